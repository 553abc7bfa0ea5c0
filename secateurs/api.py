"""The Python front door: `oneshot` compresses a model (into a directory, or in place), `load` and
`load_any` open whatever a path holds. The command line calls these; they reach every feature it has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateurs.data.corpus import AUSTEN_CALIBRATION, calibration_from
from secateurs.errors import SecateursError
from secateurs.formats import load as load_compressed
from secateurs.models import LoadedModel, context_length, hf_step, is_compressed_directory, load_model
from secateurs.pipeline.distributed import check_device, init_from_environment
from secateurs.pipeline.engine import CompressionReport, compress_model
from secateurs.pipeline.job import CompressionJob, open_model


@dataclass
class OneshotResult:
    report: CompressionReport | None  # None when a resume only finished the rename of a complete run
    output_dir: Path | None
    model: nn.Module | None  # compressed in memory (None for a streamed run)


def oneshot(model, recipe="sparsegpt-50", calibration=AUSTEN_CALIBRATION, output_dir=None, *,
            save_compressed: bool = True, dtype=None, stream: bool = False, resume: bool = False,
            overwrite: bool = False, offload_activations: bool = False, device: str | None = None,
            true_sequential: bool | None = None, samples: int = 128, seqlen: int = 2048, seed: int = 0,
            tokenizer=None, progress: bool = True, chunk_size: int | None = None,
            summary: dict | None = None) -> OneshotResult:
    """Compress `model` with `recipe` (a preset name, a YAML path, a list/dict, a Recipe; llm-compressor
    modifier names too) in one shot.

    model: an embedded name, a model directory, a .gguf file, a hub id, or a loaded PreTrainedModel
        (compressed in place; pass its `tokenizer` unless calibration is token ids).
    calibration: token ids [samples, seqlen] (or 1-D, then windowed), a text or text spec
        (`austen-calib`, a .txt/.jsonl file or directory, `hf:<dataset>`), a list of texts, or a
        dataset with a 'text' column; `samples` windows of `seqlen` tokens are drawn with `seed`.
    output_dir: where to write the model (a transformers directory, in the compressed formats unless
        `save_compressed=False`, in `dtype`: default the dtype the model was stored in); None keeps
        the result in memory only. `resume` continues a run killed in `<output_dir>.partial/`;
        `stream` reads one block at a time from the shards (larger-than-memory models);
        `offload_activations` keeps the calibration activations on disk. Under torchrun every process
        calls this; the work is shared and the main process writes.
    """
    if output_dir is None:
        if stream or resume or offload_activations:
            raise SecateursError("stream, resume and offload_activations need an output_dir")
        check_device(device)
        if isinstance(model, nn.Module):
            loaded = LoadedModel(model, tokenizer, "<in memory>")
        else:
            loaded = load_any(model)
        ids = _calibration(lambda: loaded.tokenizer, loaded.model, calibration, samples, seqlen, seed)
        report = compress_model(loaded.model, recipe, ids, device=device, true_sequential=true_sequential,
                                progress=progress, chunk_size=chunk_size)
        return OneshotResult(report, None, loaded.model)
    device = init_from_environment(device)
    with CompressionJob(model, output_dir, overwrite=overwrite, resume=resume, stream=stream,
                        offload_activations=offload_activations, compressed=save_compressed, dtype=dtype,
                        device=device, tokenizer=tokenizer) as job:
        if job.finished:
            job.run(recipe, torch.zeros(1, 1, dtype=torch.long))
            return OneshotResult(None, Path(output_dir), None)
        ids = _calibration(lambda: job.tokenizer, job.model, calibration, samples, seqlen, seed)
        record = {"model": model if isinstance(model, (str, os.PathLike)) else type(model).__name__,
                  "calibration_data": calibration if isinstance(calibration, str) and len(calibration) < 200 else
                  type(calibration).__name__, "seed": seed} | (summary or {})
        report = job.run(recipe, ids, {k: str(v) if isinstance(v, os.PathLike) else v for k, v in record.items()},
                         true_sequential=true_sequential, progress=progress, chunk_size=chunk_size)
        return OneshotResult(report, Path(output_dir), None if stream else job.model)


def _calibration(tokenizer_of, model, calibration, samples, seqlen, seed) -> torch.Tensor:
    """Token ids for the engine, checked against the model's context before any work;
    `tokenizer_of()` is asked only when the calibration is text (a streamed model loads it then)."""
    limit = context_length(model.config)
    if limit is not None and seqlen > limit and not isinstance(calibration, torch.Tensor):
        raise SecateursError(f"seqlen {seqlen} exceeds the model's context of {limit} positions")
    if isinstance(calibration, torch.Tensor) and calibration.ndim == 2:
        return calibration_from(None, calibration, samples, seqlen, seed)
    tokenizer = tokenizer_of()
    if tokenizer is None:
        raise SecateursError("calibration given as text needs the model's tokenizer (pass tokenizer=...)")
    return calibration_from(tokenizer, calibration, samples, seqlen, seed)


def load_any(spec, verify: bool | None = None) -> LoadedModel:
    """A model with its tokenizer from an embedded name, a directory (compressed or plain), a .gguf
    file or a hub id; compressed layers become secateurs.runtime modules."""
    path = _compressed_directory(spec)
    if path is not None:
        from transformers import AutoTokenizer

        from secateurs.models import quiet_loading

        with quiet_loading():
            tokenizer = hf_step(str(path), "no usable tokenizer", lambda: AutoTokenizer.from_pretrained(path))
        return LoadedModel(load_compressed(path, verify).eval(), tokenizer, str(path))
    return load_model(spec, verify=verify)


def load(path, verify: bool | None = None) -> nn.Module:
    """A model directory as a model: a compressed one with secateurs.runtime modules for its
    compressed layers (every tensor validated), a plain one as transformers loads it. Checksums
    written beside the shards are verified first (`verify=False` or SECATEURS_VERIFY=0 skips)."""
    compressed = _compressed_directory(path)
    if compressed is not None:
        return load_compressed(compressed, verify).eval()
    return load_model(path, verify=verify).model


def _compressed_directory(spec) -> Path | None:
    """`spec` as a path when it names a compressed directory (models.load_model takes the rest)."""
    path = Path(str(spec)).expanduser()
    return path if path.is_dir() and is_compressed_directory(path) else None


__all__ = ["OneshotResult", "load", "load_any", "oneshot", "open_model"]
