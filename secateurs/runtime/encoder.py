"""Hugging Face models on secateurs' CPU kernels beyond the linear layers: attention and the
feed-forward activation.

`attention_forward` is a transformers attention function (AttentionInterface): self-attention,
causal without a mask or bidirectional with a key padding mask, float32 on the CPU, goes through
`kernels.attention`; anything else (another mask, a KV cache, soft-capping, sinks, dropout, other
dtypes or devices) through transformers' own SDPA function, unchanged. The compression engine's
calibration passes use it for causal decoders (pipeline/attention.py); `accelerate_encoder` puts a
BERT-family encoder on it for inference and moves the feed-forward activation into the bitmask
kernel of a compressed intermediate layer, where it costs no extra pass over its output.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.activations import (
    GELUActivation,
    NewGELUActivation,
    PytorchGELUTanh,
    SiLUActivation,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from secateurs.errors import SecateursError

from . import kernels
from .modules import CompressedLinear, SparseQuantLinear

IMPLEMENTATION = "secateurs"
# Keyword arguments that change the result of SDPA-style attention beyond a masked softmax.
_EXTRAS = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def key_padding(attention_mask: Tensor | None, batch: int, seq: int) -> Tensor | None | bool:
    """The key padding mask [batch, seq] that a boolean [batch, 1, seq, seq] attention mask
    (transformers' SDPA masks) amounts to when every query row of an entry is the same; None
    without a mask; False when the mask is anything else (causal, float, per head)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape != (batch, 1, seq, seq):
        return False
    first = attention_mask[:, 0, 0, :]
    return first if bool((attention_mask[:, 0] == first[:, None, :]).all()) else False


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """An AttentionInterface function: (output [batch, seq, heads, dim], None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, _, seq, dim = query.shape
    key_mask = key_padding(attention_mask, batch, seq) if key.shape[2] == seq else False
    plain = (key_mask is not False and dropout == 0.0 and query.device.type == "cpu"
             and not any(kwargs.get(name) for name in _EXTRAS)
             and all(t.dtype == torch.float32 for t in (query, key, value)))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    return kernels.attention(query, key, value, scale, causal=bool(causal), key_mask=key_mask), None


def use_native_attention(model: nn.Module) -> nn.Module:
    """Switch a transformers model (in place) to `attention_forward`; returns it. SecateursError for
    a model that takes no attention implementation by name (not a transformers model, or an
    architecture without the attention interface)."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except (AttributeError, ValueError) as error:
        raise SecateursError(f"{type(model).__name__} cannot run secateurs' attention: {error}") from error
    return model


def fuse_activations(model: nn.Module) -> int:
    """In place: every feed-forward block written as `dense` then `intermediate_act_fn` (BERT,
    RoBERTa, MiniLM, ... in transformers) whose dense layer is a compressed bitmask layer with a
    fusable activation computes the activation in the kernel. Returns how many were fused."""
    fused = 0
    for module in model.modules():
        dense, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        name = activation_name(act)
        if isinstance(dense, CompressedLinear) and dense.fuses_epilogue and dense.activation is None and name:
            dense.activation = name
            module.intermediate_act_fn = nn.Identity()
            fused += 1
    return fused


def activation_name(function: object) -> str | None:
    """The kernels.ACTIVATIONS name of a transformers activation module, or None."""
    if isinstance(function, GELUActivation):  # erf GELU, in C or Python
        return "gelu"
    if isinstance(function, PytorchGELUTanh | NewGELUActivation):
        return "gelu_pytorch_tanh"
    if isinstance(function, SiLUActivation | nn.SiLU):
        return "silu"
    return None


def accelerate_encoder(model: nn.Module, int8_activations: bool = False) -> nn.Module:
    """A BERT-family encoder (in place) on secateurs' attention kernel, with the feed-forward
    activation fused into compressed intermediate layers; returns it. Outputs equal the model's
    own within float32 rounding (GELU to 1.5e-7). With int8_activations, its sparse int8 layers
    (SparseQuantLinear) also quantize their inputs to int8 per token at batches of 64 tokens or
    more (AVX-512 VNNI; about 0.7% of a layer's largest output, so check the task's accuracy)."""
    fuse_activations(model)
    layers = use_int8_activations(model, int8_activations)
    if int8_activations and layers and kernels.kernel_path() != kernels.INT8_BLOCKS_PATH:
        warnings.warn(f"int8 activations have no kernel on the {kernels.kernel_path()} path (AVX-512 VNNI needed): "
                      "torch computes them, slower than the float32 sparse kernels", stacklevel=2)
    return use_native_attention(model)


def use_int8_activations(model: nn.Module, on: bool = True) -> int:
    """Every SparseQuantLinear of `model` (in place) on int8 activations, or back on float ones
    (SparseQuantLinear.int8_activations); returns how many layers it set."""
    layers = [module for module in model.modules() if isinstance(module, SparseQuantLinear)]
    for module in layers:
        module.int8_activations = on
    return len(layers)
