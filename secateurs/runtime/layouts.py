"""Conversions between dense weights and the in-memory layouts of docs/formats.md.

Plain torch, used by the compressed modules (from_dense / to_dense) and by the pure-torch
fallback of the kernels. The `check_*` functions validate a whole layout once (construction time);
the kernels themselves only check shapes and dtypes on every call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from secateurs.algorithms.quant import dequantize as dequantize_grid


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_2d(name: str, tensor: Tensor) -> None:
    _require(isinstance(tensor, Tensor) and tensor.dim() == 2, f"{name} must be a 2-D tensor")


# --- bitmask -------------------------------------------------------------------------------

def pack_bitmask(keep: Tensor) -> Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)], bit j % 8 of byte j // 8, LSB first
    (numpy's little bit order, as compressed-tensors packs it; ~10x faster than torch ops)."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().to(torch.bool).numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(bitmask: Tensor, cols: int) -> Tensor:
    """uint8 [rows, ceil(cols / 8)] -> bool [rows, cols]."""
    bits = np.unpackbits(bitmask.detach().cpu().contiguous().numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


MASK_GROUPS = (8, 4, 2)  # row-group sizes the kernels take (kernels.bitmask_mm's mask_group)


def mask_row_group(bitmask: Tensor) -> int:
    """The largest G of MASK_GROUPS whose groups of G consecutive rows (from row 0) all have equal
    bitmask rows, as a pruning that shares masks across output rows leaves them; 1 if none."""
    _require_2d("bitmask", bitmask)
    rows = bitmask.shape[0]
    for group in MASK_GROUPS:
        if rows >= group and rows % group == 0:
            grouped = bitmask.reshape(rows // group, group, -1)
            if bool((grouped == grouped[:, :1]).all()):
                return group
    return 1


def share_row_masks(bitmask: Tensor, values: Tensor, row_offsets: Tensor, cols: int,
                    max_extra: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """The bitmask layout with each group of G consecutive rows (the largest G of MASK_GROUPS that
    qualifies) stored under the union of its rows' masks, explicit zeros where a row lacks a
    position, when that adds at most max_extra of the stored values; else the inputs as they are.
    A pruning with shared row masks followed by a quantizer that rounds some kept weights to code 0
    leaves rows that differ in those few positions; unrelated masks would need far more (two
    random 30%-dense rows: their union is 51% dense)."""
    if mask_row_group(bitmask) > 1:
        return bitmask, values, row_offsets
    rows, kept = bitmask.shape[0], values.numel()
    sample = unpack_bitmask(bitmask[: min(rows, 64)], cols)  # a quick look first: loading stays cheap
    keep = None
    for group in MASK_GROUPS:
        if rows < group or rows % group:
            continue
        head = sample[: sample.shape[0] // group * group]
        if not head.numel() or int(head.reshape(-1, group, cols).any(1).sum()) * group > (1 + 2 * max_extra) * max(int(head.sum()), 1):
            continue  # unrelated masks: their union is far larger than the rows
        keep = unpack_bitmask(bitmask, cols) if keep is None else keep
        union = keep.reshape(rows // group, group, cols).any(1)
        if int(union.sum()) * group - kept <= max_extra * kept:
            dense = bitmask_to_dense(bitmask, values, row_offsets, cols)
            return bitmask_from_dense(dense, keep=union.repeat_interleave(group, 0))
    return bitmask, values, row_offsets


def bitmask_from_dense(weight: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Dense [rows, cols] -> (bitmask, values in weight's dtype, row_offsets); kept entries are
    `keep` (default: the nonzeros)."""
    _require_2d("weight", weight)
    keep = weight != 0 if keep is None else keep
    row_offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=row_offsets[1:])
    return pack_bitmask(keep), weight[keep].contiguous(), row_offsets


def bitmask_to_dense(bitmask: Tensor, values: Tensor, row_offsets: Tensor, cols: int) -> Tensor:
    """Exact dense weight [rows, cols] in values' dtype (int8 values stay codes)."""
    keep = unpack_bitmask(bitmask, cols)
    dense = torch.zeros(keep.shape, dtype=values.dtype)
    dense[keep] = values
    return dense


def int8_blocks(codes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The int8-activation kernel's layout (kernels.int8_blocks_mm) of int8 codes [rows, cols]:
    every group of 4 consecutive columns of a row with a nonzero code is a block. Returns groups
    int32 [blocks] (the group of each block, row-major), codes int32 [blocks] (the group's 4 codes,
    column 4g + c in byte c, zero past cols), block_offsets int64 [rows + 1] and code_sums int32
    [rows] (each row's sum of codes)."""
    _require_2d("codes", codes)
    _require(codes.dtype == torch.int8, f"codes must be int8, got {codes.dtype}")
    rows, cols = codes.shape
    grouped = torch.zeros(rows, (cols + 3) // 4, 4, dtype=torch.int8)
    grouped.view(rows, grouped.shape[1] * 4)[:, :cols] = codes
    kept = (grouped != 0).any(dim=2)
    row_of_block, groups = kept.nonzero(as_tuple=True)
    block_offsets = torch.zeros(rows + 1, dtype=torch.int64)
    block_offsets[1:] = kept.sum(dim=1).cumsum(0)
    packed = grouped[row_of_block, groups].contiguous().view(torch.int32).view(-1)
    return groups.to(torch.int32), packed, block_offsets, codes.to(torch.int32).sum(dim=1, dtype=torch.int32)


def int8_blocks_to_dense(groups: Tensor, codes: Tensor, block_offsets: Tensor, cols: int) -> Tensor:
    """int8 codes [rows, cols] back from int8_blocks' layout."""
    rows = block_offsets.numel() - 1
    grouped = torch.zeros(rows, (cols + 3) // 4, 4, dtype=torch.int8)
    row_of_block = torch.repeat_interleave(torch.arange(rows), block_offsets.diff())
    grouped[row_of_block, groups.long()] = codes.contiguous().view(torch.int8).view(-1, 4)
    return grouped.view(rows, grouped.shape[1] * 4)[:, :cols].contiguous()


def check_bitmask(bitmask: Tensor, values: Tensor, row_offsets: Tensor, cols: int) -> None:
    """Full consistency check of a bitmask layout (shapes, padding bits, offsets = popcounts)."""
    _require_2d("bitmask", bitmask)
    _require(bitmask.dtype == torch.uint8, f"bitmask must be uint8, got {bitmask.dtype}")
    _require(bitmask.shape[1] == (cols + 7) // 8,
             f"bitmask has {bitmask.shape[1]} bytes per row, expected ceil({cols} / 8) = {(cols + 7) // 8}")
    _require(row_offsets.dtype == torch.int64 and row_offsets.shape == (bitmask.shape[0] + 1,),
             f"row_offsets must be int64 [rows + 1 = {bitmask.shape[0] + 1}]")
    _require(values.dim() == 1, "values must be 1-D")
    padding = unpack_bitmask(bitmask, ((cols + 7) // 8) * 8)[:, cols:]
    _require(not bool(padding.any()), "bitmask padding bits (columns >= cols) must be 0")
    counts = unpack_bitmask(bitmask, cols).sum(1)
    _require(int(row_offsets[0]) == 0 and torch.equal(row_offsets.diff(), counts),
             "row_offsets must start at 0 and grow by each row's popcount")
    _require(values.numel() == int(row_offsets[-1]),
             f"values has {values.numel()} elements but row_offsets[-1] = {int(row_offsets[-1])}")


# --- N:M -----------------------------------------------------------------------------------

def nm_from_dense(weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Dense [rows, cols] with at most n nonzeros in every group of m columns -> (values, indices).

    Groups with fewer than n nonzeros keep some zeros (the first zero positions)."""
    _require_2d("weight", weight)
    rows, cols = weight.shape
    _require(0 < n <= m <= 256 and cols % m == 0, f"N:M = {n}:{m} needs 0 < n <= m <= 256 and cols % m == 0 (cols = {cols})")
    groups = weight.view(rows, cols // m, m)
    nonzero = groups != 0
    _require(bool((nonzero.sum(-1) <= n).all()), f"weight has groups of {m} columns with more than {n} nonzeros")
    # Nonzeros first, then by position; keep the first n and restore increasing column order.
    order = (~nonzero).to(torch.int64) * m + torch.arange(m, device=weight.device)
    kept = order.topk(n, dim=-1, largest=False).indices.sort(-1).values
    values = groups.gather(-1, kept).reshape(rows, -1).contiguous()
    return values, kept.to(torch.uint8).reshape(rows, -1).contiguous()


def nm_to_dense(values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    rows, kept = values.shape
    dense = torch.zeros(rows, kept // n, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, indices.view(rows, -1, n).to(torch.int64), values.view(rows, -1, n))
    return dense.view(rows, -1)


def check_nm(values: Tensor, indices: Tensor, n: int, m: int) -> None:
    _require_2d("values", values)
    _require(0 < n <= m <= 256, f"N:M = {n}:{m} needs 0 < n <= m <= 256")
    _require(values.shape[1] % n == 0, f"values has {values.shape[1]} columns, not a multiple of n = {n}")
    _require(indices.dtype == torch.uint8 and indices.shape == values.shape,
             f"indices must be uint8 with the shape of values {tuple(values.shape)}")
    grouped = indices.view(values.shape[0], -1, n).to(torch.int64)
    _require(bool((grouped < m).all()) and bool((grouped.diff(dim=-1) > 0).all()),
             f"indices must increase within each group and be < m = {m}")


# --- dense weight-only quantization ---------------------------------------------------------

def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes [rows, cols] in [0, 15] -> [rows, ceil(cols / 2)], low nibble = even column."""
    padded = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2))
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, cols: int) -> Tensor:
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1)
    return nibbles.view(packed.shape[0], packed.shape[1] * 2)[:, :cols]


def normalize_group_size(group_size: int | None, cols: int) -> int | None:
    """None for one group per row (the layout also spells it -1, or a group of all columns)."""
    if group_size is None or group_size == -1 or group_size == cols:
        return None
    _require(isinstance(group_size, int) and group_size > 0 and cols % group_size == 0,
             f"group_size {group_size} must be a positive divisor of in_features {cols}, None or -1")
    return group_size


def group_columns(values: Tensor, group_size: int | None, cols: int) -> Tensor:
    """Expand per-(row, group) values [rows, n_groups] to per-column [rows, cols]."""
    return values.repeat_interleave(group_size or cols, dim=1)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    """w_hat = scale * (q - zero) in float32, codes [rows, cols] unpacked."""
    cols = codes.shape[1]
    return dequantize_grid(codes, group_columns(scale, group_size, cols), group_columns(zero, group_size, cols))


def quantize_rtn(weight: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest on a min/max grid per (row, group) -> (codes, scale, zero)."""
    rows, cols = weight.shape
    groups = weight.to(torch.float32).reshape(rows, -1, group_size or cols)
    low = groups.amin(-1).clamp(max=0.0)
    high = groups.amax(-1).clamp(min=0.0)
    levels = 2**bits - 1
    scale = torch.where(high > low, (high - low) / levels, torch.ones_like(low))
    zero = torch.round(-low / scale).clamp(0, levels)
    codes = torch.round(groups / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, levels)
    return codes.reshape(rows, cols).to(torch.uint8), scale.contiguous(), zero.contiguous()


def check_quant(qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, cols: int, group_size: int | None) -> None:
    _require_2d("qweight", qweight)
    _require(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    _require(qweight.dtype == torch.uint8, f"qweight must be uint8, got {qweight.dtype}")
    packed_cols = cols if bits == 8 else (cols + 1) // 2
    _require(qweight.shape[1] == packed_cols, f"qweight has {qweight.shape[1]} columns, expected {packed_cols} for {cols} int{bits} columns")
    group_size = normalize_group_size(group_size, cols)
    groups = cols // group_size if group_size else 1
    for name, tensor in (("scale", scale), ("zero", zero)):
        _require(tensor.dtype == torch.float32 and tensor.shape == (qweight.shape[0], groups),
                 f"{name} must be float32 [{qweight.shape[0]}, {groups}], got {tensor.dtype} {tuple(tensor.shape)}")


def vq_to_dense(codes: Tensor, codebooks: Tensor, scale: Tensor) -> Tensor:
    """float32 [rows, groups * g] of a vector-quantized weight: row i's group j is
    scale[i] * sum_m codebooks[m, codes[i, j, m]] (codes [rows, groups, M], integers in [0, K);
    codebooks [M, K, g]; scale [rows]), the codewords summed in codebook order."""
    codebooks, scale = codebooks.to(torch.float32), scale.to(torch.float32)
    total = codebooks[0][codes[..., 0].long()]
    for m in range(1, codebooks.shape[0]):
        total += codebooks[m][codes[..., m].long()]
    return (scale[:, None, None] * total).flatten(1)


def vq_half_codebooks(codebooks: Tensor) -> Tensor | None:
    """The codebooks as IEEE half bits (int16, same shape) when every value is a float16 exactly
    (the vq files store float16: those always are), else None: the kernels read 16 bytes a codeword
    from it instead of 32 and get the same values."""
    half = codebooks.detach().to(torch.float16)
    if not torch.equal(half.to(codebooks.dtype), codebooks.detach()):
        return None
    return half.view(torch.int16).contiguous()


def vq_int8_codebooks(codebooks: Tensor, codes: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """Integer codebooks for decode (the kernels' codebook_int8): int8 [M, K, 8] and a float32 scale
    per position of a group [8], codebooks ~ int8 * scale, such that one codeword per book sums inside
    int8: any codewords, or with `codes` [rows, groups, M] the combinations those codes use (a finer
    scale where the books' extremes never meet; the guarantee then holds for those codes only). None
    where the layout has no integer kernel (groups other than 8 values, over 256 codewords or 4 books).
    Rounding the codebooks changes the weights: a model decoded this way is scored with it."""
    books, words, group_size = codebooks.shape
    if group_size != 8 or words > 256 or books > 4:
        return None
    codebooks = codebooks.detach().to(torch.float32)

    def rounded(largest: Tensor) -> tuple[Tensor, Tensor]:
        # every book's term rounds by at most 1/2: a sum of M stays within 128 - M/2 <= 127
        scale = torch.where(largest > 0, largest / (128 - books), torch.ones_like(largest))
        return torch.round(codebooks / scale).clamp(-127, 127), scale

    every = codebooks.abs().amax(dim=1).sum(dim=0)  # [8]: the largest sum of any codewords
    q, scale = rounded(every)
    _require(int(q.abs().amax(dim=1).sum(dim=0).max()) <= 127, "integer codebooks overflow int8")  # the bound above
    if codes is not None and codes.numel():
        used = vq_to_dense(codes, codebooks, torch.ones(codes.shape[0])).view(-1, 8).abs().amax(dim=0)
        finer, finer_scale = rounded(torch.minimum(every, used))
        sums = vq_to_dense(codes, finer, torch.ones(codes.shape[0])).abs().amax()  # integers, exactly
        if finer.abs().amax() <= 127 and sums <= 127:  # a term clamped at 127 could push a sum over: keep `every`
            q, scale = finer, finer_scale
    return q.to(torch.int8).contiguous(), scale.contiguous()


def vq_int8_matmul(x: Tensor, codes: Tensor, codebooks_int8: Tensor, position_scale: Tensor, scale: Tensor,
                   exact: bool = True) -> Tensor | None:
    """x @ W.T as the integer VQ kernels compute it, in float64 (exact for int8 sums; with `exact`
    False in float32, for many rows: the integer dot then rounds past 2^24): each activation
    row times the position scales rounded to int8 with one scale (its largest magnitude -> 127), its
    integer dot product with the books' int8 sums, times that scale and the row scale. None where a
    scaled row is not finite: the kernels then run the whole call on the float codebooks."""
    rows, groups, books = codes.shape
    cols = groups * 8
    flat = x.reshape(-1, cols).to(torch.float32)
    scaled = flat * position_scale.to(torch.float32).repeat(groups)
    if not bool(torch.isfinite(scaled).all()):
        return None
    largest = scaled.abs().amax(dim=1, keepdim=True)
    tiny = largest < 1e-30
    inverse = torch.where(tiny, torch.zeros_like(largest), torch.tensor(127.0) / largest)
    q = torch.round((scaled * inverse).clamp(-127.0, 127.0))
    x_scale = torch.where(tiny, torch.zeros_like(largest), largest / torch.tensor(127.0))
    weights = codebooks_int8[0].to(torch.int32)[codes[..., 0].long()]
    for m in range(1, books):
        weights = weights + codebooks_int8[m].to(torch.int32)[codes[..., m].long()]
    wide = torch.float64 if exact else torch.float32
    dot = (q.to(wide) @ weights.reshape(rows, cols).to(wide).T).to(torch.float32)
    return (scale.to(torch.float32) * (x_scale * dot)).reshape(*x.shape[:-1], rows)


def check_vq(codes: Tensor, codebooks: Tensor, scale: Tensor) -> None:
    _require(codes.dim() == 3 and not codes.is_floating_point(), "codes must be an integer tensor [rows, groups, M]")
    _require(codebooks.dim() == 3 and codebooks.shape[0] == codes.shape[2],
             f"codebooks must be [M = {codes.shape[2]}, K, g], got {tuple(codebooks.shape)}")
    _require(1 <= codebooks.shape[1] <= 65536, f"a codebook holds 1..65536 codewords, got {codebooks.shape[1]}")
    _require(scale.shape == (codes.shape[0],), f"scale must be [{codes.shape[0]}], got {tuple(scale.shape)}")
    if codes.numel():
        _require(int(codes.min()) >= 0 and int(codes.max()) < codebooks.shape[1],
                 f"codes must lie in [0, {codebooks.shape[1]})")


def sparse_int4_pack(codes: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(bitmask uint8 [rows, cols / 8], packed codes uint8, row_offsets int64 [rows + 1]) of 4-bit
    codes [rows, cols] kept where `keep`: per row and 64-column block, the kept codes in column
    order as nibbles (low first), padded to an even count (the kernels' layout; cols % 64 == 0).
    The packed tensor has 32 spare zero bytes at its end (the kernels' loads may reach there)."""
    rows, cols = codes.shape
    _require(cols % 64 == 0, f"the sparse int4 layout needs columns in multiples of 64, got {cols}")
    _require(codes.numel() == 0 or (int(codes.max()) < 16 and int(codes.min()) >= 0), "codes must lie in [0, 15]")
    blocks = keep.view(rows, cols // 64, 64)
    counts = blocks.sum(-1)
    padded = (counts + 1) // 2 * 2  # nibbles per block, even
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), padded.flatten().cumsum(0)])
    nibbles = torch.zeros(int(starts[-1]) + 64, dtype=torch.uint8)
    # position of each kept code among its block's kept codes, then in the whole nibble stream
    rank = blocks.to(torch.int64).cumsum(-1) - 1
    stream = starts[:-1].view(rows, cols // 64, 1) + rank
    nibbles[stream[blocks]] = codes.view(rows, cols // 64, 64)[blocks].to(torch.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    row_offsets = torch.cat([starts[:-1].view(rows, -1)[:, 0], starts[-1:]]) // 2
    return pack_bitmask(keep), packed.contiguous(), row_offsets.contiguous()


def sparse_int4_unpack(bitmask: Tensor, packed: Tensor, row_offsets: Tensor, cols: int) -> tuple[Tensor, Tensor]:
    """(codes uint8 [rows, cols], 0 where pruned; keep bool) of sparse_int4_pack's layout."""
    keep = unpack_bitmask(bitmask, cols)
    rows = keep.shape[0]
    blocks = keep.view(rows, cols // 64, 64)
    padded = (blocks.sum(-1) + 1) // 2 * 2
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), padded.flatten().cumsum(0)])
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).flatten()
    stream = starts[:-1].view(rows, cols // 64, 1) + blocks.to(torch.int64).cumsum(-1) - 1
    codes = torch.zeros(rows, cols // 64, 64, dtype=torch.uint8)
    codes[blocks] = nibbles[stream[blocks]]
    return codes.view(rows, cols), keep
