"""Block weights streamed from safetensors shards (the in-memory kind is secateurs.sources).

A streamed model is a skeleton on the meta device: no weight is in memory until the engine loads a
block, whose tensors are then read from the shards (pread, no memory map: mapped pages would count
in the process's memory) and dropped again once the block is written out. Only the tensors outside
the blocks (embeddings, rotary set-up) are materialized, and only while the block inputs are
captured. Peak memory is one block plus the activations, whatever the number of blocks.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from pathlib import Path

import torch

from secateurs.errors import SecateursError
from secateurs.io import CHECKSUMS_FILE, INDEX_FILE, SafetensorsFolder, verify_checksums
from secateurs.models import hf_step, resolve_name, EMBEDDED, materialize_embedded
from secateurs.sources import BlockSource, stored, unique_state


def model_folder(spec: str) -> Path:
    """The safetensors directory behind a model spec, for streaming (embedded names resolve to the
    converted copy in the cache)."""
    name = resolve_name(spec)
    if name in EMBEDDED:
        return materialize_embedded(name)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise SecateursError(f"{spec}: streaming needs a model directory with config.json and .safetensors weights")
    return folder


class StreamedModel(BlockSource):
    """A model whose weights stay in its safetensors shards until a block is needed; blocks compute
    in `compute_dtype` and are written back in the dtype each tensor was stored in."""

    def __init__(self, folder: Path, compute_dtype: torch.dtype = torch.float32, store_dtype: torch.dtype | None = None,
                 verify: bool | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        location = str(folder)
        verify_checksums(folder, verify)
        config = hf_step(location, "unreadable model config", lambda: AutoConfig.from_pretrained(location))
        with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
        super().__init__(model.eval(), store_dtype)
        self.folder, self.compute_dtype = folder, compute_dtype
        self.shards = SafetensorsFolder(folder)
        expected = unique_state(model)
        missing = [name for name in expected if name not in self.shards.files and self.in_blocks(name)]
        if missing:
            raise SecateursError(f"{folder}: the weights lack {len(missing)} tensor(s) of the architecture, e.g. {missing[0]}")
        self.outside_names = [name for name in self.shards.files if not self.in_blocks(name)]
        self.placeholders = model.state_dict()  # meta tensors, put back to free a block

    def stored_dtype(self, name: str) -> torch.dtype:
        dtype = self.shards.layout(name)[1]
        return self.store_dtype if self.store_dtype is not None and dtype.is_floating_point else dtype

    @functools.cached_property
    def tokenizer(self):
        """Loaded when asked for: calibration from token ids needs none."""
        from transformers import AutoTokenizer

        location = str(self.folder)
        return hf_step(location, "no usable tokenizer", lambda: AutoTokenizer.from_pretrained(location))

    def layout(self):
        return {name: (self.shards.layout(name)[0], self.stored_dtype(name)) for name in self.shards.files}

    @contextlib.contextmanager
    def outside_blocks(self):
        known = [name for name in self.outside_names if name in self.placeholders]
        tensors = {name: t.to(self.compute_dtype) if t.is_floating_point() else t
                   for name, t in self.shards.read(known).items()}
        self.model.load_state_dict(tensors, strict=False, assign=True)
        try:
            yield
        finally:
            self.model.load_state_dict({name: self.placeholders[name] for name in known}, strict=False, assign=True)

    def load(self, index):
        prefix = self.block_prefix(index)
        names = [name for name in self.placeholders if name.startswith(prefix)]
        tensors = {name.removeprefix(prefix): t.to(self.compute_dtype) if t.is_floating_point() else t
                   for name, t in self.shards.read(names).items()}
        self.blocks[index].load_state_dict(tensors, assign=True)
        return self.blocks[index]

    def release(self, index):
        prefix = self.block_prefix(index)
        self.blocks[index].load_state_dict({name.removeprefix(prefix): t for name, t in self.placeholders.items()
                                            if name.startswith(prefix)}, assign=True)

    def block_tensors(self, index):
        prefix = self.block_prefix(index)
        return {prefix + name: stored(t.to(self.stored_dtype(prefix + name)), None)
                for name, t in self.blocks[index].state_dict().items()}

    def outside_tensors(self):
        return {name: stored(t, self.store_dtype) for name, t in self.shards.read(self.outside_names).items()}

    def write_description(self, folder):
        """Every file of the input directory except its weights (config, tokenizer, templates)."""
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_FILE, CHECKSUMS_FILE, "compression.json"):
                shutil.copy2(path, folder / path.name)

    def fingerprint(self):
        return self.shards.fingerprint()
