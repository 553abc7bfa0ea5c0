"""The description of a model handed to the C++ decode path (mirrors LinearSpec / LayerSpec /
ModelSpec in csrc/decode.cpp): ctypes structures, the builder that fills them with pointers to the
model's tensors (keeping every tensor it converts alive), and the checks of what the path supports."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from secateurs.errors import SecateursError

from .modules import BitmaskLinear, NMLinear, QuantLinear, SparseInt4Linear, SparseQuantLinear, per_row_int8
from .vq_linear import VQLinear


class DecodeUnsupported(SecateursError):
    """The model cannot run on the decode path (architecture, layer type, kernels); use HF generate."""


class DecodeError(SecateursError, ValueError):
    """Bad input to a DecodeModel (token ids, lengths, options)."""


EMBEDDING_FORMATS = ("fp32", "bf16", "int8")
DEFAULT_MAX_LENGTH = 2048
PREFILL_CHUNK = 64  # tokens per batched pass of a prefill (the buffers are sized for it)

DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
KIND_DENSE, KIND_BITMASK, KIND_NM, KIND_QUANT, KIND_VQ, KIND_SPARSE_INT4 = 0, 1, 2, 3, 4, 5
ACTIVATION_IDS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2}
STATUS_UNSUPPORTED_PATH, STATUS_INVALID_ARGUMENT, STATUS_OUT_OF_MEMORY = 1, 2, 3


# --- the description handed to C++ (mirrors LinearSpec / LayerSpec / ModelSpec in decode.cpp) ---

I64, F64, PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class LinearStruct(ctypes.Structure):
    _fields_ = [("kind", I64), ("value_type", I64), ("rows", I64), ("cols", I64), ("values", PTR),
                ("mask", PTR), ("row_offsets", PTR), ("row_scale", PTR), ("indices", PTR), ("n", I64),
                ("m", I64), ("bits", I64), ("group_size", I64), ("scale", PTR), ("zero", PTR),
                ("bias", PTR), ("codebooks", I64), ("codewords", I64), ("codebook_values", PTR),
                ("mask_group", I64), ("codebook_half", PTR), ("codebook_int8", PTR), ("position_scale", PTR)]


LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class LayerStruct(ctypes.Structure):
    _fields_ = [*((name, LinearStruct) for name in LINEAR_NAMES),
                ("attn_in_norm", PTR), ("attn_out_norm", PTR), ("mlp_in_norm", PTR), ("mlp_out_norm", PTR),
                ("q_norm", PTR), ("k_norm", PTR), ("sliding_window", I64), ("rope_table", I64),
                ("attention_scale", F64)]


class ModelStruct(ctypes.Structure):
    _fields_ = [("n_layers", I64), ("hidden", I64), ("n_heads", I64), ("n_kv_heads", I64), ("head_dim", I64),
                ("vocab", I64), ("max_length", I64), ("activation", I64), ("rms_eps", F64),
                ("embed_scale", F64), ("final_softcap", F64), ("embed", PTR),
                ("embed_type", I64), ("embed_row_scale", PTR), ("final_norm", PTR), ("lm_head", LinearStruct),
                ("cos", PTR * 2), ("sin", PTR * 2), ("layers", ctypes.POINTER(LayerStruct))]


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    if getattr(library, "_secateurs_decode_declared", False):
        return library
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    library.secateurs_decode_create.argtypes = [ctypes.POINTER(ModelStruct), i32, i32, i64, ctypes.POINTER(i32),
                                                ctypes.c_char_p, i64]
    library.secateurs_decode_create.restype = ptr
    library.secateurs_decode_destroy.argtypes = [ptr]
    library.secateurs_decode_destroy.restype = None
    library.secateurs_decode_set_threads.argtypes = [ptr, i32]
    library.secateurs_decode_forward.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
    library.secateurs_decode_counters.argtypes = [ptr, ctypes.POINTER(ctypes.c_double), i32]
    library.secateurs_decode_counters.restype = None
    library._secateurs_decode_declared = True
    return library


# --- building the description ------------------------------------------------------------------

class PlanBuilder:
    """Collects the tensors the plan points to (kept alive by the DecodeModel)."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []

    def keep(self, tensor: Tensor | None) -> int | None:
        if tensor is None:
            return None
        if tensor.device.type != "cpu":
            raise DecodeUnsupported(f"tensors must be on the CPU, found one on {tensor.device}")
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        self.tensors.append(tensor)
        return tensor.data_ptr()

    def floats(self, tensor: Tensor | None) -> int | None:
        return None if tensor is None else self.keep(tensor.detach().to(torch.float32))

    def linear(self, module: nn.Module, name: str, rows: int, cols: int) -> LinearStruct:
        spec = LinearStruct(rows=rows, cols=cols, group_size=cols)
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if shape != (rows, cols):
            raise DecodeUnsupported(f"{name}: expected a [{rows}, {cols}] layer, got {type(module).__name__} {shape}")
        if isinstance(module, BitmaskLinear | SparseQuantLinear):
            values = module.values
            expect(values.dtype in DTYPE_IDS and values.numel() == int(module.row_offsets[-1]),
                    name, "bitmask values do not match the row offsets")
            expect(tuple(module.bitmask.shape) == (rows, (cols + 7) // 8)
                    and tuple(module.row_offsets.shape) == (rows + 1,), name, "bitmask layout has the wrong shape")
            spec.kind, spec.value_type = KIND_BITMASK, DTYPE_IDS[values.dtype]
            spec.values, spec.mask = self.keep(values), self.keep(module.bitmask)
            spec.row_offsets = self.keep(module.row_offsets)
            if isinstance(module, SparseQuantLinear):
                expect(values.dtype == torch.int8, name, "sparse int8 values expected")
                spec.row_scale = self.floats(module.scale)
                spec.mask_group = module.mask_group
        elif isinstance(module, NMLinear):
            expect(module.values.dtype in (torch.float32, torch.bfloat16)
                    and tuple(module.values.shape) == (rows, cols // module.m * module.n)
                    and module.indices.shape == module.values.shape, name, "N:M layout has the wrong shape")
            spec.kind, spec.value_type = KIND_NM, DTYPE_IDS[module.values.dtype]
            spec.values, spec.indices = self.keep(module.values), self.keep(module.indices)
            spec.n, spec.m = module.n, module.m
        elif isinstance(module, QuantLinear):
            group_size = module.group_size or cols
            groups = cols // group_size
            packed = cols if module.bits == 8 else (cols + 1) // 2
            expect(tuple(module.qweight.shape) == (rows, packed) and tuple(module.scale.shape) == (rows, groups)
                    and tuple(module.zero.shape) == (rows, groups), name, "quantized layout has the wrong shape")
            spec.kind, spec.values = KIND_QUANT, self.keep(module.qweight)
            spec.bits, spec.group_size = module.bits, group_size
            spec.scale, spec.zero = self.floats(module.scale), self.floats(module.zero)
        elif isinstance(module, SparseInt4Linear):
            group_size = module.group_size or cols
            expect(tuple(module.bitmask.shape) == (rows, cols // 8) and tuple(module.row_offsets.shape) == (rows + 1,)
                   and tuple(module.scale.shape) == (rows, cols // group_size), name, "sparse int4 layout has the wrong shape")
            spec.kind, spec.values, spec.mask = KIND_SPARSE_INT4, self.keep(module.packed), self.keep(module.bitmask)
            spec.row_offsets, spec.group_size = self.keep(module.row_offsets), group_size
            spec.scale, spec.zero = self.floats(module.scale), self.floats(module.zero)
        elif isinstance(module, VQLinear):
            books, words, group_size = module.codebooks.shape
            expect(tuple(module.codes.shape) == (rows, cols // group_size, books) and module.scale.shape == (rows,),
                   name, "vector-quantized layout has the wrong shape")
            spec.kind, spec.values, spec.row_scale = KIND_VQ, self.keep(module.codes), self.floats(module.scale)
            spec.codebooks, spec.codewords, spec.group_size = books, words, group_size
            spec.codebook_values = self.floats(module.codebooks)
            spec.codebook_half = self.keep(module.codebooks_half)
            if module.codebooks_int8 is not None:
                spec.codebook_int8, spec.position_scale = self.keep(module.codebooks_int8), self.floats(module.position_scale)
        elif type(module) is nn.Linear:
            weight = module.weight.detach()
            if weight.dtype not in (torch.float32, torch.bfloat16):
                weight = weight.to(torch.float32)
            spec.kind, spec.value_type, spec.values = KIND_DENSE, DTYPE_IDS[weight.dtype], self.keep(weight)
        else:
            raise DecodeUnsupported(f"{name}: layer type {type(module).__name__} is not supported by the decode path")
        bias = getattr(module, "bias", None)
        spec.bias = self.floats(bias) if isinstance(bias, Tensor) else None
        return spec

    def embedding_table(self, weight: Tensor, format: str) -> tuple[int, int, int | None]:
        """(pointer, value type, row scale pointer) of the embedding matrix stored as `format`."""
        table, scale = embedding_storage(weight, format)
        return self.keep(table), DTYPE_IDS[table.dtype], self.keep(scale)


def embedding_storage(weight: Tensor, format: str) -> tuple[Tensor, Tensor | None]:
    """The embedding (and tied LM head) matrix as the decode path stores it: (table, row scale).
    fp32 / bf16: the weight in that dtype, no scale; int8: symmetric per-row codes, w = scale[r] * code."""
    weight = weight.detach()
    if format == "int8":
        return per_row_int8(weight)
    return weight.to(torch.float32 if format == "fp32" else torch.bfloat16), None


def expect(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise DecodeUnsupported(f"{name}: {message}")


def rope_tables(rotary: nn.Module, max_length: int, head_dim: int, layer_types: Sequence[str | None]) -> dict:
    """cos / sin [max_length, head_dim] per layer type, from the model's own rotary module (so rope
    scaling variants are exactly the model's)."""
    rope_types = rotary.rope_type if isinstance(rotary.rope_type, dict) else {None: rotary.rope_type}
    tables = {}
    for layer_type in dict.fromkeys(layer_types):
        rope_type = rope_types.get(layer_type, "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            # Their frequencies depend on the sequence length seen so far: not a fixed table.
            raise DecodeUnsupported(f"rope type {rope_type!r} is not supported by the decode path")
        positions = torch.arange(max_length).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            arguments = (probe, positions) if layer_type is None else (probe, positions, layer_type)
            cos, sin = rotary(*arguments)
        cos, sin = cos[0].to(torch.float32).contiguous(), sin[0].to(torch.float32).contiguous()
        if tuple(cos.shape) != (max_length, head_dim):
            raise DecodeUnsupported(f"rotary embedding of shape {tuple(cos.shape)}, expected {(max_length, head_dim)}")
        tables[layer_type] = (cos, sin)
    return tables


def model_architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM) and model_type == "llama":
        return "llama"
    if isinstance(model, Gemma3ForCausalLM) and model_type == "gemma3_text":
        return "gemma3"
    raise DecodeUnsupported(f"the decode path runs Llama and Gemma 3 text models (LlamaForCausalLM, "
                            f"Gemma3ForCausalLM), not {type(model).__name__} (model_type {model_type!r})")


def norm_weight(norm: nn.Module, plus_one: bool) -> Tensor:
    weight = norm.weight.detach().to(torch.float32)
    return (1.0 + weight) if plus_one else weight


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


