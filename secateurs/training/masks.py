"""Sparsity masks held fixed (or tightened) while a pruned model trains.

A mask is a bool tensor, True where a weight is KEPT, one per pruned linear layer of the decoder
blocks. Enforcement has three parts, because each alone leaks: the gradients of pruned weights are
zeroed before the optimizer step (so Adam's moments never see them), their Adam moments are zeroed
(so momentum built before a mask tightened cannot move them), and the weights are set to exactly 0
after the step (AdamW's decay of 0 is 0, but a rounding path or a pruning step must not leave
residue). `check` verifies the sparsity and N:M pattern exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.algorithms.masks import check_nm
from secateurs.errors import SecateursError
from secateurs.structure import find_blocks, linear_layers
from secateurs.training.qat import weight_parameter


def block_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder blocks, by full module name."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{index}.{name}": module
            for index, block in enumerate(blocks) for name, module in linear_layers(block).items()}


def _oriented(keep: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A mask in [out, in] orientation (Conv1D stores [in, out])."""
    return keep if isinstance(module, nn.Linear) else keep.t()


def unit_view(tensor: torch.Tensor, module: nn.Module, across_rows: bool = False) -> torch.Tensor:
    """A layer's weight-shaped tensor (weight, mask, gradient) as block pruning ranks it: rows whose
    consecutive entries form the pruning units. By default the [out, in] rows (a unit is consecutive
    weights of one output row: oBERT's 4-blocks); `across_rows`, the [in, out] transpose (a unit is
    consecutive output rows of one input column, so rows in groups share their masks: the layout
    the batched sparse kernel multiplies four rows at a time). A view; from_unit_view inverts it."""
    oriented = _oriented(tensor, module)
    return oriented.t() if across_rows else oriented


def from_unit_view(view: torch.Tensor, module: nn.Module, across_rows: bool = False) -> torch.Tensor:
    """The storage-oriented tensor of a unit_view (both steps are transposes: their own inverses)."""
    return _oriented(view.t() if across_rows else view, module)


@dataclass
class MaskSet:
    """Keep-masks of pruned layers (in each weight's own storage orientation) and their N:M."""

    layers: dict[str, nn.Module]
    keep: dict[str, torch.Tensor]
    nm: dict[str, tuple[int, int]] = field(default_factory=dict)

    def parameters(self):
        """(weight parameter, keep-mask) pairs."""
        return [(weight_parameter(self.layers[name]), keep) for name, keep in self.keep.items()]

    def to(self, device) -> MaskSet:
        self.keep = {name: keep.to(device) for name, keep in self.keep.items()}
        return self

    @torch.no_grad()
    def apply(self) -> None:
        """Pruned weights exactly 0."""
        for weight, keep in self.parameters():
            weight.mul_(keep.to(weight.device))

    @torch.no_grad()
    def zero_gradients(self) -> None:
        for weight, keep in self.parameters():
            if weight.grad is not None:
                weight.grad.mul_(keep.to(weight.grad.device))

    @torch.no_grad()
    def zero_moments(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-weight optimizer buffer (Adam's exp_avg, exp_avg_sq) at pruned weights."""
        for weight, keep in self.parameters():
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.mul_(keep.to(value.device))

    def set(self, name: str, keep: torch.Tensor) -> None:
        """Replace one layer's mask (a pruning step during training); weights follow at `apply`."""
        if keep.shape != self.keep[name].shape:
            raise SecateursError(f"layer {name}: mask of shape {tuple(keep.shape)} for a weight of shape {tuple(self.keep[name].shape)}")
        self.keep[name] = keep.to(torch.bool).contiguous()  # checkpoints store it

    def sparsity(self) -> float:
        """Fraction of pruned weights over the masked layers."""
        total = sum(keep.numel() for keep in self.keep.values())
        return sum(int((~keep).sum()) for keep in self.keep.values()) / total if total else 0.0

    @torch.no_grad()
    def check(self) -> dict:
        """Verify exactly that every pruned weight is 0 and every N:M layer keeps at most n of each m;
        returns {"sparsity": zeros over the masked layers, "masked": pruned fraction by the masks}."""
        zeros = total = 0
        for name, keep in self.keep.items():
            weight = weight_parameter(self.layers[name])
            keep = keep.to(weight.device)
            nonzero = weight != 0
            revived = nonzero & ~keep  # elementwise: indexing by ~keep cost a nonzero() per layer, 1-3 s a check
            if bool(revived.any()):
                raise SecateursError(f"layer {name}: {int(revived.sum())} pruned weight(s) are not 0")
            if name in self.nm:
                n, m = self.nm[name]
                rows_cols = _oriented(weight, self.layers[name])
                groups = (rows_cols != 0).reshape(rows_cols.shape[0], -1, m).sum(dim=-1)
                if bool((groups > n).any()):
                    raise SecateursError(f"layer {name}: {int((groups > n).sum())} group(s) break the {n}:{m} pattern")
            zeros += weight.numel() - int(nonzero.sum())
            total += weight.numel()
        return {"sparsity": zeros / total if total else 0.0, "masked": self.sparsity()}


def masks_from_zeros(model: nn.Module, nm: tuple[int, int] | dict[str, tuple[int, int]] | None = None,
                     layers: dict[str, nn.Module] | None = None) -> MaskSet:
    """Masks from the zeros of a pruned model's block linear layers (a layer with no zeros is left
    dense and free). `nm` — one (n, m) for every layer or {layer: (n, m)}, as in a StoragePlan —
    is verified now and at every `check`. A model with no zeros at all is an error."""
    layers = block_linear_layers(model) if layers is None else layers
    keep = {name: weight_parameter(module).detach() != 0 for name, module in layers.items()}
    keep = {name: mask for name, mask in keep.items() if not bool(mask.all())}
    if not keep:
        raise SecateursError("the model has no zero weights in its linear layers: nothing to keep pruned "
                             "(prune it first, e.g. secateurs oneshot --recipe sparsegpt-50)")
    per_layer = nm if isinstance(nm, dict) else {name: tuple(nm) for name in keep} if nm else {}
    masks = MaskSet({name: layers[name] for name in keep}, keep, {})
    for name, (n, m) in per_layer.items():
        if name not in masks.keep:
            raise SecateursError(f"layer {name}: an {n}:{m} pattern was given but the layer has no zeros")
        try:
            check_nm(n, m, _oriented(masks.keep[name], layers[name]).shape[1])
        except ValueError as exc:
            raise SecateursError(f"layer {name}: {exc}") from None
        masks.nm[name] = (int(n), int(m))
    masks.check()
    return masks


def open_masks(model: nn.Module) -> MaskSet:
    """All-kept masks over every block linear layer, for pruning that starts during training."""
    layers = block_linear_layers(model)
    return MaskSet(layers, {name: torch.ones_like(weight_parameter(module), dtype=torch.bool)
                            for name, module in layers.items()})
