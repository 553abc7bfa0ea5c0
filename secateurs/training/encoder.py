"""Prune a fine-tuned encoder classifier gradually with distillation: what `secateurs prune-encoder`
calls (oBERT, Kurtic et al. 2022, or gradual magnitude for comparison).

The model as given (any AutoModelForSequenceClassification directory; an encoder without a head,
such as the embedded all-minilm-l6-v2, after `teacher_epochs` of dense fine-tuning) is the teacher; a copy is trained on the labelled texts while
the cubic schedule takes its block linear layers from 0 to `sparsity` over the first `prune_fraction`
of the steps, then trained on at that sparsity. `unit` > 1 prunes blocks of that many consecutive
weights of a row whole (oBERT's 4-blocks), or with `across_rows` of that many consecutive rows in one
column (rows in groups sharing one mask, which the batched sparse kernel multiplies four rows at a
time: 1.4-1.8x faster on MiniLM's larger layers at 90%). `int8` puts the kept weights on per-row
symmetric int8 grids after training (zeros stay exactly zero) and stores the layers as bitmask-int8,
the compound the runtime's int8 sparse kernels run, by one of INT8_METHODS: "rtn" rounds each weight
to nearest; "gptq" runs GPTQ layer after layer with the mask held, each layer's Hessian taken over
the non-padding tokens of training examples with the layers before it already quantized; "qat"
trains `qat_epochs` more through a straight-through fake-quant on the grids rounding fitted (the same
distillation, masks held), so the stored model is the one trained. The result is written as a
compressed directory (bitmask or bitmask-int8 layers), scored beside the teacher on a held-out slice
of the data. Checkpoints go to `<output>.training/` (resume continues exactly).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from secateurs.algorithms.hessian import HessianAccumulator
from secateurs.algorithms.quant import QuantSpec, round_to_nearest
from secateurs.algorithms.sparsegpt import sparsegpt
from secateurs.data.reviews import labelled_texts
from secateurs.errors import SecateursError
from secateurs.formats import save_compressed
from secateurs.models import load_classifier
from secateurs.eval.classifier import ClassifierScore, evaluate_classifier, tokenize
from secateurs.training.classification import ClassificationData
from secateurs.training.losses import LossWeights
from secateurs.training.masks import MaskSet, block_linear_layers, open_masks, unit_view
from secateurs.training.progressive import GradualMagnitude, GradualOBert
from secateurs.training.qat import attach_fake_quant, bake_fake_quant
from secateurs.training.trainer import TrainConfig, Trainer, TrainResult

METHODS = ("obert", "gmp")
INT8_METHODS = ("rtn", "gptq", "qat")
TRAINING_SUFFIX = ".training"


@dataclass
class EncoderPruningResult:
    output: Path
    teacher: ClassifierScore  # on the held-out slice
    pruned: ClassifierScore  # the stored model (after int8 rounding where asked)
    sparsity: float  # of the block linear layers, exact
    training: TrainResult


def prune_encoder(model: str | Path, data: str | Path, output_dir: str | Path, *, sparsity: float = 0.9,
                  method: str = "obert", epochs: float = 2.0, seqlen: int = 128, batch_size: int = 16, lr: float = 5e-5,
                  hardness: float = 1.0, temperature: float = 2.0, prune_fraction: float = 2 / 3, prune_every: int = 10,
                  grads: int = 64, block_size: int = 50, validation: float = 0.1, teacher_epochs: float = 0.0,
                  unit: int = 1, across_rows: bool = False, int8: str | None = None, qat_epochs: float = 0.5,
                  calibration: int = 256, seed: int = 0, resume: bool = False, progress: bool = True) -> EncoderPruningResult:
    """`block_size` (oBERT's Fisher blocks) is rounded down to a multiple of `unit`; `calibration`:
    training examples whose tokens GPTQ's Hessians sum over."""
    if method not in METHODS:
        raise SecateursError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if int8 is not None and int8 not in INT8_METHODS:
        raise SecateursError(f"int8 must be one of {', '.join(INT8_METHODS)}, got {int8!r}")
    if int8 == "qat" and not qat_epochs > 0 or int8 == "gptq" and calibration < 1:
        raise SecateursError("need qat_epochs > 0 with int8 qat, and calibration >= 1 with int8 gptq")
    if unit < 1 or block_size < unit:
        raise SecateursError(f"need 1 <= unit <= block_size, got unit {unit} and block size {block_size}")
    if not 0 < sparsity < 1 or not 0 < prune_fraction <= 1 or not 0 < validation < 1 or not 0 <= hardness <= 1:
        raise SecateursError("need 0 < sparsity < 1, 0 < prune_fraction <= 1, 0 < validation < 1, 0 <= hardness <= 1")
    if epochs <= 0 or prune_every < 1 or seqlen < 2 or batch_size < 1:
        raise SecateursError("need epochs > 0, prune_every >= 1, seqlen >= 2, batch_size >= 1")
    texts = labelled_texts(data, "train")
    loaded = load_classifier(model, len(texts.label_names), seed=seed)
    if loaded.new_head and teacher_epochs <= 0:
        raise SecateursError(f"{model} has no classification head: pass teacher_epochs (--teacher-epochs) to fine-tune "
                             f"the dense teacher first, or give a fine-tuned classifier")
    student, tokenizer = loaded.model, loaded.tokenizer
    if not loaded.new_head:
        texts = texts.for_model(student.config.id2label)
    if len(texts.label_names) == student.config.num_labels:  # stored with its class names: evaluation maps by name
        student.config.id2label = dict(enumerate(texts.label_names))
        student.config.label2id = {name: i for i, name in enumerate(texts.label_names)}
    train, held_out = texts.split(validation, seed=seed)
    for name, layer in block_linear_layers(student).items():
        length, what = unit_view(layer.weight, layer, across_rows).shape[1], "outputs" if across_rows else "inputs"
        if length % unit:
            raise SecateursError(f"unit {unit} does not divide the {length} {what} of layer {name}")
    examples = ClassificationData.from_texts(tokenizer, train.texts, train.labels, seqlen, seed=seed)
    output = Path(output_dir)
    training_dir = output.with_name(output.name + TRAINING_SUFFIX)

    def steps_for(epochs_of_data: float) -> int:
        return max(1, round(len(examples) * epochs_of_data / batch_size))

    if teacher_epochs > 0:  # the dense teacher: cross-entropy, the same batches and learning rate
        config = TrainConfig(lr=lr, steps=steps_for(teacher_epochs), batch_size=batch_size, seqlen=seqlen, seed=seed,
                             losses=LossWeights(1, 0, 0))
        Trainer(student, examples, config, output_dir=training_dir / "teacher", progress=progress,
                description="dense teacher").train(resume=resume)
    teacher = copy.deepcopy(student).eval()
    steps = steps_for(epochs)
    end = max(prune_every, int(steps * prune_fraction) // prune_every * prune_every)
    masks = open_masks(student)
    pruner = (GradualOBert(masks, 0.0, sparsity, 0, end, every=prune_every, grads=grads,
                           block_size=block_size // unit * unit, unit=unit, across_rows=across_rows)
              if method == "obert" else GradualMagnitude(masks, 0.0, sparsity, 0, end, every=prune_every, unit=unit,
                                                         across_rows=across_rows))
    losses = LossWeights(ce=1 - hardness, kl=hardness, squarehead=0.0, temperature=temperature)
    config = TrainConfig(lr=lr, steps=steps, batch_size=batch_size, seqlen=seqlen, seed=seed, losses=losses,
                         checkpoint_every=max(1, steps // 10))
    trainer = Trainer(student, examples, config, teacher=teacher if hardness > 0 else None, masks=masks,
                      output_dir=training_dir / "pruning", on_step=pruner, progress=progress,
                      description=f"{method} to {sparsity:g}")
    result = trainer.train(resume=resume)
    masks.apply()
    masks.check()
    grids = None
    if int8 == "rtn":
        grids = round_to_int8(student)
    elif int8 == "gptq":
        grids = gptq_int8(student, examples, calibration, progress=progress)
    elif int8 == "qat":
        qat_steps = steps_for(qat_epochs)
        qat_config = TrainConfig(lr=lr, steps=qat_steps, batch_size=batch_size, seqlen=seqlen, seed=seed, losses=losses,
                                 checkpoint_every=max(1, qat_steps // 10))
        grids, _ = quantization_aware_int8(student, examples, qat_config, masks, teacher if hardness > 0 else None,
                                           training_dir / "qat", resume=resume, progress=progress)
    encoded = tokenize(tokenizer, held_out.texts, seqlen)
    labels = torch.tensor(held_out.labels)
    scores = [evaluate_classifier(m, encoded["input_ids"], encoded["attention_mask"], labels) for m in (teacher, student)]
    save_compressed(student, grids, output, tokenizer)
    return EncoderPruningResult(output, scores[0], scores[1], masks.sparsity(), result)


@torch.no_grad()
def round_to_int8(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Round every block linear layer's weights to per-row symmetric int8 in place; returns the grids
    {layer: (scale, zero)} that save_compressed stores them on. A zero weight stays exactly zero (the
    symmetric grid's zero point is a code)."""
    grids = {}
    for name, layer in block_linear_layers(model).items():
        if not isinstance(layer, torch.nn.Linear):
            raise SecateursError(f"layer {name}: int8 rounding takes torch Linear layers, not {type(layer).__name__}")
        rounded = round_to_nearest(layer.weight.detach(), QuantSpec(bits=8, symmetric=True))
        layer.weight.copy_(rounded.weight)
        grids[name] = (rounded.scale, rounded.zero)
    return grids


class _LayerInputTaken(Exception):
    """Stops a calibration forward once the layer being quantized has its input."""


@torch.no_grad()
def gptq_int8(model, examples: ClassificationData, samples: int = 256, batch_size: int = 32,
              progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ every block linear layer onto per-row symmetric int8 in place, its zeros held (the mask is
    fixed; pruned weights stay exactly 0), in forward order: each layer's Hessian sums the inputs it
    receives, with the layers before it already quantized, over the non-padding tokens of the first
    `samples` examples. Returns the grids {layer: (scale, zero)} that save_compressed stores."""
    spec = QuantSpec(bits=8, symmetric=True, act_order=True)
    ids, attention = examples.windows[:samples], examples.attention_mask[:samples]
    grids = {}
    model.eval()
    for name, layer in tqdm(block_linear_layers(model).items(), desc="GPTQ int8", disable=not progress):
        if not isinstance(layer, torch.nn.Linear):
            raise SecateursError(f"layer {name}: GPTQ int8 takes torch Linear layers, not {type(layer).__name__}")
        accumulator = HessianAccumulator(layer.in_features)
        tokens: list[torch.Tensor] = []  # the current batch's non-padding positions

        def take(module, args):
            accumulator.add(args[0][tokens[0]])  # the accumulator sums in its own float32
            raise _LayerInputTaken

        handle = layer.register_forward_pre_hook(take)
        try:
            for start in range(0, len(ids), batch_size):
                tokens[:] = [attention[start:start + batch_size].bool()]
                try:
                    model(input_ids=ids[start:start + batch_size], attention_mask=attention[start:start + batch_size])
                except _LayerInputTaken:
                    pass
        finally:
            handle.remove()
        weight = layer.weight.detach().float()
        result = sparsegpt(weight, accumulator.hessian(), 0.0, quant=spec, fixed_mask=weight != 0)
        layer.weight.copy_(result.weight)
        grids[name] = (result.scale, result.zero)
    return grids


def quantization_aware_int8(model, examples: ClassificationData, config: TrainConfig, masks: MaskSet,
                            teacher=None, output_dir: Path | None = None, resume: bool = False, progress: bool = True,
                            ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], TrainResult]:
    """Train `model` on through a straight-through fake-quant on the per-row symmetric int8 grids that
    rounding its current weights fits (masks held, `config`'s losses, distilling from `teacher`);
    returns those grids, with every weight left exactly on them."""
    layers = block_linear_layers(model)
    grids = round_to_int8(model)
    attach_fake_quant(layers, grids)
    try:
        result = Trainer(model, examples, config, teacher=teacher, masks=masks, output_dir=output_dir, progress=progress,
                         description="int8 quantization-aware").train(resume=resume)
    finally:
        bake_fake_quant(layers)
    masks.apply()
    masks.check()
    return grids, result
