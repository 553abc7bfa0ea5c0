"""A vector-quantized weight as a function of trainable codebooks and scales (codes fixed): the
parametrization that block tuning (pipeline/block_tuning.py) and fine-tuning of a VQ model
(training/finetune.py) train, and the write-back of (codes, codebooks, scales) into a module's
float weight, exactly as the vq formats decode them."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.algorithms.conv import matrix_to_conv
from secateurs.runtime.layouts import vq_to_dense
from secateurs.structure import is_transposed


def stored_weight(module: nn.Module, matrix: Tensor, shape: torch.Size | None = None) -> Tensor:
    """A weight [out, in] as the module keeps it (`shape`, default its weight's): [in, out] for GPT-2's
    Conv1D, [out, in, kh, kw] for a Conv2d (columns ordered as algorithms/conv.py orders them)."""
    if isinstance(module, nn.Conv2d):
        return matrix_to_conv(matrix, module.weight.shape if shape is None else shape)
    return matrix.t() if is_transposed(module) else matrix


class VQWeight(nn.Module):
    """The weight of a vq layer from trainable codebooks [M, K, g] and scales [rows] (codes fixed)."""

    def __init__(self, module: nn.Module, codes: Tensor, codebooks: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.codebooks = nn.Parameter(codebooks.float().clone())
        self.scales = nn.Parameter(scales.float().clone())
        # read now: once parametrized, module.weight is this module's own output
        self.dtype, self.shape = module.weight.dtype, module.weight.shape
        self.layout = lambda matrix: stored_weight(module, matrix, self.shape)
        self.weight_requires_grad = module.weight.requires_grad  # restored by detach_vq_weights

    def forward(self, _original: Tensor) -> Tensor:
        return self.layout(vq_to_dense(self.codes, self.codebooks, self.scales).to(self.dtype))

    def stored(self) -> tuple[Tensor, Tensor, Tensor]:
        """(codes, codebooks, scales) rounded to float16, as the vq formats keep them."""
        return self.codes, self.codebooks.detach().to(torch.float16), self.scales.detach().to(torch.float16)


def attach_vq_weights(layers: dict[str, nn.Module], codes: dict[str, tuple]) -> dict[str, VQWeight]:
    """Parametrize each layer's weight by VQWeight(codes[name]); the float weight underneath is frozen
    (only the codebooks and scales train). Returns the parametrizations by layer name."""
    attached = {}
    for name, module in layers.items():
        parametrize.register_parametrization(module, "weight", VQWeight(module, *codes[name]))
        module.parametrizations.weight.original.requires_grad_(False)
        attached[name] = module.parametrizations.weight[0]
    return attached


def detach_vq_weights(layers: dict[str, nn.Module], codes: dict[str, tuple]) -> None:
    """Remove the parametrizations and give each layer the weight codes[name] decodes to."""
    for name, module in layers.items():
        requires_grad = module.parametrizations.weight[0].weight_requires_grad
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.requires_grad_(requires_grad)
        set_vq_weight(module, codes[name])


def set_vq_weight(module: nn.Module, codes: tuple) -> None:
    """Give `module` the weight (codes, codebooks, scales) decode to."""
    module.weight.data.copy_(stored_weight(module, vq_to_dense(*codes).to(module.weight.dtype)))
