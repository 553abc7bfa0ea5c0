"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight reconstruction.

The mask is chosen during the column sweep (obs.py) from the OBS scores w^2 / U[j, j]^2 of the
current, already-compensated weights:
- unstructured: at the start of every block, over the whole block (all rows at once, as in the
  paper's Algorithm 1), pruning as many entries as keep the running total on round(sparsity * rows
  * cols_so_far); the layer total is therefore exactly round(sparsity * numel);
- n:m: at the start of every group of m columns, the n highest scores of each row's group are kept;
- row groups (mask_rows = g > 1, unstructured): consecutive output rows in groups of g share one
  mask. A group's score for a column is the sum of its rows' OBS scores (the rows are independent
  given H, so that is the OBS error of pruning the column in all of them), and the blockwise rule
  above runs on the groups; a shared mask lets the CPU kernels gather the kept activations once
  for g rows (runtime: BitmaskArgs::mask_group);
- fixed_mask: used as is.
Dead inputs (diag(H) == 0) have their weights zeroed. In unstructured mode they are always pruned
and count towards the target: the number of pruned weights is max(round(sparsity * numel),
rows * dead columns). With n:m they are pruned first (a dead weight the pattern must keep is a kept
0); a fixed mask is used as given (its kept dead weights are 0 too).
With `quant`, every kept weight is rounded to its group's grid within the same sweep (grid fitted
on the current weights when the sweep reaches the group); pruned weights stay exactly 0.
"""

from dataclasses import dataclass

from torch import Tensor

from .masks import check_nm, check_sparsity, nm_keep, prune_lowest, pruned_count
from .obs import compress
from .quant import QuantSpec


@dataclass
class SparseGPTResult:
    weight: Tensor  # pruned (and quantized) weights, dtype of W
    mask: Tensor  # bool [rows, cols], True where kept
    loss: float  # sum over rows of (w - w_hat)^T (H + damp I) (w - w_hat) / 2
    damp: float  # absolute damping added to diag(H)
    codes: Tensor | None = None  # uint8 [rows, cols] when quant is given (pruned: zero point)
    scale: Tensor | None = None  # float32 [rows, n_groups]
    zero: Tensor | None = None  # float32 [rows, n_groups]


class _BlockwiseMask:
    """Unstructured: prune the lowest scores of each block. Dead inputs (score -1) are always
    pruned and count towards round(sparsity * numel); the rest of that budget is spread over the
    live weights so that the running total stays on target after every block."""

    period = None

    def __init__(self, sparsity: float, rows: int, cols: int, dead_cols: int):
        self.live_weights = rows * (cols - dead_cols)
        self.budget = max(pruned_count(sparsity, rows * cols) - rows * dead_cols, 0)  # live ones to prune
        self.live_seen = self.live_pruned = 0

    def __call__(self, scores: Tensor, columns: Tensor) -> Tensor:
        forced = int((scores < 0).sum())
        self.live_seen += scores.numel() - forced
        # round(budget * live_seen / live_weights) in exact integer arithmetic
        target = (2 * self.budget * self.live_seen + self.live_weights) // max(2 * self.live_weights, 1)
        count = forced + target - self.live_pruned
        self.live_pruned = target
        return prune_lowest(scores.flatten(), count).reshape(scores.shape)


class _RowGroupMask:
    """Unstructured over groups of `group` consecutive rows sharing one mask (see the module doc)."""

    period = None

    def __init__(self, sparsity: float, rows: int, cols: int, dead_cols: int, group: int):
        self.group = group
        self.groups = _BlockwiseMask(sparsity, rows // group, cols, dead_cols)

    def __call__(self, scores: Tensor, columns: Tensor) -> Tensor:
        rows, span = scores.shape
        grouped = scores.reshape(rows // self.group, self.group, span).sum(1)
        return self.groups(grouped, columns).repeat_interleave(self.group, 0)


class _NMMask:
    def __init__(self, n: int, m: int):
        self.n, self.period = n, m

    def __call__(self, scores: Tensor, columns: Tensor) -> Tensor:
        return nm_keep(scores, self.n, self.period)


class _FixedMask:
    period = None

    def __init__(self, mask: Tensor):
        self.mask = mask

    def __call__(self, scores: Tensor, columns: Tensor) -> Tensor:
        return self.mask[:, columns]


def sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    percdamp: float = 0.01,
    quant: QuantSpec | None = None,
    fixed_mask: Tensor | None = None,
    mask_rows: int = 1,
) -> SparseGPTResult:
    """Prune W [rows, cols] (Linear weight, out x in) using H = 2 X X^T / n_tokens [cols, cols].

    n:m selects N:M sparsity (sparsity is then ignored); block_size is rounded down to a multiple
    of m. fixed_mask (bool, True = kept) replaces mask selection; sparsity is then ignored.
    mask_rows = g > 1 (unstructured only; rows divisible by g) shares each mask between g
    consecutive rows.
    Computes in float64 if W is float64, else float32; raises HessianError (hessian.py) if H
    cannot be made positive definite.
    """
    rows, cols = W.shape
    sparsity = check_sparsity(sparsity)
    nm = check_nm(n, m, cols)
    if mask_rows != 1:
        if not isinstance(mask_rows, int) or mask_rows < 1 or rows % mask_rows:
            raise ValueError(f"mask_rows must be a positive integer dividing the {rows} rows, got {mask_rows!r}")
        if nm or fixed_mask is not None:
            raise ValueError("mask_rows applies to unstructured masks only (not with n:m or fixed_mask)")
    if fixed_mask is not None:
        if nm:
            raise ValueError("fixed_mask cannot be combined with n:m")
        if fixed_mask.shape != W.shape:
            raise ValueError(f"fixed_mask must have shape {tuple(W.shape)}, got {tuple(fixed_mask.shape)}")
        rule = _FixedMask(fixed_mask.bool())
    elif nm:
        if quant is not None and quant.act_order:
            raise ValueError("act_order cannot be combined with n:m (groups of m must stay contiguous)")
        rule = _NMMask(n, m)
        block_size = max(m, block_size - block_size % m)
    else:
        dead_cols = int((H.diagonal() == 0).sum())  # the dead inputs of prepare_hessian
        rule = (_BlockwiseMask(sparsity, rows, cols, dead_cols) if mask_rows == 1
                else _RowGroupMask(sparsity, rows, cols, dead_cols, mask_rows))
    out = compress(W, H, block_size=block_size, percdamp=percdamp, rule=rule, spec=quant)
    return SparseGPTResult(out.weight, out.mask, out.loss, out.damp, out.codes, out.scale, out.zero)
