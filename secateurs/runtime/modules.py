"""Compressed drop-in replacements of nn.Linear running on the secateurs CPU kernels.

Each module keeps its layout tensors (docs/formats.md) as buffers, validates them once at
construction, and in forward uses the compressed kernel for up to KERNEL_MAX_BATCH rows of
activations (decode, batch-1 generation) and a dense matmul on a weight decompressed on the fly
(not cached: that would cost the memory the compression saved) for larger batches (prefill),
for other dtypes, and when x needs gradients. Bitmask layers at most SPARSE_GEMM_MAX_DENSITY dense
keep their kernel at any batch (encoders, prefill), where it beats the dense matmul.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.sparse import to_sparse_semi_structured

from . import kernels, layouts, ops

# Above this many activation rows a dense matmul on the decompressed weight wins: the compressed
# kernels are bandwidth-bound at batch 1 and lose to BLAS once compute dominates.
KERNEL_MAX_BATCH = 64
# ...except for bitmask layers this sparse, whose batched kernel does work per kept weight: at
# 1024 tokens (MiniLM's 384 x 1536 shapes, Zen 3, one thread) it took 0.3-0.4x torch's fp32
# matmul time at 90% sparsity and 0.55-0.8x at 80%, but 1.1-1.7x at 50%.
SPARSE_GEMM_MAX_DENSITY = 0.25

_VALUE_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16}
_QUANT_FORMATS = {"int8": 8, "int4": 4}


def _format_dtype(format: str | None, weight: Tensor) -> torch.dtype:
    if format is None:
        if weight.dtype not in _VALUE_FORMATS.values():
            raise ValueError(f"weight dtype {weight.dtype} is not float32/bfloat16: pass format='fp32' or 'bf16'")
        return weight.dtype
    if format not in _VALUE_FORMATS:
        raise ValueError(f"format must be one of {sorted(_VALUE_FORMATS)}, got {format!r}")
    return _VALUE_FORMATS[format]


def kernel_function(name: str):
    """The kernels.py function `name`, or its custom op while torch.compile traces (the op costs ~30 us more)."""
    return getattr(ops if torch.compiler.is_compiling() else kernels, name)


class CompressedLinear(nn.Module):
    """Shared forward and bias handling; subclasses provide _compressed_matmul and to_dense."""

    # Buffers that must stay float32 when the module is cast (model.to(torch.bfloat16)).
    _float32_buffers: tuple[str, ...] = ()
    kernel_max_batch = KERNEL_MAX_BATCH
    # Whether _compressed_matmul takes bias and activation and applies them in the kernel.
    fuses_epilogue = False
    # y = activation(x Wᵀ + b) when set (kernels.ACTIVATIONS): an encoder's feed-forward activation
    # moved into its first linear layer (runtime.encoder.accelerate_encoder).
    activation: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({out_features},)")
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    def _compressed_matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        use_kernel = (flat.shape[0] <= self.kernel_max_batch and x.dtype in (torch.float32, torch.bfloat16)
                      and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()))
        if use_kernel and self.fuses_epilogue:
            y = self._compressed_matmul(flat.contiguous(), None if bias is None else self.bias.to(torch.float32),
                                        self.activation)
        elif use_kernel:
            y = self._compressed_matmul(flat.contiguous())
            if bias is not None:
                y.add_(bias)  # y is the kernel's own new tensor: no second [tokens, out_features] buffer
            y = kernels.activate(y, self.activation)
        else:
            y = kernels.activate(self._dense_forward(flat, bias), self.activation)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dense_forward(self, flat: Tensor, bias: Tensor | None) -> Tensor:
        """Many rows (or autograd, or another device): the decompressed weight through torch."""
        return F.linear(flat, self.to_dense(flat.dtype), bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self._float32_buffers:
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                setattr(self, name, buffer.to(torch.float32))
        return self

    def extra_repr(self) -> str:
        activation = f", activation={self.activation}" if self.activation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{activation}"


def per_row_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 codes of a float matrix, round to nearest: (codes, scale) with
    w ≈ scale[r] * code and scale = max |w[r]| / 127 (1 for an all-zero row)."""
    weight = weight.to(torch.float32)
    max_abs = weight.abs().amax(1)
    scale = torch.where(max_abs > 0, max_abs / 127, torch.ones_like(max_abs))
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def cast_weight(weight: Tensor, dtype: torch.dtype | None) -> Tensor:
    return weight if dtype is None else weight.to(dtype)


class _BitmaskKernelBatch:
    """Bitmask layers at most SPARSE_GEMM_MAX_DENSITY dense run their kernel at any batch; the
    bitmask kernel fuses bias and activation, and takes rows that share masks in groups."""

    fuses_epilogue = True
    values: Tensor
    in_features: int
    out_features: int

    @property
    def kernel_max_batch(self) -> int:
        density = self.values.numel() / max(1, self.in_features * self.out_features)
        return sys.maxsize if density <= SPARSE_GEMM_MAX_DENSITY else KERNEL_MAX_BATCH

    @property
    def mask_group(self) -> int:
        """layouts.mask_row_group of the bitmask, found once and again whenever the buffer is
        replaced or written in place (load_state_dict), so the kernel never trusts a stale one.
        While torch.compile traces: 1 (no promise, always correct; the check is data-dependent)."""
        if torch.compiler.is_compiling():
            return 1
        bitmask: Tensor = self.bitmask
        cached = getattr(self, "_mask_group", None)
        key = (bitmask.data_ptr(), bitmask._version, tuple(bitmask.shape))
        if cached is None or cached[0] != key:
            cached = (key, layouts.mask_row_group(bitmask))
            self._mask_group = cached
        return cached[1]


class BitmaskLinear(_BitmaskKernelBatch, CompressedLinear):
    """Unstructured sparsity: bitmask uint8 [out, ceil(in / 8)], values float32/bfloat16 [nnz],
    row_offsets int64 [out + 1]."""

    def __init__(self, bitmask: Tensor, values: Tensor, row_offsets: Tensor, in_features: int,
                 bias: Tensor | None = None) -> None:
        layouts.check_bitmask(bitmask, values, row_offsets, in_features)
        if values.dtype not in _VALUE_FORMATS.values():
            raise ValueError(f"values must be float32 or bfloat16, got {values.dtype}")
        super().__init__(in_features, bitmask.shape[0], bias)
        self.register_buffer("bitmask", bitmask.contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("row_offsets", row_offsets.contiguous())

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, format: str | None = None) -> BitmaskLinear:
        """Zeros of weight are pruned; format 'fp32' / 'bf16' (default: weight's dtype)."""
        weight = weight.detach().to(_format_dtype(format, weight))
        return cls(*layouts.bitmask_from_dense(weight), weight.shape[1], bias)

    def _compressed_matmul(self, x: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
        return kernel_function("bitmask_mm")(x, self.bitmask, self.values, self.row_offsets, self.in_features,
                                             mask_group=self.mask_group, bias=bias, activation=activation)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return cast_weight(layouts.bitmask_to_dense(self.bitmask, self.values, self.row_offsets, self.in_features), dtype)


class SparseQuantLinear(_BitmaskKernelBatch, CompressedLinear):
    """Bitmask sparsity with int8 symmetric codes: w = scale[r] * v, scale float32 [out].

    With `int8_activations` set (runtime.encoder.accelerate_encoder(..., int8_activations=True)),
    batches of at least kernels.INT8_BLOCKS_MIN_TOKENS tokens are quantized to int8 per token and
    multiplied in groups of 4 columns (kernels.int8_blocks_mm: AVX-512 VNNI, torch elsewhere)."""

    _float32_buffers = ("scale",)
    int8_activations = False

    def __init__(self, bitmask: Tensor, values: Tensor, row_offsets: Tensor, scale: Tensor, in_features: int,
                 bias: Tensor | None = None) -> None:
        layouts.check_bitmask(bitmask, values, row_offsets, in_features)
        if values.dtype != torch.int8:
            raise ValueError(f"values must be int8 codes, got {values.dtype}")
        if scale.dtype != torch.float32 or scale.shape != (bitmask.shape[0],):
            raise ValueError(f"scale must be float32 [{bitmask.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")
        # rows pruned with one mask per group (SparseGPT mask_rows) whose int8 rounding zeroed a few
        # kept weights get their group's mask back, so the shared-mask kernel path applies
        bitmask, values, row_offsets = layouts.share_row_masks(bitmask, values, row_offsets, in_features)
        super().__init__(in_features, bitmask.shape[0], bias)
        self.register_buffer("bitmask", bitmask.contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("row_offsets", row_offsets.contiguous())
        self.register_buffer("scale", scale.contiguous())

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, bias: Tensor | None = None) -> SparseQuantLinear:
        """codes int8 [out, in] in [-127, 127] (zeros = pruned), scale float32 [out]."""
        if codes.dtype != torch.int8:
            raise ValueError(f"codes must be int8, got {codes.dtype}")
        return cls(*layouts.bitmask_from_dense(codes), scale, codes.shape[1], bias)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, format: str = "int8") -> SparseQuantLinear:
        """Zeros of weight are pruned; kept weights get per-row symmetric int8 codes (round to
        nearest, scale = max |w| / 127). The mask is the weight's, even where a code rounds to 0."""
        if format != "int8":
            raise ValueError(f"SparseQuantLinear only supports format='int8', got {format!r}")
        weight = weight.detach().to(torch.float32)
        codes, scale = per_row_int8(weight)
        return cls(*layouts.bitmask_from_dense(codes, keep=weight != 0), scale, weight.shape[1], bias)

    def _compressed_matmul(self, x: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
        if self.int8_activations and x.shape[0] >= kernels.INT8_BLOCKS_MIN_TOKENS:
            y = kernels.int8_blocks_mm(x.to(torch.float32), *self.int8_blocks, self.scale, self.in_features, bias=bias,
                                       activation=activation)
            return y.to(x.dtype)
        return kernel_function("bitmask_mm")(x, self.bitmask, self.values, self.row_offsets, self.in_features,
                                             self.scale, mask_group=self.mask_group, bias=bias, activation=activation)

    @property
    def int8_blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """layouts.int8_blocks of the codes, built on first use and again whenever the values or the
        mask are replaced or written in place (load_state_dict)."""
        key = tuple((b.data_ptr(), b._version, tuple(b.shape)) for b in (self.bitmask, self.values))
        cached = getattr(self, "_int8_blocks", None)
        if cached is None or cached[0] != key:
            codes = layouts.bitmask_to_dense(self.bitmask, self.values, self.row_offsets, self.in_features)
            cached = (key, layouts.int8_blocks(codes))
            self._int8_blocks = cached
        return cached[1]

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        codes = layouts.bitmask_to_dense(self.bitmask, self.values, self.row_offsets, self.in_features)
        return cast_weight(codes.to(torch.float32) * self.scale[:, None], dtype)


# PyTorch's 2:4 semi-structured kernels (CUTLASS / cuSPARSELt) take half-precision inputs whose
# token count is a multiple of the tile. On an H100 (torch 2.11, cuSPARSELt) each call costs ~0.65 ms
# whatever its size, so 2:4 beats dense only from ~16k tokens (1.23x fp16 at 4096x4096, 1.26x at
# 11008x4096; benchmarks/results/semi_structured_cuda.md): below that the dense matmul runs. bf16
# lost at 4096x4096 even at 16k tokens (0.55x), so by default only fp16 takes this path.
SEMI_STRUCTURED_DTYPES = (torch.float16,)
SEMI_STRUCTURED_ROW_TILE = 64
SEMI_STRUCTURED_MIN_TOKENS = 16384


class NMLinear(CompressedLinear):
    """N:M sparsity: values float32/bfloat16 [out, in * n / m], in-group indices uint8, same shape."""

    def __init__(self, values: Tensor, indices: Tensor, n: int, m: int, bias: Tensor | None = None) -> None:
        layouts.check_nm(values, indices, n, m)
        if values.dtype not in _VALUE_FORMATS.values():
            raise ValueError(f"values must be float32 or bfloat16, got {values.dtype}")
        super().__init__(values.shape[1] // n * m, values.shape[0], bias)
        self.n, self.m = n, m
        self.register_buffer("values", values.contiguous())
        self.register_buffer("indices", indices.contiguous())

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, n: int = 2, m: int = 4,
                   format: str | None = None) -> NMLinear:
        """weight must have at most n nonzeros per group of m columns; format 'fp32' / 'bf16'."""
        weight = weight.detach().to(_format_dtype(format, weight))
        return cls(*layouts.nm_from_dense(weight, n, m), n, m, bias)

    def _compressed_matmul(self, x: Tensor) -> Tensor:
        return kernel_function("nm_mm")(x, self.values, self.indices, self.n, self.m)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cuda" and (self.n, self.m) == (2, 4) and x.dtype in SEMI_STRUCTURED_DTYPES
                and x.numel() >= SEMI_STRUCTURED_MIN_TOKENS * self.in_features):
            return self._semi_structured_forward(x)
        return super().forward(x)

    def _semi_structured_forward(self, x: Tensor) -> Tensor:
        """2:4 on NVIDIA GPUs through PyTorch's semi-structured sparse tensors (sparse tensor cores).
        The sparse weight is built once per dtype; the token count is padded to the kernel's tile."""
        weights = self.__dict__.setdefault("_semi_structured", {})
        if x.dtype not in weights:
            weights[x.dtype] = to_sparse_semi_structured(self.to_dense(x.dtype))
        flat = x.reshape(-1, self.in_features)
        padded = F.pad(flat, (0, 0, 0, -flat.shape[0] % SEMI_STRUCTURED_ROW_TILE))
        y = F.linear(padded, weights[x.dtype])[: flat.shape[0]]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return cast_weight(layouts.nm_to_dense(self.values, self.indices, self.n, self.m), dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, m={self.m}"


class QuantLinear(CompressedLinear):
    """Dense weight-only int8 / int4: w = scale * (q - zero) per (row, group of group_size input
    columns; None or -1 = per channel). qweight uint8 [out, in] (int8) or [out, ceil(in / 2)]
    (int4, low nibble = even column); scale, zero float32 [out, n_groups]."""

    _float32_buffers = ("scale", "zero")

    def __init__(self, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int,
                 group_size: int | None = None, bias: Tensor | None = None) -> None:
        layouts.check_quant(qweight, scale, zero, bits, in_features, group_size)
        super().__init__(in_features, qweight.shape[0], bias)
        self.bits = bits
        self.group_size = layouts.normalize_group_size(group_size, in_features)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", zero.contiguous())

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None = None,
                   format: str = "int8", group_size: int | None = None) -> QuantLinear:
        """codes [out, in] integers in [0, 2**bits - 1] (unpacked), scale / zero float32 [out, n_groups]."""
        if format not in _QUANT_FORMATS:
            raise ValueError(f"format must be one of {sorted(_QUANT_FORMATS)}, got {format!r}")
        bits = _QUANT_FORMATS[format]
        in_range = codes.numel() == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 2**bits)
        if codes.dim() != 2 or codes.is_floating_point() or not in_range:
            raise ValueError(f"codes must be a 2-D integer tensor with values in [0, {2**bits - 1}]")
        codes = codes.to(torch.uint8)
        return cls(codes if bits == 8 else layouts.pack_int4(codes), scale, zero, bits, codes.shape[1], group_size, bias)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, format: str = "int8",
                   group_size: int | None = None) -> QuantLinear:
        """Round-to-nearest on a per-(row, group) min/max grid; for GPTQ & co. use from_codes."""
        if format not in _QUANT_FORMATS:
            raise ValueError(f"format must be one of {sorted(_QUANT_FORMATS)}, got {format!r}")
        group_size = layouts.normalize_group_size(group_size, weight.shape[1])
        codes, scale, zero = layouts.quantize_rtn(weight.detach(), _QUANT_FORMATS[format], group_size)
        return cls.from_codes(codes, scale, zero, bias, format, group_size)

    def _compressed_matmul(self, x: Tensor) -> Tensor:
        return kernel_function("quant_mm")(x, self.qweight, self.scale, self.zero, self.bits, self.in_features, self.group_size)

    def codes(self) -> Tensor:
        return self.qweight if self.bits == 8 else layouts.unpack_int4(self.qweight, self.in_features)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return cast_weight(layouts.dequantize(self.codes(), self.scale, self.zero, self.group_size), dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


class SparseInt4Linear(CompressedLinear):
    """Bitmask-sparse 4-bit weight (the `bitmask-packed` format with codes of up to 4 bits): w =
    scale * (code - zero) per (row, group of a multiple of 64 columns) at kept positions, exactly 0
    elsewhere. Kept as layouts.sparse_int4_pack lays it out: the mask, then each 64-column block's
    kept codes as nibbles. One activation row runs the sparse kernel (fastest where the CPU can
    expand bytes under a mask: the avx512vbmi2 path); more rows, a dense matmul."""

    _float32_buffers = ("scale", "zero")
    kernel_max_batch = 1

    def __init__(self, bitmask: Tensor, packed: Tensor, row_offsets: Tensor, scale: Tensor, zero: Tensor,
                 in_features: int, group_size: int | None = None, bias: Tensor | None = None) -> None:
        super().__init__(in_features, bitmask.shape[0], bias)
        self.group_size = layouts.normalize_group_size(group_size, in_features)
        for name, tensor in (("bitmask", bitmask), ("packed", packed), ("row_offsets", row_offsets), ("scale", scale),
                             ("zero", zero)):
            self.register_buffer(name, tensor.contiguous())

    @classmethod
    def from_codes(cls, codes: Tensor, keep: Tensor, scale: Tensor, zero: Tensor, group_size: int | None = None,
                   bias: Tensor | None = None) -> SparseInt4Linear:
        """codes [out, in] in [0, 15] (ignored where not kept), keep bool [out, in], scale / zero
        float32 [out, groups]."""
        bitmask, packed, offsets = layouts.sparse_int4_pack(torch.where(keep, codes, 0).to(torch.uint8), keep)
        return cls(bitmask, packed, offsets, scale.float(), zero.float(), codes.shape[1], group_size, bias)

    def _compressed_matmul(self, x: Tensor) -> Tensor:
        return kernel_function("sparse_int4_mm")(x, self.bitmask, self.packed, self.row_offsets, self.scale,
                                                 self.zero, self.in_features, self.group_size)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        codes, keep = layouts.sparse_int4_unpack(self.bitmask, self.packed, self.row_offsets, self.in_features)
        return cast_weight(layouts.dequantize(codes, self.scale, self.zero, self.group_size) * keep, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
