"""Find a decoder-only model's list of blocks and the linear layers inside a block, by structure.

The blocks are the nn.ModuleList of identical modules holding the most parameters, so no model
path such as `model.model.layers` is hard-coded. Linear layers are nn.Linear and transformers'
Conv1D (GPT-2), whose weight is stored transposed ([in, out]).
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.errors import SecateursError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1 or not linear_layers(module[0]):
                continue
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = (name, module), params
    if best is None:
        raise SecateursError(f"{type(model).__name__}: no list of decoder blocks with linear layers found")
    return best


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in block.named_modules() if is_linear(module)}


def is_transposed(module: nn.Module) -> bool:
    """Conv1D keeps its weight as [in, out]; the algorithms want [out, in]."""
    return not isinstance(module, nn.Linear)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out_features, in_features] (a copy for Conv1D)."""
    weight = module.weight.data
    return weight.t().contiguous() if is_transposed(module) else weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    weight = weight.t() if is_transposed(module) else weight
    module.weight.data.copy_(weight.to(module.weight.dtype))


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_transposed(module) else module.weight.shape[0]


def eos_token_ids(model: nn.Module, tokenizer=None) -> set[int]:
    """The ids that end a generation: the model's generation_config.eos_token_id (an id or ids, as
    transformers' generate reads it) and the tokenizer's eos_token_id."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(i for i in source if isinstance(i, int))
    return ids
