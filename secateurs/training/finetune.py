"""Fine-tune a pruned (optionally quantized) model from disk: what `secateurs finetune` and the
`finetune` recipe stage call.

The student is a compressed directory (its N:M layers and quantization grids come from its
config.json), a plain model directory, a .gguf or an embedded name; its zeros are the mask. The
result is written as a compressed directory with the same grids (quantization-aware training keeps
the weights on them; without it the fine-tuned weights are rounded onto them at the end, i.e.
"quantized after fine-tuning"). Checkpoints and the loss curve go to `<output>.training/` beside it.

Vector-quantized layers keep their codes: their codebooks and scales train (AQLM's end-to-end
fine-tuning, usually with the dense model as the KL teacher), with the norms and any other block
weights; the embeddings and the LM head stay as they are. The result is rounded to float16, as the
vq formats store it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from secateurs.data.corpus import load_text, tokenize
from secateurs.errors import SecateursError
from secateurs.formats import FORMATS, StoragePlan, decompress, read_compressed, save_compressed
from secateurs.models import LoadedModel, is_compressed_directory, load_model, save_model
from secateurs.training.masks import MaskSet, block_linear_layers
from secateurs.training.qat import attach_fake_quant, bake_fake_quant
from secateurs.training.trainer import TrainConfig, Trainer, TrainResult
from secateurs.training.vq_training import attach_codebook_training, detach_codebook_training, masks_besides_vq

TRAINING_SUFFIX = ".training"


@dataclass
class FinetuneResult:
    output: Path
    training_dir: Path  # checkpoints, loss.csv, loss.png
    training: TrainResult
    plan: StoragePlan


def storage_plan_of(path: str | Path) -> StoragePlan:
    """The N:M layers, quantization grids and vector-quantized layers (codes, codebooks, scales) a
    compressed directory records."""
    directory = read_compressed(path)
    plan = StoragePlan()
    for layer, spec in directory.specs.items():
        if spec.format in ("vq", "vq-packed"):
            plan.vq[layer] = FORMATS[spec.format].parts(directory.layers[layer], spec)
            plan.pack_vq_codes = plan.pack_vq_codes or spec.format == "vq-packed"
            continue
        if spec.n and spec.m:
            plan.nm[layer] = (spec.n, spec.m)
        if FORMATS[spec.format].quantized:
            plan.grids[layer] = FORMATS[spec.format].grid(directory.layers[layer], spec)
    return plan


def load_student(spec: str | Path) -> tuple[LoadedModel, StoragePlan]:
    """A trainable float32 model and the plan it was stored with (empty for a plain model)."""
    path = Path(str(spec)).expanduser()
    if not (path.is_dir() and is_compressed_directory(path)):
        return load_model(spec), StoragePlan()
    plan = storage_plan_of(path)
    with tempfile.TemporaryDirectory(prefix="secateurs-finetune-") as scratch:
        loaded = load_model(decompress(path, Path(scratch) / "dense"))
    return loaded, plan


def finetune(model: str | Path, output_dir: str | Path, config: TrainConfig, teacher: str | Path | None = None,
             data: str = "austen-calib", qat: bool = False, dense: bool = False, resume: bool = False,
             device: str = "cpu", progress: bool = True) -> FinetuneResult:
    """Fine-tune `model` with its zeros held (all its weights free with `dense`) and write it to
    `output_dir`. Every input is checked before training starts."""
    config.validate()
    output = Path(output_dir)
    loaded, plan = load_student(model)
    teacher_model = load_model(teacher).model if teacher is not None else None
    if qat and not plan.grids:
        raise SecateursError(f"{model}: quantization-aware training needs a quantized model (it has no grids)")
    layers = block_linear_layers(loaded.model)
    masks: MaskSet | None = None if dense else masks_besides_vq(loaded.model, layers, plan.vq, plan.nm)
    if qat:
        attach_fake_quant(layers, plan)
    coded = attach_codebook_training(loaded.model, layers, plan.vq)
    token_ids = tokenize(loaded.tokenizer, load_text(data))
    training_dir = output.with_name(output.name + TRAINING_SUFFIX)
    trainer = Trainer(loaded.model, token_ids, config, teacher=teacher_model, masks=masks, output_dir=training_dir,
                      device=device, progress=progress)
    result = trainer.train(resume=resume)
    loaded.model.to("cpu")
    plan.vq.update(detach_codebook_training(layers, coded))
    if plan.grids and not qat:
        attach_fake_quant(layers, plan)  # round the fine-tuned weights onto the stored grids
    bake_fake_quant(layers)
    if masks is not None:
        masks.apply()
        masks.check()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # every process holds the same weights
        if masks is None and not plan.grids and not plan.vq:
            save_model(loaded.model, loaded.tokenizer, output)
        else:
            save_compressed(loaded.model, plan, output, loaded.tokenizer, store_dtype=loaded.stored_dtype)
    if distributed:
        torch.distributed.barrier()
    return FinetuneResult(output, training_dir, result, plan)
