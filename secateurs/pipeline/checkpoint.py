"""`<output>.partial/`: the finished blocks of a compression run, kept so a killed run can continue.

    manifest.json                      fingerprint of the run and how many blocks are done
    model-00003-of-00033.safetensors   block 2 exactly as it will be in the output
    records/block-00002.safetensors    its layer reports (in the metadata) and quantization grids
    activations/rank0-after-00002/     this process's inputs of block 3, one file per chunk
    offload/rank0/                     working activations, when they are offloaded

A block is committed in this order: its shard and record (rank 0), every process's activations
(each file flushed, its folder renamed into place), then the manifest is replaced. A kill at any
moment leaves the old or the new manifest, each consistent with the files it counts; files past
it are stale and removed on resume. At the end the last shard (the tensors outside the blocks), the
index, config, tokenizer and compression.json are added, the working files removed, and the folder
renamed to `<output>`: an output directory is never half-written.

A resume reads the next block's inputs back instead of recomputing them by re-running every
finished block: the file costs samples x seqlen x hidden floats of disk (64 MiB for 16 x 256 tokens
of a 4096-wide model, 4 GiB for 128 x 2048), the recomputation half a block's compute per finished
block (a forward over the calibration set; the other half is statistics and the sweeps).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.errors import SecateursError
from secateurs.pipeline.activations import load_chunks, save_chunks
from secateurs.pipeline.distributed import ProcessGroup
from secateurs.pipeline.engine import CompressionReport, LayerReport, ResumeState
from secateurs.pipeline.streaming import INDEX_FILE, BlockSource, read_header

MANIFEST = "manifest.json"
WORKING = ("records", "activations", "offload")


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def _flush(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write, flush, then rename into place: the file is whole or absent."""
    staging = path.with_name(f".{path.name}.tmp")
    save_file(tensors, staging, metadata={"format": "pt"} | (metadata or {}))
    _flush(staging)
    os.replace(staging, path)


def write_json(path: Path, data: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data, indent=2))
    _flush(staging)
    os.replace(staging, path)


class PartialRun:
    """The partial folder of one output; every process of a torchrun group holds one."""

    def __init__(self, output: Path, group: ProcessGroup):
        self.output = Path(output)
        self.folder = self.output.with_name(self.output.name + ".partial")
        self.group = group
        self.started = time.perf_counter()
        self.previous_seconds = 0.0  # spent by the runs this one continues
        self.fingerprint: dict | None = None

    def exists(self) -> bool:
        return self.folder.exists()

    def offload_dir(self) -> Path:
        return self.folder / "offload" / f"rank{self.group.rank}"

    def _activations(self, index: int) -> Path:
        return self.folder / "activations" / f"rank{self.group.rank}-after-{index:05d}"

    def _record(self, index: int) -> Path:
        return self.folder / "records" / f"block-{index:05d}.safetensors"

    def _manifest(self, fingerprint: dict, blocks: int, done: int, block_sparsity) -> dict:
        seconds = self.previous_seconds + time.perf_counter() - self.started
        return {"format": 1, "fingerprint": fingerprint, "blocks": blocks, "blocks_done": done,
                "block_sparsity": block_sparsity, "seconds": seconds}

    def create(self, fingerprint: dict, blocks: int) -> None:
        if self.group.is_main:
            self.folder.mkdir(parents=True)
            write_json(self.folder / MANIFEST, self._manifest(fingerprint, blocks, 0, None))
        self.group.barrier()
        self.fingerprint = fingerprint

    def resume(self, fingerprint: dict, source: BlockSource) -> ResumeState | None:
        """The state after the last committed block, or None if none was; refuses a run whose
        recipe, model, calibration or options differ."""
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            raise SecateursError(f"{self.folder}: not a resumable run (no readable {MANIFEST}); delete it to start over") from None
        differing = [key for key in fingerprint if manifest["fingerprint"].get(key) != fingerprint[key]]
        if differing:
            raise SecateursError(f"{self.folder} was started with a different {', '.join(differing)}: resume it with "
                                 f"the same settings, or delete it to start over")
        self.fingerprint = fingerprint
        self.previous_seconds = manifest["seconds"]
        done = manifest["blocks_done"]
        self._remove_stale(done, len(source.blocks))
        if done == 0:
            return None
        layers, grids = [], {}
        total = len(source.blocks) + 1
        for index in range(done):
            with safe_open(self._record(index), "pt") as handle:
                layers += [LayerReport(**entry) for entry in json.loads(handle.metadata()["layers"])]
                names = {key.rsplit(".", 1)[0] for key in handle.keys()}
                grids |= {name: (handle.get_tensor(f"{name}.scale"), handle.get_tensor(f"{name}.zero")) for name in names}
            source.restore(index, self.folder / shard_name(index + 1, total))
        return ResumeState(done, layers, grids, manifest["block_sparsity"], load_chunks(self._activations(done - 1)))

    def _remove_stale(self, done: int, blocks: int) -> None:
        """Files a killed run wrote past its last manifest: half-written files, later blocks."""
        keep = self._activations(done - 1) if done else None
        for path in (self.folder / "activations").glob(f"*rank{self.group.rank}-after-*"):
            if path != keep:
                shutil.rmtree(path)
        shutil.rmtree(self.offload_dir(), ignore_errors=True)
        if self.group.is_main:
            later = {name for i in range(done, blocks) for name in (shard_name(i + 1, blocks + 1), self._record(i).name)}
            for path in [*self.folder.glob("*"), *self.folder.glob("records/*")]:
                if path.is_file() and (path.name in later or path.name.endswith(".tmp")):
                    path.unlink()
        self.group.barrier()

    def commit(self, source: BlockSource, index: int, report: CompressionReport, hidden, block_sparsity) -> None:
        """Make block `index` durable: its shard, its record, the next block's inputs, the manifest."""
        blocks = len(source.blocks)
        if self.group.is_main:
            prefix = source.block_prefix(index)
            write_safetensors(self.folder / shard_name(index + 1, blocks + 1), source.block_tensors(index))
            layers = [asdict(layer) for layer in report.layers if layer.name.startswith(prefix)]
            grids = {f"{name}.{part}": tensor.contiguous() for name, pair in report.grids.items()
                     if name.startswith(prefix) for part, tensor in zip(("scale", "zero"), pair)}
            (self.folder / "records").mkdir(exist_ok=True)
            write_safetensors(self._record(index), grids, {"layers": json.dumps(layers)})
        target = self._activations(index)
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        save_chunks(hidden, staging)
        os.replace(staging, target)
        self.group.barrier()
        if self.group.is_main:
            write_json(self.folder / MANIFEST, self._manifest(self.fingerprint, blocks, index + 1, block_sparsity))
        self.group.barrier()  # only now is the previous block's copy of the activations unneeded
        shutil.rmtree(self._activations(index - 1), ignore_errors=True)

    def finish(self, source: BlockSource, summary: dict) -> None:
        """Complete the output in the partial folder, then rename it to the output."""
        if self.group.is_main:
            total = len(source.blocks) + 1
            write_safetensors(self.folder / shard_name(total, total), source.outside_tensors())
            weight_map, size = {}, 0
            for number in range(1, total + 1):
                header = read_header(self.folder / shard_name(number, total))
                weight_map |= {name: shard_name(number, total) for name in header}
                size += sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
            write_json(self.folder / INDEX_FILE, {"metadata": {"total_size": size}, "weight_map": weight_map})
            source.write_description(self.folder)
            write_json(self.folder / "compression.json", summary)
            for name in WORKING:
                shutil.rmtree(self.folder / name, ignore_errors=True)
            (self.folder / MANIFEST).unlink()
            self._swap_into_place()
        self.group.barrier()

    def _swap_into_place(self) -> None:
        """Rename to the output; a replaced output is moved aside first and deleted last."""
        aside = None
        if self.output.exists():
            aside = self.output.with_name(f".{self.output.name}.replaced-{os.getpid()}")
            os.replace(self.output, aside)
        os.replace(self.folder, self.output)
        if aside is not None:
            shutil.rmtree(aside)

    def discard(self) -> None:
        if self.group.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
