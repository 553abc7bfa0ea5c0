"""The sequential engine: compress a decoder-only model block by block.

For each block: hook its linear layers, run every calibration chunk through it, turn the summed
statistics into Hessians, compress each layer, then re-run the block so the next block sees the
compressed outputs. Only the block being compressed moves to the compute device.
With `true_sequential`, the layers of a block are compressed in groups in execution order (layers
reading the same input form a group: q/k/v, then o, then gate/up, then down), each group's
statistics gathered after the groups before it were compressed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.algorithms import HessianError, outlier_fraction, owl_ratios
from secateurs.errors import SecateursError
from secateurs.pipeline.capture import capture_block_inputs, run_block
from secateurs.pipeline.discovery import find_blocks, get_weight, in_features, linear_layers, set_weight
from secateurs.pipeline.layer import compress_layer
from secateurs.pipeline.statistics import HessianAccumulator, attach
from secateurs.recipe import Recipe, load_recipe


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    method: str
    loss: float
    sparsity: float
    bits: int | None
    group_size: int | None
    seconds: float
    damp: float


@dataclass
class CompressionReport:
    recipe: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)
    # Quantization grids per layer (scale, zero), for the compressed formats; not serialized here.
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        layers = [asdict(layer) for layer in self.layers]
        weights = sum(layer["shape"][0] * layer["shape"][1] for layer in layers) or 1
        return {
            "recipe": self.recipe,
            "calibration": self.calibration,
            "totals": {
                "layers": len(layers),
                "seconds": self.seconds,
                "loss": sum(layer["loss"] for layer in layers),
                "sparsity": sum(layer["sparsity"] * layer["shape"][0] * layer["shape"][1] for layer in layers) / weights,
            },
            "layers": layers,
        }


def targeted_layers(model: nn.Module, recipe: Recipe) -> dict[str, nn.Module]:
    """The linear layers inside the decoder blocks that at least one stage applies to, by full name."""
    prefix, blocks = find_blocks(model)
    found = {}
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block).items():
            full = f"{prefix}.{index}.{name}"
            if any(recipe.stages_for(full)):
                found[full] = module
    return found


def validate(model: nn.Module, recipe: Recipe) -> None:
    """Reject a recipe that cannot run on this model before any work starts, naming key and layer."""
    prefix, blocks = find_blocks(model)
    every = [f"{prefix}.{i}.{name}" for i, block in enumerate(blocks) for name in linear_layers(block)]
    for stage in recipe.stages:
        if not any(stage.applies_to(name) for name in every):
            raise SecateursError(f"{stage.method}: targets {list(stage.targets)} match no layer of the model")
    for name, module in targeted_layers(model, recipe).items():
        columns = in_features(module)
        prune, quant = recipe.stages_for(name)
        if prune and prune.nm[1] and columns % prune.nm[1]:
            raise SecateursError(f"{prune.method}.mask {prune.mask}: layer {name} has {columns} input columns, not divisible by {prune.nm[1]}")
        if quant and quant.group_size and columns % quant.group_size:
            raise SecateursError(f"{quant.method}.group_size {quant.group_size} does not divide the {columns} input columns of layer {name}")


def execution_groups(block: nn.Module, layers: dict[str, nn.Module], hidden, kwargs, device) -> list[list[str]]:
    """Layers in first-call order, grouped by the input tensor they read."""
    calls: list[tuple[str, int]] = []
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, args[0].data_ptr())))
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            run_block(block, hidden[:1], kwargs, device)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    inputs: list[int] = []
    for name, pointer in calls:
        if any(name in group for group in groups):
            continue
        if inputs and inputs[-1] == pointer:
            groups[-1].append(name)
        else:
            groups.append([name])
            inputs.append(pointer)
    return groups


class Engine:
    def __init__(self, model, recipe, device=None, chunk_size: int = 8, hessian_dtype=torch.float32, progress=True):
        self.model = model
        self.recipe = load_recipe(recipe)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.chunk_size = chunk_size
        self.hessian_dtype = hessian_dtype
        self.progress = progress
        self.prefix, self.blocks = find_blocks(model)

    def _gather(self, block, layers: dict[str, nn.Module], inputs, index) -> dict[str, HessianAccumulator]:
        accumulators = {n: HessianAccumulator(in_features(m), self.hessian_dtype, self.device) for n, m in layers.items()}
        handles = attach(layers, accumulators)
        try:
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs[index]):
                run_block(block, hidden, kwargs, self.device)
        finally:
            for handle in handles:
                handle.remove()
        return accumulators

    def _block_layers(self, index: int) -> dict[str, nn.Module]:
        return {name: module for name, module in linear_layers(self.blocks[index]).items()
                if any(self.recipe.stages_for(f"{self.prefix}.{index}.{name}"))}

    def _owl_sparsities(self, inputs) -> list[float]:
        """One dense pass over all blocks to measure each block's outlier ratio (OWL)."""
        stage = next(s for s in self.recipe.stages if s.prunes)
        fractions = []
        hidden = inputs.hidden
        for index, block in enumerate(tqdm(self.blocks, desc="OWL outlier ratios", disable=not self.progress)):
            block.to(self.device)
            layers = self._block_layers(index)
            stats = self._gather(block, layers, inputs, index)
            fractions.append(outlier_fraction([get_weight(m) for m in layers.values()],
                                              [stats[n].column_norms() for n in layers], stage.owl_threshold))
            inputs.hidden = [run_block(block, h, k, self.device).cpu() for h, k in zip(inputs.hidden, inputs.kwargs[index])]
            block.to("cpu")
        inputs.hidden = hidden
        return owl_ratios(fractions, stage.sparsity, stage.owl_lambda)

    @torch.no_grad()
    def run(self, calibration: torch.Tensor, on_block_done=None) -> CompressionReport:
        validate(self.model, self.recipe)
        started = time.perf_counter()
        report = CompressionReport(self.recipe.as_dict(), calibration={
            "samples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1])})
        inputs = capture_block_inputs(self.model, self.blocks, calibration, self.chunk_size)
        owl = any(s.prunes and s.sparsity_profile == "owl" for s in self.recipe.stages)
        block_sparsity = self._owl_sparsities(inputs) if owl else [None] * len(self.blocks)
        bar = tqdm(range(len(self.blocks)), desc="compress", unit="block", disable=not self.progress)
        for index in bar:
            block = self.blocks[index].to(self.device)
            layers = self._block_layers(index)
            groups = (execution_groups(block, layers, inputs.hidden[0], inputs.kwargs[index][0], self.device)
                      if self.recipe.true_sequential else [list(layers)])
            for group in groups:
                stats = self._gather(block, {n: layers[n] for n in group}, inputs, index)
                for name in group:
                    bar.set_postfix_str(name)
                    report.layers.append(self._compress_one(index, name, layers[name], stats.pop(name), block_sparsity[index], report))
            inputs.hidden = [run_block(block, h, k, self.device).cpu() for h, k in zip(inputs.hidden, inputs.kwargs[index])]
            self.blocks[index] = block.to("cpu")
            if on_block_done:
                on_block_done(index, report)
        report.seconds = time.perf_counter() - started
        return report

    def _compress_one(self, index, name, module, stats: HessianAccumulator, sparsity, report) -> LayerReport:
        full = f"{self.prefix}.{index}.{name}"
        prune, quant = self.recipe.stages_for(full)
        weight = get_weight(module)
        try:
            result = compress_layer(weight, stats.hessian(), stats.column_norms(), prune, quant, sparsity)
        except HessianError as exc:
            raise SecateursError(f"layer {full}: {exc}") from None
        set_weight(module, result.weight)
        if result.scale is not None:
            report.grids[full] = (result.scale.cpu(), result.zero.cpu())
        return LayerReport(full, list(weight.shape), "+".join(s.method for s in (prune, quant) if s),
                           result.loss, result.sparsity, quant.bits if quant else None,
                           quant.group_size if quant else None, result.seconds, result.damp)


def compress(model, recipe="sparsegpt-50", calibration: torch.Tensor | None = None, **options) -> CompressionReport:
    """Compress `model` in place with `recipe` on calibration token ids [samples, seqlen]."""
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] == 0:
        raise SecateursError("calibration must be a [samples, seqlen] tensor of token ids")
    return Engine(model, recipe, **options).run(calibration)
