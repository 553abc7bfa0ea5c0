"""The sequential engine: compress a decoder-only model block by block.

For each block: hook its linear layers, run every calibration chunk through it, turn the summed
statistics into Hessians, compress each layer, then re-run the block so the next block sees the
compressed outputs. Only the block being compressed moves to the compute device.
With `true_sequential`, the layers of a block are compressed in groups in execution order (layers
reading the same input form a group: q/k/v, then o, then gate/up, then down), each group's
statistics gathered after the groups before it were compressed.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.algorithms import HessianError, outlier_fraction, owl_ratios
from secateurs.errors import SecateursError
from secateurs.formats import StoragePlan
from secateurs.pipeline.activations import discard_chunks, keep_chunks
from secateurs.pipeline.attention import native_causal_attention
from secateurs.pipeline.block_tuning import tune_vq_block
from secateurs.pipeline.capture import capture_block_inputs, run_block
from secateurs.structure import find_blocks, get_weight, in_features, linear_layers, out_features, set_weight
from secateurs.pipeline.distributed import ProcessGroup, layer_cost
from secateurs.pipeline.layer import compress_layer, native_sweeps
from secateurs.algorithms.hessian import HessianAccumulator
from secateurs.pipeline.statistics import BlockStopped, StatisticsHooks
from secateurs.recipe import Recipe, load_recipe
from secateurs.sources import BlockSource, InMemoryModel


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    method: str
    loss: float | None  # None where no Hessian was gathered (magnitude, RTN, Wanda without GPTQ)
    sparsity: float
    bits: int | None
    group_size: int | None
    seconds: float
    damp: float
    input_group: str  # first layer of the group reading the same input (they share one Hessian)


@dataclass
class CompressionReport:
    recipe: dict
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)
    # Quantization grids per layer (scale, zero), for the compressed formats; not serialized here.
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    # Vector-quantized layers' (codes, codebooks, scales), for the vq format; not serialized here.
    vq: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    parsed_recipe: Recipe | None = field(default=None, repr=False)  # `recipe` as the engine ran it
    # Per block tuned after coding (vq block_steps): its output error relative to the dense block.
    blocks: list[dict] = field(default_factory=list)

    def storage_plan(self, prefix: str = "") -> StoragePlan:
        """What the stored formats need of the layers whose names start with `prefix` (default all):
        the grids, the codebooks, the N:M layers, the act-order layers."""
        recipe = self.parsed_recipe or load_recipe(self.recipe)
        nm, act_order = {}, set()
        for layer in self.layers:
            if not layer.name.startswith(prefix):
                continue
            prune, quant = recipe.stages_for(layer.name)
            if prune and prune.nm != (0, 0):
                nm[layer.name] = prune.nm
            if quant and quant.act_order:
                act_order.add(layer.name)
        return StoragePlan({name: grid for name, grid in self.grids.items() if name.startswith(prefix)}, nm, act_order,
                           {name: code for name, code in self.vq.items() if name.startswith(prefix)})

    def as_dict(self) -> dict:
        layers = [asdict(layer) for layer in self.layers]
        weights = sum(layer["shape"][0] * layer["shape"][1] for layer in layers) or 1
        return {
            "recipe": self.recipe,
            "calibration": self.calibration,
            "totals": {
                "layers": len(layers),
                "seconds": self.seconds,
                "loss": None if any(layer["loss"] is None for layer in layers) else sum(layer["loss"] for layer in layers),
                "sparsity": sum(layer["sparsity"] * layer["shape"][0] * layer["shape"][1] for layer in layers) / weights,
            },
            "layers": layers,
        } | ({"blocks": self.blocks} if self.blocks else {})


@dataclass
class ResumeState:
    """Where an interrupted run stopped (see pipeline.checkpoint)."""

    next_block: int
    layers: list[LayerReport]
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]]
    vq: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    block_sparsity: list[float | None] | None
    hidden: Iterable[torch.Tensor]  # this process's inputs of `next_block`, chunk by chunk


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
        rows = out_features(module)
        if prune and prune.mask_rows > 1 and rows % prune.mask_rows:
            raise SecateursError(f"{prune.method}.mask_rows {prune.mask_rows}: layer {name} has {rows} output rows, "
                                 f"not divisible by {prune.mask_rows}")
        if quant and quant.group_size and columns % quant.group_size:
            raise SecateursError(f"{quant.method}.group_size {quant.group_size} does not divide the {columns} input columns of layer {name}")


class Engine:
    """`source` streams the block weights (default: the model in memory), `offload_dir` keeps the
    activations between blocks on disk, `group` spreads the work over torchrun processes (default:
    the initialized torch.distributed group, if any). `chunk_size` is the number of calibration
    samples run through a block at once; by default as many as make about CHUNK_TOKENS tokens."""

    # Measured on SmolLM2 blocks (2 cores): 2048-token chunks run a block's forward about 10%
    # faster than 4096 (the MLP activations of a chunk stay in the 32 MB L3) and 5% faster than 512.
    CHUNK_TOKENS = 2048

    def __init__(self, model, recipe, device=None, chunk_size: int | None = None, hessian_dtype=torch.float32, progress=True,
                 true_sequential: bool | None = None, source: BlockSource | None = None, offload_dir=None,
                 group: ProcessGroup | None = None):
        self.model = model
        self.recipe = load_recipe(recipe)
        if not isinstance(self.recipe, Recipe):  # finetune stages need the trainer: the front door runs them
            raise SecateursError("a recipe with finetune stages runs through secateurs.oneshot or `secateurs compress`")
        if true_sequential is not None:
            self.recipe = dataclasses.replace(self.recipe, true_sequential=true_sequential)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.chunk_size = chunk_size
        self.hessian_dtype = hessian_dtype
        self.progress = progress
        self.prefix, self.blocks = find_blocks(model)
        self.source = source or InMemoryModel(model, None)
        self.offload_dir = offload_dir
        self.group = group or ProcessGroup.current()
        self.inputs = None  # the current block's inputs; its outputs once the block is done
        self.block_sparsity: list[float | None] | None = None

    def _gather(self, block, layers: dict[str, nn.Module], inputs, index, accumulate=True, chunks=None,
                hessians=True) -> StatisticsHooks:
        """Run calibration chunks through the block with statistics hooks on `layers` (`hessians`
        False: column norms only)."""
        hooks = StatisticsHooks(layers, self.hessian_dtype, self.device, accumulate, hessians)
        try:
            for hidden, kwargs in itertools.islice(zip(inputs.hidden, inputs.kwargs[index]), chunks):
                try:
                    run_block(block, hidden, kwargs, self.device)
                except BlockStopped:
                    pass
                hooks.stop_after_last_layer()
        finally:
            hooks.remove()
        self.group.all_reduce(list(hooks.accumulators.values()))
        return hooks

    def _advance(self, block, inputs, index, discard_previous=True) -> None:
        """Replace the block's inputs by its outputs, the next block's inputs."""
        previous = inputs.hidden
        inputs.hidden = keep_chunks((run_block(block, h, k, self.device) for h, k in zip(previous, inputs.kwargs[index])),
                                    self.offload_dir)
        if discard_previous:
            discard_chunks(previous)

    def _block_layers(self, index: int) -> dict[str, nn.Module]:
        return {name: module for name, module in linear_layers(self.blocks[index]).items()
                if any(self.recipe.stages_for(f"{self.prefix}.{index}.{name}"))}

    def _stages(self, index: int, layers: Iterable[str]) -> list:
        return [stage for name in layers for stage in self.recipe.stages_for(f"{self.prefix}.{index}.{name}") if stage]

    def _uses_calibration(self, index: int) -> bool:
        """Whether any stage on a layer of this block needs its statistics (not only its weights)."""
        return any(stage.uses_calibration for stage in self._stages(index, self._block_layers(index)))

    def _owl_sparsities(self, inputs) -> list[float]:
        """One dense pass over all blocks to measure each block's outlier ratio (OWL)."""
        stage = next(s for s in self.recipe.stages if s.prunes)
        fractions = []
        hidden = inputs.hidden
        for index in tqdm(range(len(self.blocks)), desc="OWL outlier ratios", disable=not self.progress):
            block = self.source.load(index).to(self.device)
            layers = self._block_layers(index)
            stats = self._gather(block, layers, inputs, index, hessians=False)
            fractions.append(outlier_fraction([get_weight(m) for m in layers.values()],
                                              [stats.accumulators[stats.owner[n]].column_norms() for n in layers],
                                              stage.owl_threshold))
            self._advance(block, inputs, index, discard_previous=index > 0)  # the first inputs are needed again
            block.to("cpu")
            self.source.release(index)
        discard_chunks(inputs.hidden)
        inputs.hidden = hidden
        return owl_ratios(fractions, stage.sparsity, stage.owl_lambda)

    @torch.no_grad()
    def run(self, calibration: torch.Tensor, on_block_done=None, resume: ResumeState | None = None) -> CompressionReport:
        """`on_block_done(index, report)` runs after each block, while `self.inputs` holds the next
        block's inputs; `resume` continues an interrupted run after its last finished block."""
        with native_causal_attention(), native_sweeps():
            return self._run(calibration, on_block_done, resume)

    def _run(self, calibration: torch.Tensor, on_block_done, resume: ResumeState | None) -> CompressionReport:
        validate(self.model, self.recipe)
        started = time.perf_counter()
        report = CompressionReport(self.recipe.as_dict(), parsed_recipe=self.recipe, calibration={
            "samples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1])})
        with self.source.outside_blocks():
            chunk_size = self.chunk_size or max(1, self.CHUNK_TOKENS // calibration.shape[1])
            inputs = self.inputs = capture_block_inputs(self.model, self.blocks, self.group.shard(calibration), chunk_size)
        start, self.block_sparsity = 0, None
        if resume is not None:
            start, report.layers, report.grids, report.vq = resume.next_block, resume.layers, resume.grids, resume.vq
            inputs.hidden, self.block_sparsity = resume.hidden, resume.block_sparsity
        inputs.hidden = keep_chunks(inputs.hidden, self.offload_dir)
        if self.block_sparsity is None:
            owl = any(s.prunes and s.sparsity_profile == "owl" for s in self.recipe.stages)
            self.block_sparsity = self._owl_sparsities(inputs) if owl else [None] * len(self.blocks)
        calibrated = [self._uses_calibration(index) for index in range(len(self.blocks))]
        report.calibration["calibrated_blocks"] = sum(calibrated)
        bar = tqdm(range(start, len(self.blocks)), desc="compress", unit="block", disable=not self.progress)
        for index in bar:
            block = self.source.load(index).to(self.device)
            layers = self._block_layers(index)
            if not calibrated[index]:  # weights only: no forward, no statistics
                self._compress_step(index, layers, None, report, bar)
            else:
                # true_sequential: one cheap pass learns the input groups in execution order, then each
                # group's statistics are gathered after the groups before it were compressed.
                steps = ([{n: layers[n] for n in group} for group in self._gather(block, layers, inputs, index, False, 1).groups()]
                         if self.recipe.true_sequential else [layers])
                tuning = self._block_tuning(index, layers)
                targets = None if tuning is None else [run_block(block, h, k, self.device).float()
                                                       for h, k in zip(inputs.hidden, inputs.kwargs[index])]
                for step in steps:
                    hessians = any(stage.needs_hessian for stage in self._stages(index, step))
                    stats = self._gather(block, step, inputs, index, hessians=hessians)
                    self._compress_step(index, step, stats, report, bar)
                if tuning is not None:
                    self._tune_block(index, block, layers, tuning, inputs, targets, report, bar)
            if any(calibrated[index + 1 :]):
                self._advance(block, inputs, index)
            else:  # no later block reads these outputs
                discard_chunks(inputs.hidden)
                inputs.hidden = []
            self.blocks[index] = block.to("cpu")
            if on_block_done:
                on_block_done(index, report)
            self.source.release(index)
        discard_chunks(inputs.hidden)
        self.inputs = None
        report.seconds = time.perf_counter() - started
        return report

    def _block_tuning(self, index: int, layers: dict[str, nn.Module]):
        """The vq stage that asks for block fine-tuning of this block's layers (None: no tuning)."""
        stage = next((s for s in self._stages(index, layers) if s.method == "vq" and s.block_steps), None)
        if stage is not None and self.group.world_size > 1:
            raise SecateursError("vq.block_steps: block fine-tuning runs in one process, not under torchrun")
        return stage

    def _tune_block(self, index, block, layers, stage, inputs, targets, report, bar) -> None:
        bar.set_postfix_str("tuning codebooks")
        coded = {name: module for name, module in layers.items() if f"{self.prefix}.{index}.{name}" in report.vq}
        codes = {name: report.vq[f"{self.prefix}.{index}.{name}"] for name in coded}
        chunks = list(zip(inputs.hidden, inputs.kwargs[index]))
        tuned, before, after = tune_vq_block(block, coded, codes, chunks, targets, stage.block_steps, stage.block_lr,
                                             self.device)
        for name, code in tuned.items():
            report.vq[f"{self.prefix}.{index}.{name}"] = tuple(t.cpu() for t in code)
        report.blocks.append({"block": index, "output_error_before": before, "output_error_after": after,
                              "steps": stage.block_steps})

    def _compress_step(self, index, layers: dict[str, nn.Module], stats: StatisticsHooks | None, report, bar) -> None:
        """Compress `layers`, in order (`stats` None: their stages need none); with several processes
        each takes a share balanced by estimated cost, then every compressed weight is broadcast from
        the process that made it."""
        costs = {name: layer_cost(out_features(module), in_features(module),
                                  [s.method for s in self.recipe.stages_for(f"{self.prefix}.{index}.{name}") if s])
                 for name, module in layers.items()}
        owners = self.group.assign(costs)
        mine = {}
        for name, module in layers.items():
            if owners[name] == self.group.rank:
                bar.set_postfix_str(name)
                owner = stats.owner[name] if stats else name
                mine[name] = self._compress_one(index, name, module, stats.accumulators[owner] if stats else None,
                                                f"{self.prefix}.{index}.{owner}", self.block_sparsity[index], report)
        for name, module in layers.items():
            full = f"{self.prefix}.{index}.{name}"
            entry, grid, code = self.group.share(owners[name], module.weight.data,
                                                 (mine.get(name), report.grids.get(full), report.vq.get(full)))
            report.layers.append(entry)
            if grid is not None:
                report.grids[full] = grid
            if code is not None:
                report.vq[full] = code

    def _compress_one(self, index, name, module, stats: HessianAccumulator | None, input_group: str, sparsity, report) -> LayerReport:
        full = f"{self.prefix}.{index}.{name}"
        prune, quant = self.recipe.stages_for(full)
        weight = get_weight(module)
        try:
            hessian = stats.hessian() if stats and stats.full else None
            result = compress_layer(weight, hessian, stats and stats.column_norms(), prune, quant, sparsity)
        except HessianError as exc:
            raise SecateursError(f"layer {full}: {exc}") from None
        set_weight(module, result.weight)
        if result.scale is not None:
            report.grids[full] = (result.scale.cpu(), result.zero.cpu())
        if result.vq is not None:
            report.vq[full] = tuple(t.cpu() for t in result.vq)
        return LayerReport(full, list(weight.shape), "+".join(s.method for s in (prune, quant) if s),
                           result.loss, result.sparsity, quant.bits if quant else None,
                           quant.group_size if quant else None, result.seconds, result.damp, input_group)


def compress_model(model, recipe="sparsegpt-50", calibration: torch.Tensor | None = None, **options) -> CompressionReport:
    """Compress `model` in place with `recipe` on calibration token ids [samples, seqlen]."""
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] == 0:
        raise SecateursError("calibration must be a [samples, seqlen] tensor of token ids")
    return Engine(model, recipe, **options).run(calibration)
