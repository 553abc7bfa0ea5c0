"""Pruning interleaved with training: progressive one-shot stages (prune, fine-tune, prune more on
the fine-tuned weights, fine-tune: Agarwalla et al. 2024) and gradual magnitude pruning on the
cubic schedule during training (Zhu & Gupta 2017), both on the one Trainer.

The one-shot engine is handed in (`compress`, e.g. secateurs.pipeline.engine.compress_model) rather
than imported: training sits beside the pipeline, not above it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from secateurs.algorithms.magnitude import magnitude_mask
from secateurs.training.masks import MaskSet, masks_from_zeros
from secateurs.training.qat import weight_parameter
from secateurs.training.schedules import cubic_sparsity
from secateurs.training.trainer import TrainConfig, Trainer, TrainResult


@dataclass
class StageResult:
    recipe: object
    compression: object  # what `compress` returned (the engine's CompressionReport)
    training: TrainResult


def progressive_prune(model, compress, recipes: list, calibration: torch.Tensor, token_ids: torch.Tensor,
                      configs: list[TrainConfig], teacher=None, output_dir: str | Path | None = None,
                      progress: bool = True, resume: bool = False) -> list[StageResult]:
    """For each (recipe, config): `compress(model, recipe, calibration, progress=...)` in place, its
    statistics gathered on the current (fine-tuned) weights, returning a report with
    `storage_plan()`; then fine-tune with the new zeros (and N:M patterns) held fixed."""
    if len(recipes) != len(configs):
        raise ValueError("progressive_prune needs one training configuration per pruning recipe")
    for config in configs:
        config.validate()
    results = []
    for index, (recipe, config) in enumerate(zip(recipes, configs)):
        model.eval()
        report = compress(model, recipe, calibration, progress=progress)
        masks = masks_from_zeros(model, nm=report.storage_plan().nm or None)
        stage_dir = Path(output_dir) / f"stage-{index + 1}" if output_dir is not None else None
        trainer = Trainer(model, token_ids, config, teacher=teacher, masks=masks, output_dir=stage_dir,
                          progress=progress, description=f"stage {index + 1}")
        results.append(StageResult(recipe, report, trainer.train(resume=resume)))
    return results


class GradualMagnitude:
    """A Trainer `on_step` callback: every `every` steps between `start` and `end`, prune each masked
    layer by magnitude to the cubic schedule's sparsity (within each layer; N:M layers keep their
    pattern). Pruned weights never come back: a weight already at 0 has the lowest magnitude."""

    def __init__(self, masks: MaskSet, initial: float, final: float, start: int, end: int, every: int = 1):
        if not 0 <= initial <= final < 1 or not 0 <= start < end or every < 1:
            raise ValueError("gradual pruning needs 0 <= initial <= final < 1, 0 <= start < end, every >= 1")
        self.masks, self.initial, self.final = masks, initial, final
        self.start, self.end, self.every = start, end, every

    def target(self, step: int) -> float:
        return cubic_sparsity(max(0, step - self.start), self.end - self.start, self.initial, self.final)

    @torch.no_grad()
    def __call__(self, trainer: Trainer, step: int) -> None:
        if step < self.start or step > self.end or (step - self.start) % self.every:
            return
        sparsity = self.target(step)
        for name, keep in self.masks.keep.items():
            weight = weight_parameter(self.masks.layers[name]).detach() * keep
            new_keep = magnitude_mask(weight, sparsity) & keep
            self.masks.set(name, new_keep)
        self.masks.zero_moments(trainer.optimizer)
        self.masks.apply()
