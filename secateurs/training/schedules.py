"""Learning-rate and sparsity schedules, as plain functions of the step (no state to checkpoint)."""

from __future__ import annotations

import math

from secateurs.errors import SecateursError

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "linear") -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based) of `total`: linear
    warmup over the first `warmup` steps (step 0 gets 1/warmup), then constant, linear or cosine
    decay from 1 towards 0 at step `total`."""
    if kind not in LR_SCHEDULES:
        raise SecateursError(f"unknown learning-rate schedule {kind!r}; choose from {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cubic_sparsity(step: int, total: int, initial: float, final: float) -> float:
    """Zhu & Gupta's gradual schedule s_t = s_f + (s_i - s_f)(1 - t/T)^3, held at s_f after T."""
    if total <= 0:
        raise SecateursError(f"the sparsity schedule needs a positive number of steps (got {total})")
    progress = min(1.0, max(0.0, step / total))
    return final + (initial - final) * (1.0 - progress) ** 3
