"""The vector-quantized linear module (additive codebooks: the `vq` formats, formats/vector.py)
and the switch of a model's VQ layers to integer codebooks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import layouts
from .modules import CompressedLinear, cast_weight, kernel_function


class VQLinear(CompressedLinear):
    """Vector-quantized weight (additive codebooks, formats/vector.py): row i's group j of
    group_size inputs is scale[i] * sum_m codebooks[m, codes[i, j, m]]. codes integers in [0, K)
    [out, in / g, M]; codebooks [M, K, g]; scale [out]. Kept as the kernel reads them: codes uint8
    (K <= 256) or their low 16 bits in int16; codebooks and scale float32."""

    _float32_buffers = ("codebooks", "scale")

    def __init__(self, codes: Tensor, codebooks: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        layouts.check_vq(codes, codebooks, scale)
        rows, groups, _ = codes.shape
        self.group_size = codebooks.shape[2]
        super().__init__(groups * self.group_size, rows, bias)
        stored = codes.to(torch.uint8) if codebooks.shape[1] <= 256 else codes.to(torch.int32).to(torch.int16)
        self.register_buffer("codes", stored.contiguous())
        self.register_buffer("codebooks", codebooks.to(torch.float32).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.integer = False
        self._refresh_derived_codebooks()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_derived_codebooks())

    def _refresh_derived_codebooks(self) -> None:
        # not saved: derived from the codebooks whenever they are set (construction, load_state_dict)
        half = layouts.vq_half_codebooks(self.codebooks)
        self.register_buffer("codebooks_half", half, persistent=False)
        books = layouts.vq_int8_codebooks(self.codebooks, self.unpacked_codes()) if self.integer else None
        self.register_buffer("codebooks_int8", None if books is None else books[0], persistent=False)
        self.register_buffer("position_scale", None if books is None else books[1], persistent=False)

    def use_integer_codebooks(self, on: bool = True) -> bool:
        """Compute with int8 codebooks and int8 activations (layouts.vq_int8_codebooks: 1.10-1.24x
        the half-codebook tile on a Zen 3, and a measured perplexity cost; see benchmarks/results/
        vq.md). False where the layout has no integer kernel (it then stays on float codebooks)."""
        self.integer = on
        self._refresh_derived_codebooks()
        return self.codebooks_int8 is not None

    def unpacked_codes(self) -> Tensor:
        """int32 [out, in / g, M] in [0, K)."""
        codes = self.codes.to(torch.int32)
        return codes % 65536 if self.codes.dtype == torch.int16 else codes

    def _compressed_matmul(self, x: Tensor) -> Tensor:
        integer = None if self.codebooks_int8 is None else (self.codebooks_int8, self.position_scale)
        return kernel_function("vq_mm")(x, self.codes, self.codebooks, self.scale, self.codebooks_half, integer)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return cast_weight(layouts.vq_to_dense(self.unpacked_codes(), self.codebooks, self.scale), dtype)

    def _dense_forward(self, flat: Tensor, bias: Tensor | None) -> Tensor:
        # the integer numerics at any batch (a perplexity measures the model that decodes)
        y = None if self.codebooks_int8 is None or flat.requires_grad else layouts.vq_int8_matmul(
            flat, self.unpacked_codes(), self.codebooks_int8, self.position_scale, self.scale, exact=False)
        if y is None:
            return super()._dense_forward(flat, bias)
        y = y.to(flat.dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        books, words, _ = self.codebooks.shape
        return f"{super().extra_repr()}, codebooks={books}x{words}, group_size={self.group_size}"


def use_integer_vq(model: nn.Module, on: bool = True) -> int:
    """Every VQLinear of `model` on integer codebooks (VQLinear.use_integer_codebooks), or back on
    float ones; returns how many layers now compute in integers. A decoder made before keeps its plan."""
    return sum(module.use_integer_codebooks(on) for module in model.modules() if isinstance(module, VQLinear))
