"""The registry of on-disk formats for one compressed Linear weight.

A format is a sparsity layout (none, bitmask, N:M) combined with a value encoding (the float
weights, int8 codes, or codes bit-packed into int32 words); its tensors are named as
compressed-tensors names them, `<layer>.<suffix>`. Every format can `encode` a dense weight
[out, in] (with its quantization grid), `validate` the tensors read from an untrusted file,
`decode` them to the exact dense weight, and build the runtime module that computes with them.

Codes are our unsigned q in [0, 2**bits - 1] with w = scale * (q - zero) (docs/layouts.md);
compressed-tensors stores signed q - 2**(bits-1) (and zero - 2**(bits-1)), which for int8 tensors
is the same byte with the top bit flipped, and for bit-packed words is the same bits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from secateurs.algorithms.quant import quantize_codes
from secateurs.errors import FormatError
from secateurs.formats.packing import pack_bits, packed_words, padding_is_zero, unpack_bits
from secateurs.runtime import BitmaskLinear, NMLinear, QuantLinear, SparseQuantLinear
from secateurs.runtime.layouts import dequantize, group_columns, nm_from_dense
from secateurs.runtime.layouts import pack_bitmask as pack_mask, unpack_bitmask as unpack_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what the runtime modules compute in
LAYOUT_KEY = "secateurs_compression"  # config.json: {version, layers: {layer: LayerSpec.as_json()}}
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
        for key in ("rows", "cols", "n", "m", "bits", "group_size"):
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


@dataclass(frozen=True)
class Format:
    name: str
    sparsity: str  # "dense", "bitmask" or "nm"
    values: str  # "float", "int8" or "packed"
    ct_sparsity: str | None = None  # the compressed-tensors formats whose layout this is exactly
    ct_quantization: str | None = None

    @property
    def quantized(self) -> bool:
        return self.values != "float"

    def compressed_tensors_names(self, spec: LayerSpec) -> tuple[str | None, str | None] | None:
        """(sparsity format, quantization format) as compressed-tensors names them, or None where
        compressed-tensors has no such layout."""
        if (self.ct_sparsity, self.ct_quantization) == (None, None) or (self.sparsity == "nm" and (spec.n, spec.m) != (2, 4)):
            return None
        return self.ct_sparsity, self.ct_quantization

    def spec_problem(self, spec: LayerSpec) -> str | None:
        if self.sparsity == "nm":
            if spec.n is None or spec.m is None or not spec.n < spec.m <= 256 or spec.cols % spec.m:
                return f"N:M = {spec.n}:{spec.m} needs 0 < n < m <= 256 dividing cols = {spec.cols}"
        elif spec.n is not None or spec.m is not None:
            return f"n and m belong to the nm format, not {self.name}"
        if not self.quantized:
            if spec.bits is not None or spec.group_size is not None:
                return f"bits and group_size belong to quantized formats, not {self.name}"
            return None
        allowed = (8,) if self.values == "int8" else tuple(range(2, 9))
        if spec.bits not in allowed:
            return f"bits {spec.bits} not in {allowed} for format {self.name}"
        if spec.group_size is not None and spec.cols % spec.group_size:
            return f"group_size {spec.group_size} does not divide cols = {spec.cols}"
        return None

    # --- encode --------------------------------------------------------------------------

    def encode(self, weight: Tensor, spec: LayerSpec, grid: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Tensors (by suffix) of a dense weight [rows, cols] whose pruned entries are 0 and, for a
        quantized format, whose kept entries lie on `grid` = (scale, zero) float32 [rows, groups]."""
        rows, cols = weight.shape
        payload = weight if not self.quantized else self._codes(weight, spec, grid)
        tensors = {}
        if self.sparsity == "dense":
            kept = payload
        else:
            keep = weight != 0 if self.sparsity == "bitmask" else _nm_keep(weight, spec.n, spec.m)
            kept = payload[keep]
            tensors["bitmask"] = pack_mask(keep)
            if self.sparsity == "bitmask":
                counts = keep.sum(1)
                tensors["row_offsets"] = counts.cumsum(0) - counts
                tensors["shape"] = torch.tensor([rows, cols])
            else:
                kept = kept.view(rows, -1)
                tensors["shape"] = torch.tensor([[rows], [cols]])
        tensors[self._values_name()] = self._encode_values(kept.contiguous(), spec)
        if self.sparsity == "dense" and self.values == "packed":
            tensors["weight_shape"] = torch.tensor([rows, cols])
        if self.quantized:
            scale, zero = grid
            tensors["weight_scale"] = scale.to(torch.float32).contiguous()
            if not spec.symmetric:
                tensors["weight_zero_point"] = self._encode_zero(zero, spec)
        return tensors

    def _codes(self, weight: Tensor, spec: LayerSpec, grid) -> Tensor:
        if grid is None:
            raise ValueError(f"format {self.name} needs a quantization grid")
        return grid_codes(weight, grid, spec.group_size, spec.bits)

    def _values_name(self) -> str:
        if self.sparsity != "dense":
            return "compressed"
        return "weight" if self.values == "int8" else "weight_packed"

    def _encode_values(self, values: Tensor, spec: LayerSpec) -> Tensor:
        if self.values == "float":
            return values
        if self.values == "int8":
            return _signed(values)
        return pack_bits(values, spec.bits)  # per row, or the 1-D run of a bitmask's kept codes

    def _encode_zero(self, zero: Tensor, spec: LayerSpec) -> Tensor:
        codes = zero.to(torch.uint8)
        # compressed-tensors packs asymmetric zero points along the output dimension.
        return _signed(codes) if self.values == "int8" else pack_bits(codes.t(), spec.bits).t().contiguous()

    # --- validate ------------------------------------------------------------------------

    def expected_tensors(self, spec: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
        """dtype and shape of each tensor by suffix; shape None where it depends on the mask (1-D)."""
        rows, cols = spec.rows, spec.cols
        value_dtype = {"float": spec.torch_dtype, "int8": torch.int8, "packed": torch.int32}[self.values]
        expected: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] = {}
        if self.sparsity == "dense":
            width = cols if self.values == "int8" else packed_words(cols, spec.bits)
            expected[self._values_name()] = (value_dtype, (rows, width))
            if self.values == "packed":
                expected["weight_shape"] = (torch.int64, (2,))
        else:
            expected["bitmask"] = (torch.uint8, (rows, -(-cols // 8)))
            if self.sparsity == "bitmask":
                expected["row_offsets"] = (torch.int64, (rows,))
                expected["shape"] = (torch.int64, (2,))
                expected["compressed"] = (value_dtype, None)
            else:
                expected["shape"] = (torch.int64, (2, 1))
                expected["compressed"] = (value_dtype, (rows, cols // spec.m * spec.n))
        if self.quantized:
            expected["weight_scale"] = (torch.float32, (rows, spec.groups))
            if not spec.symmetric:
                zero_shape = (rows, spec.groups) if self.values == "int8" else (packed_words(rows, spec.bits), spec.groups)
                expected["weight_zero_point"] = (value_dtype, zero_shape)
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
        count = spec.cols  # codes per bit stream
        if self.sparsity != "dense":
            bitmask = tensors["bitmask"]
            padded = bitmask.shape[1] * 8
            if padded > spec.cols and bool(unpack_mask(bitmask, padded)[:, spec.cols:].any()):
                fail("bitmask", f"padding bits after column {spec.cols} are set")
            keep = unpack_mask(bitmask, spec.cols)
            if self.sparsity == "nm":
                if bool((keep.view(spec.rows, -1, spec.m).sum(-1) != spec.n).any()):
                    fail("bitmask", f"a group of {spec.m} columns does not keep exactly {spec.n}")
            else:
                counts = keep.sum(1)
                if not torch.equal(tensors["row_offsets"], counts.cumsum(0) - counts):
                    fail("row_offsets", "does not match the running popcount of the bitmask rows")
                count = int(counts.sum())
                length = packed_words(count, spec.bits) if self.values == "packed" else count
                if tensors["compressed"].shape != (length,):
                    fail("compressed", f"has {tensors['compressed'].numel()} elements, the bitmask keeps {count} "
                         f"weights ({length} elements)")
        if self.values == "packed":
            if not padding_is_zero(tensors[self._values_name()], spec.bits, count):
                fail(self._values_name(), "padding bits after the last code are set")
            if not spec.symmetric and not padding_is_zero(tensors["weight_zero_point"].t(), spec.bits, spec.rows):
                fail("weight_zero_point", "padding bits after the last zero point are set")
        if self.values == "float" and not bool(tensors["compressed"].isfinite().all()):
            fail("compressed", "holds NaN or infinite weights")
        if self.quantized:
            scale = tensors["weight_scale"]
            if not bool((scale.isfinite() & (scale > 0)).all()):
                fail("weight_scale", "holds a scale that is not a positive finite number")

    # --- decode ------------------------------------------------------------------------

    def decode(self, tensors: dict[str, Tensor], spec: LayerSpec) -> Tensor:
        """The exact dense weight [rows, cols] in spec.dtype."""
        keep = None if self.sparsity == "dense" else unpack_mask(tensors["bitmask"], spec.cols)
        if not self.quantized:
            dense = torch.zeros(spec.rows, spec.cols, dtype=spec.torch_dtype)
            dense[keep] = tensors["compressed"].flatten()
            return dense
        scale, zero = self._grid(tensors, spec)
        return dequantize(self.dense_codes(tensors, spec, keep, zero), scale, zero, spec.group_size).to(spec.torch_dtype)

    def _grid(self, tensors: dict[str, Tensor], spec: LayerSpec) -> tuple[Tensor, Tensor]:
        scale = tensors["weight_scale"]
        if spec.symmetric:
            return scale, torch.full_like(scale, 2 ** (spec.bits - 1))
        stored = tensors["weight_zero_point"]
        if self.values == "int8":
            zero = _unsigned(stored)
        else:
            zero = unpack_bits(stored.t(), spec.bits, spec.rows).t()
        return scale, zero.to(torch.float32).contiguous()

    def _kept_codes(self, tensors: dict[str, Tensor], spec: LayerSpec, count: int) -> Tensor:
        """The stored codes as uint8 q: `count` per row (dense) or in all (a bitmask's 1-D run)."""
        stored = tensors[self._values_name()]
        if self.values == "int8":
            return _unsigned(stored)
        return unpack_bits(stored, spec.bits, count)

    def dense_codes(self, tensors: dict[str, Tensor], spec: LayerSpec, keep: Tensor | None, zero: Tensor) -> Tensor:
        """uint8 codes [rows, cols]; pruned weights get their group's zero point (w = 0)."""
        if keep is None:
            return self._kept_codes(tensors, spec, spec.cols)
        codes = group_columns(zero, spec.group_size, spec.cols).to(torch.uint8)
        codes[keep] = self._kept_codes(tensors, spec, int(keep.sum()))
        return codes

    # --- runtime module ------------------------------------------------------------------

    def module(self, tensors: dict[str, Tensor], spec: LayerSpec, bias: Tensor | None) -> nn.Module:
        """The compressed Linear computing with these (validated) tensors."""
        keep = None if self.sparsity == "dense" else unpack_mask(tensors["bitmask"], spec.cols)
        if self.sparsity == "nm":
            indices = torch.arange(spec.m, dtype=torch.uint8).repeat(spec.rows, spec.cols // spec.m)[keep]
            shape = tensors["compressed"].shape
            return NMLinear(tensors["compressed"], indices.view(shape), spec.n, spec.m, bias)
        if self.sparsity == "bitmask":
            offsets = torch.cat([tensors["row_offsets"], torch.tensor([int(keep.sum())])])
            if not self.quantized:
                return BitmaskLinear(tensors["bitmask"], tensors["compressed"], offsets, spec.cols, bias)
            if self.values == "int8" and spec.symmetric and spec.group_size is None:
                # compressed-tensors' signed codes are exactly SparseQuantLinear's w = scale[r] * v.
                return SparseQuantLinear(tensors["bitmask"], tensors["compressed"], offsets,
                                         tensors["weight_scale"][:, 0].contiguous(), spec.cols, bias)
        # Other quantized layouts run on the dense int4 / int8 kernel: 2- and 3-bit codes fit int4,
        # 5- to 7-bit codes int8, and pruned weights are their group's zero point.
        scale, zero = self._grid(tensors, spec)
        codes = self.dense_codes(tensors, spec, keep, zero)
        return QuantLinear.from_codes(codes, scale, zero, bias, "int4" if spec.bits <= 4 else "int8", spec.group_size)


def grid_codes(weight: Tensor, grid: tuple[Tensor, Tensor], group_size: int | None, bits: int) -> Tensor:
    """uint8 round(w / scale + zero) per (row, group), clamped to [0, 2**bits - 1], in float32."""
    scale, zero = (group_columns(t.to(torch.float32), group_size, weight.shape[1]) for t in grid)
    return quantize_codes(weight.to(torch.float32), scale, zero, bits)


def _signed(codes: Tensor) -> Tensor:
    """uint8 q -> int8 q - 128, compressed-tensors' signed 8-bit code."""
    return (codes.to(torch.int16) - 128).to(torch.int8)


def _unsigned(codes: Tensor) -> Tensor:
    return (codes.to(torch.int16) + 128).to(torch.uint8)


def _nm_keep(weight: Tensor, n: int, m: int) -> Tensor:
    """Bool [rows, cols]: the n kept positions of every group of m (zeros fill groups with fewer
    than n nonzeros, as runtime.layouts.nm_from_dense keeps them)."""
    rows, cols = weight.shape
    _, indices = nm_from_dense(weight, n, m)
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    keep.scatter_(-1, indices.view(rows, -1, n).to(torch.int64), True)
    return keep.view(rows, cols)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bitmask", "bitmask", "float", ct_sparsity="sparse-bitmask"),
    Format("nm", "nm", "float", ct_sparsity="sparse-24-bitmask"),
    Format("int8", "dense", "int8", ct_quantization="naive-quantized"),
    Format("pack-quantized", "dense", "packed", ct_quantization="pack-quantized"),
    Format("bitmask-int8", "bitmask", "int8", ct_sparsity="sparse-bitmask", ct_quantization="naive-quantized"),
    Format("bitmask-packed", "bitmask", "packed"),
)}


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
