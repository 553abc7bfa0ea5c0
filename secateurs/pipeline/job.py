"""Compress a model into an output directory: checks first, resumable state, one rename at the end.

Everything that can be known before the work starts is checked before anything is written: the
output and its `.partial` folder, the recipe against the model, the calibration, the disk space.
A run that fails on the user's input removes its partial folder; any other interruption (a kill,
a crash, Ctrl-C) leaves it for `resume=True`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from secateurs.errors import SecateursError
from secateurs.pipeline.checkpoint import PartialRun
from secateurs.pipeline.distributed import ProcessGroup
from secateurs.pipeline.engine import CompressionReport, Engine, validate
from secateurs.pipeline.streaming import BlockSource, InMemoryModel, StreamedModel, model_folder


def open_model(spec: str, stream: bool) -> BlockSource:
    if stream:
        return StreamedModel(model_folder(spec))
    from secateurs.models import load_model

    loaded = load_model(spec)
    return InMemoryModel(loaded.model, loaded.tokenizer)


def calibration_digest(calibration: torch.Tensor) -> str:
    data = calibration.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(str(tuple(calibration.shape)).encode() + data).hexdigest()[:16]


def activation_bytes(source: BlockSource, calibration: torch.Tensor) -> int:
    """One copy of the activations between two blocks, for all processes together."""
    width = source.model.get_input_embeddings().embedding_dim
    itemsize = next(source.model.parameters()).dtype.itemsize
    return calibration.numel() * width * itemsize


def check_disk_space(output: Path, needed: int) -> None:
    where = output.resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise SecateursError(f"not enough disk space for {output}: it needs about {needed / 2**30:.2f} GiB, "
                             f"{free / 2**30:.2f} GiB are free on {where}")


class CompressionJob:
    """`CompressionJob(model, output, ...)` checks the output and loads (or opens, with `stream`)
    the model; `.tokenizer` makes the calibration; `.run(recipe, calibration)` writes the output."""

    def __init__(self, model: str, output, *, overwrite: bool = False, resume: bool = False, stream: bool = False,
                 offload_activations: bool = False):
        self.output = Path(output)
        self.overwrite, self.offload = overwrite, offload_activations
        self.group = ProcessGroup.current()
        self.partial = PartialRun(self.output, self.group)
        if self.output.exists() and not overwrite:
            raise SecateursError(f"output {self.output} exists (pass --overwrite to replace it)")
        if self.partial.exists() and not resume:
            raise SecateursError(f"{self.partial.folder} holds an unfinished run: pass --resume to continue it, "
                                 f"or delete it to start over")
        self.stream = stream
        self.source = open_model(model, stream)

    @property
    def tokenizer(self):
        return self.source.tokenizer

    def run(self, recipe, calibration: torch.Tensor, summary: dict | None = None, **engine_options) -> CompressionReport:
        """Compress and write the output; `summary` adds keys to compression.json, `engine_options`
        go to Engine (device, chunk_size, hessian_dtype, true_sequential, progress)."""
        progress = engine_options.pop("progress", True) and self.group.is_main  # one progress bar under torchrun
        engine = Engine(self.source.model, recipe, source=self.source, group=self.group, progress=progress,
                        offload_dir=self.partial.offload_dir() if self.offload else None, **engine_options)
        validate(engine.model, engine.recipe)
        fingerprint = {
            "recipe": engine.recipe.digest(),
            "model": self.source.fingerprint(),
            "calibration": calibration_digest(calibration),
            "engine options": {"stream": self.stream, "chunk_size": engine.chunk_size,
                               "hessian_dtype": str(engine.hessian_dtype)},
            "number of processes": self.group.world_size,
        }
        resuming = self.partial.exists()
        state = self.partial.resume(fingerprint, self.source) if resuming else None
        # Output, plus the activations kept for a resume (two generations during a commit) and offloaded.
        needed = self.source.output_bytes() + activation_bytes(self.source, calibration) * (4 if self.offload else 2)
        if resuming:
            needed -= sum(path.stat().st_size for path in self.partial.folder.rglob("*") if path.is_file())
        check_disk_space(self.output, needed)
        self.group.barrier()  # every process has checked the output before the first one writes
        if not resuming:
            self.partial.create(fingerprint, len(self.source.blocks))
        try:
            report = engine.run(calibration, resume=state, on_block_done=lambda index, report: self.partial.commit(
                self.source, index, report, engine.inputs.hidden, engine.block_sparsity))
        except SecateursError:  # the input is at fault: a resume would fail the same way
            self.partial.discard()
            raise
        report.seconds += self.partial.previous_seconds
        self.partial.finish(self.source, report.as_dict() | (summary or {}))
        return report
