"""Catch what each decoder block receives: the hidden states into the first block, and the keyword
arguments of every block (attention masks differ per block in models with sliding-window layers).

Each block is swapped for a recorder that returns its input unchanged; the last recorder stops the
forward, so neither the blocks nor the LM head run. Only the embeddings and the model's
mask/rotary set-up are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.errors import SecateursError


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.sink["hidden"] = hidden
        self.sink.setdefault("kwargs", []).append(kwargs)
        if self.last:
            raise _StopForward
        return hidden


@dataclass
class BlockInputs:
    """Calibration inputs split into chunks: hidden states per chunk, and per block and chunk the
    keyword arguments the model passes to that block."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]] = field(default_factory=list)  # [block][chunk]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, token_ids: torch.Tensor, chunk_size: int) -> BlockInputs:
    originals = list(blocks)
    hidden, per_chunk = [], []
    try:
        for start in range(0, token_ids.shape[0], chunk_size):
            sink: dict = {}
            for index in range(len(originals)):
                blocks[index] = _Recorder(index, index == len(originals) - 1, sink)
            try:
                model(token_ids[start : start + chunk_size], use_cache=False)
            except _StopForward:
                pass
            else:
                raise SecateursError(f"{type(model).__name__}: the forward did not reach its last block")
            hidden.append(sink["hidden"])
            per_chunk.append(sink["kwargs"])
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    # per_chunk is [chunk][block]; the engine walks block by block.
    return BlockInputs(hidden, [list(chunks) for chunks in zip(*per_chunk)])


def to_device(value, device):
    """Move the tensors inside nested kwargs (tuples of cos/sin, masks) to a device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    out = block(hidden.to(device), **to_device(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out
