"""The `vq` format: a vector-quantized Linear weight (algorithms/vq.py) in the tensors the `aqlm`
inference package loads into its QuantizedLinear (out_group_size 1):

    <layer>.codes      int8 [rows, cols / g, M] for codebooks of up to 2**8 words (int16 up to 2**16):
                       the code k stored as k - 2**B when k >= 2**(B-1), as aqlm packs it
    <layer>.codebooks  float16 [M, 2**B, 1, g]
    <layer>.scales     float16 [rows, 1, 1, 1]

and W[i, group j] = scales[i] * sum_m codebooks[m, codes[i, j, m], 0]. LayerSpec records M
(`codebooks`), B (`bits`) and g (`group_size`).

`vq-packed` is the same with codebooks whose codes are not whole bytes (2**B words, B not 8 or 16),
where a byte or two per code would waste bits (the small layers of diffusion UNets, whose own
codebooks must be small to pay for themselves, or one codebook of 2**12 words shared by all layers):

    <layer>.codes      int32 [rows, packed_words(cols / g * M, B)]: each row's codes, in the order of
                       codes[i].flatten() (group major, codebook minor), bit-packed as formats/packing.py

aqlm has no such layout; its tensors are otherwise aqlm's. The codebooks and scales are float16 in every model
dtype: the quantizer rounds them to float16, so the file is exact; the dense weight is decoded in
float32 and cast to the layer's dtype, as the engine computed it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from secateurs.errors import FormatError
from secateurs.formats.packing import pack_bits, packed_words, padding_is_zero, unpack_bits
from secateurs.runtime import VQLinear
from secateurs.runtime.layouts import vq_to_dense

VALUE_DTYPE = torch.float16


def code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes in [0, 2**bits) -> aqlm's signed storage."""
    codes = codes.to(torch.int32)
    return torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes).to(code_dtype(bits))


def unpack_codes(stored: Tensor, bits: int) -> Tensor:
    """aqlm's signed storage -> int32 codes in [0, 2**bits)."""
    return stored.to(torch.int32) % 2**bits


class VQFormat:
    quantized = True  # codes, not float weights: nothing to fine-tune in place

    def __init__(self, packed: bool = False):
        self.packed = packed
        self.name = "vq-packed" if packed else "vq"

    def spec_problem(self, spec) -> str | None:
        if spec.n is not None or spec.m is not None:
            return "n and m belong to the nm layout, not vq"
        if spec.codebooks is None or not 1 <= spec.codebooks <= 16:
            return f"codebooks must be 1..16 for format vq, got {spec.codebooks}"
        if spec.bits is None or not 1 <= spec.bits <= (15 if self.packed else 16):
            return f"bits must be 1..{15 if self.packed else 16} for format {self.name}, got {spec.bits}"
        if spec.group_size is None or spec.cols % spec.group_size:
            return f"group_size {spec.group_size} does not divide cols = {spec.cols}"
        return None

    def compressed_tensors_names(self, spec) -> None:
        return None  # compressed-tensors has no vector quantization

    def expected_tensors(self, spec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        per_row = spec.cols // spec.group_size * spec.codebooks
        return {
            "codes": (torch.int32, (spec.rows, packed_words(per_row, spec.bits))) if self.packed else
                     (code_dtype(spec.bits), (spec.rows, spec.cols // spec.group_size, spec.codebooks)),
            "codebooks": (VALUE_DTYPE, (spec.codebooks, 2**spec.bits, 1, spec.group_size)),
            "scales": (VALUE_DTYPE, (spec.rows, 1, 1, 1)),
        }

    def encode_codes(self, codes: Tensor, codebooks: Tensor, scales: Tensor, spec) -> dict[str, Tensor]:
        """The stored tensors of (codes [rows, cols/g, M], codebooks [M, 2**B, g], scales [rows])."""
        stored = pack_bits(codes.reshape(spec.rows, -1), spec.bits) if self.packed else pack_codes(codes, spec.bits)
        return {
            "codes": stored.contiguous(),
            "codebooks": codebooks.to(VALUE_DTYPE).reshape(spec.codebooks, 2**spec.bits, 1, spec.group_size).contiguous(),
            "scales": scales.to(VALUE_DTYPE).reshape(spec.rows, 1, 1, 1).contiguous(),
        }

    def validate(self, layer: str, tensors: dict[str, Tensor], spec) -> None:
        def fail(suffix: str, message: str):
            raise FormatError(f"tensor {layer}.{suffix}: {message}")

        for suffix, (dtype, shape) in self.expected_tensors(spec).items():
            if suffix not in tensors:
                fail(suffix, "missing (format vq)")
            if tensors[suffix].dtype != dtype:
                fail(suffix, f"has dtype {tensors[suffix].dtype}, expected {dtype}")
            if tuple(tensors[suffix].shape) != shape:
                fail(suffix, f"has shape {tuple(tensors[suffix].shape)}, expected {shape}")
        if self.packed:  # every B-bit code is a word of the codebook; only the padding can be wrong
            if not padding_is_zero(tensors["codes"], spec.bits, spec.cols // spec.group_size * spec.codebooks):
                fail("codes", "has nonzero padding bits after the last code of a row")
        else:
            codes = tensors["codes"].to(torch.int32)  # compared with 2**(B-1) = 128 an int8 tensor would wrap
            if bool(((codes < -(2 ** (spec.bits - 1))) | (codes >= 2 ** (spec.bits - 1))).any()):
                fail("codes", f"holds a code outside the {2**spec.bits} words of a codebook")
        for suffix in ("codebooks", "scales"):
            if not bool(tensors[suffix].isfinite().all()):
                fail(suffix, "holds NaN or infinite values")

    def parts(self, tensors: dict[str, Tensor], spec) -> tuple[Tensor, Tensor, Tensor]:
        """(int32 codes [rows, cols/g, M], float32 codebooks [M, 2**B, g], float32 scales [rows])."""
        groups = spec.cols // spec.group_size
        codes = unpack_bits(tensors["codes"], spec.bits, groups * spec.codebooks).to(torch.int32).reshape(
            spec.rows, groups, spec.codebooks) if self.packed else unpack_codes(tensors["codes"], spec.bits)
        return (codes, tensors["codebooks"].float().flatten(2),
                tensors["scales"].float().flatten())

    def decode(self, tensors: dict[str, Tensor], spec) -> Tensor:
        return vq_to_dense(*self.parts(tensors, spec)).to(spec.torch_dtype)

    def module(self, tensors: dict[str, Tensor], spec, bias: Tensor | None) -> nn.Module:
        return VQLinear(*self.parts(tensors, spec), bias)
