"""Fine-tuning of vector-quantized layers with their codes fixed: the codebooks and scales of all vq
layers of a module are trained together with Adam so that its outputs on the calibration inputs
match the dense ones, loss = sum ||y - y_dense||^2 / sum ||y_dense||^2. For a transformer block that
is AQLM's "fine-tuning of the codebooks within a block" (tune_vq_block); for a whole denoiser it is
the diffusion seed's fine-tuning of codebooks and scales on the teacher's outputs (tune_vq_codebooks
with the model and the teacher's outputs along its trajectories).

The result is rounded to float16 again (what the vq formats store) and kept only if it lowers that
loss, so a run with tuning is never worse on the calibration set than one without.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from secateurs.pipeline.capture import run_block
from secateurs.runtime.vq_weight import attach_vq_weights, detach_vq_weights, set_vq_weight


def relative_error(forward: Callable[[int], Tensor], targets: list[Tensor]) -> float:
    """sum ||forward(i) - targets[i]||^2 / sum ||targets[i]||^2."""
    error = total = 0.0
    with torch.no_grad():
        for index, target in enumerate(targets):
            out = forward(index).float()
            error += float((out - target).square().sum())
            total += float(target.square().sum())
    return error / max(total, torch.finfo(torch.float32).tiny)


def tune_vq_block(block: nn.Module, layers: dict[str, nn.Module], codes: dict[str, tuple], chunks: list,
                  targets: list[Tensor], steps: int, lr: float, device) -> tuple[dict[str, tuple], float, float]:
    """tune_vq_codebooks on one transformer block, its calibration chunks (hidden, kwargs) in turn."""
    return tune_vq_codebooks(block, layers, codes, lambda i: run_block(block, *chunks[i], device), targets, steps, lr)


def tune_vq_codebooks(root: nn.Module, layers: dict[str, nn.Module], codes: dict[str, tuple],
                      forward: Callable[[int], Tensor], targets: list[Tensor], steps: int, lr: float,
                      on_step: Callable[[int, float], None] | None = None) -> tuple[dict[str, tuple], float, float]:
    """Train the codebooks and scales of `layers` (name -> module of `root`, `codes[name]` = (codes,
    float16 codebooks, float16 scales)) for `steps` Adam steps; step k computes `forward(i)` (root's
    output on calibration input i = k mod len(targets)) against `targets[i]`. Every other parameter of
    `root` is frozen meanwhile. Returns (the new codes of each layer, float16, the same codes where
    tuning did not help; relative output error before; after)."""
    before = relative_error(forward, targets)
    coded = attach_vq_weights(layers, codes)
    parameters = [p for c in coded.values() for p in (c.codebooks, c.scales)]
    frozen = [p for p in root.parameters() if p.requires_grad and all(p is not q for q in parameters)]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    tuned = codes
    try:
        with torch.enable_grad():
            for step in range(steps):
                target = targets[step % len(targets)]
                out = forward(step % len(targets)).float()
                loss = (out - target).square().sum() / target.square().sum().clamp(min=torch.finfo(torch.float32).tiny)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if on_step:
                    on_step(step, loss.item())
        tuned = {name: c.stored() for name, c in coded.items()}
    finally:
        for p in frozen:
            p.requires_grad_(True)
        detach_vq_weights(layers, tuned)  # the rounded values, exactly as the file decodes them
    after = relative_error(forward, targets)
    if not after < before:  # NaN included: a diverged tuning is never kept
        for name, module in layers.items():
            set_vq_weight(module, codes[name])
        return codes, before, before
    return tuned, before, after
