"""The Optimal-Brain-Surgeon column sweep shared by SparseGPT and GPTQ.

Columns are fixed one at a time in sweep order: column j gets its compressed value q (pruned to 0
and/or rounded to the grid) and the error e = (w_j - q) / U[j, j] is compensated on the later
columns by -e * U[j, j:], U being the upper Cholesky factor of H^-1 (see hessian.py). Each step is
the exact optimum of the quadratic objective over the columns not fixed yet, so the loss it adds,
e^2 / 2 per row, sums to the final (W - W_hat) (H + damp I) (W - W_hat)^T / 2 (summed over rows;
W with its dead columns already zeroed).
Updates are applied eagerly inside a block of columns and lazily, as one matmul, to the columns
after the block.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from .hessian import prepare_hessian
from .quant import QuantSpec, fake_quantize, fit_grid, group_count, group_index, quantize_codes


# A faster implementation of _fix_columns with the same arguments plus `fallback` (the torch twin to
# run where it cannot): the engine installs the native kernel (runtime.kernels.obs_span), so this
# module needs no C++ library. None: the torch loop.
span_kernel: Callable[..., None] | None = None


def use_span_kernel(kernel: Callable[..., None] | None) -> Callable[..., None] | None:
    """Install the span kernel the sweeps use (None: the torch loop); returns the previous one."""
    global span_kernel
    previous, span_kernel = span_kernel, kernel
    return previous


class MaskRule(Protocol):
    """Chooses the kept weights of a span of columns from their OBS scores w^2 / U[j, j]^2.

    `period` None: called once per block with the whole block; an int p: called with the p columns
    starting at every multiple of p (blocks are aligned to p). Dead columns get score -1.
    `columns` are the original indices of the span's columns.
    """

    period: int | None

    def __call__(self, scores: Tensor, columns: Tensor) -> Tensor: ...


@dataclass
class SweepOutput:
    weight: Tensor  # dtype of W, original column order
    mask: Tensor | None  # bool kept mask, None without a MaskRule
    codes: Tensor | None  # uint8 [rows, cols], None without a QuantSpec
    scale: Tensor | None  # float32 [rows, n_groups], original column groups
    zero: Tensor | None
    loss: float
    damp: float


class _StaticGroupGrid:
    """Grid of each (row, group), fitted on the current weights when the sweep first reaches any
    column of the group. Groups are original-order column runs, so act-order needs no g_idx."""

    def __init__(self, spec: QuantSpec, rows: int, order: Tensor, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self.group_at = group_index(len(order), spec.group_size).to(order.device)[order]  # sweep position -> group
        self.group_list = self.group_at.tolist()
        # run_end[p]: the first sweep position after p in a different group (act-order interleaves groups)
        self.run_end = list(range(1, len(order) + 1))
        for position in range(len(order) - 2, -1, -1):
            if self.group_list[position] == self.group_list[position + 1]:
                self.run_end[position] = self.run_end[position + 1]
        n_groups = group_count(len(order), spec.group_size)
        self.scale = torch.zeros(rows, n_groups, device=order.device)
        self.zero = torch.zeros(rows, n_groups, device=order.device)
        self.fitted: dict[int, tuple[Tensor, Tensor]] = {}  # group -> scale, zero in work dtype

    def at(self, position: int, current: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Scale and zero [rows] of the group at a sweep position, fitted now if this is its first."""
        group = self.group_list[position]
        if group not in self.fitted:
            members = (self.group_at == group).nonzero().squeeze(1)
            scale, zero = fit_grid(current(members), self.spec)
            self.scale[:, group], self.zero[:, group] = scale, zero
            self.fitted[group] = scale.to(self.dtype).contiguous(), zero.to(self.dtype).contiguous()
        return self.fitted[group]


def compress(
    W: Tensor,
    H: Tensor,
    *,
    block_size: int,
    percdamp: float,
    rule: MaskRule | None = None,
    spec: QuantSpec | None = None,
) -> SweepOutput:
    """Prune (rule) and/or quantize (spec) W [rows, cols] given H [cols, cols] in one OBS sweep."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rows, cols = W.shape
    permuted = spec is not None and spec.act_order
    if permuted:
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        H, W_sweep = H.index_select(0, order).index_select(1, order), W.index_select(1, order)
    else:
        order, W_sweep = torch.arange(cols, device=W.device), W
    prepared = prepare_hessian(H, W_sweep, percdamp)
    weight_t = prepared.weight.T.contiguous()
    grid = _StaticGroupGrid(spec, rows, order, weight_t.dtype) if spec is not None else None
    keep_t, loss = _sweep(weight_t, prepared.hinv_chol, prepared.dead, order, block_size, rule, grid)

    if permuted:
        inverse = torch.argsort(order)  # sweep position of each original column
        weight_t = weight_t[inverse]
        keep_t = None if keep_t is None else keep_t[inverse]
    weight = weight_t.T.contiguous()
    mask = None if keep_t is None else keep_t.T.contiguous()
    codes = scale = zero = None
    if grid is not None:
        # Every weight is exactly scale * (integer - zero), so rounding recovers its code; pruned
        # weights (0) get the zero point.
        scale, zero = grid.scale, grid.zero
        groups = group_index(cols, spec.group_size).to(W.device)
        codes = quantize_codes(weight, scale[:, groups], zero[:, groups], spec.bits)
    return SweepOutput(weight.to(W.dtype), mask, codes, scale, zero, loss, prepared.damp)


def _sweep(weight_t, hinv_chol, dead, order, block_size, rule, grid) -> tuple[Tensor | None, float]:
    """Run the sweep in place on weight_t = W^T [cols, rows] in sweep order; returns the kept mask
    (transposed too) and the loss. Column j of W is the contiguous row j of weight_t, which makes
    the per-column rank-1 updates about 3x faster than on W itself. Each block is fixed in spans
    of columns sharing one mask decision and one grid, by the native kernel when it is built."""
    cols, rows = weight_t.shape
    keep_t = torch.ones(cols, rows, dtype=torch.bool, device=weight_t.device) if rule is not None else None
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = weight_t[i1:i2].clone()  # up to date: received all earlier lazy updates
        errors = torch.zeros_like(block)  # (w - q) / U[j, j] of the block's columns
        hinv = hinv_chol[i1:i2, i1:i2]
        i = 0
        while i < i2 - i1:
            j = i1 + i
            end = i2 - i1  # the span ends before the next mask selection or grid change
            if rule is not None:
                span = _selection_span(rule, i, j, i2)
                if span:
                    scores = (block[i : i + span] / hinv.diagonal()[i : i + span, None]).square()
                    scores[dead[j : j + span]] = -1  # dead inputs are pruned first
                    keep_t[j : j + span] = rule(scores.T, order[j : j + span]).T
                if rule.period is not None:
                    end = min(end, i - j % rule.period + rule.period)
            scale = zero = None
            if grid is not None:
                scale, zero = grid.at(j, partial(_current, weight_t, block, errors, hinv_chol, i1, i))
                end = min(end, grid.run_end[j] - i1)
            keep = None if keep_t is None else keep_t[j : i1 + end]
            bits = grid.spec.bits if grid is not None else 1
            torch_span = partial(_fix_columns, block, errors, hinv, i, end, keep, scale, zero, bits)
            if span_kernel is None:
                torch_span()
            else:
                span_kernel(block, errors, hinv, i, end, keep, scale, zero, 2**bits - 1, fallback=torch_span)
            i = end
        weight_t[i1:i2] = block
        weight_t[i2:].addmm_(hinv_chol[i1:i2, i2:].T, errors, alpha=-1)
        loss += errors.square().sum().item() / 2
    return keep_t, loss


def _fix_columns(block, errors, hinv, begin, end, keep, scale, zero, bits) -> None:
    """Torch twin of the native span kernel: fix columns [begin, end) of the block one at a time,
    each to its grid point (scale/zero) or to 0 where not kept, compensating the later columns."""
    diag = hinv.diagonal()
    for i in range(begin, end):
        w = block[i]
        q = w if scale is None else fake_quantize(w, scale, zero, bits)
        if keep is not None:
            q = torch.where(keep[i - begin], q, 0.0)
        error = torch.sub(w, q, out=errors[i]).div_(diag[i])
        block[i + 1 :].addr_(hinv[i, i + 1 :], error, alpha=-1)
        block[i] = q  # exactly 0 / on the grid


def _selection_span(rule: MaskRule, i: int, j: int, i2: int) -> int:
    """Number of columns whose mask is chosen at sweep position j (i inside the block), or 0."""
    if rule.period is None:
        return i2 - j if i == 0 else 0
    return rule.period if j % rule.period == 0 else 0


def _current(weight_t, block, errors, hinv_chol, i1, i, positions: Tensor) -> Tensor:
    """Current values [rows, len(positions)] of the not-yet-fixed columns at sweep `positions`
    (all >= i1 + i): those in the block are up to date, later ones still miss the block's pending
    lazy update."""
    i2 = i1 + block.shape[0]
    inside, beyond = positions[positions < i2], positions[positions >= i2]
    pending = hinv_chol[i1 : i1 + i, beyond].T @ errors[:i]
    return torch.cat([block[inside - i1], weight_t[beyond] - pending]).T
