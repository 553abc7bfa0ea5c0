"""Codes for fixed codebooks by a GPTQ-style sweep with error feedback (as GPTVQ, van Baalen et al.
2024, does for vector quantization).

The groups of g columns are coded left to right. Coding group S of every row changes the loss
1/2 tr(dW H dW^T) least, given the columns before S already fixed and the ones after still free to
move, when the code minimizes ||(w_S - q_S) U_SS^-1||^2, U the upper Cholesky factor of H^-1; the
free columns R after S then take the optimal correction

    w_R <- w_R - (w_S - q_S) U_SS^-1 U_SR ,

the block form of GPTQ's update (U_SS^-1 U_SR = [H^-1 restricted to the free columns]_SS^-1 [.]_SR).
Where inputs are strongly correlated, as in the channels of an image model's activations, coding
each group knowing how the rest will compensate finds codes a search from nearest-codeword codes
does not reach: the alternation in vq.py then starts from these codes.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .hessian import prepare_hessian

# Below this many codeword combinations a group's code is found by trying every one.
EXHAUSTIVE_COMBINATIONS = 4096
# Passes over the codebooks when the combinations are too many (each codebook re-chosen given the others).
COORDINATE_PASSES = 3


def error_feedback_codes(W: Tensor, H: Tensor, codebooks: Tensor, scales: Tensor, percdamp: float = 0.01,
                         act_order: bool = False) -> Tensor:
    """int64 codes [rows, cols / g, M] for W [rows, cols] given codebooks [M, 2**B, g] and row scales
    [rows], by the sweep above (H damped by percdamp * mean(diag H) to factor it). With `act_order`
    the groups are swept by decreasing sum of diag(H) over their columns (GPTQ's activation order,
    at the granularity of whole groups, so the stored layout is unchanged): the most activated
    groups are coded while the most columns can still compensate them."""
    books, words, g = codebooks.shape
    if not act_order:
        return _sweep(W, H, codebooks, scales, percdamp)
    order = H.diagonal().reshape(-1, g).sum(1).argsort(descending=True)
    columns = (order[:, None] * g + torch.arange(g)).flatten()
    swept = _sweep(W[:, columns], H[columns][:, columns], codebooks, scales, percdamp)
    codes = torch.empty_like(swept)
    codes[:, order] = swept
    return codes


def _sweep(W: Tensor, H: Tensor, codebooks: Tensor, scales: Tensor, percdamp: float) -> Tensor:
    rows, cols = W.shape
    books, words, g = codebooks.shape
    prepared = prepare_hessian(H, W, percdamp)
    U, work = prepared.hinv_chol, prepared.weight  # work: W with dead inputs zeroed, in the work dtype
    codebooks, scales = codebooks.to(work.dtype), scales.to(work.dtype)
    table = _combinations(books, words) if words**books <= EXHAUSTIVE_COMBINATIONS else None
    sums = codebooks[torch.arange(books)[:, None], table.T].sum(0) if table is not None else None  # [combos, g]
    codes = torch.empty(rows, cols // g, books, dtype=torch.long)
    for group, start in enumerate(range(0, cols, g)):
        block = slice(start, start + g)
        to_metric = torch.linalg.inv(U[block, block])  # upper triangular g x g
        target = work[:, block] / scales[:, None]  # in codebook units
        if table is not None:
            chosen = _nearest_rows(target @ to_metric, sums @ to_metric)
            codes[:, group] = table[chosen]
        else:
            codes[:, group] = _coordinate_codes(target, codebooks, to_metric)
        coded = scales[:, None] * codebooks[torch.arange(books), codes[:, group]].sum(1)
        error = (work[:, block] - coded) @ to_metric
        work[:, start + g:] -= error @ U[block, start + g:]
    return codes


def _combinations(books: int, words: int) -> Tensor:
    """[words**books, books]: every tuple of one codeword index per codebook."""
    return torch.tensor(list(itertools.product(range(words), repeat=books)), dtype=torch.long)


def _nearest_rows(points: Tensor, centers: Tensor) -> Tensor:
    """For each row i, argmin_c ||points_i - c||^2 (a row's scale multiplies both sides of its
    distances, so it does not move the minimizer)."""
    distances = torch.addmm(centers.square().sum(1)[None, :], points, centers.T, alpha=-2)
    return distances.argmin(1)


def _coordinate_codes(target: Tensor, codebooks: Tensor, to_metric: Tensor) -> Tensor:
    """[rows, M] codes by residual coding, then COORDINATE_PASSES passes re-choosing each codebook's
    word given the others, all in the metric of `to_metric`."""
    books = codebooks.shape[0]
    mapped = codebooks @ to_metric  # [M, words, g]
    goal = target @ to_metric
    codes = torch.zeros(target.shape[0], books, dtype=torch.long)
    residual = goal.clone()
    for m in range(books):
        codes[:, m] = _nearest_rows(residual, mapped[m])
        residual -= mapped[m][codes[:, m]]
    for _ in range(COORDINATE_PASSES):
        for m in range(books):
            residual += mapped[m][codes[:, m]]
            codes[:, m] = _nearest_rows(residual, mapped[m])
            residual -= mapped[m][codes[:, m]]
    return codes
