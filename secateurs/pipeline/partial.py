"""`<output>.partial/`: the finished blocks of a compression run, kept so a killed run can continue.

    manifest.json                      fingerprint of the run and how many blocks are done
    model-00003-of-00033.safetensors   block 2 exactly as it will be in the output
    records/block-00002.safetensors    its layer reports and formats (in the metadata), grids, codebooks
    activations/rank0-after-00002/     this process's inputs of block 3, one file per chunk
    offload/rank0/                     working activations, when they are offloaded

A block is committed in this order: its shard and record (rank 0), every process's activations
(each file flushed, its folder renamed into place), then the manifest is replaced. A kill at any
moment leaves the old or the new manifest, each consistent with the files it counts; files past
it are stale and removed on resume. At the end the last shard (the tensors outside the blocks), the
index, config, tokenizer, compression.json and checksums are added, the working files removed, the
manifest marked complete, and the folder renamed to `<output>`: an output directory is never
half-written, and a run killed during that rename is finished by `--resume`.

A resume reads the next block's inputs back instead of recomputing them by re-running every
finished block: the file costs samples x seqlen x hidden floats of disk (64 MiB for 16 x 256 tokens
of a 4096-wide model, 4 GiB for 128 x 2048), the recomputation half a block's compute per finished
block (a forward over the calibration set; the other half is statistics and the sweeps).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from secateurs.errors import SecateursError
from secateurs.formats import LayerSpec, decode_tensors, encode_block, record_compression
from secateurs.io import (replace_directory, shard_name, temporary_sibling, write_checksums, write_index, write_json,
                          write_safetensors)
from secateurs.pipeline.activations import load_chunks, save_chunks
from secateurs.pipeline.distributed import ProcessGroup
from secateurs.pipeline.engine import CompressionReport, LayerReport, ResumeState
from secateurs.sources import BlockSource

MANIFEST = "manifest.json"
GRID_PARTS = ("scale", "zero")  # a record's tensors per quantized layer: <layer>.scale, <layer>.zero
VQ_PARTS = ("codes", "codebooks", "scales")  # and per vector-quantized layer
WORKING = ("records", "activations", "offload")


def _read_dense(shard: Path, specs: dict[str, LayerSpec]) -> dict:
    """A committed block's dense tensors: its shard, its compressed layers decoded."""
    with safe_open(shard, "pt", backend="pread") as handle:
        return decode_tensors(specs, {name: handle.get_tensor(name) for name in handle.keys()})


class PartialRun:
    """The partial folder of one output; every process of a torchrun group holds one."""

    def __init__(self, output: Path, group: ProcessGroup, compressed: bool = True):
        self.output = Path(output)
        self.folder = self.output.with_name(self.output.name + ".partial")
        self.group = group
        self.compressed = compressed  # blocks stored in the compressed formats (else dense)
        self.started = time.perf_counter()
        self.previous_seconds = 0.0  # spent by the runs this one continues
        self.fingerprint: dict | None = None
        self.specs: dict[str, LayerSpec] = {}  # compressed layers of the committed blocks
        self.nonzeros: dict[str, int] = {}
        self.checksums: dict[str, str] = {}  # shard file -> sha256, computed as each was written
        self.blocks_done = 0

    def exists(self) -> bool:
        return self.folder.exists()

    def is_complete(self) -> bool:
        """Whether the folder holds a finished output whose final rename was interrupted."""
        try:
            return json.loads((self.folder / MANIFEST).read_text()).get("complete") is True
        except (OSError, ValueError, AttributeError):
            return False

    def complete_rename(self) -> None:
        """Finish the rename of a complete run (see is_complete)."""
        if self.group.is_main:
            self._swap_into_place()
        self.group.barrier()

    def offload_dir(self) -> Path:
        return self.folder / "offload" / f"rank{self.group.rank}"

    def _activations(self, index: int) -> Path:
        return self.folder / "activations" / f"rank{self.group.rank}-after-{index:05d}"

    def _record(self, index: int) -> Path:
        return self.folder / "records" / f"block-{index:05d}.safetensors"

    def _manifest(self, fingerprint: dict, blocks: int, done: int, block_sparsity, complete: bool = False) -> dict:
        seconds = self.previous_seconds + time.perf_counter() - self.started
        return {"format": 1, "fingerprint": fingerprint, "blocks": blocks, "blocks_done": done,
                "block_sparsity": block_sparsity, "seconds": seconds, "complete": complete}

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
        self.blocks_done = done
        layers, grids, codes = [], {}, {}
        total = len(source.blocks) + 1
        for index in range(done):
            shard = self.folder / shard_name(index + 1, total)
            with safe_open(self._record(index), "pt") as handle:
                metadata = handle.metadata()
                layers += [LayerReport(**entry) for entry in json.loads(metadata["layers"])]
                keys = set(handle.keys())
                for name in {key.rsplit(".", 1)[0] for key in keys}:
                    parts = GRID_PARTS if f"{name}.{GRID_PARTS[0]}" in keys else VQ_PARTS
                    (grids if parts is GRID_PARTS else codes)[name] = tuple(handle.get_tensor(f"{name}.{part}") for part in parts)
            specs = {layer: LayerSpec.from_json(layer, entry) for layer, entry in json.loads(metadata["specs"]).items()}
            self.specs |= specs
            self.nonzeros |= json.loads(metadata["nonzeros"])
            self.checksums[shard.name] = metadata["sha256"]
            source.restore(index, functools.partial(_read_dense, shard, specs))
        return ResumeState(done, layers, grids, codes, manifest["block_sparsity"], load_chunks(self._activations(done - 1)))

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
            for path in self.folder.glob("activations/.*.tmp"):
                shutil.rmtree(path, ignore_errors=True)
        self.group.barrier()

    def commit(self, source: BlockSource, index: int, report: CompressionReport, hidden, block_sparsity) -> None:
        """Make block `index` durable: its shard, its record, the next block's inputs, the manifest."""
        blocks = len(source.blocks)
        if self.group.is_main:
            prefix = source.block_prefix(index)
            tensors, specs, nonzeros = source.block_tensors(index), {}, {}
            if self.compressed:
                encoded = encode_block(source.blocks[index], prefix, tensors, report.storage_plan(prefix))
                tensors, specs, nonzeros = encoded.tensors, encoded.specs, encoded.nonzeros
            shard = self.folder / shard_name(index + 1, blocks + 1)
            digest = write_safetensors(shard, tensors)
            self.specs |= specs
            self.nonzeros |= nonzeros
            self.checksums[shard.name] = digest
            layers = [asdict(layer) for layer in report.layers if layer.name.startswith(prefix)]
            grids = {f"{name}.{part}": tensor.contiguous()
                     for found, parts in ((report.grids, GRID_PARTS), (report.vq, VQ_PARTS))
                     for name, stored in found.items() if name.startswith(prefix) for part, tensor in zip(parts, stored)}
            (self.folder / "records").mkdir(exist_ok=True)
            write_safetensors(self._record(index), grids, {
                "layers": json.dumps(layers), "specs": json.dumps({layer: spec.as_json() for layer, spec in specs.items()}),
                "nonzeros": json.dumps(nonzeros), "sha256": digest})
        target = self._activations(index)
        staging = temporary_sibling(target)
        save_chunks(hidden, staging)
        os.replace(staging, target)
        self.group.barrier()
        if self.group.is_main:
            write_json(self.folder / MANIFEST, self._manifest(self.fingerprint, blocks, index + 1, block_sparsity))
        self.blocks_done = index + 1
        self.group.barrier()  # only now is the previous block's copy of the activations unneeded
        shutil.rmtree(self._activations(index - 1), ignore_errors=True)

    def finish(self, source: BlockSource, report: CompressionReport, summary: dict) -> None:
        """Complete the output in the partial folder, mark it complete, then rename it to the output."""
        if self.group.is_main:
            total = len(source.blocks) + 1
            last = self.folder / shard_name(total, total)
            self.checksums[last.name] = write_safetensors(last, source.outside_tensors())
            weight_map = {}
            for number in range(1, total + 1):
                with safe_open(self.folder / shard_name(number, total), "pt") as handle:
                    weight_map |= dict.fromkeys(handle.keys(), shard_name(number, total))
            write_index(self.folder, weight_map)
            source.describe(self.folder)
            if self.compressed:
                record_compression(self.folder, self.specs, self.nonzeros, report.storage_plan().act_order)
            write_json(self.folder / "compression.json", summary)
            write_checksums(self.folder, self.checksums)
            for name in WORKING:
                shutil.rmtree(self.folder / name, ignore_errors=True)
            write_json(self.folder / MANIFEST, self._manifest(self.fingerprint, total - 1, total - 1, None, complete=True))
            self._swap_into_place()
        self.group.barrier()

    def _swap_into_place(self) -> None:
        """Rename to the output (a replaced output is moved aside first and deleted last), then drop
        the manifest that marked the folder complete."""
        replace_directory(self.folder, self.output)
        (self.output / MANIFEST).unlink(missing_ok=True)

    def discard(self) -> None:
        if self.group.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
