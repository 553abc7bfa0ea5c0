"""Where the engine's block weights come from: a model in memory, or streamed from safetensors shards.

A streamed model is a skeleton on the meta device: no weight is in memory until the engine loads a
block, whose tensors are then read from the shards (pread, no memory map: mapped pages would count
in the process's memory) and dropped again once the block is written out. Only the tensors outside
the blocks (embeddings, rotary set-up) are materialized, and only while the block inputs are
captured. Peak memory is one block plus the activations, whatever the number of blocks.

Both kinds answer the same questions for the checkpoint writer: the tensors of a block as they
are to be stored, the tensors outside the blocks, the files that describe the model (config,
tokenizer) and a fingerprint that identifies the model for a resume.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from secateurs.errors import SecateursError
from secateurs.formats.registry import FormatError
from secateurs.pipeline.discovery import find_blocks

INDEX_FILE = "model.safetensors.index.json"
SAMPLED_VALUES = 4096  # values per tensor hashed into an in-memory model's fingerprint
SAMPLED_READS = 16  # evenly spaced 64 KiB reads per shard hashed into a streamed model's fingerprint


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied parameters (the LM head tied to the
    embeddings is stored once, as transformers does)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach()
    return state


class BlockSource:
    """A model and its decoder blocks, as the engine and the checkpoint writer see them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def in_blocks(self, name: str) -> bool:
        head = self.prefix + "."
        return name.startswith(head) and name[len(head):].split(".", 1)[0].isdigit()

    def layout(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Shape and stored dtype of every tensor the output will hold."""
        raise NotImplementedError

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
        raise NotImplementedError

    def restore(self, index: int, shard: Path) -> None:
        """Take a block compressed by an earlier run from its shard (resume); a streamed model holds no
        finished block, so only an in-memory one does anything."""

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def write_description(self, folder: Path) -> None:
        """config.json, generation config and tokenizer files."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


class InMemoryModel(BlockSource):
    """A model already loaded; blocks are written in the model's dtype."""

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model)
        self.tokenizer = tokenizer

    def layout(self):
        return {name: (t.shape, t.dtype) for name, t in unique_state(self.model).items()}

    def block_tensors(self, index):
        prefix = self.block_prefix(index)
        return {prefix + name: t.detach().contiguous() for name, t in self.blocks[index].state_dict().items()}

    def restore(self, index, shard):
        prefix = self.block_prefix(index)
        with safe_open(shard, "pt", backend="pread") as handle:
            self.blocks[index].load_state_dict({name.removeprefix(prefix): handle.get_tensor(name) for name in handle.keys()})

    def outside_tensors(self):
        return {name: t.contiguous() for name, t in unique_state(self.model).items() if not self.in_blocks(name)}

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


def read_header(path: Path) -> dict:
    """A safetensors file's header: {name: {dtype, shape, data_offsets}}, without reading data."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def index_shards(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> shard file, from the directory's model.safetensors.index.json (None without
    one). FormatError unless the index is readable and names present files of this directory."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{index}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard
            for shard in weight_map.values()):
        raise FormatError(f"{index}: weight_map must map tensor names to shard files of this directory")
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FormatError(f"{folder / shard}: missing (the index names it)")
    return {name: folder / shard for name, shard in weight_map.items()}


class SafetensorsFolder:
    """The tensors of a model directory (one safetensors file, or shards with an index), read on
    demand; every read opens the shards it needs and closes them again."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = index_shards(folder)
        if files is None:
            shards = sorted(folder.glob("*.safetensors"))
            if len(shards) != 1:
                raise SecateursError(f"{folder}: {len(shards)} safetensors files and no {INDEX_FILE}")
            files = {name: shards[0] for name in read_header(shards[0])}
        self.files = files
        self.headers = {path: read_header(path) for path in sorted(set(files.values()))}

    def layout(self, name: str) -> tuple[torch.Size, torch.dtype]:
        entry = self.headers[self.files[name]][name]
        if entry["dtype"] not in _DTYPES:
            raise SecateursError(f"{self.files[name]}: tensor {name} has unsupported dtype {entry['dtype']}")
        return torch.Size(entry["shape"]), _DTYPES[entry["dtype"]]

    def read(self, names) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for path, wanted in by_file.items():
            with safe_open(path, "pt", backend="pread") as handle:
                tensors.update({name: handle.get_tensor(name) for name in wanted})
        return tensors

    def fingerprint(self) -> str:
        """Every header, and evenly spaced samples of every shard's bytes (hashing whole shards of
        a large model would take minutes)."""
        digest = hashlib.sha256()
        for path, header in self.headers.items():
            digest.update(json.dumps(header, sort_keys=True).encode())
            size = path.stat().st_size
            with open(path, "rb") as handle:
                for step in range(SAMPLED_READS):
                    handle.seek(size * step // SAMPLED_READS)
                    digest.update(handle.read(1 << 16))
        return digest.hexdigest()[:16]


def stored_float_dtype(folder: Path) -> torch.dtype:
    """The one floating dtype a directory's tensors are stored in (SecateursError if they mix)."""
    shards = SafetensorsFolder(folder)
    dtypes = {dtype for shape, dtype in map(shards.layout, shards.files) if dtype.is_floating_point}
    if len(dtypes) != 1:
        raise SecateursError(f"{folder}: tensors stored in {len(dtypes)} float dtypes {sorted(map(str, dtypes))}, "
                             f"one is needed")
    return dtypes.pop()


def model_folder(spec: str) -> Path:
    """The safetensors directory behind a model spec, for streaming (embedded names resolve to the
    converted copy in the cache)."""
    from secateurs.models import _ALIASES, EMBEDDED, materialize_embedded

    name = _ALIASES.get(spec, spec)
    if name in EMBEDDED:
        return materialize_embedded(name)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise SecateursError(f"{spec}: streaming needs a model directory with config.json and .safetensors weights")
    return folder


class StreamedModel(BlockSource):
    """A model whose weights stay in its safetensors shards until a block is needed; blocks compute
    in `compute_dtype` and are written back in the dtype each tensor was stored in."""

    def __init__(self, folder: Path, compute_dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from secateurs.models import _hf_step

        location = str(folder)
        config = _hf_step(location, "unreadable model config", lambda: AutoConfig.from_pretrained(location))
        with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
        super().__init__(model.eval())
        self.folder, self.compute_dtype = folder, compute_dtype
        self.shards = SafetensorsFolder(folder)
        expected = unique_state(model)
        missing = [name for name in expected if name not in self.shards.files and self.in_blocks(name)]
        if missing:
            raise SecateursError(f"{folder}: the weights lack {len(missing)} tensor(s) of the architecture, e.g. {missing[0]}")
        self.outside_names = [name for name in self.shards.files if not self.in_blocks(name)]
        self._placeholders = model.state_dict()  # meta tensors, put back to free a block

    @functools.cached_property
    def tokenizer(self):
        """Loaded when asked for: calibration from token ids needs none."""
        from transformers import AutoTokenizer

        from secateurs.models import _hf_step

        location = str(self.folder)
        return _hf_step(location, "no usable tokenizer", lambda: AutoTokenizer.from_pretrained(location))

    def layout(self):
        return {name: self.shards.layout(name) for name in self.shards.files}

    @contextlib.contextmanager
    def outside_blocks(self):
        known = [name for name in self.outside_names if name in self._placeholders]
        tensors = {name: t.to(self.compute_dtype) if t.is_floating_point() else t
                   for name, t in self.shards.read(known).items()}
        self.model.load_state_dict(tensors, strict=False, assign=True)
        try:
            yield
        finally:
            self.model.load_state_dict({name: self._placeholders[name] for name in known}, strict=False, assign=True)

    def load(self, index):
        prefix = self.block_prefix(index)
        names = [name for name in self._placeholders if name.startswith(prefix)]
        tensors = {name.removeprefix(prefix): t.to(self.compute_dtype) if t.is_floating_point() else t
                   for name, t in self.shards.read(names).items()}
        self.blocks[index].load_state_dict(tensors, assign=True)
        return self.blocks[index]

    def release(self, index):
        prefix = self.block_prefix(index)
        self.blocks[index].load_state_dict({name.removeprefix(prefix): t for name, t in self._placeholders.items()
                                            if name.startswith(prefix)}, assign=True)

    def block_tensors(self, index):
        prefix = self.block_prefix(index)
        return {prefix + name: t.detach().to(self.shards.layout(prefix + name)[1]).contiguous()
                for name, t in self.blocks[index].state_dict().items()}

    def outside_tensors(self):
        return self.shards.read(self.outside_names)

    def write_description(self, folder):
        """Every file of the input directory except its weights (config, tokenizer, templates)."""
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_FILE, "compression.json"):
                shutil.copy2(path, folder / path.name)

    def fingerprint(self):
        return self.shards.fingerprint()
