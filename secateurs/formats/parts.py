"""The two parts a format composes (registry.py): a sparsity layout (which weights are stored, and
where: dense, bitmask, N:M) and a value codec (how the stored values are encoded: float weights,
int8 codes, bit-packed codes). A new encoding of the values, such as vector-quantization codes, is
one new codec. `spec` is always a registry.LayerSpec (the layer's shape, dtype, N:M, bits, groups)."""

from __future__ import annotations

import torch
from torch import Tensor

from secateurs.formats.packing import pack_bits, packed_words, padding_is_zero, unpack_bits
from secateurs.runtime.layouts import nm_from_dense
from secateurs.runtime.layouts import pack_bitmask as pack_mask
from secateurs.runtime.layouts import unpack_bitmask as unpack_mask

# --- sparsity layouts: which weights are stored, and where ------------------------------------

class SparsityLayout:
    """Dense (every weight), bitmask (the nonzeros, row by row) or N:M (n of every m columns)."""

    name = ""

    def spec_problem(self, spec) -> str | None:
        if spec.n is not None or spec.m is not None:
            return f"n and m belong to the nm layout, not {self.name}"
        return None

    def keep(self, weight: Tensor, spec) -> Tensor | None:
        """bool [rows, cols] of the stored weights (None: all)."""
        return None

    def position_tensors(self, keep: Tensor | None, spec, codec: ValueCodec) -> dict[str, Tensor]:
        return {}

    def expected_positions(self, spec, codec: ValueCodec) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
        return {}

    def values_shape(self, spec, codec: ValueCodec) -> tuple[int, ...] | None:
        """Shape of the stored values (None: 1-D, its length set by the mask)."""
        return (spec.rows, codec.width(spec.cols, spec))

    def values_suffix(self, codec: ValueCodec) -> str:
        return "compressed"

    def arrange(self, kept: Tensor, spec) -> Tensor:
        """The kept values (in row-major order) in the stored shape, before encoding."""
        return kept.view(spec.rows, -1)

    def validate(self, fail, tensors: dict[str, Tensor], spec, codec: ValueCodec) -> int:
        """Check the positions; returns the number of codes in one stream of values (a row's, or the
        whole 1-D run's)."""
        return spec.cols

    def stored_keep(self, tensors: dict[str, Tensor], spec) -> Tensor | None:
        return None if "bitmask" not in tensors else unpack_mask(tensors["bitmask"], spec.cols)


class DenseLayout(SparsityLayout):
    name = "dense"

    def values_suffix(self, codec: ValueCodec) -> str:
        return codec.dense_suffix

    def position_tensors(self, keep, spec, codec):
        return {"weight_shape": torch.tensor([spec.rows, spec.cols])} if codec.records_shape else {}

    def expected_positions(self, spec, codec):
        return {"weight_shape": (torch.int64, (2,))} if codec.records_shape else {}


class BitmaskLayout(SparsityLayout):
    name = "bitmask"

    def keep(self, weight, spec):
        return weight != 0

    def position_tensors(self, keep, spec, codec):
        counts = keep.sum(1)
        return {"bitmask": pack_mask(keep), "row_offsets": counts.cumsum(0) - counts,
                "shape": torch.tensor([spec.rows, spec.cols])}

    def expected_positions(self, spec, codec):
        return {"bitmask": (torch.uint8, (spec.rows, -(-spec.cols // 8))), "row_offsets": (torch.int64, (spec.rows,)),
                "shape": (torch.int64, (2,))}

    def values_shape(self, spec, codec):
        return None

    def arrange(self, kept, spec):
        return kept

    def validate(self, fail, tensors, spec, codec):
        keep = _checked_mask(fail, tensors["bitmask"], spec)
        counts = keep.sum(1)
        if not torch.equal(tensors["row_offsets"], counts.cumsum(0) - counts):
            fail("row_offsets", "does not match the running popcount of the bitmask rows")
        count = int(counts.sum())
        length = codec.width(count, spec)
        if tensors["compressed"].shape != (length,):
            fail("compressed", f"has {tensors['compressed'].numel()} elements, the bitmask keeps {count} "
                 f"weights ({length} elements)")
        return count


class NMLayout(SparsityLayout):
    name = "nm"

    def spec_problem(self, spec):
        if spec.n is None or spec.m is None or not spec.n < spec.m <= 256 or spec.cols % spec.m:
            return f"N:M = {spec.n}:{spec.m} needs 0 < n < m <= 256 dividing cols = {spec.cols}"
        return None

    def keep(self, weight, spec):
        return nm_keep(weight, spec.n, spec.m)

    def position_tensors(self, keep, spec, codec):
        return {"bitmask": pack_mask(keep), "shape": torch.tensor([[spec.rows], [spec.cols]])}

    def expected_positions(self, spec, codec):
        return {"bitmask": (torch.uint8, (spec.rows, -(-spec.cols // 8))), "shape": (torch.int64, (2, 1))}

    def values_shape(self, spec, codec):
        return (spec.rows, codec.width(spec.cols // spec.m * spec.n, spec))

    def validate(self, fail, tensors, spec, codec):
        keep = _checked_mask(fail, tensors["bitmask"], spec)
        if bool((keep.view(spec.rows, -1, spec.m).sum(-1) != spec.n).any()):
            fail("bitmask", f"a group of {spec.m} columns does not keep exactly {spec.n}")
        return spec.cols // spec.m * spec.n


def _checked_mask(fail, bitmask: Tensor, spec) -> Tensor:
    padded = bitmask.shape[1] * 8
    if padded > spec.cols and bool(unpack_mask(bitmask, padded)[:, spec.cols:].any()):
        fail("bitmask", f"padding bits after column {spec.cols} are set")
    return unpack_mask(bitmask, spec.cols)


# --- value codecs: how the stored values are encoded --------------------------------------------

class ValueCodec:
    """Float weights as they are, or quantization codes q (w = scale * (q - zero)) as signed bytes
    or bit-packed int32 words; a quantized codec also stores the grid (weight_scale, and
    weight_zero_point when asymmetric)."""

    name = ""
    quantized = True
    dense_suffix = ""  # the values' name in the dense layout (compressed-tensors' naming)
    records_shape = False  # the dense layout also stores weight_shape (compressed-tensors' pack-quantized)
    bits_allowed: tuple[int, ...] = ()

    def dtype(self, spec) -> torch.dtype:
        raise NotImplementedError

    def width(self, count: int, spec) -> int:
        """Stored elements for `count` values."""
        return count

    def encode(self, values: Tensor, spec) -> Tensor:
        """Float weights, or uint8 codes, in their stored shape -> the stored tensor."""
        raise NotImplementedError

    def decode(self, stored: Tensor, spec, count: int) -> Tensor:
        """The stored tensor -> float weights, or uint8 codes (`count` per stream)."""
        raise NotImplementedError

    def encode_zero(self, zero: Tensor, spec) -> Tensor:
        raise NotImplementedError

    def decode_zero(self, stored: Tensor, spec) -> Tensor:
        raise NotImplementedError

    def zero_shape(self, spec) -> tuple[int, int]:
        return (spec.rows, spec.groups)

    def validate(self, fail, suffix: str, tensors: dict[str, Tensor], spec, count: int) -> None:
        """Checks of the values themselves (padding bits, finiteness)."""


class FloatValues(ValueCodec):
    name, quantized = "float", False

    def dtype(self, spec):
        return spec.torch_dtype

    def encode(self, values, spec):
        return values

    def decode(self, stored, spec, count):
        return stored

    def validate(self, fail, suffix, tensors, spec, count):
        if not bool(tensors[suffix].isfinite().all()):
            fail(suffix, "holds NaN or infinite weights")


class Int8Codes(ValueCodec):
    """compressed-tensors' signed 8-bit codes q - 128: our unsigned byte with its top bit flipped."""

    name, dense_suffix, bits_allowed = "int8", "weight", (8,)

    def dtype(self, spec):
        return torch.int8

    def encode(self, values, spec):
        return signed_codes(values)

    def decode(self, stored, spec, count):
        return unsigned_codes(stored)

    def encode_zero(self, zero, spec):
        return signed_codes(zero.to(torch.uint8))

    def decode_zero(self, stored, spec):
        return unsigned_codes(stored)


class PackedCodes(ValueCodec):
    """Codes of 2-8 bits bit-packed into int32 words per row (or along a bitmask's 1-D run), as
    compressed-tensors' pack-quantized; asymmetric zero points are packed along the output rows."""

    name, dense_suffix, bits_allowed, records_shape = "packed", "weight_packed", tuple(range(2, 9)), True

    def dtype(self, spec):
        return torch.int32

    def width(self, count, spec):
        return packed_words(count, spec.bits)

    def encode(self, values, spec):
        return pack_bits(values, spec.bits)

    def decode(self, stored, spec, count):
        return unpack_bits(stored, spec.bits, count)

    def encode_zero(self, zero, spec):
        return pack_bits(zero.to(torch.uint8).t(), spec.bits).t().contiguous()

    def decode_zero(self, stored, spec):
        return unpack_bits(stored.t(), spec.bits, spec.rows).t()

    def zero_shape(self, spec):
        return (packed_words(spec.rows, spec.bits), spec.groups)

    def validate(self, fail, suffix, tensors, spec, count):
        if not padding_is_zero(tensors[suffix], spec.bits, count):
            fail(suffix, "padding bits after the last code are set")
        if not spec.symmetric and not padding_is_zero(tensors["weight_zero_point"].t(), spec.bits, spec.rows):
            fail("weight_zero_point", "padding bits after the last zero point are set")


def signed_codes(codes: Tensor) -> Tensor:
    """uint8 q -> int8 q - 128, compressed-tensors' signed 8-bit code."""
    return (codes.to(torch.int16) - 128).to(torch.int8)


def unsigned_codes(codes: Tensor) -> Tensor:
    return (codes.to(torch.int16) + 128).to(torch.uint8)


def nm_keep(weight: Tensor, n: int, m: int) -> Tensor:
    """Bool [rows, cols]: the n kept positions of every group of m (zeros fill groups with fewer
    than n nonzeros, as runtime.layouts.nm_from_dense keeps them)."""
    rows, cols = weight.shape
    _, indices = nm_from_dense(weight, n, m)
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    keep.scatter_(-1, indices.view(rows, -1, n).to(torch.int64), True)
    return keep.view(rows, cols)


