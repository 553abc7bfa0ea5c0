"""Bit-level packing of integer codes into int32 words, as compressed-tensors 0.20's pack-quantized.

Each row is one little-endian bit stream: code j occupies bits [j*bits, (j+1)*bits) of the row,
bit k of the stream is bit k % 32 of word k // 32, and the last word is padded with zero bits.
For 2, 4 and 8 bits this is the classic 32 // bits codes per word, LSB first; for 3, 5, 6, 7 and
9-15 bits codes straddle word boundaries and no bit is wasted. Codes have at most 16 bits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def packed_words(count: int, bits: int) -> int:
    """int32 words that hold `count` codes of `bits` bits."""
    return -(-count * bits // 32)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Integer codes [..., n] in [0, 2**bits - 1] (bits <= 16) -> int32 [..., packed_words(n, bits)]."""
    *lead, count = codes.shape
    narrow = np.uint8 if bits <= 8 else np.uint16
    shifts = np.arange(bits, dtype=narrow)
    stream = (codes.to(torch.int32).numpy().astype(narrow)[..., None] >> shifts) & 1  # [..., n, bits], LSB first
    packed = np.packbits(stream.reshape(*lead, count * bits), axis=-1, bitorder="little")
    words = packed_words(count, bits)
    padded = np.zeros((*lead, words * 4), dtype=np.uint8)
    padded[..., : packed.shape[-1]] = packed
    return torch.from_numpy(padded.view("<i4").astype(np.int32))


def unpack_bits(words: Tensor, bits: int, count: int) -> Tensor:
    """int32 [..., packed_words(count, bits)] -> codes [..., count]: uint8 for up to 8 bits, else int32."""
    *lead, _ = words.shape
    raw = words.contiguous().numpy().astype("<i4").view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    codes = (stream.reshape(*lead, count, bits).astype(np.uint16) * weights).sum(-1, dtype=np.uint16)
    return torch.from_numpy(codes.astype(np.uint8) if bits <= 8 else codes.astype(np.int32))


def padding_is_zero(words: Tensor, bits: int, count: int) -> bool:
    """Whether the bits after the last code of each row are all 0 (they are in every file we write)."""
    used = count * bits
    if used % 32 == 0:
        return True
    tail = words[..., -1].to(torch.int64) & 0xFFFFFFFF
    return not bool((tail >> (used % 32)).any())
