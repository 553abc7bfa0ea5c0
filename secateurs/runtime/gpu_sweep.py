"""The OBS column sweep's span kernel on a GPU, in Triton (the twin of csrc/obs_sweep.cpp).

A span is a run of columns of one block that share one mask decision and one quantization grid
(algorithms/obs.py). On a GPU the torch loop over its columns costs about ten kernel launches per
column, each on a few thousand numbers, so a sweep there runs at a small fraction of the device;
here one launch fixes a whole span. Each program owns a tile of W's rows (block columns, W being
stored transposed as [size, rows]) and keeps the span's block columns [begin, size) of those rows in
registers for the whole span: column i is read out of the tile, rounded to its grid and/or pruned,
its error e_i = (w_i - q) / U[i, i] written, and the later columns of the tile updated by
-U[i, k] e_i, without touching memory until the span ends.

The arithmetic is the torch loop's: IEEE division (div_rn in float32, not Triton's fast default; float64
division is exact already), rounding
half to even written out exactly (floor and the fraction, as torch.round does), clamping to the
grid. Only the multiply-subtract of the update may fuse into one FMA on a GPU, a last-bit difference.
Without a GPU the same kernel runs in Triton's interpreter on CPU tensors: slow, but that is how the
tests check it against the torch loop on machines without one.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

# Values of the tile per thread: each thread holds its rows' block columns (rounded up to a power of
# two), so a column is read out of the tile without leaving the thread; 128 columns of one row
# each for a 128-column block (one warp of 32 rows per program), more rows per thread for shorter spans.
VALUES_PER_THREAD = 128
THREADS_PER_WARP = 32


def triton_available(device: str = "cuda") -> bool:
    """Whether the kernel can run on `device`: Triton installed (it ships with CUDA builds of torch;
    `pip install triton`) and, for "cpu", its interpreter active since Triton's first import."""
    if triton is None:
        return False
    if device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.sum, InterpretedFunction)
    return torch.cuda.is_available()


if not torch.cuda.is_available():
    # Triton's interpreter needs its own library functions (tl.sum ...) interpreted too, which Triton
    # decides when it is first imported; without a GPU there is nothing else to compile for.
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:  # optional: the kernel is defined only where Triton is installed
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

if tl is not None:

    def _span(block, errors, hinv, hinv_stride, keep, scale, zero, rows, size, begin, end, max_code,
              HAS_KEEP: tl.constexpr, HAS_GRID: tl.constexpr, FLOAT32: tl.constexpr, COLS: tl.constexpr,
              ROWS: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        live_rows = r < rows
        k = begin + tl.arange(0, COLS)  # the block columns from the span's first one on
        live_cols = k < size
        offsets = k[:, None] * rows + r[None, :]
        live = live_cols[:, None] & live_rows[None, :]
        tile = tl.load(block + offsets, mask=live, other=0.0)
        if HAS_GRID:
            s = tl.load(scale + r, mask=live_rows, other=1.0)
            z = tl.load(zero + r, mask=live_rows, other=0.0)
        for i in range(begin, end):
            this = k == i
            w = tl.sum(tl.where(this[:, None], tile, 0.0), axis=0)
            q = w
            if HAS_GRID:
                x = (tl.math.div_rn(w, s) if FLOAT32 else w / s) + z
                whole = tl.floor(x)
                fraction = x - whole  # exact for the magnitudes a grid's codes take
                odd = (whole - 2 * tl.floor(whole * 0.5)) != 0
                code = whole + tl.where((fraction > 0.5) | ((fraction == 0.5) & odd), 1.0, 0.0)
                code = tl.minimum(tl.maximum(code, 0.0), max_code)
                q = s * (code - z)
            if HAS_KEEP:
                kept = tl.load(keep + (i - begin) * rows + r, mask=live_rows, other=1)
                q = tl.where(kept != 0, q, 0.0)
            u = tl.load(hinv + i * hinv_stride + k, mask=live_cols & (k > i), other=0.0)  # U[i, later k]
            d = tl.load(hinv + i * hinv_stride + i)
            e = tl.math.div_rn(w - q, d) if FLOAT32 else (w - q) / d
            tl.store(errors + i * rows + r, e, mask=live_rows)
            tile = tl.where(this[:, None], q[None, :], tile - u[:, None] * e[None, :])
        tl.store(block + offsets, tile, mask=live)


@functools.cache
def _kernel(interpret: bool):
    """The kernel compiled for the GPU, or wrapped for Triton's CPU interpreter (chosen per call
    rather than by TRITON_INTERPRET at import, so one process can do both)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_span)
    return triton.jit(_span)


def obs_span_triton(block: Tensor, errors: Tensor, hinv: Tensor, begin: int, end: int, keep: Tensor | None,
                    scale: Tensor | None, zero: Tensor | None, max_code: int) -> None:
    """Fix columns [begin, end) of one block of the OBS sweep in place; the arguments are those of
    runtime.kernels.obs_span (block and errors [size, rows] contiguous, hinv [size, size] with unit
    column stride, keep [end - begin, rows] bool, scale and zero [rows]), float32 or float64, on a
    CUDA device, or on the CPU through Triton's interpreter."""
    size, rows = block.shape
    if end <= begin or rows == 0:
        return
    if not (block.is_contiguous() and errors.is_contiguous() and hinv.stride(1) == 1):
        raise ValueError("block and errors must be contiguous and hinv must have unit column stride")
    cols = 1 << (size - begin - 1).bit_length()
    warps = max(1, min(4, VALUES_PER_THREAD // cols))
    tile_rows = THREADS_PER_WARP * warps
    interpret = block.device.type != "cuda"
    if not triton_available(block.device.type):
        raise RuntimeError(f"the Triton sweep kernel cannot run on {block.device.type} here" +
                           (" (Triton not installed)" if triton is None else " (Triton was imported before its interpreter was enabled)"))
    kernel = _kernel(interpret)
    keep_bytes = keep.contiguous().view(torch.uint8) if keep is not None else block  # unused when absent
    has_grid = scale is not None
    kernel[(rows + tile_rows - 1) // tile_rows,](
        block, errors, hinv, hinv.stride(0), keep_bytes, scale if has_grid else block, zero if has_grid else block,
        rows, size, begin, end, float(max_code),
        HAS_KEEP=keep is not None, HAS_GRID=has_grid, FLOAT32=block.dtype == torch.float32, COLS=cols,
        ROWS=tile_rows, num_warps=warps)
