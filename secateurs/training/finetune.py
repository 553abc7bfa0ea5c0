"""Fine-tune a pruned (optionally quantized) model from disk: what `secateurs finetune` and the
`finetune` recipe stage call.

The student is a compressed directory (its N:M layers and quantization grids come from its
config.json), a plain model directory, a .gguf or an embedded name; its zeros are the mask. The
result is written as a compressed directory with the same grids (quantization-aware training keeps
the weights on them; without it the fine-tuned weights are rounded onto them at the end, i.e.
"quantized after fine-tuning"). Checkpoints and the loss curve go to `<output>.training/` beside it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from secateurs.data.corpus import load_text, tokenize
from secateurs.errors import SecateursError
from secateurs.formats import FORMATS, StoragePlan, decompress, read_compressed, save_compressed
from secateurs.models import LoadedModel, is_compressed_directory, load_model, save_model
from secateurs.training.masks import MaskSet, block_linear_layers, masks_from_zeros
from secateurs.training.qat import attach_fake_quant, bake_fake_quant
from secateurs.training.trainer import TrainConfig, Trainer, TrainResult

TRAINING_SUFFIX = ".training"


@dataclass
class FinetuneResult:
    output: Path
    training_dir: Path  # checkpoints, loss.csv, loss.png
    training: TrainResult
    plan: StoragePlan


def storage_plan_of(path: str | Path) -> StoragePlan:
    """The N:M layers and quantization grids a compressed directory records."""
    directory = read_compressed(path)
    plan = StoragePlan()
    for layer, spec in directory.specs.items():
        if spec.format in ("vq", "vq-packed"):
            raise SecateursError(f"{path}: layer {layer} is vector-quantized; fine-tuning keeps masks and scalar "
                                 f"grids, not codebooks: fine-tune the model before vq")
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
    masks: MaskSet | None = None if dense else masks_from_zeros(loaded.model, nm=plan.nm or None)
    if qat and not plan.grids:
        raise SecateursError(f"{model}: quantization-aware training needs a quantized model (it has no grids)")
    layers = block_linear_layers(loaded.model)
    if qat:
        attach_fake_quant(layers, plan)
    token_ids = tokenize(loaded.tokenizer, load_text(data))
    training_dir = output.with_name(output.name + TRAINING_SUFFIX)
    trainer = Trainer(loaded.model, token_ids, config, teacher=teacher_model, masks=masks, output_dir=training_dir,
                      device=device, progress=progress)
    result = trainer.train(resume=resume)
    loaded.model.to("cpu")
    if plan.grids and not qat:
        attach_fake_quant(layers, plan)  # round the fine-tuned weights onto the stored grids
    bake_fake_quant(layers)
    if masks is not None:
        masks.apply()
        masks.check()
    if masks is None and not plan.grids:
        save_model(loaded.model, loaded.tokenizer, output)
    else:
        save_compressed(loaded.model, plan, output, loaded.tokenizer, store_dtype=loaded.stored_dtype)
    return FinetuneResult(output, training_dir, result, plan)
