"""Argument checks and exact-count mask selection shared by the pruning algorithms.

Masks are bool tensors that are True where a weight is KEPT.
"""

import math

import torch
from torch import Tensor


def check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity <= 1:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return float(sparsity)


def check_nm(n: int, m: int, cols: int) -> bool:
    """True for an N:M pattern (n kept of every m consecutive columns), False for n = m = 0."""
    if n == 0 and m == 0:
        return False
    if not 0 < n < m:
        raise ValueError(f"n:m must satisfy 0 < n < m, got n:m = {n}:{m}")
    if cols % m:
        raise ValueError(f"n:m = {n}:{m} needs the column count {cols} to be divisible by m")
    return True


def pruned_count(sparsity: float, total: int) -> int:
    """round(sparsity * total), halves rounded up (Python's round() would round them to even)."""
    return int(math.floor(sparsity * total + 0.5))


def prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask pruning exactly the k lowest scores along the last dim; among scores equal to the
    k-th lowest, the lowest indices are pruned first. (A selection, not a sort: ~8x faster.)"""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values
    below, tied = scores < kth, scores == kth
    still_needed = k - below.sum(dim=-1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(dim=-1) <= still_needed)))


def nm_keep(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the n highest scores of every m consecutive columns of [rows, cols]."""
    rows, cols = scores.shape
    return prune_lowest(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)
