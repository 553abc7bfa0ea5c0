"""Fine-tuning losses, weighted and combinable: next-token cross-entropy, KL to a teacher's logits,
and SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of LLMs").

`mask` is the attention mask [batch, seq] (1 for real tokens, 0 for padding); every mean is over
real tokens only. SquareHead for one block is mean((s - t)^2) / mean(t^2) over the real tokens and
the hidden dimension; the loss sums it over the block outputs (transformers' hidden_states[1:], the
last of which is taken after the final norm).

Under data parallelism each process sees a slice of the batch. `share` (the trainer's mean over the
processes) is applied to every denominator: each process then divides its own sums by the global
batch's token count or teacher power, so the gradients averaged over the processes are exactly those
of the global batch, SquareHead's normalization and padded batches included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from secateurs.errors import SecateursError


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss parts; the paper's defaults are CE 1 + SquareHead 1, KL 0."""

    ce: float = 1.0
    kl: float = 0.0
    squarehead: float = 1.0
    temperature: float = 1.0  # of the KL term's softmaxes

    def __post_init__(self):
        for name in ("ce", "kl", "squarehead"):
            value = getattr(self, name)
            if not value >= 0:  # also NaN
                raise SecateursError(f"loss weight {name} must be >= 0 (got {value})")
        if not self.ce + self.kl + self.squarehead > 0:
            raise SecateursError("at least one loss weight (ce, kl, squarehead) must be positive")
        if not self.temperature > 0:
            raise SecateursError(f"temperature must be > 0 (got {self.temperature})")

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.squarehead > 0

    @classmethod
    def named(cls, name: str, temperature: float = 1.0) -> LossWeights:
        """The benchmark's loss names: ce, kl (KL 1 alone), squarehead (CE 1 + SquareHead 1)."""
        table = {"ce": cls(1, 0, 0, temperature), "kl": cls(0, 1, 0, temperature),
                 "squarehead": cls(1, 0, 1, temperature), "ce+kl": cls(1, 1, 0, temperature)}
        if name not in table:
            raise SecateursError(f"unknown loss {name!r}; choose from {sorted(table)}")
        return table[name]

    def as_dict(self) -> dict:
        return asdict(self)


Share = Callable[[Tensor], Tensor]


def _mask(mask: Tensor | None, shape) -> Tensor:
    return torch.ones(shape, dtype=torch.float32) if mask is None else mask.to(torch.float32)


def _denominator(value: Tensor, share: Share | None) -> Tensor:
    return value if share is None else share(value.detach())


def cross_entropy(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None, share: Share | None = None) -> Tensor:
    """Mean NLL of each next token, over positions whose token and next token are both real."""
    pair = _mask(mask, input_ids.shape).to(logits.device)
    pair = pair[:, :-1] * pair[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                          reduction="none").view_as(pair)
    return (nll * pair).sum() / _denominator(pair.sum(), share).clamp(min=1)


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                  temperature: float = 1.0, share: Share | None = None) -> Tensor:
    """KL(teacher || student) of the softmaxes at `temperature`, mean over real tokens, times T^2
    (so its gradient's scale does not shrink with T, as in Hinton et al.)."""
    weights = _mask(mask, student_logits.shape[:2]).to(student_logits.device)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return (per_token * weights).sum() / _denominator(weights.sum(), share).clamp(min=1) * temperature**2


def squarehead(student_hidden, teacher_hidden, mask: Tensor | None = None, share: Share | None = None) -> Tensor:
    """Sum over blocks of mean((s - t)^2) / mean(t^2) over real tokens (and the hidden dimension)."""
    if len(student_hidden) != len(teacher_hidden):
        raise SecateursError(f"SquareHead needs as many blocks in student and teacher "
                             f"({len(student_hidden)} vs {len(teacher_hidden)})")
    total = 0.0
    for s, t in zip(student_hidden, teacher_hidden):
        weights = _mask(mask, s.shape[:2]).to(s.device)[..., None]
        s, t = s.float(), t.float()
        error = ((s - t).square() * weights).sum()
        scale = (t.square() * weights).sum()
        total = total + error / _denominator(scale, share).clamp(min=torch.finfo(torch.float32).tiny)
    return total


def combined_loss(weights: LossWeights, student_out, input_ids: Tensor, mask: Tensor | None = None,
                  teacher_out=None, share: Share | None = None) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum and its parts (unweighted floats) from model outputs with `.logits` and,
    for SquareHead, `.hidden_states` (transformers' output_hidden_states=True: embeddings first)."""
    total, parts = 0.0, {}
    if weights.ce:
        part = cross_entropy(student_out.logits, input_ids, mask, share)
        total, parts["ce"] = total + weights.ce * part, part.item()
    if weights.kl:
        part = kl_divergence(student_out.logits, teacher_out.logits, mask, weights.temperature, share)
        total, parts["kl"] = total + weights.kl * part, part.item()
    if weights.squarehead:
        part = squarehead(student_out.hidden_states[1:], teacher_out.hidden_states[1:], mask, share)
        total, parts["squarehead"] = total + weights.squarehead * part, part.item()
    parts["loss"] = float(total.item())
    return total, parts
