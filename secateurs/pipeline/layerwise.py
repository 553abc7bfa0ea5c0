"""Layer-by-layer compression of a model that is not a stack of identical blocks: a diffusion UNet
(diffusers' UNet2DModel / UNet2DConditionModel, or a converted ONNX graph), any nn.Module whose
work is done by Linear and Conv2d layers.

The layers are ordered as one forward pass first calls them and cut into `groups` runs of about
equal weight count. For each run, the calibration inputs go through the whole model (the runs
before it already compressed, so each layer sees the inputs its compressed predecessors give it,
as in the block engine); forward pre-hooks accumulate each layer's H = 2 XᵀX / n (a Conv2d's X are
its input patches, algorithms/conv.py) and the pass stops once the run's last layer has its input.
Then each layer of the run is compressed by pipeline/layer.py, exactly as a language model's
Linear is. groups = 1 calibrates every layer on the dense model in one pass (fastest, the inputs
of no compressed layer); groups = the number of layers is fully sequential (one pass per layer).

With `tune_steps`, the codebooks and scales of every vector-quantized layer are then trained together,
codes fixed, so that the model's outputs on the calibration inputs match the dense model's (the
diffusion seed's fine-tuning on the teacher's outputs along its trajectories; pipeline/block_tuning.py,
kept only where it lowers the calibration error).

With a `work_dir`, each finished run is written there (weights, grids, codebooks, reports) and a
killed job given the same `work_dir` continues after the last finished run, bit-identically.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from secateurs.algorithms.conv import as_matrix, conv_patches
from secateurs.algorithms.vq import shared_codebooks, vq_bits
from secateurs.errors import SecateursError
from secateurs.formats import StoragePlan
from secateurs.formats.module_file import compressible
from secateurs.io import read_safetensors, write_json, write_safetensors
from secateurs.pipeline.block_tuning import relative_error, tune_vq_codebooks
from secateurs.pipeline.layer import compress_layer, native_sweeps
from secateurs.algorithms.hessian import HessianAccumulator
from secateurs.pipeline.statistics import BlockStopped
from secateurs.recipe import Recipe
from secateurs.runtime.vq_weight import set_vq_weight, stored_weight

# One calibration input: the positional and keyword arguments of one call of the model.
CalibrationCall = tuple[tuple, dict]


@dataclass
class LayerwiseReport:
    layers: dict[str, dict] = field(default_factory=dict)  # layer -> {shape, loss, seconds, format hints}
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stays dense
    # what the formats need to store the layers; a module file is no aqlm checkpoint, so codes of
    # small codebooks are bit-packed
    plan: StoragePlan = field(default_factory=lambda: StoragePlan(pack_vq_codes=True))
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    groups: int = 0
    tuning: dict | None = None  # {steps, error_before, error_after}: relative output error on the calibration set


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as the algorithms see it: [out, in] for a Linear, [out, kh*kw*in] for a Conv2d."""
    return as_matrix(module.weight.detach())


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X whose XᵀX is the layer's Hessian: the input vectors of a Linear, the patches of a
    Conv2d (padded as the convolution pads them: zeros, reflect, replicate or circular; "same")."""
    if isinstance(module, nn.Conv2d):
        x = F.pad(x, _conv_padding(module), mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        return conv_patches(x, module.kernel_size, module.stride, 0, module.dilation)
    return x.reshape(-1, x.shape[-1])


def _conv_padding(conv: nn.Conv2d) -> list[int]:
    """F.pad's [left, right, top, bottom] for the convolution's padding."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":  # torch puts the odd pixel on the right / bottom
        amounts = []
        for kernel, dilation in ((conv.kernel_size[1], conv.dilation[1]), (conv.kernel_size[0], conv.dilation[0])):
            total = dilation * (kernel - 1)
            amounts += [total // 2, total - total // 2]
        return amounts
    height, width = conv.padding
    return [width, width, height, height]


def select_layers(model: nn.Module, recipe: Recipe, min_weights: int = 0) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(layers to compress, {layer: why not} for the compressible layers the recipe matches but
    leaves dense): fewer than `min_weights` weights, a width (kh*kw*in for a Conv2d) the quantization
    or VQ groups do not divide, or a Conv2d whose VQ groups would straddle kernel positions
    (in_channels not a multiple of g)."""
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if not compressible(module):
            continue
        prune, quant = recipe.stages_for(name)
        if prune is None and quant is None:
            continue
        rows, cols = layer_matrix(module).shape
        if rows * cols < min_weights:
            skipped[name] = f"{rows * cols} weights < {min_weights}"
        elif quant is not None and quant.method == "vq" and isinstance(module, nn.Conv2d) \
                and module.in_channels % quant.group_size:
            skipped[name] = f"in_channels {module.in_channels} not a multiple of the VQ group {quant.group_size}"
        elif quant is not None and quant.group_size and cols % quant.group_size:
            skipped[name] = f"width {cols} not a multiple of the group size {quant.group_size}"
        else:
            chosen[name] = module
    return chosen, skipped


def call_order(model: nn.Module, layers: dict[str, nn.Module], call: CalibrationCall) -> tuple[list[str], bool]:
    """The layers in the order one forward pass first calls them (layers never called are left out),
    and whether any is called more than once (then a pass cannot stop early)."""
    calls: dict[str, int] = {}

    def hook(name):
        def count(module, args):
            calls[name] = calls.get(name, 0) + 1
        return count

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            run_call(model, call)
    finally:
        for handle in handles:
            handle.remove()
    return list(calls), any(count > 1 for count in calls.values())


def run_call(model: nn.Module, call: CalibrationCall):
    args, kwargs = call
    return model(*args, **kwargs)


def output_tensor(result) -> torch.Tensor:
    """The tensor a model returned: itself, a diffusers output's `.sample`, or a tuple's first item."""
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    raise SecateursError(f"cannot find the output tensor in a {type(result).__name__}")


def split_runs(order: list[str], layers: dict[str, nn.Module], groups: int) -> list[list[str]]:
    """Cut the ordered layers into min(groups, len(order)) consecutive, non-empty runs of about equal
    weight count: run k ends at the first layer where the running total reaches k/groups of it."""
    groups = min(groups, len(order))
    totals = torch.tensor([layers[name].weight.numel() for name in order], dtype=torch.float64).cumsum(0)
    ends, previous = [], 0
    for k in range(1, groups):
        end = int(torch.searchsorted(totals, totals[-1] * k / groups)) + 1
        end = max(previous + 1, min(end, len(order) - (groups - k)))  # leave a layer for every later run
        ends.append(end)
        previous = end
    bounds = [0, *ends, len(order)]
    return [order[start:stop] for start, stop in zip(bounds, bounds[1:])]


class _RunHooks:
    """Pre-hooks that accumulate the Hessians of one run's layers, and stop the pass after the last."""

    def __init__(self, layers: dict[str, nn.Module], last: str | None, dtype: torch.dtype, patches: int | None,
                 generator: torch.Generator, full: bool = True):
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name, module, name == last, dtype, patches, generator,
                                                                     full))
                         for name, module in layers.items()]

    def _hook(self, name, module, stop, dtype, patches, generator, full):
        def record(_, args):
            rows = layer_inputs(module, args[0].detach())
            if patches is not None and rows.shape[0] > patches:
                # A uniform sample of rows keeps XᵀX / n unbiased; neighbouring patches of an image
                # are so alike that a fraction of them gives the same Hessian at a fraction of the cost.
                rows = rows[torch.randperm(rows.shape[0], generator=generator)[:patches]]
            if name not in self.accumulators:
                self.accumulators[name] = HessianAccumulator(rows.shape[-1], dtype, rows.device, full)
            self.accumulators[name].add(rows)
            if stop:
                raise BlockStopped
        return record

    def remove(self):
        for handle in self._handles:
            handle.remove()


def compress_layerwise(model: nn.Module, recipe: Recipe, calibration: Sequence[CalibrationCall], *, groups: int = 4,
                       min_weights: int = 0, patches_per_call: int | None = None, work_dir=None, progress: bool = True,
                       hessian_dtype: torch.dtype = torch.float32, tune_steps: int = 0, tune_lr: float = 1e-4,
                       on_layer: Callable[[str, dict], None] | None = None) -> LayerwiseReport:
    """Compress `model` in place with `recipe` (its per-layer stages; vq, gptq, rtn, sparsegpt, wanda,
    magnitude), calibrated on `calibration` (calls of the model); returns what was done and the
    StoragePlan that formats.module_file.save_compressed_module needs."""
    if not calibration:
        raise SecateursError("compress_layerwise needs at least one calibration input")
    if groups < 1:
        raise SecateursError(f"groups must be >= 1, got {groups}")
    started = time.perf_counter()
    report = LayerwiseReport()
    layers, report.skipped = select_layers(model, recipe, min_weights)
    if not layers:
        raise SecateursError("the recipe matches no Linear or Conv2d layer of this model")
    shared = _shared_codebooks(model, layers, recipe, calibration, patches_per_call)
    if shared and tune_steps:
        raise SecateursError("vq with shared: true cannot be combined with codebook tuning (tune_steps), which "
                             "trains each layer's codebooks apart")
    teacher = None
    if tune_steps and any(stage.method == "vq" for stage in recipe.stages):  # the dense outputs, before any change
        with torch.no_grad():
            teacher = [output_tensor(run_call(model, call)).float() for call in calibration]
    order, repeated = call_order(model, layers, calibration[0])
    for name in set(layers) - set(order):
        report.skipped[name] = "not called by the model's forward"
    runs = split_runs(order, layers, groups)
    report.groups = len(runs)
    store = _RunStore(work_dir, _fingerprint(model, recipe, runs, calibration, patches_per_call)) if work_dir else None
    done = store.restore(model, layers, report) if store else 0
    generator = torch.Generator().manual_seed(0)
    needs_statistics = any(stage.uses_calibration for stage in recipe.stages)
    bar = tqdm(total=len(order), initial=sum(len(run) for run in runs[:done]), desc="compress", unit="layer",
               disable=not progress)
    with native_sweeps():
        for index in range(done, len(runs)):
            run = runs[index]
            generator.manual_seed(index)  # a resumed run samples the same patches
            accumulators = {}
            if needs_statistics:
                bar.set_postfix_str(f"calibrating run {index + 1}/{len(runs)}")
                calibrated = time.perf_counter()
                hooks = _RunHooks({name: layers[name] for name in run}, None if repeated else run[-1], hessian_dtype,
                                  patches_per_call, generator)
                accumulators = _calibration_pass(model, calibration, hooks)
                report.calibration_seconds += time.perf_counter() - calibrated
            for name in run:
                bar.set_postfix_str(name)
                record = _compress_one(name, layers[name], recipe, accumulators.pop(name, None), report.plan, shared)
                report.layers[name] = record
                if on_layer:
                    on_layer(name, record)
                bar.update(1)
            if store:
                store.save(index, run, layers, report)
    bar.close()
    if teacher is not None and report.plan.vq:
        report.tuning = _tune(model, {name: layers[name] for name in report.plan.vq}, calibration, teacher, report.plan,
                              tune_steps, tune_lr, progress)
    report.seconds = time.perf_counter() - started
    return report


def _tune(model, coded, calibration, teacher, plan: StoragePlan, steps: int, lr: float, progress: bool) -> dict:
    """Tune on all but every fourth calibration call and keep the result only if the held-out calls'
    error falls too: ~90k codebook values fit 32 terrain inputs' noise (calibration error 0.0065 ->
    0.0025 while unseen inputs lost 1.8 dB). Fewer than 4 calls: no hold-out."""
    held = list(range(3, len(calibration), 4)) if len(calibration) >= 4 else []
    train = [i for i in range(len(calibration)) if i not in held]
    bar = tqdm(total=steps, desc="tune codebooks", unit="step", disable=not progress)

    def forward_on(indices):
        return lambda k: output_tensor(run_call(model, calibration[indices[k]]))

    def on_step(step, loss):
        bar.set_postfix(loss=f"{loss:.3g}")
        bar.update(1)

    untuned = {name: plan.vq[name] for name in coded}
    held_before = relative_error(forward_on(held), [teacher[i] for i in held]) if held else None
    tuned, before, after = tune_vq_codebooks(model, coded, untuned, forward_on(train), [teacher[i] for i in train],
                                             steps, lr, on_step)
    bar.close()
    held_after = relative_error(forward_on(held), [teacher[i] for i in held]) if held else None
    if held and not held_after < held_before:  # overfitted (or diverged on) the calls it saw: untuned again
        for name, module in coded.items():
            set_vq_weight(module, untuned[name])
        tuned, after = untuned, before
    plan.vq.update(tuned)
    return {"steps": steps, "lr": lr, "error_before": before, "error_after": after, "held_out_calls": len(held),
            "held_out_before": held_before, "held_out_after": held_after, "kept": tuned is not untuned}


def _shared_codebooks(model: nn.Module, layers: dict[str, nn.Module], recipe: Recipe,
                      calibration: Sequence[CalibrationCall], patches: int | None) -> dict[str, torch.Tensor]:
    """{layer: its codebooks} for the layers of the vq stages with `shared: true`: per stage one set
    of codebooks fitted to the weights of every layer it codes (algorithms.shared_codebooks), each
    layer's input coordinates weighted by diag(H) from one pass of the calibration inputs through
    the dense model (as a single layer's codebooks are), rounded to float16 as the files keep them.
    A module file stores identical tensors once (formats/module_file.py), so the codebooks cost
    their bytes once for all those layers."""
    shared = {}
    for stage in recipe.stages:
        if not (stage.method == "vq" and stage.shared):
            continue
        coded = {name: module for name, module in layers.items() if recipe.stages_for(name)[1] is stage}
        if not coded:
            continue
        diagonals = _calibration_pass(model, calibration, _RunHooks(coded, None, torch.float64, patches,
                                                                    torch.Generator().manual_seed(0), full=False))
        books = shared_codebooks([layer_matrix(module).float() for module in coded.values()], stage.vq_spec(),
                                 [diagonals[name].sum if name in diagonals else None for name in coded])
        shared |= dict.fromkeys(coded, books.to(torch.float16))
    return shared


def _calibration_pass(model: nn.Module, calibration: Sequence[CalibrationCall], hooks: _RunHooks
                      ) -> dict[str, HessianAccumulator]:
    """Run every calibration call through `model` with `hooks` (a call they stop early counts as
    done), remove them, and return what they accumulated."""
    try:
        with torch.no_grad():
            for call in calibration:
                try:
                    run_call(model, call)
                except BlockStopped:
                    pass
    finally:
        hooks.remove()
    return hooks.accumulators


def _compress_one(name: str, module: nn.Module, recipe: Recipe, accumulator: HessianAccumulator | None,
                  plan: StoragePlan, shared: dict[str, torch.Tensor]) -> dict:
    prune, quant = recipe.stages_for(name)
    codebooks = shared.get(name)
    matrix = layer_matrix(module)
    hessian = norms = None
    if accumulator is not None:
        norms = accumulator.column_norms()
        if accumulator.full:
            hessian = accumulator.hessian()
    result = compress_layer(matrix, hessian, norms, prune, quant, codebooks=codebooks)
    module.weight.data = stored_weight(module, result.weight).to(module.weight.dtype)
    record = {"shape": list(module.weight.shape), "loss": result.loss, "seconds": result.seconds,
              "sparsity": result.sparsity}
    if result.vq is not None:
        plan.vq[name] = result.vq
        bits = vq_bits(*matrix.shape, quant.vq_spec())
        # shared codebooks are stored once for all the stage's layers, not in this layer's bits
        record["vq_bits_per_weight"] = (bits.total - bits.codebooks * (codebooks is not None)) / bits.weights
        record["vq_shared_codebooks"] = codebooks is not None
    if result.scale is not None:
        plan.grids[name] = (result.scale, result.zero)
    if prune is not None and prune.nm != (0, 0):
        plan.nm[name] = prune.nm
        record["nm"] = list(prune.nm)
    return record


def _fingerprint(model, recipe, runs, calibration, patches) -> str:
    """What a resumed job must share with the one that wrote the work directory."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": recipe.as_dict(), "runs": runs, "calls": len(calibration),
                              "patches": patches}, sort_keys=True, default=str).encode())
    for call in calibration[:1]:
        for value in (*call[0], *call[1].values()):
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().float().cpu().numpy().tobytes())
    for name, tensor in sorted(model.state_dict().items())[:4]:
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


class _RunStore:
    """`work_dir/`: manifest.json {fingerprint, runs_done} and run-NNNNN.safetensors per finished run
    (its layers' compressed weights, grids and codebooks; the reports in the metadata)."""

    def __init__(self, folder, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.manifest = self.folder / "manifest.json"

    def restore(self, model: nn.Module, layers: dict[str, nn.Module], report: LayerwiseReport) -> int:
        if not self.manifest.exists():
            return 0
        manifest = json.loads(self.manifest.read_text())
        if manifest.get("fingerprint") != self.fingerprint:
            raise SecateursError(f"{self.folder} holds another job's work (other model, recipe or calibration); "
                                 f"remove it or choose another work directory")
        for index in range(manifest["runs_done"]):
            path = self.folder / f"run-{index:05d}.safetensors"
            tensors = read_safetensors(path)
            with safe_open(path, "pt") as handle:
                records = json.loads(handle.metadata()["records"])
            for name, record in records.items():
                layers[name].weight.data = tensors[f"{name}.weight"].to(layers[name].weight.dtype)
                if f"{name}.scale" in tensors:
                    report.plan.grids[name] = (tensors[f"{name}.scale"], tensors[f"{name}.zero"])
                if f"{name}.codes" in tensors:
                    report.plan.vq[name] = (tensors[f"{name}.codes"], tensors[f"{name}.codebooks"], tensors[f"{name}.scales"])
                if "nm" in record:
                    report.plan.nm[name] = tuple(record["nm"])
                report.layers[name] = record
        return manifest["runs_done"]

    def save(self, index: int, run: list[str], layers: dict[str, nn.Module], report: LayerwiseReport) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors, records = {}, {}
        for name in run:
            tensors[f"{name}.weight"] = layers[name].weight.detach().contiguous()
            if name in report.plan.grids:
                tensors[f"{name}.scale"], tensors[f"{name}.zero"] = report.plan.grids[name]
            if name in report.plan.vq:
                tensors[f"{name}.codes"], tensors[f"{name}.codebooks"], tensors[f"{name}.scales"] = report.plan.vq[name]
            records[name] = report.layers[name]
        write_safetensors(self.folder / f"run-{index:05d}.safetensors",
                          {key: value.contiguous() for key, value in tensors.items()}, {"records": json.dumps(records)})
        write_json(self.manifest, {"fingerprint": self.fingerprint, "runs_done": index + 1})
