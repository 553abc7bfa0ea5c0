"""Where the calibration activations between two blocks live: in memory, or offloaded to disk.

The engine holds one block's inputs as a sequence of chunks ([chunk, seq, hidden] tensors). With
offloading, each chunk is a safetensors file read back when the block runs on it, so only one
chunk is in memory at a time; the block's outputs are written to a fresh folder as they are made.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHUNK_FILE = "chunk-{:05d}.safetensors"


def write_chunk(tensor: torch.Tensor, path: Path, durable: bool = False) -> None:
    """One chunk as a file; `durable` flushes it to disk (checkpoints must survive a power cut,
    offloaded working copies need not)."""
    save_file({"hidden": tensor.detach().cpu().contiguous()}, path)
    if durable:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def read_chunk(path: Path) -> torch.Tensor:
    with safe_open(path, "pt", backend="pread") as handle:
        return handle.get_tensor("hidden")


def save_chunks(chunks: Iterable[torch.Tensor], folder: Path) -> None:
    """Durable copies of the chunks in `folder` (the caller renames the folder into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, chunk in enumerate(chunks):
        write_chunk(chunk, folder / CHUNK_FILE.format(index), durable=True)


def load_chunks(folder: Path) -> Iterator[torch.Tensor]:
    """The chunks saved by `save_chunks`, one at a time, in order."""
    for path in sorted(folder.glob("chunk-*.safetensors")):
        yield read_chunk(path)


class OffloadedChunks(Sequence):
    """A read-only sequence of chunk files; indexing reads the chunk from disk."""

    def __init__(self, folder: Path, count: int):
        self.folder, self.count = folder, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return read_chunk(self.folder / CHUNK_FILE.format(index % self.count))


def keep_chunks(chunks: Iterable[torch.Tensor], offload_dir: Path | None) -> Sequence[torch.Tensor]:
    """Materialize a stream of chunks: a list in memory, or files in a new folder of `offload_dir`."""
    if offload_dir is None:
        return [chunk.cpu() for chunk in chunks]
    folder = Path(offload_dir) / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    count = 0
    for count, chunk in enumerate(chunks, start=1):
        write_chunk(chunk, folder / CHUNK_FILE.format(count - 1))
    return OffloadedChunks(folder, count)


def discard_chunks(chunks: Sequence[torch.Tensor]) -> None:
    """Free the disk behind offloaded chunks once the engine has moved past them."""
    if isinstance(chunks, OffloadedChunks):
        shutil.rmtree(chunks.folder, ignore_errors=True)
