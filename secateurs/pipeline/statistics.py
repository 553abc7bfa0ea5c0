"""Per-layer calibration statistics collected by forward hooks.

H = 2 X Xᵀ / n is kept as the float sum of x xᵀ over tokens plus the token count, so partial sums
from several processes (or resumed runs) add up exactly before the division. Wanda's
per-input-column norms ‖X_j‖₂ are the square roots of that sum's diagonal.
Layers called one after another on the same input tensor (q/k/v, gate/up) share one accumulator,
so XᵀX is computed once per distinct input.
"""

from __future__ import annotations

import torch
from torch import nn


class HessianAccumulator:
    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device="cpu"):
        self.sum = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def merge(self, other_sum: torch.Tensor, other_count: int) -> None:
        self.sum += other_sum.to(self.sum)
        self.count += other_count

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))

    def column_norms(self) -> torch.Tensor:
        return self.sum.diagonal().clamp_min(0).sqrt()


class StatisticsHooks:
    """Forward hooks on some layers; `owner[name]` is the first layer, in call order, of the run of
    layers that read the same input tensor as `name`, and `accumulators` is keyed by owners.
    With `accumulate=False` the hooks only learn the grouping (one cheap pass for true-sequential)."""

    def __init__(self, layers: dict[str, nn.Module], dtype, device, accumulate: bool = True):
        self.owner: dict[str, str] = {}
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = [module.register_forward_hook(self._hook(name, dtype, device, accumulate))
                         for name, module in layers.items()]

    def _hook(self, name, dtype, device, accumulate):
        def record(module, args, output):
            x = args[0]
            owner = self._last[1] if self._last is not None and self._last[0] is x else name
            self._last = (x, owner)
            x = x.detach()
            self.owner.setdefault(name, owner)
            if accumulate and owner == name:
                if name not in self.accumulators:
                    self.accumulators[name] = HessianAccumulator(x.shape[-1], dtype, device)
                self.accumulators[name].add(x)

        return record

    def groups(self) -> list[list[str]]:
        grouped: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            grouped.setdefault(owner, []).append(name)
        return list(grouped.values())

    def remove(self) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()
