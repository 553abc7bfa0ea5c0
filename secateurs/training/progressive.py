"""Pruning interleaved with training: progressive one-shot stages (prune, fine-tune, prune more on
the fine-tuned weights, fine-tune: Agarwalla et al. 2024), and gradual pruning on the cubic schedule
during training, by magnitude (Zhu & Gupta 2017) or by the Optimal BERT Surgeon (Kurtic et al. 2022),
all on the one Trainer.

The one-shot engine is handed in (`compress`, e.g. secateurs.pipeline.engine.compress_model) rather
than imported: training sits beside the pipeline, not above it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from secateurs.algorithms.magnitude import magnitude_mask
from secateurs.algorithms.obert import FisherInverseBuilder, obert_prune
from secateurs.training.losses import LossWeights
from secateurs.training.masks import MaskSet, block_linear_layers, from_unit_view, unit_view
from secateurs.training.qat import weight_parameter
from secateurs.training.schedules import cubic_sparsity
from secateurs.training.trainer import TrainConfig, Trainer, TrainResult, to_device
from secateurs.training.vq_training import attach_codebook_training, detach_codebook_training, masks_besides_vq


@dataclass
class StageResult:
    recipe: object
    compression: object  # what `compress` returned (the engine's CompressionReport)
    training: TrainResult | None  # None for a phase without training


def progressive_prune(model, compress, recipes: list, calibration: torch.Tensor, token_ids: torch.Tensor,
                      configs: list[TrainConfig], teacher=None, output_dir: str | Path | None = None,
                      progress: bool = True, resume: bool = False) -> list[StageResult]:
    """For each (recipe, config): `compress(model, recipe, calibration, progress=...)` in place, its
    statistics gathered on the current (fine-tuned) weights, returning a report with
    `storage_plan()`; then fine-tune with the new zeros (and N:M patterns) held fixed (a config of
    None: no training after that phase)."""
    if len(recipes) != len(configs):
        raise ValueError("progressive_prune needs one training configuration per pruning recipe")
    for config in configs:
        if config is not None:
            config.validate()
    results = []
    for index, (recipe, config) in enumerate(zip(recipes, configs)):
        model.eval()
        report = compress(model, recipe, calibration, progress=progress)
        if config is None:  # a last phase without training (e.g. quantization after the pruning phases)
            results.append(StageResult(recipe, report, None))
            continue
        plan = report.storage_plan()
        layers = block_linear_layers(model)
        masks = masks_besides_vq(model, layers, plan.vq, plan.nm)
        coded = attach_codebook_training(model, layers, plan.vq)  # a vq phase: its codebooks train, codes fixed
        stage_dir = Path(output_dir) / f"stage-{index + 1}" if output_dir is not None else None
        trainer = Trainer(model, token_ids, config, teacher=teacher, masks=masks, output_dir=stage_dir,
                          progress=progress, description=f"stage {index + 1}")
        training = trainer.train(resume=resume)
        # the trained codebooks replace the phase's in its report, which the stored file is made from
        report.vq.update(detach_codebook_training(layers, coded))
        results.append(StageResult(recipe, report, training))
    return results


class GradualPruning:
    """A Trainer `on_step` callback: every `every` steps from `start` to `end`, prune the masked
    layers to the cubic schedule's sparsity s_t = s_f + (s_i - s_f)(1 - t/T)^3 (`prune`, by a
    subclass), then zero the pruned weights' optimizer moments. Pruned weights never come back."""

    def __init__(self, masks: MaskSet, initial: float, final: float, start: int, end: int, every: int = 1):
        if not 0 <= initial <= final < 1 or not 0 <= start < end or every < 1:
            raise ValueError("gradual pruning needs 0 <= initial <= final < 1, 0 <= start < end, every >= 1")
        self.masks, self.initial, self.final = masks, initial, final
        self.start, self.end, self.every = start, end, every

    def target(self, step: int) -> float:
        return cubic_sparsity(max(0, step - self.start), self.end - self.start, self.initial, self.final)

    def __call__(self, trainer: Trainer, step: int) -> None:
        if step < self.start or step > self.end or (step - self.start) % self.every:
            return
        self.prune(trainer, step, self.target(step))
        self.masks.zero_moments(trainer.optimizer)
        self.masks.apply()

    def prune(self, trainer: Trainer, step: int, sparsity: float) -> None:
        raise NotImplementedError


class GradualMagnitude(GradualPruning):
    """Gradual magnitude pruning (GMP): each layer by the magnitude of its weights, to the target
    within the layer (N:M layers keep their pattern); a weight already at 0 has the lowest magnitude.
    With `unit` > 1, blocks of that many consecutive weights of a row are pruned whole by their norm
    (`across_rows`: of that many consecutive rows in one column, masks.unit_view)."""

    def __init__(self, masks: MaskSet, initial: float, final: float, start: int, end: int, every: int = 1,
                 unit: int = 1, across_rows: bool = False):
        super().__init__(masks, initial, final, start, end, every)
        self.unit, self.across_rows = unit, across_rows

    @torch.no_grad()
    def prune(self, trainer: Trainer, step: int, sparsity: float) -> None:
        for name, keep in self.masks.keep.items():
            layer = self.masks.layers[name]
            weight = weight_parameter(layer).detach() * keep
            new_keep = magnitude_mask(unit_view(weight, layer, self.across_rows), sparsity, unit=self.unit)
            self.masks.set(name, from_unit_view(new_keep, layer, self.across_rows) & keep)


# Gradient samples for the Fisher are drawn from the training data far past any training position,
# at an offset fixed by the step, so they do not move the trainer's data order (resume stays exact).
FISHER_POSITION = 1 << 40
# Examples per batched pass of gradual oBERT's gradient samples: a MiniLM layer's inputs and output
# gradients for 16 reviews of 128 tokens are about 400 MB over its 36 layers.
EXAMPLES_PER_PASS = 16


class GradualOBert(GradualPruning):
    """Gradual oBERT: at each pruning step, `grads` gradients of the task loss (cross-entropy, eval
    mode: no dropout) on mini-batches of `grad_batch` examples build each masked layer's
    block-diagonal inverse Fisher (blocks of `block_size`, dampening `damp`), then every layer is
    pruned at once to the target with OBS updates of the kept weights (algorithms.obert_prune:
    `scope` global or per layer, units of `unit` consecutive weights, `recomputations` increments).
    With `across_rows` the units, and the Fisher blocks, run down the columns (masks.unit_view)."""

    def __init__(self, masks: MaskSet, initial: float, final: float, start: int, end: int, every: int = 1,
                 grads: int = 64, grad_batch: int = 1, block_size: int = 50, damp: float = 1e-7, unit: int = 1,
                 scope: str = "global", recomputations: int = 1, across_rows: bool = False):
        super().__init__(masks, initial, final, start, end, every)
        if grads < 1 or grad_batch < 1:
            raise ValueError("gradual oBERT needs grads >= 1 and grad_batch >= 1")
        self.grads, self.grad_batch, self.block_size, self.damp = grads, grad_batch, block_size, damp
        self.unit, self.scope, self.recomputations, self.across_rows = unit, scope, recomputations, across_rows

    def _view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return unit_view(tensor, self.masks.layers[name], self.across_rows)

    def fishers(self, trainer: Trainer, step: int) -> list:
        names, parameters = list(self.masks.keep), self.masks.parameters()
        builders = [FisherInverseBuilder(weight.numel(), self.grads, self.block_size, self.damp, device=weight.device)
                    for weight, _ in parameters]
        model, was_training = trainer.model, trainer.model.training
        model.eval()
        try:
            for gradients in self.gradient_samples(trainer, step):
                for name, builder, gradient, (_, keep) in zip(names, builders, gradients, parameters):
                    builder.add(self._view(name, gradient * keep).flatten())
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return [builder.result() for builder in builders]

    def gradient_samples(self, trainer: Trainer, step: int):
        """The `grads` gradients of the task loss, each over its mini-batch of `grad_batch` examples:
        per masked layer, the weight's gradient (model in eval mode). Data whose examples' losses
        come apart (`example_losses`, as ClassificationData's) and plain nn.Linear layers take
        batched passes of EXAMPLES_PER_PASS examples; anything else one backward per gradient."""
        layers = [self.masks.layers[name] for name in self.masks.keep]
        if hasattr(trainer.data, "example_losses") and all(type(layer) is torch.nn.Linear for layer in layers):
            yield from self._batched_gradient_samples(trainer, step, layers)
            return
        task_loss = LossWeights(ce=1.0, kl=0.0, squarehead=0.0)
        for sample in range(self.grads):
            position = FISHER_POSITION + (step * self.grads + sample) * self.grad_batch
            batch = to_device(trainer.data.batch(position, self.grad_batch), trainer.device)
            trainer.model.zero_grad(set_to_none=True)
            loss, _ = trainer.data.loss(task_loss, trainer.model, None, batch, trainer.autocast)
            loss.backward()
            yield [weight.grad.detach() for weight, _ in self.masks.parameters()]

    def _batched_gradient_samples(self, trainer: Trainer, step: int, layers: list):
        # A linear layer's weight gradient over examples E is sum over e in E and tokens t of
        # dL/dy[e, t]ᵀ x[e, t]: one forward and one backward to the layer outputs (no weight
        # gradients) give every mini-batch's, summed over its own examples only.
        per_pass = max(1, EXAMPLES_PER_PASS // self.grad_batch)
        for first in range(0, self.grads, per_pass):
            count = min(per_pass, self.grads - first)
            position = FISHER_POSITION + (step * self.grads + first) * self.grad_batch
            batch = to_device(trainer.data.batch(position, count * self.grad_batch), trainer.device)
            inputs, outputs = [None] * len(layers), [None] * len(layers)

            def keeper(index: int):
                def hook(_module, args, output):
                    inputs[index], outputs[index] = args[0].detach(), output
                return hook

            handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
            try:
                with trainer.autocast():
                    losses = trainer.data.example_losses(trainer.model, batch)
            finally:
                for handle in handles:
                    handle.remove()
            # each mini-batch's loss is the mean over its examples, as the one-backward path has it
            output_grads = torch.autograd.grad(losses.float().sum() / self.grad_batch, outputs)
            for sample in range(count):
                rows = slice(sample * self.grad_batch, (sample + 1) * self.grad_batch)
                yield [torch.einsum("e...o,e...i->oi", grad[rows].float(), x[rows].float())
                       for grad, x in zip(output_grads, inputs)]

    def prune(self, trainer: Trainer, step: int, sparsity: float) -> None:
        fishers = self.fishers(trainer, step)
        names = list(self.masks.keep)
        parameters = self.masks.parameters()
        # contiguous copies in the units' orientation (the weights themselves when it is theirs)
        views = [self._view(name, weight.detach()).contiguous() for name, (weight, _) in zip(names, parameters)]
        result = obert_prune(views, fishers, sparsity,
                             keeps=[self._view(name, keep).contiguous() for name, (_, keep) in zip(names, parameters)],
                             unit=self.unit, scope=self.scope, recomputations=self.recomputations, in_place=True)
        with torch.no_grad():
            for name, (weight, _), new_weight, keep in zip(names, parameters, result.weights, result.masks):
                layer = self.masks.layers[name]
                weight.copy_(from_unit_view(new_weight, layer, self.across_rows))
                self.masks.set(name, from_unit_view(keep, layer, self.across_rows))
