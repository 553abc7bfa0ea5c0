"""Block-level fine-tuning of vector-quantized layers (AQLM's "fine-tuning of the codebooks within a
block"): once every layer of a block is coded, the codes stay fixed and the codebooks and scales of
all its vq layers are trained together with Adam so that the block's outputs on the calibration
inputs match the dense block's, loss = sum ||y - y_dense||^2 / sum ||y_dense||^2 over the chunks.

The result is rounded to float16 again (what the vq format stores) and kept only if it lowers that
loss, so a run with tuning is never worse on the calibration set than one without.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.pipeline.capture import run_block
from secateurs.runtime.layouts import vq_to_dense
from secateurs.structure import is_transposed, set_weight


class _CodedWeight(nn.Module):
    """The weight of a vq layer as a function of trainable codebooks and scales (codes fixed)."""

    def __init__(self, codes: Tensor, codebooks: Tensor, scales: Tensor, dtype: torch.dtype, transposed: bool):
        super().__init__()
        self.register_buffer("codes", codes)
        self.codebooks = nn.Parameter(codebooks.float().clone())
        self.scales = nn.Parameter(scales.float().clone())
        self.dtype, self.transposed = dtype, transposed

    def forward(self, _original: Tensor) -> Tensor:
        weight = vq_to_dense(self.codes, self.codebooks, self.scales).to(self.dtype)
        return weight.t() if self.transposed else weight  # GPT-2's Conv1D stores [in, out]


def _relative_error(block, chunks, targets, device) -> float:
    error = total = 0.0
    with torch.no_grad():
        for (hidden, kwargs), target in zip(chunks, targets):
            out = run_block(block, hidden, kwargs, device).float()
            error += float((out - target).square().sum())
            total += float(target.square().sum())
    return error / max(total, torch.finfo(torch.float32).tiny)


def tune_vq_block(block: nn.Module, layers: dict[str, nn.Module], codes: dict[str, tuple], chunks: list,
                  targets: list[Tensor], steps: int, lr: float, device) -> tuple[dict[str, tuple], float, float]:
    """Train the codebooks and scales of `layers` (name -> module, `codes[name]` = (codes, float16
    codebooks, float16 scales)) for `steps` Adam steps, one calibration chunk per step in turn.
    Returns (the new codes of each layer, float16, the same codes where tuning did not help;
    relative output error before; after)."""
    before = _relative_error(block, chunks, targets, device)
    for name, module in layers.items():
        parametrize.register_parametrization(module, "weight", _CodedWeight(*codes[name], module.weight.dtype,
                                                                            is_transposed(module)))
    coded = {name: module.parametrizations.weight[0] for name, module in layers.items()}
    parameters = [p for c in coded.values() for p in (c.codebooks, c.scales)]
    frozen = [p for p in block.parameters() if p.requires_grad and all(p is not q for q in parameters)]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    try:
        with torch.enable_grad():
            for step in range(steps):
                (hidden, kwargs), target = chunks[step % len(chunks)], targets[step % len(targets)]
                out = run_block(block, hidden, kwargs, device).float()
                loss = (out - target).square().sum() / target.square().sum().clamp(min=torch.finfo(torch.float32).tiny)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        tuned = {name: (c.codes, c.codebooks.detach().to(torch.float16), c.scales.detach().to(torch.float16))
                 for name, c in coded.items()}
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for module in layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    for name, module in layers.items():  # the rounded values, exactly as the file decodes them
        set_weight(module, vq_to_dense(tuned[name][0], tuned[name][1], tuned[name][2]).to(module.weight.dtype))
    after = _relative_error(block, chunks, targets, device)
    if after >= before:
        for name, module in layers.items():
            set_weight(module, vq_to_dense(*codes[name]).to(module.weight.dtype))
        return codes, before, before
    return tuned, before, after
