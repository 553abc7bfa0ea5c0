"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2 within each output row, no weight update."""

from dataclasses import dataclass

import torch
from torch import Tensor

from .hessian import work_dtype
from .masks import check_nm, check_sparsity, nm_keep, prune_lowest, pruned_count


@dataclass
class WandaResult:
    mask: Tensor  # bool [rows, cols], True where kept
    weight: Tensor  # W with the pruned weights set to 0, dtype of W


def wanda_scores(W: Tensor, col_norm: Tensor) -> Tensor:
    """|W_ij| * col_norm_j, where col_norm [cols] is the L2 norm of input feature j over all
    calibration tokens: sqrt(sum_t x_tj^2). Any positive multiple ranks the same, so
    sqrt(diag(H)) of H = 2 X X^T / n works too."""
    if col_norm.shape != (W.shape[1],):
        raise ValueError(f"col_norm must have shape ({W.shape[1]},), got {tuple(col_norm.shape)}")
    dtype = work_dtype(W)
    return W.to(dtype).abs() * col_norm.to(dtype)


def wanda_mask(W: Tensor, col_norm: Tensor, sparsity: float, n: int = 0, m: int = 0) -> WandaResult:
    """Prune exactly round(sparsity * cols) weights per output row by Wanda score, or keep the n
    highest scores of every m consecutive columns (n:m given; sparsity is then ignored)."""
    scores = wanda_scores(W, col_norm)
    if check_nm(n, m, W.shape[1]):
        mask = nm_keep(scores, n, m)
    else:
        mask = prune_lowest(scores, pruned_count(check_sparsity(sparsity), W.shape[1]))
    return WandaResult(mask, torch.where(mask, W, 0.0))
