"""Per-layer calibration statistics collected by forward hooks, into
algorithms.hessian.HessianAccumulator (H = 2 X Xᵀ / n as an exact sum plus a token count). Wanda's
per-input-column norms ‖X_j‖₂ are the square roots of that sum's diagonal; when no layer of the
pass needs a Hessian (Wanda, OWL's outlier pass), only that diagonal is accumulated, which skips
the XᵀX products (about a fifth of a block's two passes on SmolLM2).
Layers called one after another on the same input tensor (q/k/v, gate/up) share one accumulator,
so XᵀX is computed once per distinct input.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.algorithms.hessian import HessianAccumulator


class BlockStopped(Exception):
    """Raised by the hooks to cut a statistics pass short once the last hooked layer has its input."""


class StatisticsHooks:
    """Forward pre-hooks on some layers; `owner[name]` is the first layer, in call order, of the run
    of layers that read the same input tensor as `name`, and `accumulators` is keyed by owners.
    With `accumulate=False` the hooks only learn the grouping (one cheap pass for true-sequential);
    with `hessians=False` they accumulate only the diagonals (column norms).
    After `stop_after_last_layer()` (call it once a full pass has shown the call order) the pass
    stops with BlockStopped before the last hooked layer runs: the statistics need only the inputs
    of the hooked layers, so the rest of the block's forward (down_proj at least) is skipped."""

    def __init__(self, layers: dict[str, nn.Module], dtype, device, accumulate: bool = True, hessians: bool = True):
        self.owner: dict[str, str] = {}
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._stop_at: str | None = None
        self._handles = [module.register_forward_pre_hook(self._hook(name, dtype, device, accumulate, hessians))
                         for name, module in layers.items()]

    def _hook(self, name, dtype, device, accumulate, hessians):
        def record(module, args):
            x = args[0]
            owner = self._last[1] if self._last is not None and self._last[0] is x else name
            self._last = (x, owner)
            x = x.detach()
            self.owner.setdefault(name, owner)
            if accumulate and owner == name:
                if name not in self.accumulators:
                    self.accumulators[name] = HessianAccumulator(x.shape[-1], dtype, device, hessians)
                self.accumulators[name].add(x)
            if name == self._stop_at:
                raise BlockStopped

        return record

    def stop_after_last_layer(self) -> None:
        self._last = None
        self._stop_at = next(reversed(self.owner), None)

    def groups(self) -> list[list[str]]:
        grouped: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            grouped.setdefault(owner, []).append(name)
        return list(grouped.values())

    def remove(self) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()
