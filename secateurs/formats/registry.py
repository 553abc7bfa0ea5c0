"""The registry of on-disk formats for one compressed Linear weight.

A format is a sparsity layout (dense, bitmask, N:M: which weights are stored, and where) composed
with a value codec (the float weights, int8 codes, or codes bit-packed into int32 words); a new
encoding of the stored values is one new codec; its tensors are named as
compressed-tensors names them, `<layer>.<suffix>`. Every format can `encode` a dense weight
[out, in] (with its quantization grid), `validate` the tensors read from an untrusted file,
`decode` them to the exact dense weight, and build the runtime module that computes with them.

Codes are our unsigned q in [0, 2**bits - 1] with w = scale * (q - zero) (docs/formats.md);
compressed-tensors stores signed q - 2**(bits-1) (and zero - 2**(bits-1)), which for int8 tensors
is the same byte with the top bit flipped, and for bit-packed words is the same bits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from secateurs.algorithms.quant import quantize_codes
from secateurs.errors import FormatError
from secateurs.io import COMPRESSION_KEY
from secateurs.formats.vector import VQFormat
from secateurs.formats.parts import (BitmaskLayout, DenseLayout, FloatValues, Int8Codes, NMLayout, PackedCodes,
                                     SparsityLayout, ValueCodec)
from secateurs.runtime import BitmaskLinear, NMLinear, QuantLinear, SparseInt4Linear, SparseQuantLinear, kernel_path
from secateurs.runtime.layouts import dequantize, group_columns

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what the runtime modules compute in
LAYOUT_KEY = COMPRESSION_KEY  # config.json: {version, layers: {layer: LayerSpec.as_json()}}
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class LayerSpec:
    """What config.json records about one compressed layer, enough to check and decode its tensors."""

    format: str
    rows: int  # out_features
    cols: int  # in_features
    dtype: str  # of the dense weight: a key of DTYPES
    transposed: bool = False  # the model keeps the weight as [in, out] (GPT-2's Conv1D)
    n: int | None = None  # N:M
    m: int | None = None
    bits: int | None = None  # quantized formats
    group_size: int | None = None  # None: one group per row
    symmetric: bool = True  # zero = 2**(bits-1) everywhere: not stored
    codebooks: int | None = None  # vq: M codebooks of 2**bits codewords of group_size values

    @property
    def groups(self) -> int:
        return 1 if self.group_size is None else self.cols // self.group_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, layer: str, data) -> LayerSpec:
        """Check every field of an untrusted entry, naming it on failure."""
        def fail(message: str):
            raise FormatError(f"config.json: layer {layer}: {message}")

        if not isinstance(data, dict):
            fail("expected a mapping")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            fail(f"unknown key(s) {sorted(unknown)}")
        if data.get("format") not in FORMATS:
            fail(f"format {data.get('format')!r} is not one of {sorted(FORMATS)}")
        if data.get("dtype") not in DTYPES:
            fail(f"dtype {data.get('dtype')!r} is not one of {sorted(DTYPES)}")
        for key in ("rows", "cols", "n", "m", "bits", "group_size", "codebooks"):
            value = data.get(key)
            if value is not None and (type(value) is not int or not 0 < value < 2**31):
                fail(f"{key} must be a positive integer, got {value!r}")
        for key in ("transposed", "symmetric"):
            if type(data.get(key, False)) is not bool:
                fail(f"{key} must be true or false")
        try:
            spec = cls(**data)
        except TypeError as exc:  # a required key is missing
            fail(str(exc))
        problem = FORMATS[spec.format].spec_problem(spec)
        if problem:
            fail(problem)
        return spec


# --- formats: a layout composed with a codec --------------------------------------------------

@dataclass(frozen=True)
class Format:
    name: str
    layout: SparsityLayout
    codec: ValueCodec
    ct_sparsity: str | None = None  # the compressed-tensors formats whose layout this is exactly
    ct_quantization: str | None = None

    @property
    def quantized(self) -> bool:
        return self.codec.quantized

    def compressed_tensors_names(self, spec: LayerSpec) -> tuple[str | None, str | None] | None:
        """(sparsity format, quantization format) as compressed-tensors names them, or None where
        compressed-tensors has no such layout."""
        if (self.ct_sparsity, self.ct_quantization) == (None, None) or (self.layout.name == "nm" and (spec.n, spec.m) != (2, 4)):
            return None
        return self.ct_sparsity, self.ct_quantization

    def spec_problem(self, spec: LayerSpec) -> str | None:
        if spec.codebooks is not None:
            return f"codebooks belong to format vq, not {self.name}"
        problem = self.layout.spec_problem(spec)
        if problem:
            return problem
        if not self.quantized:
            if spec.bits is not None or spec.group_size is not None:
                return f"bits and group_size belong to quantized formats, not {self.name}"
            return None
        if spec.bits not in self.codec.bits_allowed:
            return f"bits {spec.bits} not in {self.codec.bits_allowed} for format {self.name}"
        if spec.group_size is not None and spec.cols % spec.group_size:
            return f"group_size {spec.group_size} does not divide cols = {spec.cols}"
        return None

    @property
    def values_suffix(self) -> str:
        return self.layout.values_suffix(self.codec)

    # --- encode --------------------------------------------------------------------------

    def encode(self, weight: Tensor, spec: LayerSpec, grid: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Tensors (by suffix) of a dense weight [rows, cols] whose pruned entries are 0 and, for a
        quantized format, whose kept entries lie on `grid` = (scale, zero) float32 [rows, groups]."""
        if self.quantized and grid is None:
            raise ValueError(f"format {self.name} needs a quantization grid")
        payload = grid_codes(weight, grid, spec.group_size, spec.bits) if self.quantized else weight
        keep = self.layout.keep(weight, spec)
        kept = payload if keep is None else self.layout.arrange(payload[keep], spec)
        tensors = self.layout.position_tensors(keep, spec, self.codec)
        tensors[self.values_suffix] = self.codec.encode(kept.contiguous(), spec)
        if self.quantized:
            scale, zero = grid
            tensors["weight_scale"] = scale.to(torch.float32).contiguous()
            if not spec.symmetric:
                tensors["weight_zero_point"] = self.codec.encode_zero(zero, spec)
        return tensors

    # --- validate ------------------------------------------------------------------------

    def expected_tensors(self, spec: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
        """dtype and shape of each tensor by suffix; shape None where it depends on the mask (1-D)."""
        expected = dict(self.layout.expected_positions(spec, self.codec))
        expected[self.values_suffix] = (self.codec.dtype(spec), self.layout.values_shape(spec, self.codec))
        if self.quantized:
            expected["weight_scale"] = (torch.float32, (spec.rows, spec.groups))
            if not spec.symmetric:
                expected["weight_zero_point"] = (self.codec.dtype(spec), self.codec.zero_shape(spec))
        return expected

    def validate(self, layer: str, tensors: dict[str, Tensor], spec: LayerSpec) -> None:
        """Everything the decoder and the kernels rely on, checked before either sees the tensors:
        names, dtypes, shapes, mask popcounts against row offsets and value counts, padding bits,
        scales. The FormatError names the tensor."""
        def fail(suffix: str, message: str):
            raise FormatError(f"tensor {layer}.{suffix}: {message}")

        for suffix, (dtype, shape) in self.expected_tensors(spec).items():
            if suffix not in tensors:
                fail(suffix, f"missing (format {self.name})")
            tensor = tensors[suffix]
            if tensor.dtype != dtype:
                fail(suffix, f"has dtype {tensor.dtype}, expected {dtype}")
            if tuple(tensor.shape) != (shape or tuple(tensor.shape[:1])):  # shape None: any 1-D length
                fail(suffix, f"has shape {tuple(tensor.shape)}, expected {shape or '1-D'}")
        for suffix in ("shape", "weight_shape"):
            if suffix in tensors and tensors[suffix].flatten().tolist() != [spec.rows, spec.cols]:
                fail(suffix, f"holds {tensors[suffix].flatten().tolist()}, config.json says [{spec.rows}, {spec.cols}]")
        count = self.layout.validate(fail, tensors, spec, self.codec)
        self.codec.validate(fail, self.values_suffix, tensors, spec, count)
        if self.quantized:
            scale = tensors["weight_scale"]
            if not bool((scale.isfinite() & (scale > 0)).all()):
                fail("weight_scale", "holds a scale that is not a positive finite number")

    # --- decode ------------------------------------------------------------------------

    def decode(self, tensors: dict[str, Tensor], spec: LayerSpec) -> Tensor:
        """The exact dense weight [rows, cols] in spec.dtype."""
        keep = self.layout.stored_keep(tensors, spec)
        if not self.quantized:
            values = self.codec.decode(tensors[self.values_suffix], spec, spec.cols)
            if keep is None:
                return values.to(spec.torch_dtype)
            dense = torch.zeros(spec.rows, spec.cols, dtype=spec.torch_dtype)
            dense[keep] = values.flatten()
            return dense
        scale, zero = self.grid(tensors, spec)
        return dequantize(self.dense_codes(tensors, spec, keep, zero), scale, zero, spec.group_size).to(spec.torch_dtype)

    def grid(self, tensors: dict[str, Tensor], spec: LayerSpec) -> tuple[Tensor, Tensor]:
        scale = tensors["weight_scale"]
        if spec.symmetric:
            return scale, torch.full_like(scale, 2 ** (spec.bits - 1))
        zero = self.codec.decode_zero(tensors["weight_zero_point"], spec)
        return scale, zero.to(torch.float32).contiguous()

    def dense_codes(self, tensors: dict[str, Tensor], spec: LayerSpec, keep: Tensor | None, zero: Tensor) -> Tensor:
        """uint8 codes [rows, cols]; pruned weights get their group's zero point (w = 0)."""
        stored = tensors[self.values_suffix]
        if keep is None:
            return self.codec.decode(stored, spec, spec.cols)
        codes = group_columns(zero, spec.group_size, spec.cols).to(torch.uint8)
        per_stream = int(keep.sum()) if stored.dim() == 1 else int(keep[0].sum())
        codes[keep] = self.codec.decode(stored, spec, per_stream).flatten()
        return codes

    # --- runtime module ------------------------------------------------------------------

    def module(self, tensors: dict[str, Tensor], spec: LayerSpec, bias: Tensor | None) -> nn.Module:
        """The compressed Linear computing with these (validated) tensors."""
        keep = self.layout.stored_keep(tensors, spec)
        if self.layout.name == "nm" and not self.quantized:
            indices = torch.arange(spec.m, dtype=torch.uint8).repeat(spec.rows, spec.cols // spec.m)[keep]
            values = tensors[self.values_suffix]
            return NMLinear(values, indices.view(values.shape), spec.n, spec.m, bias)
        if self.layout.name == "bitmask":
            offsets = torch.cat([tensors["row_offsets"], torch.tensor([int(keep.sum())])])
            if not self.quantized:
                return BitmaskLinear(tensors["bitmask"], tensors["compressed"], offsets, spec.cols, bias)
            if self.codec.name == "int8" and spec.symmetric and spec.group_size is None:
                # compressed-tensors' signed codes are exactly SparseQuantLinear's w = scale[r] * v.
                return SparseQuantLinear(tensors["bitmask"], tensors["compressed"], offsets,
                                         tensors["weight_scale"][:, 0].contiguous(), spec.cols, bias)
        scale, zero = self.grid(tensors, spec)
        codes = self.dense_codes(tensors, spec, keep, zero)
        if keep is not None and sparse_int4_pays(spec):
            return SparseInt4Linear.from_codes(codes, keep, scale, zero, spec.group_size, bias)
        # Other quantized layouts run on the dense int4 / int8 kernel: 2- and 3-bit codes fit int4,
        # 5- to 7-bit codes int8, and pruned weights are their group's zero point.
        return QuantLinear.from_codes(codes, scale, zero, bias, "int4" if spec.bits <= 4 else "int8", spec.group_size)


def sparse_int4_pays(spec: LayerSpec) -> bool:
    """Whether a bitmask layer of up to 4-bit codes runs on the sparse int4 kernel: where the CPU
    expands bytes under a mask (the avx512vbmi2 path); on the others its scalar walk is slower than
    the dense int4 kernel, which then runs it (pruned weights at their group's zero point)."""
    return (spec.bits <= 4 and spec.cols % 64 == 0 and (spec.group_size is None or spec.group_size % 64 == 0)
            and kernel_path() == "avx512vbmi2")


def grid_codes(weight: Tensor, grid: tuple[Tensor, Tensor], group_size: int | None, bits: int) -> Tensor:
    """uint8 round(w / scale + zero) per (row, group), clamped to [0, 2**bits - 1], in float32."""
    scale, zero = (group_columns(t.to(torch.float32), group_size, weight.shape[1]) for t in grid)
    return quantize_codes(weight.to(torch.float32), scale, zero, bits)


DENSE, BITMASK, NM = DenseLayout(), BitmaskLayout(), NMLayout()
FLOAT, INT8, PACKED = FloatValues(), Int8Codes(), PackedCodes()
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bitmask", BITMASK, FLOAT, ct_sparsity="sparse-bitmask"),
    Format("nm", NM, FLOAT, ct_sparsity="sparse-24-bitmask"),
    Format("int8", DENSE, INT8, ct_quantization="naive-quantized"),
    Format("pack-quantized", DENSE, PACKED, ct_quantization="pack-quantized"),
    Format("bitmask-int8", BITMASK, INT8, ct_sparsity="sparse-bitmask", ct_quantization="naive-quantized"),
    Format("bitmask-packed", BITMASK, PACKED),
    VQFormat(),
    VQFormat(packed=True),
)}


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
