"""Scoring a sequence classifier on labelled texts: accuracy and macro-F1 of its argmax predictions,
and the sequences per second of the forward passes that made them (tokenizing not counted).

Texts are truncated and padded to one length (`seqlen`), as the encoder benchmark runs them, so the
speed is that of fixed-size batches; the padding is masked, so predictions do not depend on it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateurs.data.reviews import LabelledTexts
from secateurs.errors import SecateursError
from secateurs.eval.perplexity import check_seqlen, max_context

DEFAULT_SEQLEN = 128  # tokens per text, or the model's context where that is shorter


def tokenize(tokenizer, texts: list[str], seqlen: int) -> dict[str, Tensor]:
    """input_ids and attention_mask [len(texts), seqlen]: truncated, padded to seqlen."""
    return dict(tokenizer(list(texts), padding="max_length", truncation=True, max_length=seqlen, return_tensors="pt"))


@dataclass
class ClassifierScore:
    accuracy: float
    macro_f1: float
    n: int


@dataclass
class ClassifierEvaluation:
    score: ClassifierScore
    seconds: float  # the forward passes only
    batch_size: int
    seqlen: int

    @property
    def sequences_per_second(self) -> float:
        return self.score.n / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"accuracy": self.score.accuracy, "macro_f1": self.score.macro_f1, "n": self.score.n,
                "seconds": self.seconds, "seq_per_s": self.sequences_per_second, "batch": self.batch_size,
                "seqlen": self.seqlen}


@torch.no_grad()
def predict(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 64,
            progress: bool = False) -> tuple[Tensor, float]:
    """(argmax class of every row, seconds spent in the model's forward passes)."""
    if batch_size < 1:
        raise SecateursError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    predictions, seconds = [], 0.0
    starts = range(0, len(input_ids), batch_size)
    for start in tqdm(starts, desc="classify", unit="batch", disable=not progress):
        began = time.perf_counter()
        logits = model(input_ids=input_ids[start : start + batch_size],
                       attention_mask=attention_mask[start : start + batch_size]).logits
        seconds += time.perf_counter() - began
        predictions.append(logits.argmax(-1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long), seconds


def evaluate_classifier(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                        batch_size: int = 64) -> ClassifierScore:
    """Accuracy and macro-F1 (the mean over classes of each class's F1) of argmax predictions."""
    predictions, _ = predict(model, input_ids, attention_mask, batch_size)
    return score_predictions(predictions, labels, model.config.num_labels)


def score_predictions(predictions: Tensor, labels: Tensor, classes: int) -> ClassifierScore:
    f1 = []
    for c in range(classes):
        true_positive = int(((predictions == c) & (labels == c)).sum())
        predicted, actual = int((predictions == c).sum()), int((labels == c).sum())
        f1.append(0.0 if predicted + actual == 0 else 2 * true_positive / (predicted + actual))
    return ClassifierScore(float((predictions == labels).float().mean()), sum(f1) / classes, len(labels))


def evaluate_texts(model: nn.Module, tokenizer, data: LabelledTexts, seqlen: int | None = None, batch_size: int = 32,
                   progress: bool = False) -> ClassifierEvaluation:
    """Score `model` on `data`, whose label ids must already be the model's (LabelledTexts.for_model)."""
    if len(data) == 0:
        raise SecateursError("no labelled texts to evaluate")
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, max_context(model) or DEFAULT_SEQLEN)
    check_seqlen(model, seqlen)
    encoded = tokenize(tokenizer, data.texts, seqlen)
    predictions, seconds = predict(model, encoded["input_ids"], encoded["attention_mask"], batch_size, progress)
    score = score_predictions(predictions, torch.tensor(data.labels), model.config.num_labels)
    return ClassifierEvaluation(score, seconds, batch_size, seqlen)
