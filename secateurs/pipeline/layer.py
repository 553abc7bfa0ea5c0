"""Compress one layer: route its weight and statistics to the algorithms a recipe names.

Plumbing only; the mathematics is in secateurs.algorithms.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from secateurs import algorithms as alg
from secateurs.algorithms import obs
from secateurs.errors import SecateursError
from secateurs.recipe import Stage
from secateurs.runtime import kernels
from secateurs.runtime.layouts import vq_to_dense



@contextmanager
def native_sweeps():
    """For the duration of a run, the OBS sweeps fix each span of columns with the native kernel
    (its torch twin is the fallback where the library is missing or the tensors are on a GPU)."""
    previous = obs.use_span_kernel(kernels.obs_span)
    try:
        yield
    finally:
        obs.use_span_kernel(previous)


@dataclass
class LayerResult:
    weight: torch.Tensor  # [out, in], dense, pruned weights exactly 0
    loss: float | None  # ½ Σ_rows ΔwᵀHΔw with the undamped H = ‖(W-Ŵ)X‖² / n; None without H
    sparsity: float
    seconds: float
    scale: torch.Tensor | None = None  # quantization grid, see docs/formats.md
    zero: torch.Tensor | None = None
    damp: float = 0.0
    vq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (codes, codebooks, scales), see formats


def compress_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    column_norms: torch.Tensor | None,
    prune: Stage | None,
    quant: Stage | None,
    sparsity: float | None = None,
    codebooks: torch.Tensor | None = None,
) -> LayerResult:
    """`sparsity` overrides the pruning stage's (non-uniform profiles such as OWL). `hessian` and
    `column_norms` may be None when no stage uses calibration (magnitude, RTN); `hessian` is None
    also when only column norms were gathered (Wanda without GPTQ). `codebooks`: a vq stage's shared
    codebooks (float16 values, see algorithms.shared_codebooks), required when the stage says shared."""
    started = time.perf_counter()
    W = weight.float()
    if quant is not None and quant.method == "vq":
        if quant.shared and codebooks is None:
            raise SecateursError("vq with shared: true needs every layer's weights before the first is coded: only the "
                                 "layer-wise engine (diffusion models, secateurs.pipeline.layerwise) supports it")
        return _vector_quantize(W, hessian, quant, weight.dtype, started, codebooks)
    spec = quant.quant_spec() if quant else None
    gptq_spec = spec if quant and quant.method == "gptq" else None  # RTN never uses the Hessian
    target = prune.sparsity if sparsity is None and prune else sparsity
    new, scale, zero, damp = W, None, None, 0.0
    sweep = None  # the OBS sweep's output, while it is the final weight
    if prune is not None:
        n, m = prune.nm
        if prune.method == "sparsegpt":
            sweep = alg.sparsegpt(W, hessian, target, n, m, prune.block_size, prune.percdamp, quant=gptq_spec,
                                  mask_rows=prune.mask_rows)
        else:
            if prune.method == "wanda":
                mask = alg.wanda_mask(W, column_norms, target, n, m).mask
            else:
                mask = alg.magnitude_mask(W, target, per_row=prune.per_row, n=n, m=m)
            if gptq_spec is None:
                new = torch.where(mask, W, 0.0)  # W * mask would leave -0.0 behind
            else:  # GPTQ on the surviving weights, the mask held fixed
                sweep = alg.sparsegpt(W, hessian, 0.0, block_size=quant.block_size, percdamp=quant.percdamp,
                                      quant=gptq_spec, fixed_mask=mask)
    elif gptq_spec is not None and quant.keep_zeros and bool((W == 0).any()):  # earlier pruning held
        sweep = alg.sparsegpt(W, hessian, 0.0, block_size=quant.block_size, percdamp=quant.percdamp, quant=gptq_spec,
                              fixed_mask=W != 0)
    elif gptq_spec is not None:
        sweep = alg.gptq(W, hessian, gptq_spec, quant.block_size, quant.percdamp)
    if sweep is not None:
        new, scale, zero, damp = sweep.weight, sweep.scale, sweep.zero, sweep.damp
    if quant is not None and gptq_spec is None:  # round to nearest; a pruned 0 rounds to exactly 0
        new, _, scale, zero = alg.round_to_nearest(new, spec)
        sweep = None
    loss = None
    if sweep is not None:
        # The sweep summed ½Δᵀ(H + damp·I)Δ over rows; dead inputs (zero rows and columns of H) add nothing.
        # This saves a [rows, cols] x [cols, cols] product per layer (about 1% of a SparseGPT run).
        live = hessian.diagonal() != 0
        loss = sweep.loss - 0.5 * sweep.damp * float((W - new)[:, live].square().sum())
    elif hessian is not None:
        delta = (W - new).to(hessian.dtype)
        loss = 0.5 * float(((delta @ hessian) * delta).sum())
    sparsity_achieved = float((new == 0).sum()) / new.numel()
    return LayerResult(new.to(weight.dtype), loss, sparsity_achieved, time.perf_counter() - started, scale, zero, damp)


def _vector_quantize(W: torch.Tensor, hessian: torch.Tensor, stage: Stage, dtype: torch.dtype, started: float,
                     codebooks: torch.Tensor | None = None) -> LayerResult:
    """Codebooks and scales rounded to float16, the precision the files keep them in, so the weight
    returned is exactly what the stored codes decode to."""
    result = alg.vq(W, hessian, stage.vq_spec(), beam=stage.beam, rounds=stage.rounds, adam_steps=stage.adam_steps,
                    tol=stage.tolerance, round_to=torch.float16,
                    codebooks=None if codebooks is None else codebooks.to(torch.float16).float())
    codes, codebooks, scales = result.codes, result.codebooks.to(torch.float16), result.scales.to(torch.float16)
    weight = vq_to_dense(codes, codebooks, scales)  # exactly as the vq format and VQLinear decode it
    return LayerResult(weight.to(dtype), result.loss, float((weight == 0).sum()) / W.numel(),
                       time.perf_counter() - started, vq=(codes, codebooks, scales))
