"""Sequence classification on the one Trainer: labelled texts as a data object (its batches and its
loss); scoring a classifier is secateurs.eval.classifier's.

The loss is oBERT's distillation (Kurtic et al. 2022): (1 - h) CE(labels) + h T^2 KL(teacher || student)
at temperature T, with hardness h = LossWeights.kl and 1 - h = LossWeights.ce (the paper: h = 1,
T = 2); SquareHead on the encoder's hidden states (padding masked) may be added like for decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateurs.errors import SecateursError
from secateurs.eval.classifier import tokenize
from secateurs.training.losses import LossWeights, Share, kl_divergence, squarehead
from secateurs.training.trainer import PackedWindows


class ClassificationData(PackedWindows):
    """Tokenized labelled texts [N, seqlen] (padded, with their attention mask) visited in the
    trainer's seeded epoch order; a batch is a dict of input_ids, attention_mask and labels."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, seed: int = 0):
        if not (input_ids.shape == attention_mask.shape and input_ids.dim() == 2 and labels.shape == input_ids.shape[:1]):
            raise SecateursError("classification data needs input_ids and attention_mask [N, seqlen] and labels [N]")
        if len(labels) == 0:
            raise SecateursError("no training examples")
        self.windows, self.attention_mask, self.labels = input_ids.long(), attention_mask.long(), labels.long()
        self.seed = seed
        self._order = None

    @classmethod
    def from_texts(cls, tokenizer, texts: list[str], labels: list[int], seqlen: int, seed: int = 0) -> ClassificationData:
        encoded = tokenize(tokenizer, texts, seqlen)
        return cls(encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels), seed)

    def batch(self, position: int, size: int) -> dict[str, Tensor]:
        rows = self.indices(position, size)
        return {"input_ids": self.windows[rows], "attention_mask": self.attention_mask[rows], "labels": self.labels[rows]}

    def check(self, model: nn.Module, teacher: nn.Module | None) -> None:
        classes = model.config.num_labels
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= classes:
            raise SecateursError(f"labels must lie in [0, {classes}) for a model with {classes} classes")
        if teacher is not None and teacher.config.num_labels != classes:
            raise SecateursError(f"the teacher has {teacher.config.num_labels} classes, the model {classes}")

    def example_losses(self, model: nn.Module, batch: dict) -> Tensor:
        """Each example's cross-entropy [batch] (gradual oBERT's batched gradient samples)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")

    def loss(self, weights: LossWeights, model: nn.Module, teacher: nn.Module | None, batch: dict, autocast,
             share: Share | None = None):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        hidden = weights.squarehead > 0
        teacher_out = None
        if teacher is not None and weights.needs_teacher:
            with torch.no_grad(), autocast():
                teacher_out = teacher(**inputs, output_hidden_states=hidden)
        with autocast():
            student_out = model(**inputs, output_hidden_states=hidden)
        total, parts = 0.0, {}
        if weights.ce:
            # a mean over examples: every process holds as many, so no count needs sharing
            part = F.cross_entropy(student_out.logits.float(), batch["labels"])
            total, parts["ce"] = total + weights.ce * part, part.item()
        if weights.kl:  # one "token" per example: the mask is all ones
            part = kl_divergence(student_out.logits[:, None], teacher_out.logits[:, None], None, weights.temperature, share)
            total, parts["kl"] = total + weights.kl * part, part.item()
        if weights.squarehead:
            part = squarehead(student_out.hidden_states[1:], teacher_out.hidden_states[1:], batch["attention_mask"], share)
            total, parts["squarehead"] = total + weights.squarehead * part, part.item()
        parts["loss"] = float(total.item())
        return total, parts
