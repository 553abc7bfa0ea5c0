"""oBERT benchmark: all-MiniLM-L6-v2 with a classification head on the fine-food reviews
(r-cran-modeldata `small_fine_foods`), dense teacher, one-shot magnitude / SparseGPT / oBERT pruning,
and gradual magnitude / oBERT pruning with distillation, scored on the 1,000 test reviews.

Protocol (fit to a 2-core CPU; every choice below is fixed, none tuned on the test split):
  - data: the 4,000 training reviews, 400 of them held out (seed 0) as the validation slice (scored
    in every row, for choices); test = the 1,000 test reviews; texts cut to SEQLEN tokens;
  - teacher: the encoder plus a fresh head fine-tuned dense with cross-entropy, AdamW lr 5e-5 with
    10% warmup and linear decay, batch 16, EPOCHS epochs;
  - one-shot: the teacher pruned to s in every block linear layer (no training after): magnitude
    (per layer), SparseGPT (the engine, calibrated on 128 training reviews of at least SEQLEN tokens), oBERT (global, m = 256
    gradients of single reviews, blocks of 50, one recomputation);
  - gradual: from the teacher, the cubic schedule from 0 to s over the first 2/3 of the steps
    (pruning every PRUNE_EVERY steps), the rest at s; distillation from the teacher with hardness 1,
    temperature 2 (oBERT's downstream setting); oBERT with m = 64 gradients per pruning step;
    structures: unstructured, 4-block (4 consecutive weights of a row, the paper's) and 4-row (4
    consecutive rows of a column: rows in groups of 4 share one mask, the batched kernel's fast path);
  - seeds: `--seeds N` (the issue asks for 3), or `--seed S` for one seed (a lane per seed); each row
    is the mean over its seeds, spread beside it.

Speed (`--rows speed`, a quiet machine only): sequences/s of the classifier at sequence length
SEQLEN, batch 1 / 8 / 32, 1 and 2 threads: torch eager dense fp32 and bf16, our runtime's dense fp32
kernel (kernels.dense_mm) in every block linear layer, and the encoder with its
block linear layers at 80 / 90 / 97% sparsity (4-row at 90 / 97%, 4-block at 80 / 90%) through our bitmask fp32 and bitmask
int8 modules, the latter also with int8 activations (int8-a8: kernels.int8_blocks_mm) (the
batched sparse kernel at every batch; runtime.modules.SPARSE_GEMM_MAX_DENSITY), with the encoder
runtime (runtime.encoder.accelerate_encoder: attention through our kernel, bias and GELU fused into
the bitmask kernel) and, at 90%, also without it (linears only); embeddings, norms and residual
adds stay torch. The sparse layers' pattern is per-layer magnitude
pruning of the pretrained encoder: a bitmask kernel's time depends on how many weights each row
keeps, not on which, so the gradual rows' accuracy (or the one-shot oBERT row's, where no gradual
row exists yet) is set beside the speed of the same sparsity. Median of SPEED_REPEAT (9) timed
forwards after one warm-up, the variants timed in interleaved rounds; `uptime` in every row; written to obert.json (kind "speed") and
obert-speed.md.

Rows are cached in benchmarks/results/obert.json as they finish; the teacher is kept in the cache.

    nice .venv/bin/python benchmarks/obert.py [--rows dense oneshot gradual] [--seeds 1]
    .venv/bin/python benchmarks/obert.py --rows speed
    .venv/bin/python benchmarks/obert.py --rows split     # where a forward's time goes (a quiet machine only)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from quality import cpu_label, cpu_name, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "obert.json"
ENCODER, SEQLEN, EPOCHS, BATCH, LR, PRUNE_EVERY = "all-minilm-l6-v2", 128, 2, 16, 5e-5, 10
ONESHOT_SPARSITIES = (0.5, 0.7, 0.8, 0.9)
# The int8 compounds of the 90% model, stored as bitmask-int8 and scored as loaded back (training.encoder):
# GPTQ with the mask held; QAT_EPOCHS more through a fake-quant; and the QAT's baseline, the same extra
# epochs in float and then rounded to the grid QAT starts from.
COMPOUNDS, QAT_EPOCHS = ("int8-gptq", "int8-qat", "int8-ft"), 0.5
# (method, target, structure, quant): the int8 rows are the gradual oBERT models of the row before,
# their block linear layers as the runtime's bitmask int8 modules (no training of their own); int8-a8
# the same with int8 activations too (SparseQuantLinear.int8_activations)
GRADUAL = tuple((method, target, structure, quant)
                for target, structure in ((0.8, "unstructured"), (0.9, "unstructured"), (0.97, "unstructured"),
                                          (0.8, "block4"), (0.9, "rows4"))
                for method, quant in (("gradual-gmp", None), ("gradual-obert", None), ("gradual-obert", "int8"),
                                      ("gradual-obert", "int8-a8"))
                if not (quant and structure == "block4") and not (method == "gradual-gmp" and structure == "rows4")) + tuple(
    ("gradual-obert", 0.9, "unstructured", quant) for quant in COMPOUNDS)
# structure -> (unit, across_rows, Fisher block): "block4" = oBERT's 4 consecutive weights of a row;
# "rows4" = 4 consecutive rows of a column (rows in groups of 4 share masks: the batched kernel's fast
# path). Blocks of 4 need a Fisher block that 4 divides.
STRUCTURES = {"unstructured": (1, False, 50), "block4": (4, False, 48), "rows4": (4, True, 48)}
STRUCTURE_LABELS = {"unstructured": "", "block4": " 4-block", "rows4": " 4-row"}


def cache() -> Path:
    from secateurs.io import cache_dir

    return cache_dir() / "obert-bench"


def datasets(tokenizer, seed: int):
    from secateurs.data.reviews import fine_foods
    from secateurs.eval.classifier import tokenize
    from secateurs.training.classification import ClassificationData

    train, validation = fine_foods("train").split(0.1, seed=0)
    test = fine_foods("test")
    data = ClassificationData.from_texts(tokenizer, train.texts, train.labels, SEQLEN, seed=seed)
    scored = {name: (tokenize(tokenizer, split.texts, SEQLEN), torch.tensor(split.labels))
              for name, split in (("validation", validation), ("test", test))}
    return data, scored


def score(model, scored) -> dict:
    from secateurs.eval.classifier import evaluate_classifier

    result = {}
    for name, (encoded, labels) in scored.items():
        s = evaluate_classifier(model, encoded["input_ids"], encoded["attention_mask"], labels)
        result |= {f"{name}_accuracy": s.accuracy, f"{name}_f1": s.macro_f1}
    return result


def steps_for(data, epochs: float) -> int:
    return max(1, round(len(data) * epochs / BATCH))


@functools.cache
def teacher(seed: int):
    """The dense fine-tuned classifier of `seed` (trained once, then loaded from the cache; loaded once
    per process, read only: every row copies it before changing it)."""
    from secateurs.models import load_classifier
    from secateurs.training.losses import LossWeights
    from secateurs.training.trainer import TrainConfig, Trainer

    loaded = load_classifier(ENCODER, 2, seed=seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    data, scored = datasets(tokenizer, seed)
    folder = cache() / f"teacher-seed{seed}"
    weights = folder / "model.safetensors"
    seconds = 0.0
    if weights.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    else:
        steps = steps_for(data, EPOCHS)
        config = TrainConfig(lr=LR, steps=steps, warmup_steps=steps // 10, batch_size=BATCH, seqlen=SEQLEN, seed=seed,
                             losses=LossWeights(1, 0, 0), checkpoint_every=50)
        started = time.perf_counter()
        Trainer(model, data, config, output_dir=folder / "training", description=f"teacher seed {seed}").train(resume=True)
        seconds = time.perf_counter() - started
        from secateurs.io import write_safetensors

        write_safetensors(weights, {k: v.contiguous() for k, v in model.state_dict().items()})
    return model.eval(), tokenizer, data, scored, seconds


@functools.cache
def teacher_scores(seed: int) -> dict:  # scored once per process
    """The teacher's own scores, beside every gradual row: the target is "within 1 point of the teacher"."""
    model, _, _, scored, _ = teacher(seed)
    return {f"teacher_{key}": value for key, value in score(model, scored).items()}


def sparsity_of(model) -> float:
    from secateurs.training.masks import block_linear_layers

    layers = block_linear_layers(model).values()
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


def oneshot(method: str, sparsity: float, seed: int) -> dict:
    from secateurs.algorithms.magnitude import magnitude_mask
    from secateurs.training.losses import LossWeights
    from secateurs.training.masks import block_linear_layers, open_masks
    from secateurs.training.progressive import GradualOBert
    from secateurs.training.trainer import TrainConfig, Trainer

    dense, tokenizer, data, scored, _ = teacher(seed)
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    if method == "magnitude":
        with torch.no_grad():
            for module in block_linear_layers(model).values():
                module.weight.mul_(magnitude_mask(module.weight, sparsity))
    elif method == "obert":  # one pruning step of the gradual pruner, from 0 straight to s
        masks = open_masks(model)
        trainer = Trainer(model, data, TrainConfig(steps=1, batch_size=BATCH, seqlen=SEQLEN, seed=seed,
                                                   losses=LossWeights(1, 0, 0)), masks=masks, progress=False)
        GradualOBert(masks, sparsity, sparsity, 0, 1, grads=256).prune(trainer, 0, sparsity)
        masks.apply()
    else:  # sparsegpt, through the engine on 128 training reviews
        from secateurs.pipeline.engine import compress_model

        # the engine runs without an attention mask: reviews that fill all SEQLEN tokens, no padding
        calibration = data.windows[data.attention_mask.all(1)][:128]
        compress_model(model, [{"sparsegpt": {"sparsity": sparsity}}], calibration, progress=False)
    seconds = time.perf_counter() - started
    return {"method": f"oneshot-{method}", "sparsity": sparsity_of(model), "target": sparsity, "kd": False,
            "epochs": 0, "seconds": seconds} | score(model, scored)


def gradual(method: str, sparsity: float, seed: int, structure: str = "unstructured", quant: str | None = None,
            lr: float = LR, recovery: float = 0.0, schedule: float = EPOCHS, squarehead: float = 0.0) -> dict:
    """A gradual row; with quant "int8", the trained model's block linear layers become the runtime's
    bitmask int8 modules (the deployed model, scored through its kernels); "int8-a8" also quantizes
    their inputs to int8 per token; COMPOUNDS are stored and loaded back. `recovery` > 0: that many
    epochs more at the final sparsity after the protocol's; `schedule`: the gradual run's length in
    epochs, pruning over its first 2/3 (another than EPOCHS: rows of their own); `squarehead` > 0: the
    distillation also matches every block's hidden states with that weight (rows of their own)."""
    from secateurs.runtime.encoder import use_int8_activations
    from secateurs.training.losses import LossWeights
    from secateurs.training.masks import open_masks
    from secateurs.training.progressive import GradualMagnitude, GradualOBert
    from secateurs.training.trainer import TrainConfig, Trainer

    dense, tokenizer, data, scored, _ = teacher(seed)
    model = copy.deepcopy(dense)
    steps = steps_for(data, schedule)
    end = steps * 2 // 3 // PRUNE_EVERY * PRUNE_EVERY
    masks = open_masks(model)
    unit, across_rows, fisher_block = STRUCTURES[structure]
    pruner = (GradualOBert(masks, 0.0, sparsity, 0, end, every=PRUNE_EVERY, grads=64, unit=unit,
                           block_size=fisher_block, across_rows=across_rows) if method == "gradual-obert"
              else GradualMagnitude(masks, 0.0, sparsity, 0, end, every=PRUNE_EVERY, unit=unit, across_rows=across_rows))
    config = TrainConfig(lr=lr, steps=steps, warmup_steps=0, batch_size=BATCH, seqlen=SEQLEN, seed=seed,
                         losses=LossWeights(0, 1, squarehead, temperature=2.0), checkpoint_every=50)
    started = time.perf_counter()
    # checkpoints (weights, masks, optimizer, data position) let a killed row continue where it stopped
    name = (f"{method}-{sparsity}-seed{seed}" + ("" if structure == "unstructured" else f"-{structure}")
            + ("" if lr == LR else f"-lr{lr:g}") + ("" if schedule == EPOCHS else f"-e{schedule:g}")
            + (f"-sh{squarehead:g}" if squarehead else ""))
    trainer = Trainer(model, data, config, teacher=dense, masks=masks, on_step=pruner,
                      output_dir=cache() / name, description=f"{method} {sparsity} {structure}")
    resumed = trainer.resume()  # a finished row's checkpoint is its final model: nothing left to train
    trainer.train()
    if recovery:
        recover(model, dense, data, masks, config, recovery, cache() / f"{name}-recovery{recovery:g}")
    achieved = sparsity_of(model)
    if quant in ("int8", "int8-a8"):
        model = int8_linears(model)
        use_int8_activations(model, quant == "int8-a8")
    elif quant in COMPOUNDS:
        model = compound(quant, model, dense, tokenizer, data, masks, config, name)
    epochs = schedule + recovery + (QAT_EPOCHS if quant in ("int8-qat", "int8-ft") else 0)
    return {"method": method, "sparsity": achieved, "target": sparsity, "structure": structure, "quant": quant,
            "kd": True, "epochs": epochs, "lr": lr, "recovery": recovery, "schedule": schedule, "squarehead": squarehead, "seconds": time.perf_counter() - started, "resumed": resumed} | score(
        model, scored) | teacher_scores(seed)


def compound(quant: str, model, dense, tokenizer, data, masks, config, name: str):
    """The deployed int8 compound `quant` (COMPOUNDS) of a trained sparse model: saved as bitmask-int8
    and loaded back. The extra training of QAT and of its float baseline resumes from checkpoints."""
    import tempfile

    import secateurs
    from secateurs.formats import save_compressed
    from secateurs.training.encoder import gptq_int8, quantization_aware_int8, round_to_int8

    if quant == "int8-gptq":
        grids = gptq_int8(model, data, 256, progress=True)
    elif quant == "int8-qat":
        grids, _ = quantization_aware_int8(model, data, continuation(config, data, QAT_EPOCHS), masks, dense,
                                           cache() / f"{name}-qat", resume=True)
    else:
        recover(model, dense, data, masks, config, QAT_EPOCHS, cache() / f"{name}-ft")
        grids = round_to_int8(model)
    with tempfile.TemporaryDirectory(prefix="obert-int8-") as folder:
        save_compressed(model, grids, Path(folder) / "model", tokenizer)
        return secateurs.load(Path(folder) / "model").eval()


def recover(model, dense, data, masks, config, epochs: float, folder: Path) -> None:
    """Train on `epochs` more at the final sparsity: the same distillation, a fresh linear schedule
    from the row's learning rate, the masks held; resumes from its checkpoints in `folder`."""
    from secateurs.training.trainer import Trainer

    Trainer(model, data, continuation(config, data, epochs), teacher=dense, masks=masks, output_dir=folder,
            description=f"{epochs:g} epochs more at the final sparsity").train(resume=True)


def continuation(config, data, epochs: float):
    """`config` for `epochs` more of training after a row (QAT, recovery), checkpointed every 25 steps."""
    import dataclasses

    return dataclasses.replace(config, steps=steps_for(data, epochs), checkpoint_every=25)


def int8_linears(model):
    """A copy of `model` whose block linear layers are the runtime's bitmask int8 modules."""
    from secateurs.runtime import SparseQuantLinear

    return with_linears(model, lambda layer: SparseQuantLinear.from_dense(layer.weight, layer.bias))


def with_linears(model, make):
    """A copy of `model` whose block linear layers are make(layer)."""
    from secateurs.training.masks import block_linear_layers

    model = copy.deepcopy(model)
    for name, module in block_linear_layers(model).items():
        model.set_submodule(name, make(module))
    return model.eval()


SPEED_BATCHES, SPEED_THREADS, SPEED_REPEAT = (1, 8, 32), (1, 2), 9
SPEED_MODELS = ((0.8, "unstructured"), (0.9, "unstructured"), (0.97, "unstructured"), (0.9, "rows4"), (0.97, "rows4"),
                (0.8, "block4"), (0.9, "block4"))


def structured_magnitude_mask(module, sparsity: float, structure: str) -> torch.Tensor:
    """A magnitude mask of `module`'s weight with the blocks of `structure` (STRUCTURES)."""
    from secateurs.algorithms.magnitude import magnitude_mask
    from secateurs.training.masks import from_unit_view, unit_view

    unit, across_rows, _ = STRUCTURES[structure]
    view = unit_view(module.weight.detach(), module, across_rows)
    return from_unit_view(magnitude_mask(view, sparsity, unit=unit), module, across_rows)


def magnitude_pruned(dense, sparsity: float, structure: str):
    """A copy of `dense` with its block linear layers magnitude-pruned to `sparsity` in `structure`:
    the speed depends on the structure of the masks, not on which weights they keep."""
    from secateurs.training.masks import block_linear_layers

    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for module in block_linear_layers(pruned).values():
            module.weight.mul_(structured_magnitude_mask(module, sparsity, structure))
    return pruned


class DenseKernelLinear(torch.nn.Module):
    """A dense fp32 linear layer through our runtime's dense kernel (kernels.dense_mm): the speed
    table's baseline of our own engine without sparsity."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().float().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from secateurs.runtime import kernels

        y = kernels.dense_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def accuracy_for(accuracy: list[dict], sparsity: float, quant: str | None,
                 structure: str = "unstructured") -> tuple[float | None, str | None]:
    """The accuracy set beside a speed row, and the row it comes from: the dense teacher at 0, else
    the best-matching row of its structure (gradual oBERT of this quant, gradual oBERT, one-shot oBERT)
    at the protocol's learning rate."""
    if not sparsity:
        row = next((r for r in accuracy if r["method"] == "dense"), None)
        return (row["accuracy"], "dense") if row else (None, None)
    for method, row_quant in (("gradual-obert", quant), ("gradual-obert", None), ("oneshot-obert", None)):
        row = next((r for r in accuracy if r["method"] == method and abs(r["target"] - sparsity) < 1e-9
                    and r.get("structure", "unstructured") == structure and r.get("quant") == row_quant
                    and r.get("lr", LR) == LR and not r.get("recovery") and r.get("schedule", EPOCHS) == EPOCHS
                    and not r.get("squarehead")), None)
        if row:
            return row["accuracy"], label(row)
    return None, None


def speed_rows(accuracy: list[dict]) -> list[dict]:
    """Sequences/s of the dense and sparse encoders (module docstring), with accuracy beside."""
    import os

    from secateurs.models import load_classifier
    from secateurs.runtime import BitmaskLinear, SparseQuantLinear, kernels
    from secateurs.runtime.encoder import accelerate_encoder

    dense = load_classifier(ENCODER, 2).model.eval()
    # (method, sparsity, quant, engine, dtype, runtime, structure): runtime "linears" = only the block
    # linear layers on our kernels; "encoder" = also attention and the fused feed-forward epilogue
    variants = {("dense", 0.0, None, "torch", "fp32", None, "unstructured"): dense,
                ("dense", 0.0, None, "torch", "bf16", None, "unstructured"): copy.deepcopy(dense).to(torch.bfloat16),
                ("dense", 0.0, None, "secateurs", "fp32", "encoder", "unstructured"):
                    accelerate_encoder(with_linears(dense, DenseKernelLinear))}
    for sparsity, structure in SPEED_MODELS:
        pruned = magnitude_pruned(dense, sparsity, structure)
        for quant, kind in ((None, BitmaskLinear), ("int8", SparseQuantLinear)):
            linears = with_linears(pruned, lambda module, kind=kind: kind.from_dense(module.weight, module.bias))
            if sparsity == 0.9 and structure == "unstructured":
                variants[("sparse", sparsity, quant, "secateurs", "fp32", "linears", structure)] = linears
            variants[("sparse", sparsity, quant, "secateurs", "fp32", "encoder", structure)] = \
                accelerate_encoder(copy.deepcopy(linears))
        # the int8 model of the loop's last pass with int8 activations too
        variants[("sparse", sparsity, "int8-a8", "secateurs", "fp32", "encoder", structure)] = \
            accelerate_encoder(copy.deepcopy(linears), int8_activations=True)
    rows, cpu, isa = [], cpu_label(), kernels.kernel_path()  # read once, not per row
    for threads in SPEED_THREADS:
        torch.set_num_threads(threads)
        for batch in SPEED_BATCHES:
            ids = torch.randint(1000, 20000, (batch, SEQLEN), generator=torch.Generator().manual_seed(batch))
            mask = torch.ones_like(ids)
            times = {key: [] for key in variants}
            with torch.no_grad():
                for model in variants.values():
                    model(input_ids=ids, attention_mask=mask)  # warm-up
                for _ in range(SPEED_REPEAT):  # interleaved rounds: drifts of the machine hit every variant alike
                    for key, model in variants.items():
                        started = time.perf_counter()
                        model(input_ids=ids, attention_mask=mask)
                        times[key].append(time.perf_counter() - started)
            for (method, sparsity, quant, engine, dtype, runtime, structure), spent in times.items():
                acc, source = accuracy_for(accuracy, sparsity, quant, structure)
                rows.append({"kind": "speed", "method": method, "sparsity": sparsity, "quant": quant, "engine": engine,
                             "dtype": dtype, "runtime": runtime, "structure": structure, "batch": batch, "seqlen": SEQLEN,
                             "threads": threads,
                             "seq_per_s": batch / statistics.median(spent), "accuracy": acc, "accuracy_from": source,
                             "cpu": cpu, "isa": isa if engine == "secateurs" else "torch",
                             "uptime": os.getloadavg()})
                print(f"[obert] speed {method} {sparsity} {quant or dtype} {runtime or ''} batch {batch} "
                      f"threads {threads}: {rows[-1]['seq_per_s']:.1f} seq/s", flush=True)
    return rows


SPLIT_PARTS = ("block linear layers", "attention besides its projections", "layer norms", "embeddings", "the rest")


def time_split(model, linear_names, ids, mask) -> dict[str, float]:
    """Milliseconds of one forward by part, timed by forward hooks: the block linear layers
    (`linear_names`); the self-attention modules less the projections inside them; the layer norms;
    the embeddings; the rest (residual adds, unfused activations, pooler, head, transformers' glue)."""
    spent = dict.fromkeys(SPLIT_PARTS, 0.0)
    state = {"attention_depth": 0, "linears_in_attention": 0.0}
    started: dict[int, float] = {}
    linears = {id(model.get_submodule(name)) for name in linear_names}

    def part_of(module) -> str | None:
        if id(module) in linears:
            return "block linear layers"
        if all(hasattr(module, name) for name in ("query", "key", "value")):
            return "attention besides its projections"
        if isinstance(module, torch.nn.LayerNorm):
            return "layer norms"
        return "embeddings" if module is model.base_model.embeddings else None

    def before(module, _args):
        started[id(module)] = time.perf_counter()
        if part_of(module) == "attention besides its projections":
            state["attention_depth"] += 1

    def after(module, _args, _output):
        elapsed = time.perf_counter() - started.pop(id(module))
        part = part_of(module)
        if part == "attention besides its projections":
            state["attention_depth"] -= 1
        elif part == "block linear layers" and state["attention_depth"]:
            state["linears_in_attention"] += elapsed
        spent[part] += elapsed

    handles = [h for m in model.modules() if part_of(m)
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.no_grad():
            begin = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            total = time.perf_counter() - begin
    finally:
        for handle in handles:
            handle.remove()
    spent["attention besides its projections"] -= state["linears_in_attention"]
    spent["the rest"] = total - sum(spent[name] for name in SPLIT_PARTS[:-1])
    return {name: 1e3 * value for name, value in ({"total": total} | spent).items()}


def split_rows() -> list[dict]:
    """Where the time of a forward goes (time_split) at batch 8, 1 and 2 threads: torch dense fp32
    against the 90% int8 encoder on our runtime (the issue's speed target pair), with and without
    int8 activations, and the 4-block model with them."""
    import os

    from secateurs.models import load_classifier
    from secateurs.runtime import kernels
    from secateurs.runtime.encoder import accelerate_encoder
    from secateurs.training.masks import block_linear_layers

    dense = load_classifier(ENCODER, 2).model.eval()
    linear_names = list(block_linear_layers(dense))
    int8 = int8_linears(magnitude_pruned(dense, 0.9, "unstructured"))
    sparse = accelerate_encoder(copy.deepcopy(int8))
    sparse_a8 = accelerate_encoder(int8, int8_activations=True)
    block_a8 = accelerate_encoder(int8_linears(magnitude_pruned(dense, 0.9, "block4")), int8_activations=True)
    batch, rows = 8, []
    ids = torch.randint(1000, 20000, (batch, SEQLEN), generator=torch.Generator().manual_seed(batch))
    models = (("torch dense fp32", dense, "torch"),
              ("bitmask int8 90%, encoder runtime", sparse, kernels.kernel_path()),
              ("bitmask int8-a8 90%, encoder runtime", sparse_a8, kernels.kernel_path()),
              ("bitmask int8-a8 90% 4-block, encoder runtime", block_a8, kernels.kernel_path()))
    mask, cpu = torch.ones_like(ids), cpu_label()
    for threads in SPEED_THREADS:
        torch.set_num_threads(threads)
        load = os.getloadavg()
        for _, model, _ in models:
            time_split(model, linear_names, ids, mask)  # warm-up
        # interleaved rounds: drifts of the machine hit every model alike
        rounds = [[time_split(model, linear_names, ids, mask) for _, model, _ in models] for _ in range(SPEED_REPEAT)]
        for index, (name, _, isa) in enumerate(models):
            ms = {part: statistics.median(r[index][part] for r in rounds) for part in rounds[0][index]}
            rows.append({"kind": "split", "model": name, "batch": batch, "seqlen": SEQLEN, "threads": threads,
                         "total_ms": ms.pop("total"), "ms": ms, "cpu": cpu, "isa": isa, "uptime": load})
            print(f"[obert] split {name} threads {threads}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    return rows


def split_markdown(rows: list[dict]) -> str:
    """The time split of one CPU's forward, and what the 5x target leaves for the parts besides the linears."""
    lines = ["", f"Where the time of one forward goes (batch {rows[0]['batch']}, sequence {SEQLEN}; forward hooks, "
             f"median of {SPEED_REPEAT} interleaved rounds, each part's median on its own, so parts need not add up "
             f"to the total; milliseconds; load average before {rows[0]['uptime'][0]:.2f}):", "",
             "| threads | model | total | " + " | ".join(SPLIT_PARTS) + " |", "|---:|---|---:|" + "---:|" * len(SPLIT_PARTS)]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['model']} | {r['total_ms']:.1f} | "
                     + " | ".join(f"{r['ms'][name]:.1f}" for name in SPLIT_PARTS) + " |")
    lines.append("")
    for threads in sorted({r["threads"] for r in rows}):
        torch_row = next((r for r in rows if r["threads"] == threads and r["isa"] == "torch"), None)
        for ours in (r for r in rows if r["threads"] == threads and r["isa"] != "torch" and torch_row):
            others = ours["total_ms"] - ours["ms"]["block linear layers"]
            lines.append(f"- {threads} thread(s), {ours['model']}: 5x torch fp32 would be {torch_row['total_ms'] / 5:.1f} ms "
                         f"per batch; it spends {others:.1f} ms outside the block linear layers and "
                         f"{ours['ms']['block linear layers']:.1f} ms in them.")
    return "\n".join(lines) + "\n"


def speed_markdown(rows: list[dict]) -> str:
    """One CPU's speed rows as a section of obert-speed.md."""
    isa = next((r["isa"] for r in rows if r["engine"] == "secateurs"), "")
    lines = [f"## {rows[0]['cpu']} ({isa})", "",
             f"Sequences/s of all-MiniLM-L6-v2 + head at sequence length {SEQLEN}; {rows[0]['cpu']}, kernel path "
             f"{isa}, load average before "
             f"{rows[0]['uptime'][0]:.2f}; {SPEED_REPEAT} interleaved rounds, median. Sparse rows: block linear layers as "
             "bitmask modules (fp32 or int8 values; int8-a8: int8 values and int8 activations per token, "
             "kernels.int8_blocks_mm); *linears only*: the rest torch fp32; *encoder runtime*: also "
             "attention through secateurs' kernel and bias + GELU fused into the intermediate layer's kernel "
             "(runtime.encoder.accelerate_encoder). Accuracy from the obert.json row named.", "",
             "| threads | batch | model | seq/s | vs torch fp32 | vs torch bf16 | accuracy (row) |", "|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        def base(dtype):
            return next(b["seq_per_s"] for b in rows if b["engine"] == "torch" and b["dtype"] == dtype
                        and (b["batch"], b["threads"]) == (r["batch"], r["threads"]))
        runtime = {"linears": ", linears only", "encoder": ", encoder runtime"}.get(r.get("runtime"), "")
        name = (f"torch dense {r['dtype']}" if r["engine"] == "torch"
                else f"secateurs dense fp32 (dense kernel{runtime})" if r["method"] == "dense"
                else f"bitmask {r['quant'] or 'fp32'} {100 * r['sparsity']:.0f}%"
                     f"{STRUCTURE_LABELS[r.get('structure', 'unstructured')]}{runtime}")
        accuracy = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} ({r['accuracy_from']})"
        lines.append(f"| {r['threads']} | {r['batch']} | {name} | {r['seq_per_s']:.1f} | {r['seq_per_s'] / base('fp32'):.2f}x | "
                     f"{r['seq_per_s'] / base('bf16'):.2f}x | {accuracy} |")
    return "\n".join(lines) + "\n"


def mean_row(rows: list[dict]) -> dict:
    """Seeds averaged: accuracy (test), its spread, F1, validation accuracy."""
    row = dict(rows[0])
    for key in ("test_accuracy", "test_f1", "validation_accuracy", "validation_f1", "seconds", "sparsity",
                "teacher_test_accuracy"):
        if all(key in r for r in rows):
            row[key] = statistics.fmean(r[key] for r in rows)
    row["accuracy"], row["f1"] = row["test_accuracy"], row["test_f1"]
    row["accuracy_std"] = statistics.stdev(r["test_accuracy"] for r in rows) if len(rows) > 1 else None
    row["seeds"] = len(rows)
    return row


def label(row: dict) -> str:
    """The method of a row with its structure and quantization, e.g. "gradual-obert 4-row" or "... + int8"."""
    return (row["method"] + STRUCTURE_LABELS[row.get("structure", "unstructured")] + (f" + {row['quant']}" if row.get("quant") else "")
            + ("" if row.get("lr", LR) == LR else f" (lr {row['lr']:g})")
            + (f" (+{row['recovery']:g} epochs at s)" if row.get("recovery") else "")
            + ("" if row.get("schedule", EPOCHS) == EPOCHS else f" ({row['schedule']:g}-epoch schedule)")
            + (f" (KD + SquareHead {row['squarehead']:g})" if row.get("squarehead") else ""))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | sparsity | KD | epochs | test accuracy | ± (seeds) | vs its teacher | macro-F1 | validation acc. "
             "| seconds |", "|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for row in sorted((r for r in rows if r["kind"] == "accuracy"), key=lambda r: (r["sparsity"] > 0, label(r), r["sparsity"])):
        spread = "" if row.get("accuracy_std") is None else f"{100 * row['accuracy_std']:.1f}"
        teacher = row.get("teacher_test_accuracy")  # the gradual rows' teacher, scored in the same run
        versus = "" if teacher is None else f"{100 * (row['accuracy'] - teacher):+.1f}"
        lines.append(f"| {label(row)} | {row['sparsity']:.3f} | {'yes' if row['kd'] else 'no'} | {row['epochs']} | "
                     f"{100 * row['accuracy']:.1f} | {spread} ({row['seeds']}) | {versus} | {100 * row['f1']:.1f} | "
                     f"{100 * row['validation_accuracy']:.1f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in sorted({label(r) for r in rows if r["method"] != "dense"}):
        points = sorted((r["sparsity"], 100 * r["accuracy"]) for r in rows if label(r) == method)
        axis.plot(*zip(*points), marker="o", label=method)
    if dense:
        axis.axhline(100 * dense["accuracy"], color="grey", linestyle="--", label="dense teacher")
    axis.set(xlabel="sparsity of the encoder's linear layers", ylabel="test accuracy (%)",
             title="all-MiniLM-L6-v2 on fine-food reviews")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "obert.png", dpi=120)


def write_speed_markdown(speed: list[dict], split: list[dict]) -> None:
    """obert-speed.md: one section per CPU measured (speed table, then time split), the latest first."""
    cpus = list(dict.fromkeys(r["cpu"] for r in reversed(speed)))
    sections = []
    for cpu in cpus:
        here = [r for r in split if r["cpu"] == cpu]
        sections.append(speed_markdown([r for r in speed if r["cpu"] == cpu]) + (split_markdown(here) if here else ""))
    if sections:
        (RESULTS / "obert-speed.md").write_text("# Encoder speed, one section per CPU\n\n" + "\n".join(sections))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=["dense", "oneshot", "gradual", "speed", "split"], default=["dense", "oneshot"])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, help="run only this seed (one lane per seed on a multi-core machine)")
    parser.add_argument("--only", nargs="*", help="methods to run, e.g. oneshot-obert gradual-gmp")
    parser.add_argument("--sparsities", nargs="*", type=float, help="targets to run, e.g. 0.9 0.97")
    parser.add_argument("--structures", nargs="*", choices=sorted(STRUCTURES), help="structures to run, e.g. unstructured")
    parser.add_argument("--quants", nargs="*", help="quantizations to run, e.g. none int8 int8-gptq")
    parser.add_argument("--recovery-epochs", type=float, default=0.0,
                        help="gradual rows train this many epochs more at their final sparsity (rows of their own)")
    parser.add_argument("--gradual-epochs", type=float, default=EPOCHS,
                        help=f"length of the gradual rows' run in epochs, pruning over its first 2/3 (default {EPOCHS}; "
                             "another makes rows of their own)")
    parser.add_argument("--squarehead", type=float, default=0.0,
                        help="weight of a SquareHead term (every block's hidden states) beside the gradual rows' "
                             "KD (default 0: logits only, oBERT's; another makes rows of their own)")
    parser.add_argument("--gradual-lr", type=float, default=LR,
                        help=f"learning rate of the gradual rows (default {LR:g}; another one makes rows of its own, "
                             "to be chosen on the validation split)")
    args = parser.parse_args()
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    if "speed" in args.rows or "split" in args.rows:
        kind = "speed" if "speed" in args.rows else "split"
        timed = speed_rows([r for r in rows if r.get("kind") == "accuracy"]) if kind == "speed" else split_rows()
        rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []  # as it is now, other runs' rows too
        rows = [r for r in rows if not (r.get("kind") == kind and r["cpu"] == timed[0]["cpu"])] + timed
        write_json(JSON_PATH, rows)
        write_speed_markdown([r for r in rows if r.get("kind") == "speed"], [r for r in rows if r.get("kind") == "split"])
        print(speed_markdown(timed) if kind == "speed" else split_markdown(timed))
        return
    def key(row: dict) -> tuple:
        return (row["method"], row["target"], row.get("structure", "unstructured"), row.get("quant"), row.get("lr", LR),
                row.get("recovery", 0.0), row.get("schedule", EPOCHS), row.get("squarehead", 0.0))

    runs = {key(r) + (r["seed"],) for r in rows if r.get("kind") == "run"}
    plan = []
    if "dense" in args.rows:
        plan.append(("dense", 0.0, "unstructured", None))
    if "oneshot" in args.rows:
        plan += [(f"oneshot-{m}", s, "unstructured", None) for s in ONESHOT_SPARSITIES
                 for m in ("magnitude", "obert", "sparsegpt")]
    if "gradual" in args.rows:
        plan += list(GRADUAL)
    plan = [p for p in plan if (not args.only or p[0] in args.only)
            and (not args.sparsities or any(abs(p[1] - s) < 1e-9 for s in args.sparsities))
            and (not args.structures or p[2] in args.structures)
            and (not args.quants or (p[3] or "none") in args.quants)]
    for method, target, structure, quant in plan:
        lr = args.gradual_lr if method.startswith("gradual") else LR
        recovery = args.recovery_epochs if method.startswith("gradual") else 0.0
        schedule = args.gradual_epochs if method.startswith("gradual") else EPOCHS
        squarehead = args.squarehead if method.startswith("gradual") else 0.0
        for seed in [args.seed] if args.seed is not None else range(args.seeds):
            if (method, target, structure, quant, lr, recovery, schedule, squarehead, seed) in runs:
                continue
            print(f"[obert] {method} {target} {structure} {quant or ''} seed {seed}", flush=True)
            if method == "dense":
                model, _, _, scored, seconds = teacher(seed)
                result = {"method": "dense", "sparsity": 0.0, "target": 0.0, "kd": False, "epochs": EPOCHS,
                          "seconds": seconds} | score(model, scored)
            elif method.startswith("oneshot"):
                result = oneshot(method.removeprefix("oneshot-"), target, seed)
            else:
                result = gradual(method, target, seed, structure, quant, lr, recovery, schedule, squarehead)
            row = {"kind": "run", "seed": seed, "structure": "unstructured", "quant": None,
                   "threads": torch.get_num_threads(), "cpu": cpu_name(), "seqlen": SEQLEN} | result
            print(f"[obert] {result}", flush=True)
            # read again: another process (another row's run) may have written rows since this one started
            rows = (json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []) + [row]
            write_json(JSON_PATH, rows)
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    runs = [r for r in rows if r.get("kind") == "run"]
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    summary = [mean_row(group) | {"kind": "accuracy"} for group in groups.values()]
    # the speed rows' accuracy follows the accuracy rows (no timing is repeated)
    speed = [r | dict(zip(("accuracy", "accuracy_from"),
                          accuracy_for(summary, r["sparsity"], r["quant"], r.get("structure", "unstructured"))))
             for r in rows if r.get("kind") == "speed"]
    split = [r for r in rows if r.get("kind") == "split"]
    write_json(JSON_PATH, runs + summary + speed + split)
    (RESULTS / "obert-table.md").write_text(markdown(summary))
    write_speed_markdown(speed, split)
    plot(summary)
    print(markdown(summary))


if __name__ == "__main__":
    main()
