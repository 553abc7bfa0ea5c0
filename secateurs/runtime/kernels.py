"""Typed wrappers of the C++ CPU kernels, with pure-torch fallbacks implementing the same math.

Every kernel computes y = x @ W_hat^T for activations x [batch, in_features] (float32 or bfloat16),
returns y in x's dtype and accumulates in fp32. Shapes, dtypes, devices and contiguity are checked
here (ValueError) so that nothing malformed reaches C++; the layout *contents* (popcounts,
indices) are trusted and checked once by the modules that own them. Which instruction-set path a
call takes, and loading the library, is native.py's business (re-exported here).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import layouts
from .native import (ENV_VAR, NATIVE_PATHS, PATH_IDS, TORCH_PATH, KernelPathError, forced_kernel_path, kernel_path,
                     last_kernel_path, native_library, raise_for_status, record_path, requested_path,
                     reset_kernel_path_override, supported_paths)

__all__ = ["ENV_VAR", "NATIVE_PATHS", "PATH_IDS", "TORCH_PATH", "KernelPathError", "forced_kernel_path", "kernel_path",
           "last_kernel_path", "native_library", "reset_kernel_path_override", "supported_paths", "ACTIVATIONS", "activate", "attention",
           "bitmask_mm", "dense_mm", "int8_blocks_mm", "int8_blocks_reference", "nm_mm", "obs_span", "quant_mm", "sparse_int4_mm", "vq_mm"]

_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
# Activations the kernels fuse (kernels.h: Activation), by the names transformers' configs use.
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}
_NO_ACTIVATION = 3
_STATUS_NON_FINITE = 4  # kernels.h: Status::kNonFinite


def activate(y: Tensor, activation: str | None) -> Tensor:
    """activation(y) as torch computes it (the fallbacks' and the dense paths' epilogue)."""
    if activation is None:
        return y
    if activation == "silu":
        return torch.nn.functional.silu(y)
    return torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_pytorch_tanh" else "none")


# --- argument checks ---------------------------------------------------------------------------

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_tensor(name: str, tensor: object, dtypes: tuple[torch.dtype, ...], shape: tuple[int | None, ...]) -> None:
    """dtype in dtypes, CPU, contiguous, and shape matching (None = any size)."""
    # Messages are only formatted on failure: this runs several times per kernel call.
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {tensor.device}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    actual = tensor.shape
    matches = len(actual) == len(shape)
    for expected_size, size in zip(shape, actual):
        matches = matches and (expected_size is None or expected_size == size)
    if not matches:
        expected = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {expected}, got {tuple(actual)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_activations(x: object, in_features: int) -> None:
    _check_tensor("x", x, _ACTIVATION_DTYPES, (None, in_features))


def _run(function_name: str, x: Tensor, rows: int, cols: int, *arguments: object, fallback,
         paths: tuple[str, ...] = NATIVE_PATHS, recover=None) -> Tensor:
    """Calls the native kernel on the active path (or the torch fallback) and records the path.
    `paths`: the native paths that have this kernel (on the others the fallback computes it);
    `recover(status, y)`: True when it has mended y for a nonzero status the kernel reports on
    purpose (anything else raises)."""
    path = kernel_path()
    record_path(path)
    if path == TORCH_PATH or path not in paths:
        return fallback().to(x.dtype)
    y = torch.empty(x.shape[0], rows, dtype=x.dtype)
    if x.shape[0] == 0 or rows == 0:
        return y
    pointers = [a.data_ptr() if isinstance(a, Tensor) else a for a in arguments]
    status = getattr(native_library(), function_name)(
        PATH_IDS[path], torch.get_num_threads(), x.data_ptr(), _DTYPE_IDS[x.dtype], x.shape[0], rows, cols, *pointers, y.data_ptr())
    if not (status and recover is not None and recover(status, y)):
        raise_for_status(function_name, status, path)
    return y


def _dense_matmul(x: Tensor, weight: Tensor) -> Tensor:
    return x.to(torch.float32) @ weight.to(torch.float32).T


# --- kernels -----------------------------------------------------------------------------------

def bitmask_mm(x: Tensor, bitmask: Tensor, values: Tensor, row_offsets: Tensor, in_features: int,
               row_scale: Tensor | None = None, mask_group: int = 1, bias: Tensor | None = None,
               activation: str | None = None) -> Tensor:
    """Bitmask-sparse weight [rows, in_features]: values float32 / bfloat16, or int8 codes with a
    float32 per-row `row_scale` (w = row_scale[r] * v). `mask_group` G > 1 promises that rows in
    groups of G (from row 0) have equal masks (layouts.mask_row_group(bitmask) says which G holds):
    int8 rows at batch 1 then share one gathering of their kept activations. Fused epilogue:
    y = activation(x Wᵀ + bias), bias float32 [rows], activation one of ACTIVATIONS (GELU with erf
    to 1.5e-7, as the kernels compute it, not to the last bit of torch's)."""
    _check_activations(x, in_features)
    _check_tensor("bitmask", bitmask, (torch.uint8,), (None, (in_features + 7) // 8))
    rows = bitmask.shape[0]
    _check_tensor("values", values, tuple(_DTYPE_IDS), (None,))
    _check_tensor("row_offsets", row_offsets, (torch.int64,), (rows + 1,))
    if values.dtype == torch.int8:
        _require(row_scale is not None, "int8 values need row_scale")
        _check_tensor("row_scale", row_scale, (torch.float32,), (rows,))
    else:
        _require(row_scale is None, f"row_scale is only for int8 values, got {values.dtype} values")
    # read in place (checked contiguous int64 on the CPU above): two tensor indexings cost ~10 us a call
    first, last = ctypes.c_int64.from_address(row_offsets.data_ptr()).value, ctypes.c_int64.from_address(
        row_offsets.data_ptr() + 8 * rows).value
    _require(first == 0 and last == values.numel(), f"row_offsets must run from 0 to values.numel() = {values.numel()}")
    if bias is not None:
        _check_tensor("bias", bias, (torch.float32,), (rows,))
    _require(activation is None or activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}")

    def fallback() -> Tensor:
        dense = layouts.bitmask_to_dense(bitmask, values, row_offsets, in_features).to(torch.float32)
        y = _dense_matmul(x, dense if row_scale is None else dense * row_scale[:, None])
        return activate(y if bias is None else y + bias, activation)

    _require(isinstance(mask_group, int) and mask_group >= 1, f"mask_group must be an integer >= 1, got {mask_group!r}")
    return _run("secateurs_bitmask_mm", x, rows, in_features, bitmask, values, _DTYPE_IDS[values.dtype],
                row_offsets, row_scale, mask_group, bias, ACTIVATIONS.get(activation, _NO_ACTIVATION), fallback=fallback)


# Batches of at least this many tokens take the int8-activation kernel (a tile of 64 tokens is its unit).
INT8_BLOCKS_MIN_TOKENS = 64
# The path whose native kernel int8_blocks_mm runs (it needs VNNI, which only that path requires).
INT8_BLOCKS_PATH = "avx512vbmi2"


def int8_blocks_mm(x: Tensor, groups: Tensor, codes: Tensor, block_offsets: Tensor, code_sums: Tensor,
                   row_scale: Tensor, in_features: int, bias: Tensor | None = None,
                   activation: str | None = None) -> Tensor:
    """int8 weights in blocks of 4 columns (layouts.int8_blocks) times x quantized to int8 per token
    (q = round(x * 127 / max |x|), kernels.h: Int8BlockArgs): y = activation(float(q . codes) *
    (token scale * row_scale) + bias). The integer sums are exact, so the native kernel (AVX-512
    VNNI) and the torch computation of other paths agree bit for bit before the activation. A
    token holding a NaN or an infinity is computed in float32 instead (x @ (codes * row_scale)ᵀ)."""
    _check_tensor("x", x, (torch.float32,), (None, in_features))
    _check_tensor("block_offsets", block_offsets, (torch.int64,), (None,))
    rows = block_offsets.shape[0] - 1
    _check_tensor("groups", groups, (torch.int32,), (None,))
    _check_tensor("codes", codes, (torch.int32,), (groups.shape[0],))
    _check_tensor("code_sums", code_sums, (torch.int32,), (rows,))
    _check_tensor("row_scale", row_scale, (torch.float32,), (rows,))
    if bias is not None:
        _check_tensor("bias", bias, (torch.float32,), (rows,))
    _require(activation is None or activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}")
    _require(in_features > 0, "in_features must be positive")

    def dense_codes() -> Tensor:
        return layouts.int8_blocks_to_dense(groups, codes, block_offsets, in_features)

    def recompute_non_finite(status: int, y: Tensor) -> bool:
        if status != _STATUS_NON_FINITE:
            return False
        rows_with = ~torch.isfinite(x).all(dim=1)
        y[rows_with] = int8_blocks_reference(x[rows_with], dense_codes(), row_scale, bias, activation)
        return True

    return _run("secateurs_int8_blocks_mm", x, rows, in_features, groups, codes, block_offsets, code_sums, row_scale,
                bias, ACTIVATIONS.get(activation, _NO_ACTIVATION),
                fallback=lambda: int8_blocks_reference(x, dense_codes(), row_scale, bias, activation),
                paths=(INT8_BLOCKS_PATH,), recover=recompute_non_finite)


def int8_blocks_reference(x: Tensor, codes: Tensor, row_scale: Tensor, bias: Tensor | None,
                          activation: str | None) -> Tensor:
    """int8_blocks_mm in torch, from dense int8 codes [rows, in_features]: the same per-token
    quantization and exact integer sums (float64), the same float32 scaling."""
    amax = x.abs().amax(dim=1)
    zero = amax < 1e-30  # below it a token rounds to zero: its inverse scale would overflow
    levels = torch.full_like(amax, 127.0)  # tensor / tensor: IEEE division, as the kernel's (127 / t is not)
    inverse = torch.where(zero, 0.0, levels / amax)
    q = torch.round(x * inverse[:, None])
    scale = torch.where(zero, 0.0, amax / levels)
    y = (q.double() @ codes.double().T).float() * (scale[:, None] * row_scale[None, :])
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        y[~finite] = x[~finite] @ (codes.float() * row_scale[:, None]).T
    return activate(y if bias is None else y + bias, activation)


def nm_mm(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    """N:M-sparse weight: values [rows, in_features * n / m] float32 / bfloat16, uint8 indices."""
    _require(isinstance(n, int) and isinstance(m, int) and 0 < n <= m <= 256, f"bad N:M = {n}:{m}")
    _check_tensor("values", values, _ACTIVATION_DTYPES, (None, None))
    _require(values.shape[1] % n == 0, f"values has {values.shape[1]} columns, not a multiple of n = {n}")
    rows, in_features = values.shape[0], values.shape[1] // n * m
    _check_tensor("indices", indices, (torch.uint8,), tuple(values.shape))
    _check_activations(x, in_features)
    return _run("secateurs_nm_mm", x, rows, in_features, n, m, values, _DTYPE_IDS[values.dtype], indices,
                fallback=lambda: _dense_matmul(x, layouts.nm_to_dense(values, indices, n, m)))


def quant_mm(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int,
             group_size: int | None = None) -> Tensor:
    """Dense weight-only quantized weight: w = scale * (q - zero) per (row, group); int8 codes
    uint8 [rows, in_features], int4 packed uint8 [rows, ceil(in_features / 2)]."""
    _require(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    _check_activations(x, in_features)
    group_size = layouts.normalize_group_size(group_size, in_features)
    packed_cols = in_features if bits == 8 else (in_features + 1) // 2
    _check_tensor("qweight", qweight, (torch.uint8,), (None, packed_cols))
    rows, groups = qweight.shape[0], in_features // group_size if group_size else 1
    _check_tensor("scale", scale, (torch.float32,), (rows, groups))
    _check_tensor("zero", zero, (torch.float32,), (rows, groups))

    def fallback() -> Tensor:
        codes = qweight if bits == 8 else layouts.unpack_int4(qweight, in_features)
        return _dense_matmul(x, layouts.dequantize(codes, scale, zero, group_size))

    return _run("secateurs_quant_mm", x, rows, in_features, bits, group_size or 0, qweight, scale, zero,
                fallback=fallback)


def dense_mm(x: Tensor, weight: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """Dense weight [rows, in_features]: float32 / bfloat16, or int8 codes with a float32 per-row
    `row_scale` (w = row_scale[r] * v). The decode path's kernel for unpruned layers and LM heads."""
    _check_tensor("weight", weight, tuple(_DTYPE_IDS), (None, None))
    rows, in_features = weight.shape
    _check_activations(x, in_features)
    if weight.dtype == torch.int8:
        _require(row_scale is not None, "int8 weights need row_scale")
        _check_tensor("row_scale", row_scale, (torch.float32,), (rows,))
    else:
        _require(row_scale is None, f"row_scale is only for int8 weights, got {weight.dtype} weights")

    def fallback() -> Tensor:
        dense = weight.to(torch.float32)
        return _dense_matmul(x, dense if row_scale is None else dense * row_scale[:, None])

    return _run("secateurs_dense_mm", x, rows, in_features, weight, _DTYPE_IDS[weight.dtype], row_scale,
                fallback=fallback)


def vq_mm(x: Tensor, codes: Tensor, codebooks: Tensor, scale: Tensor, codebooks_half: Tensor | None = None,
          integer: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Vector-quantized weight (layouts.vq_to_dense): codes [rows, in / g, M], uint8 for up to
    256 codewords, else int16 holding the code's 16 bits; codebooks float32 [M, K, g]; scale
    float32 [rows]. Each group's weights are rebuilt from its codewords and multiplied into x.
    `codebooks_half` (layouts.vq_half_codebooks: the same values as IEEE half bits) lets the kernel
    read half the bytes; it must hold exactly the codebooks' values. `integer` (layouts.
    vq_int8_codebooks: int8 codebooks and position scales) computes with those and int8 activations
    instead, as layouts.vq_int8_matmul does: an approximation of the codebooks' product."""
    _check_tensor("codebooks", codebooks, (torch.float32,), (None, None, None))
    if codebooks_half is not None:
        _check_tensor("codebooks_half", codebooks_half, (torch.int16,), tuple(codebooks.shape))
    if integer is not None:
        books_int8, position_scale = integer
        _check_tensor("codebooks_int8", books_int8, (torch.int8,), tuple(codebooks.shape))
        _check_tensor("position_scale", position_scale, (torch.float32,), (8,))
        # the books' sum fitting int8 is vq_int8_codebooks' guarantee (per call, a check costs a layer)
        _require(codebooks.shape[2] == 8 and codebooks.shape[1] <= 256 and codebooks.shape[0] <= 4
                 and codes.shape[1] <= 16384, "integer codebooks: groups of 8, <= 256 words, 4 books, 131072 inputs")
    books, words, group_size = codebooks.shape
    _require(1 <= books <= 16 and 1 <= words <= 65536 and group_size >= 1,
             f"need 1..16 codebooks of 1..65536 codewords, got {books} x {words}")
    _check_tensor("codes", codes, (torch.uint8,) if words <= 256 else (torch.int16,), (None, None, books))
    rows, in_features = codes.shape[0], codes.shape[1] * group_size
    _check_activations(x, in_features)
    _check_tensor("scale", scale, (torch.float32,), (rows,))

    def fallback() -> Tensor:
        unsigned = codes.to(torch.int32) % 65536 if codes.dtype == torch.int16 else codes
        y = None if integer is None else layouts.vq_int8_matmul(x, unsigned, *integer, scale)  # None: not finite
        return _dense_matmul(x, layouts.vq_to_dense(unsigned, codebooks, scale)) if y is None else y.to(x.dtype)

    books_int8, position_scale = integer if integer is not None else (None, None)
    return _run("secateurs_vq_mm", x, rows, in_features, group_size, books, words, codes, codebooks, codebooks_half,
                books_int8, position_scale, scale, fallback=fallback)


def sparse_int4_mm(x: Tensor, bitmask: Tensor, packed: Tensor, row_offsets: Tensor, scale: Tensor, zero: Tensor,
                   in_features: int, group_size: int | None = None) -> Tensor:
    """Bitmask-sparse 4-bit codes (layouts.sparse_int4_pack), w = scale * (code - zero) per (row,
    group of a multiple of 64 columns) at kept positions, 0 elsewhere; one activation row."""
    _check_activations(x, in_features)
    _require(x.shape[0] == 1, f"the sparse int4 kernel takes one activation row, got {x.shape[0]}")
    _require(in_features % 64 == 0, f"the sparse int4 layout needs in_features % 64 == 0, got {in_features}")
    _check_tensor("bitmask", bitmask, (torch.uint8,), (None, in_features // 8))
    rows = bitmask.shape[0]
    group_size = layouts.normalize_group_size(group_size, in_features)
    _require(group_size is None or group_size % 64 == 0, f"group_size must be a multiple of 64, got {group_size}")
    groups = in_features // group_size if group_size else 1
    _check_tensor("packed", packed, (torch.uint8,), (None,))
    _check_tensor("row_offsets", row_offsets, (torch.int64,), (rows + 1,))
    _check_tensor("scale", scale, (torch.float32,), (rows, groups))
    _check_tensor("zero", zero, (torch.float32,), (rows, groups))
    _require(int(row_offsets[-1]) + 32 <= packed.numel(), "packed codes need 32 spare bytes past the last row")

    def fallback() -> Tensor:
        codes, keep = layouts.sparse_int4_unpack(bitmask, packed, row_offsets, in_features)
        return _dense_matmul(x, layouts.dequantize(codes, scale, zero, group_size) * keep)

    return _run("secateurs_sparse_int4_mm", x, rows, in_features, group_size or 0, bitmask, packed, row_offsets, scale,
                zero, fallback=fallback)


def obs_span(block: Tensor, errors: Tensor, hinv: Tensor, begin: int, end: int, keep: Tensor | None,
             scale: Tensor | None, zero: Tensor | None, max_code: int, fallback) -> None:
    """Fix columns [begin, end) of one block of the OBS column sweep in place (algorithms/obs.py):
    block and errors are [size, rows] (W^T), hinv the block's [size, size] slice of the upper
    Cholesky factor (rows may be strided), keep [end - begin, rows] bool or None, scale and zero
    [rows] or None. float32 or float64. On a CUDA device the Triton twin runs (gpu_sweep.py) where
    Triton is installed; `fallback()` does the same in torch on the torch path and for tensors on
    other devices or without Triton (a sweep on a GPU stays there)."""
    if block.device.type == "cpu":
        path = kernel_path()
    else:
        from . import gpu_sweep  # imports Triton: only for a sweep off the CPU

        path = "triton" if block.device.type == "cuda" and requested_path() != TORCH_PATH and \
            gpu_sweep.triton_available() else TORCH_PATH
    record_path(path)
    if path == "triton":
        gpu_sweep.obs_span_triton(block, errors, hinv, begin, end, keep, scale, zero, max_code)
        return
    if path == TORCH_PATH:
        fallback()
        return
    size, rows = block.shape
    _require(block.dtype in (torch.float32, torch.float64), f"block must be float32 or float64, got {block.dtype}")
    dtypes = (block.dtype,)
    _check_tensor("block", block, dtypes, (None, None))
    _check_tensor("errors", errors, dtypes, (size, rows))
    _require(hinv.dtype == block.dtype and hinv.shape == (size, size) and hinv.stride(1) == 1,
             f"hinv must be a {block.dtype} [{size}, {size}] view with unit column stride")
    _require(0 <= begin <= end <= size, f"need 0 <= begin <= end <= {size}, got {begin}, {end}")
    if keep is not None:
        _check_tensor("keep", keep, (torch.bool,), (end - begin, rows))
    _require((scale is None) == (zero is None), "scale and zero go together")
    if scale is not None:
        _check_tensor("scale", scale, dtypes, (rows,))
        _check_tensor("zero", zero, dtypes, (rows,))
    status = native_library().secateurs_obs_span(
        torch.get_num_threads(), 0 if block.dtype == torch.float32 else 1, block.data_ptr(), errors.data_ptr(),
        hinv.data_ptr(), hinv.stride(0), rows, size, begin, end, None if keep is None else keep.data_ptr(),
        None if scale is None else scale.data_ptr(), None if zero is None else zero.data_ptr(), max_code)
    raise_for_status("secateurs_obs_span", status, path)


def attention(query: Tensor, key: Tensor, value: Tensor, scale: float, causal: bool = True,
              key_mask: Tensor | None = None) -> Tensor:
    """softmax(scale * Q Kᵀ) V (csrc/attention.cpp), float32 on the CPU: query [batch, heads, seq, dim], key
    and value [batch, kv_heads, seq, dim] (unit stride along dim). causal: keys up to each query's position;
    key_mask, bool [batch, seq]: False hides a key from its batch entry's queries (padding; a query with no
    key left gives 0). Returns [batch, seq, heads, dim] contiguous, as output projections take it."""
    _require(query.dim() == 4 and key.dim() == 4 and value.shape == key.shape, "query, key and value must be 4-d, key and value alike")
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    _require(key.shape[0] == batch and key.shape[2] == seq and key.shape[3] == dim and heads % kv_heads == 0,
             f"key/value {tuple(key.shape)} do not fit query {tuple(query.shape)}")
    _require(all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key, value)),
             "query, key and value must be float32 on the CPU")
    _require(key_mask is None or (key_mask.dtype == torch.bool and key_mask.shape == (batch, seq)), "key_mask: bool [batch, seq]")
    path = kernel_path()
    native = TORCH_PATH if dim % 16 else path  # the micro-kernel takes head dims in multiples of 16
    record_path(native)
    if native == TORCH_PATH:
        allowed = torch.ones(batch, 1, seq, seq, dtype=torch.bool).tril(0 if causal else seq)
        allowed = allowed if key_mask is None else allowed & key_mask[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale,
                                                               enable_gqa=heads != kv_heads)
        return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0).transpose(1, 2).contiguous()
    tensors = [t if t.stride(3) == 1 else t.contiguous() for t in (query, key, value)]
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()  # held until the call returns
    out = torch.empty(batch, seq, heads, dim)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in tensors]
    status = native_library().secateurs_attention(
        PATH_IDS[native], torch.get_num_threads(), tensors[0].data_ptr(), strides[0], tensors[1].data_ptr(), strides[1],
        tensors[2].data_ptr(), strides[2], out.data_ptr(), batch, seq, heads, kv_heads, dim, scale, int(causal),
        None if mask is None else mask.data_ptr())
    raise_for_status("secateurs_attention", status, native)
    return out
