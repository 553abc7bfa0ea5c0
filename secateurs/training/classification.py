"""Sequence classification on the one Trainer: labelled texts as a data object (its batches and its
loss), and the evaluation of a classifier (accuracy, macro-F1).

The loss is oBERT's distillation (Kurtic et al. 2022): (1 - h) CE(labels) + h T^2 KL(teacher || student)
at temperature T, with hardness h = LossWeights.kl and 1 - h = LossWeights.ce (the paper: h = 1,
T = 2); SquareHead on the encoder's hidden states (padding masked) may be added like for decoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateurs.errors import SecateursError
from secateurs.training.losses import LossWeights, kl_divergence, squarehead
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

    def loss(self, weights: LossWeights, model: nn.Module, teacher: nn.Module | None, batch: dict, autocast):
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
            part = F.cross_entropy(student_out.logits.float(), batch["labels"])
            total, parts["ce"] = total + weights.ce * part, part.item()
        if weights.kl:  # one "token" per example: the mask is all ones
            part = kl_divergence(student_out.logits[:, None], teacher_out.logits[:, None], None, weights.temperature)
            total, parts["kl"] = total + weights.kl * part, part.item()
        if weights.squarehead:
            part = squarehead(student_out.hidden_states[1:], teacher_out.hidden_states[1:], batch["attention_mask"])
            total, parts["squarehead"] = total + weights.squarehead * part, part.item()
        parts["loss"] = float(total.item())
        return total, parts


def tokenize(tokenizer, texts: list[str], seqlen: int) -> dict[str, Tensor]:
    """input_ids and attention_mask [len(texts), seqlen]: truncated, padded to seqlen."""
    return dict(tokenizer(list(texts), padding="max_length", truncation=True, max_length=seqlen, return_tensors="pt"))


@dataclass
class ClassifierScore:
    accuracy: float
    macro_f1: float
    n: int


@torch.no_grad()
def evaluate_classifier(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                        batch_size: int = 64) -> ClassifierScore:
    """Accuracy and macro-F1 (the mean over classes of each class's F1) of argmax predictions."""
    model.eval()
    predictions = torch.cat([
        model(input_ids=input_ids[i : i + batch_size], attention_mask=attention_mask[i : i + batch_size]).logits.argmax(-1)
        for i in range(0, len(labels), batch_size)])
    return score_predictions(predictions, labels, model.config.num_labels)


def score_predictions(predictions: Tensor, labels: Tensor, classes: int) -> ClassifierScore:
    f1 = []
    for c in range(classes):
        true_positive = int(((predictions == c) & (labels == c)).sum())
        predicted, actual = int((predictions == c).sum()), int((labels == c).sum())
        f1.append(0.0 if predicted + actual == 0 else 2 * true_positive / (predicted + actual))
    return ClassifierScore(float((predictions == labels).float().mean()), sum(f1) / classes, len(labels))
