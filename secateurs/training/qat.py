"""Quantization-aware training: the forward pass sees each kept weight rounded onto its fixed grid
(scale, zero per row and group, as GPTQ/RTN stored them); the backward pass is straight-through.

The grid stays fixed (the one the stored format will hold), so after training the weights are
exactly on it and save_compressed writes them without a second rounding. The float weights
underneath keep accumulating small updates that move a weight to a neighbouring code once they
cross a rounding boundary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.algorithms.quant import fake_quantize
from secateurs.errors import SecateursError
from secateurs.formats import StoragePlan
from secateurs.structure import is_transposed, out_features


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale, zero, bits):
        # the returned value is exactly the grid point (w + (q - w).detach() would not be, in floats)
        return fake_quantize(weight, scale, zero, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class FakeQuant(nn.Module):
    """A parametrization of a weight [out, in] (or Conv1D's [in, out]) onto a fixed grid."""

    def __init__(self, scale: Tensor, zero: Tensor, bits: int, transposed: bool):
        super().__init__()
        self.bits, self.transposed = bits, transposed
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)
        self.register_buffer("zero", zero.to(torch.float32), persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        # the weight viewed as [out, groups, group size] against [out, groups, 1] grids: no per-column
        # copies of the scale and zero (two more weight-sized tensors on every forward)
        oriented = weight.t() if self.transposed else weight
        rows, cols = oriented.shape
        groups = self.scale.shape[1]
        grouped = oriented.float().reshape(rows, groups, cols // groups)
        scale, zero = self.scale.to(weight.device)[..., None], self.zero.to(weight.device)[..., None]
        quantized = _StraightThrough.apply(grouped, scale, zero, self.bits).reshape(rows, cols).to(weight.dtype)
        return quantized.t() if self.transposed else quantized


def grid_bits(zero: Tensor) -> int:
    """Bits of a symmetric grid from its zero point 2**(bits - 1)."""
    value = float(zero.flatten()[0])
    bits = int(math.log2(value)) + 1 if value >= 1 else 0
    if not 2 <= bits <= 8 or not bool((zero == 2 ** (bits - 1)).all()):
        raise SecateursError("the grid is not symmetric: pass its bits explicitly")
    return bits


def attach_fake_quant(layers: dict[str, nn.Module], plan_or_grids, bits: int | None = None) -> list[str]:
    """Put every layer that has a grid in the plan (a StoragePlan or {layer: (scale, zero)}) under
    fake quantization; returns their names. The weights are projected onto the grid's float
    values first, so a model already quantized on that grid is unchanged."""
    plan = StoragePlan.of(plan_or_grids)
    missing = sorted(set(plan.grids) - set(layers))
    if missing:
        raise SecateursError(f"the quantization grids name layers the model does not have, e.g. {missing[0]}")
    for name, (scale, zero) in plan.grids.items():
        module = layers[name]
        rows = out_features(module)
        cols = module.weight.numel() // rows
        if scale.dim() != 2 or scale.shape[0] != rows or cols % scale.shape[1] or zero.shape != scale.shape:
            raise SecateursError(f"layer {name}: grid of shape {tuple(scale.shape)} does not fit the weight")
        parametrize.register_parametrization(
            module, "weight", FakeQuant(scale, zero, bits or grid_bits(zero), is_transposed(module)))
    return sorted(plan.grids)


def weight_parameter(module: nn.Module) -> nn.Parameter:
    """The trainable weight of a layer, under a fake-quant parametrization or not."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def bake_fake_quant(layers: dict[str, nn.Module]) -> None:
    """Replace each fake-quantized weight by its grid values (exactly on the grid), for export."""
    for module in layers.values():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
