"""A model and its decoder blocks as the engine and the checkpoint writers see them.

A source answers: which blocks there are, the tensors of a block as they are to be stored, the
tensors outside the blocks, the files that describe the model (config, tokenizer) and a fingerprint
that identifies the model for a resume. `InMemoryModel` is a model already loaded; a streamed model
(pipeline/streaming.py) reads each block from its safetensors shards only while it is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from secateurs.io import CONFIG_FILE, dominant_float_dtype, write_json
from secateurs.structure import find_blocks

SAMPLED_VALUES = 4096  # values per tensor hashed into an in-memory model's fingerprint


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied parameters (the LM head tied to the
    embeddings is stored once, as transformers does)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach()
    return state


def stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as it is written: floating tensors in `dtype` (None: as they are), contiguous."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous()


class BlockSource:
    """A model and its decoder blocks. `store_dtype` is the floating dtype tensors are written in
    (None: each tensor's own)."""

    def __init__(self, model: nn.Module, store_dtype: torch.dtype | None = None):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self.store_dtype = store_dtype

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def in_blocks(self, name: str) -> bool:
        head = self.prefix + "."
        return name.startswith(head) and name[len(head):].split(".", 1)[0].isdigit()

    def layout(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Shape and stored dtype of every tensor the output will hold."""
        raise NotImplementedError

    def float_dtype(self) -> torch.dtype:
        """The floating dtype most of the written weights have (by bytes)."""
        return dominant_float_dtype(self.layout().values()) or torch.float32

    def output_bytes(self) -> int:
        return sum(shape.numel() * dtype.itemsize for shape, dtype in self.layout().values())

    def outside_blocks(self):
        """Context in which the tensors outside the blocks are real (for capturing block inputs)."""
        return contextlib.nullcontext()

    def load(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release(self, index: int) -> None:
        """Called once the engine is done with a block (and its checkpoint is written)."""

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        prefix = self.block_prefix(index)
        return {prefix + name: stored(t, self.store_dtype) for name, t in self.blocks[index].state_dict().items()}

    def restore(self, index: int, read_tensors: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Take a block finished by an earlier run (resume); `read_tensors()` gives its dense tensors
        by full name. A streamed model holds no finished block, so only an in-memory one reads them."""

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def write_description(self, folder: Path) -> None:
        """config.json, generation config and tokenizer files."""
        raise NotImplementedError

    def describe(self, folder: Path) -> None:
        """write_description, with config.json's dtype set to the dtype the weights are stored in."""
        self.write_description(folder)
        if self.store_dtype is not None:
            config_file = Path(folder) / CONFIG_FILE
            config = json.loads(config_file.read_text())
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = str(self.store_dtype).removeprefix("torch.")
            write_json(config_file, config)

    def fingerprint(self) -> str:
        raise NotImplementedError


class InMemoryModel(BlockSource):
    """A model already loaded."""

    def __init__(self, model: nn.Module, tokenizer=None, store_dtype: torch.dtype | None = None):
        super().__init__(model, store_dtype)
        self.tokenizer = tokenizer

    def layout(self):
        return {name: (t.shape, self.store_dtype if self.store_dtype and t.is_floating_point() else t.dtype)
                for name, t in unique_state(self.model).items()}

    def restore(self, index, read_tensors):
        tensors = read_tensors()
        prefix = self.block_prefix(index)
        block = self.blocks[index]
        state = block.state_dict()
        block.load_state_dict({name.removeprefix(prefix): t.to(state[name.removeprefix(prefix)].dtype)
                               for name, t in tensors.items()})

    def outside_tensors(self):
        return {name: stored(t, self.store_dtype) for name, t in unique_state(self.model).items()
                if not self.in_blocks(name)}

    def write_description(self, folder):
        self.model.config.save_pretrained(folder)
        if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
            self.model.generation_config.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    def fingerprint(self):
        """Names, shapes, dtypes and a strided sample of every tensor's values."""
        digest = hashlib.sha256()
        for name, tensor in unique_state(self.model).items():
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)].float().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
        return digest.hexdigest()[:16]
