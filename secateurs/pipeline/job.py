"""Compress a model into an output directory: checks first, resumable state, one rename at the end.

Everything that can be known before the work starts is checked before anything is written: the
device, the output (a directory we can write, not another run's), the recipe against the model,
the calibration against the model's context, the disk space. The output is locked for the whole
run (`<output>.lock`). A run that fails before finishing a block removes its partial folder; a
later failure (a Hessian that cannot be repaired, a full disk, a kill, Ctrl-C) keeps the finished
blocks for `resume=True`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.formats import check_storable
from secateurs.io import OutputLock, check_writable, existing_parent, is_disk_full
from secateurs.models import LoadedModel, context_length, load_model
from secateurs.pipeline.distributed import ProcessGroup, check_device
from secateurs.pipeline.engine import CompressionReport, Engine, validate
from secateurs.pipeline.partial import PartialRun
from secateurs.pipeline.streaming import StreamedModel, model_folder
from secateurs.sources import BlockSource, InMemoryModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or "auto": the dtype the model was stored in; else float32, bfloat16 or float16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise SecateursError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def open_model(model, stream: bool, store_dtype: torch.dtype | None = None, tokenizer=None) -> BlockSource:
    """A source for a model spec (embedded name, directory, .gguf, hub id) or a loaded model; tensors
    are written in `store_dtype`, default the dtype the model was stored in."""
    if isinstance(model, nn.Module):
        return InMemoryModel(model, tokenizer, store_dtype)
    if stream:
        return StreamedModel(model_folder(str(model)), store_dtype=store_dtype)
    loaded: LoadedModel = model if isinstance(model, LoadedModel) else load_model(model)
    return InMemoryModel(loaded.model, loaded.tokenizer, store_dtype or loaded.stored_dtype)


def calibration_digest(calibration: torch.Tensor) -> str:
    data = calibration.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(str(tuple(calibration.shape)).encode() + data).hexdigest()[:16]


def activation_bytes(source: BlockSource, calibration: torch.Tensor) -> int:
    """One copy of the activations between two blocks, for all processes together."""
    width = source.model.get_input_embeddings().embedding_dim
    itemsize = next(source.model.parameters()).dtype.itemsize
    return calibration.numel() * width * itemsize


def check_disk_space(output: Path, needed: int) -> None:
    where = existing_parent(output)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise SecateursError(f"not enough disk space for {output}: it needs about {needed / 2**30:.2f} GiB, "
                             f"{free / 2**30:.2f} GiB are free on {where}")


class CompressionJob:
    """`CompressionJob(model, output, ...)` checks the output, locks it and loads (or opens, with
    `stream`) the model; `.tokenizer` makes the calibration; `.run(recipe, calibration)` writes the
    output (compressed formats, or dense weights with `compressed=False`, in `dtype`: None keeps the
    dtype the model was stored in) and releases the lock. Use it as a context manager, or call
    `close()`, so a run that fails before `run` releases the lock too."""

    def __init__(self, model, output, *, overwrite: bool = False, resume: bool = False, stream: bool = False,
                 offload_activations: bool = False, compressed: bool = True, dtype=None, device: str | None = None,
                 tokenizer=None):
        self.output = Path(output)
        self.overwrite, self.offload, self.stream, self.compressed = overwrite, offload_activations, stream, compressed
        self.device = device
        check_device(device)
        check_writable(self.output)
        if self.output.exists() and not overwrite:
            raise SecateursError(f"output {self.output} exists (pass --overwrite to replace it)")
        self.group = ProcessGroup.current()
        self.lock = OutputLock(self.output) if self.group.is_main else None
        if self.lock:
            self.lock.acquire()
        try:
            self.partial = PartialRun(self.output, self.group, compressed)
            self.finished = self.partial.exists() and self.partial.is_complete()
            if self.partial.exists() and not resume:
                what = "a finished run whose final rename was interrupted" if self.finished else "an unfinished run"
                raise SecateursError(f"{self.partial.folder} holds {what}: pass --resume to "
                                     f"{'move it into place' if self.finished else 'continue it'}, or delete it to start over")
            store_dtype = parse_dtype(dtype)
            self.source = None if self.finished else open_model(model, stream, store_dtype, tokenizer)
            if compressed and self.source is not None:
                check_storable(self.source.float_dtype())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.lock:
            self.lock.release()

    def __enter__(self) -> CompressionJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.source.tokenizer

    @property
    def model(self) -> nn.Module:
        return self.source.model

    def check_calibration(self, calibration: torch.Tensor) -> None:
        if calibration.ndim != 2 or calibration.shape[0] == 0:
            raise SecateursError("calibration must be a [samples, seqlen] tensor of token ids")
        limit = context_length(self.source.model.config)
        if limit is not None and calibration.shape[1] > limit:
            raise SecateursError(f"calibration windows of {calibration.shape[1]} tokens exceed the model's context of "
                                 f"{limit} positions (lower --seqlen)")

    def run(self, recipe, calibration: torch.Tensor, summary: dict | None = None, **engine_options) -> CompressionReport | None:
        """Compress and write the output; `summary` adds keys to compression.json, `engine_options`
        go to Engine (chunk_size, hessian_dtype, true_sequential, progress). Returns the report
        (None when a resume only finished the final rename of a complete run)."""
        try:
            if self.finished:
                self.partial.complete_rename()
                return None
            return self._run(recipe, calibration, summary, engine_options)
        finally:
            self.close()

    def _run(self, recipe, calibration, summary, engine_options) -> CompressionReport:
        progress = engine_options.pop("progress", True) and self.group.is_main  # one progress bar under torchrun
        engine = Engine(self.source.model, recipe, source=self.source, group=self.group, progress=progress,
                        device=self.device, offload_dir=self.partial.offload_dir() if self.offload else None,
                        **engine_options)
        validate(engine.model, engine.recipe)
        self.check_calibration(calibration)
        fingerprint = {
            "recipe": engine.recipe.digest(),
            "model": self.source.fingerprint(),
            "calibration": calibration_digest(calibration),
            "engine options": {"stream": self.stream, "chunk_size": engine.chunk_size,
                               "hessian_dtype": str(engine.hessian_dtype)},
            "output": {"compressed": self.compressed, "dtype": str(self.source.store_dtype)},
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
            report.seconds += self.partial.previous_seconds
            self.partial.finish(self.source, report, report.as_dict() | (summary or {}))
        except SecateursError as exc:
            if self.partial.blocks_done == 0:  # nothing worth keeping: the input is at fault
                self.partial.discard()
                raise
            raise SecateursError(f"{exc} ({self.kept()})") from None
        except Exception as exc:
            if is_disk_full(exc):
                raise SecateursError(f"disk full while writing {self.partial.folder} ({self.kept()}; "
                                     f"free some space first)") from None
            raise
        return report

    def kept(self) -> str:
        done = self.partial.blocks_done
        return (f"the {done} finished block(s) are kept in {self.partial.folder}: "
                f"rerun with --resume to continue after them")
