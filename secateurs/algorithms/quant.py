"""Uniform affine quantization grids (see docs/formats.md) and the round-to-nearest baseline.

A weight of row r in group g is stored as a code q in [0, 2**bits - 1] with
w_hat = scale[r, g] * (q - zero[r, g]); scale and zero are float32, zero holds an integer.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .hessian import work_dtype

# Range shrink factors tried by the MSE clip search: 1.0, 0.95, ..., 0.2.
CLIP_FACTORS = tuple(k / 20 for k in range(20, 3, -1))


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None  # None (or -1): one group per row
    act_order: bool = False  # GPTQ: sweep columns by decreasing diag(H), groups stay static
    mse_clip: bool = False  # search a shrunk range per (row, group) minimising squared error

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        size = self.group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"group_size must be a positive int, None or -1, got {size!r}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1


def group_count(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(cols / group_size)


def group_index(cols: int, group_size: int | None) -> Tensor:
    """[cols] int64: the group of each column in the original order (j // group_size)."""
    columns = torch.arange(cols)
    return torch.zeros_like(columns) if group_size is None else columns // group_size


def _grid_from_range(low: Tensor, high: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale/zero (float32) of the grid covering [low, high] per row; low <= 0 <= high."""
    if spec.symmetric:
        # As in GPTQ: the codes span [-amax, amax] with zero point 2**(bits-1).
        scale = 2 * torch.maximum(-low, high) / spec.max_code
    else:
        scale = (high - low) / spec.max_code
    # An all-zero row would give scale 0 (then NaN codes); any positive scale maps it to exact zeros.
    scale = torch.where(scale > 0, scale, 1.0).float()
    if spec.symmetric:
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        zero = torch.round(-low / scale).clamp(0, spec.max_code).float()
    return scale, zero


def fit_grid(w_block: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero (float32 [rows]) of the grid for each row of `w_block` [rows, cols].

    The range is min/max of the row widened to include 0 (so pruned weights are representable).
    With `spec.mse_clip` the range is also shrunk by each of CLIP_FACTORS and the factor with the
    smallest plain squared reconstruction error of the row is kept (ties: the widest range).
    """
    low = w_block.min(dim=1).values.clamp(max=0)
    high = w_block.max(dim=1).values.clamp(min=0)
    scale, zero = _grid_from_range(low, high, spec)
    if not spec.mse_clip:
        return scale, zero
    best_error = torch.full_like(low, math.inf)
    for factor in CLIP_FACTORS:
        trial_scale, trial_zero = _grid_from_range(low * factor, high * factor, spec)
        error = (fake_quantize(w_block, trial_scale[:, None], trial_zero[:, None], spec.bits) - w_block)
        error = error.square().sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, trial_scale, scale)
        zero = torch.where(better, trial_zero, zero)
    return scale, zero


def _rounded_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """uint8 codes of `w`; scale/zero must broadcast against it (e.g. [rows, 1] for a group)."""
    return _rounded_codes(w, scale, zero, bits).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """scale * (codes - zero), computed in `dtype` (float64 makes the product exact)."""
    return scale.to(dtype) * (codes.to(dtype) - zero.to(dtype))


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Nearest grid point of each weight, in the dtype of `w` (quantize then dequantize)."""
    return scale * (_rounded_codes(w, scale, zero, bits) - zero)


class RTNResult(NamedTuple):
    weight: Tensor  # dequantized, dtype of W
    codes: Tensor  # uint8 [rows, cols]
    scale: Tensor  # float32 [rows, n_groups]
    zero: Tensor  # float32 [rows, n_groups]


def round_to_nearest(W: Tensor, spec: QuantSpec) -> RTNResult:
    """Round-to-nearest baseline: fit each group's grid on W and round every weight independently."""
    cols = W.shape[1]
    work = W.to(work_dtype(W))
    size = spec.group_size or cols
    grids = [fit_grid(work[:, start : start + size], spec) for start in range(0, cols, size)]
    scale = torch.stack([s for s, _ in grids], dim=1)
    zero = torch.stack([z for _, z in grids], dim=1)
    groups = group_index(cols, spec.group_size).to(W.device)
    codes = quantize_codes(work, scale[:, groups], zero[:, groups], spec.bits)
    weight = dequantize(codes, scale[:, groups], zero[:, groups], work.dtype).to(W.dtype)
    return RTNResult(weight, codes, scale, zero)
