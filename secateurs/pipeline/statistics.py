"""Per-layer calibration statistics collected by forward hooks.

H = 2 X Xᵀ / n is kept as the float sum of x xᵀ over tokens plus the token count, so partial sums
from several processes (or resumed runs) add up exactly before the division. Wanda's
per-input-column norms ‖X_j‖₂ are the square roots of that sum's diagonal.
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


def attach(modules: dict[str, nn.Module], accumulators: dict[str, HessianAccumulator]) -> list:
    """Forward hooks that feed each module's input into its accumulator; returns the handles."""
    def hook_for(name):
        return lambda module, args, output: accumulators[name].add(args[0].detach())

    return [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
