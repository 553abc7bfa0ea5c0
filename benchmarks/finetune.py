"""Sparse fine-tuning benchmark: how much of one-shot pruning's damage training with the mask held
fixed recovers on SmolLM2-135M, by loss (none, CE, KL, SquareHead + CE) and sparsity.

Protocol: the one-shot models are the quality benchmark's (benchmarks/quality.py: SparseGPT on 64 x
512 calibration windows, seed 0, from the five Austen training novels); fine-tuning reads the same
five novels packed into windows of `--seqlen`, in a seeded order, every row under one token budget;
perplexity is the protocol's (Persuasion, 40,960 tokens in windows of 512) unless `--eval-tokens`
says otherwise (then the rows and the markdown say so). The teacher of the distillation rows is the
dense model fine-tuned with CE under the same budget (the `dense` row), which is also the ceiling
recovery is measured against: r = (ppl_oneshot - ppl) / (ppl_oneshot - ppl_dense_ft).

Each finished row is written atomically into benchmarks/results/finetune.json as soon as it ends; a
row that is killed resumes from its trainer checkpoint (in --work, default the secateurs cache). The
one-shot model of each variant and the fine-tuned dense teacher are cached there too.

`--seed S` (S > 0) runs the training rows again with the fine-tuning windows in another order (the
one-shot models and the teacher stay seed 0's); the report lists every seed beside seed 0's and
their mean.

    .venv/bin/python benchmarks/finetune.py [--tokens 250000] [--only ROW ...] [--eval-tokens N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH, MD_PATH, PNG_PATH = RESULTS / "finetune.json", RESULTS / "finetune.md", RESULTS / "finetune.png"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the protocol's calibration and one-shot recipes)

MODEL = quality.PROTOCOL["model"]
# The minimal set, in its order: (variant, loss, qat).
ROW_ORDER = [("dense", "ce", False), ("sparsegpt-70", "none", False), ("sparsegpt-70", "ce", False),
             ("sparsegpt-70", "kl", False), ("sparsegpt-70", "squarehead", False),
             ("sparsegpt-2of4", "ce", False), ("sparsegpt-2of4", "squarehead", False),
             ("sparsegpt-50", "squarehead", False), ("progressive-50-70", "squarehead", False),
             ("sparsegpt-50-w4g64", "squarehead", True), ("sparsegpt-50-w4g64", "squarehead", False)]


def row_key(variant: str, loss: str, qat: bool) -> str:
    return f"{variant}/{loss}" + ("/qat" if qat else "")


def load_rows() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []


def identity(row: dict) -> tuple:
    """What makes a row one row: (variant, loss, qat, budget, seed)."""
    return row["variant"], row["loss"], row["qat"], json.dumps(row["budget"], sort_keys=True), row.get("seed", 0)


def find(rows: list[dict], variant: str, loss: str, qat: bool, budget: dict, seed: int = 0) -> dict | None:
    wanted = identity({"variant": variant, "loss": loss, "qat": qat, "budget": budget, "seed": seed})
    return next((row for row in rows if identity(row) == wanted), None)


def store(row: dict) -> None:
    from secateurs.io import write_json

    rows = [r for r in load_rows() if identity(r) != identity(row)]
    write_json(JSON_PATH, rows + [row])


# ---- one row ----

def evaluate(model, evaluation, eval_tokens: int) -> float:
    from secateurs.eval.perplexity import perplexity

    return perplexity(model, evaluation, quality.PROTOCOL["eval_seqlen"], max_tokens=eval_tokens, progress=False).ppl


def task_scores(model, tokenizer, subset: int) -> dict:
    """Zero-shot accuracy on the seven tasks, on the seeded subset benchmarks/tasks.py uses (the same
    documents as its rows of that subset, so the untrained dense model's row there is the reference)."""
    from secateurs.eval.tasks import TASKS, mean_accuracy
    from secateurs.eval.tasks import evaluate as evaluate_tasks

    results = evaluate_tasks(model.eval(), tokenizer, list(TASKS), subset=subset, progress=False)
    return {"tasks": {r.task: r.acc for r in results}, "task_mean": mean_accuracy(results), "task_subset": subset}


def dense_task_mean(subset: int) -> float | None:
    """The untrained dense model's mean over the seven tasks in benchmarks/results/tasks.json."""
    path = RESULTS / "tasks.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    accs = {r["task"]: r["acc"] for r in rows if r["variant"] == "dense" and r["engine"] == "secateurs"
            and r["subset"] == subset}
    return sum(accs.values()) / len(accs) if len(accs) == 7 else None


def oneshot(variant: str, work: Path, eval_tokens: int):
    """The variant's one-shot model (cached as a model directory) with its perplexity and plan."""

    from secateurs.models import load_model, save_model
    from secateurs.pipeline.engine import compress_model

    folder = work / "oneshot" / variant
    info_path = folder.parent / f"{variant}.json"
    plan_path = folder.parent / f"{variant}.plan.safetensors"  # not inside: a model folder holds one weights file
    loaded = load_model(MODEL)
    calibration, evaluation = quality._calibration_and_eval(loaded.tokenizer)
    if info_path.is_file() and (plan_path).is_file():
        info = json.loads(info_path.read_text())
        model = load_model(folder).model
    else:
        report = compress_model(loaded.model, quality.ROWS[variant]["recipe"], calibration, progress=False)
        plan = report.storage_plan()
        model = loaded.model
        info = {"nm": {k: list(v) for k, v in plan.nm.items()}, "compress_seconds": report.seconds}
        save_model(model, loaded.tokenizer, folder)
        from secateurs.io import write_json, write_safetensors

        write_safetensors(plan_path, {f"{k}.{i}": t.contiguous() for k, grid in plan.grids.items()
                                                          for i, t in enumerate(grid)})
        write_json(info_path, info)
    key = f"ppl_{eval_tokens}"
    if key not in info:
        info[key] = evaluate(model, evaluation, eval_tokens)
        from secateurs.io import write_json

        write_json(info_path, info)
    from safetensors.torch import load_file

    flat = load_file(plan_path)
    grids = {name.rsplit(".", 1)[0]: (flat[f"{name.rsplit('.', 1)[0]}.0"], flat[f"{name.rsplit('.', 1)[0]}.1"])
             for name in flat}
    nm = {k: tuple(v) for k, v in info["nm"].items()}
    return model, loaded.tokenizer, evaluation, info[key], grids, nm


def train_row(model, teacher, tokenizer, args, masks, out: Path, loss: str, seed: int, tokens: int | None = None):
    from secateurs.data.corpus import load_text, tokenize
    from secateurs.training.losses import LossWeights
    from secateurs.training.trainer import TrainConfig, Trainer

    config = TrainConfig(lr=args.lr, warmup_steps=args.warmup, schedule="linear", tokens=tokens or args.tokens,
                         batch_size=args.batch, seqlen=args.seqlen, seed=seed, bf16=args.bf16,
                         losses=LossWeights.named(loss), checkpoint_every=args.checkpoint_every, max_grad_norm=1.0)
    data = tokenize(tokenizer, load_text(quality.PROTOCOL["calib"]))
    trainer = Trainer(model, data, config, teacher=teacher if config.losses.needs_teacher else None, masks=masks,
                      output_dir=out, progress=args.progress, description=out.name)
    return trainer.train(resume=True)


def progressive(model, teacher, tokenizer, args, masks, out: Path, loss: str, row: dict):
    """50% one-shot (given) -> half the budget -> SparseGPT 70% on the fine-tuned weights, recalibrated
    on the protocol's windows -> the other half: the same total tokens as the direct 70% rows."""
    from secateurs.pipeline.engine import compress_model
    from secateurs.training.masks import masks_from_zeros

    half = args.tokens // 2
    first = train_row(model, teacher, tokenizer, args, masks, out / "stage-1", loss, args.seed, tokens=half)
    calibration, _ = quality._calibration_and_eval(tokenizer)
    stage2 = out / "stage-2"
    if not (stage2 / "checkpoint").is_dir():  # a resumed second stage already holds its 70% weights
        compress_model(model.eval(), quality.ROWS["sparsegpt-70"]["recipe"], calibration, progress=False)
    second = train_row(model, teacher, tokenizer, args, masks_from_zeros(model), stage2, loss, args.seed,
                       tokens=args.tokens - half)
    second.tokens += first.tokens
    second.seconds += first.seconds
    second.tokens_per_s = second.tokens / second.seconds
    return second


def rows_dir(work: Path, budget: dict) -> Path:
    """Checkpoints of the rows of one budget (a checkpoint of another budget would be refused)."""
    return work / "rows" / quality._hash(budget)


def run_row(variant: str, loss: str, qat: bool, args, budget: dict) -> dict:
    import torch

    from secateurs.models import load_model, save_model
    from secateurs.training.masks import block_linear_layers, masks_from_zeros
    from secateurs.training.qat import attach_fake_quant, bake_fake_quant

    work = Path(args.work)
    eval_tokens = args.eval_tokens
    started = time.perf_counter()
    row = {"model": MODEL, "variant": variant, "loss": loss, "qat": qat, "budget": budget, "seed": args.seed,
           "device": "cpu", "threads": torch.get_num_threads(), "cpu": quality.cpu_name(),
           "bf16": args.bf16, "eval_tokens": eval_tokens, "task_mean": None}
    tasks = (lambda model, tokenizer: task_scores(model, tokenizer, args.task_subset)) if args.task_subset else None
    teacher_dir = work / "teacher" / quality._hash(budget)

    def train_teacher():
        """The dense model fine-tuned with CE under the budget (saved as the teacher), its perplexity."""
        loaded = load_model(MODEL)
        _, evaluation = quality._calibration_and_eval(loaded.tokenizer)
        result = train_row(loaded.model, None, loaded.tokenizer, args, None, rows_dir(work, budget) / "dense-ce", "ce",
                           args.seed)
        save_model(loaded.model, loaded.tokenizer, teacher_dir)
        return loaded, result, evaluate(loaded.model, evaluation, eval_tokens)

    if variant == "dense":
        loaded, result, ppl = train_teacher()
        dense_ppl = load_rows_dense(eval_tokens, work)
        row |= {"tokens": result.tokens, "ppl": ppl, "ppl_oneshot": dense_ppl, "ppl_dense_ft": ppl, "sparsity": 0.0,
                "train_seconds": result.seconds, "tokens_per_s": result.tokens_per_s}
        row |= tasks(loaded.model, loaded.tokenizer) if tasks else {}
    else:
        dense_ft = find(load_rows(), "dense", "ce", False, budget)  # seed 0's: the teacher of every seed
        if loss != "none" and dense_ft is None:
            raise SystemExit(f"{row_key(variant, loss, qat)}: run the dense CE row (the teacher) first")
        if loss != "none" and not teacher_dir.is_dir():
            # a new machine: train the teacher again (seeded, so the same model) and say whether its
            # perplexity is the dense row's, the one recovery is measured against
            print(f"{row_key(variant, loss, qat)}: training the teacher again (dense CE)", flush=True)
            row["teacher_ppl"] = train_teacher()[2]
            print(f"teacher perplexity {row['teacher_ppl']:.6f}, dense row {dense_ft['ppl']:.6f}", flush=True)
        base = variant.replace("progressive-50-70", "sparsegpt-50")
        model, tokenizer, evaluation, ppl_oneshot, grids, nm = oneshot(base, work, eval_tokens)
        masks = masks_from_zeros(model, nm=nm or None)
        row |= {"ppl_oneshot": ppl_oneshot, "ppl_dense_ft": dense_ft["ppl"] if dense_ft else None}
        if loss == "none":
            row |= {"tokens": 0, "ppl": ppl_oneshot, "sparsity": masks.check()["sparsity"], "tokens_per_s": None}
            row |= tasks(model, tokenizer) if tasks else {}
        else:
            teacher = load_model(teacher_dir).model
            out = rows_dir(work, budget) / (row_key(variant, loss, qat).replace("/", "-")
                                            + (f"-seed{args.seed}" if args.seed else ""))
            layers = block_linear_layers(model)
            if qat:
                attach_fake_quant(layers, grids)
            if variant.startswith("progressive"):
                result = progressive(model, teacher, tokenizer, args, masks, out, loss, row)
            else:
                result = train_row(model, teacher, tokenizer, args, masks, out, loss, args.seed)
            if grids:  # QAT kept the weights on the grids; otherwise round the fine-tuned ones onto them
                if not qat:
                    attach_fake_quant(layers, grids)
                bake_fake_quant(layers)
                masks.check()
            row |= {"tokens": result.tokens, "ppl": evaluate(model, evaluation, eval_tokens),
                    "sparsity": result.sparsity["sparsity"], "train_seconds": result.seconds,
                    "tokens_per_s": result.tokens_per_s}
            row |= tasks(model, tokenizer) if tasks else {}
    row["seconds"] = time.perf_counter() - started
    if variant != "dense" and row["ppl_dense_ft"] is not None and row["ppl_oneshot"] != row["ppl_dense_ft"]:
        row["recovery"] = (row["ppl_oneshot"] - row["ppl"]) / (row["ppl_oneshot"] - row["ppl_dense_ft"])
    return row


def load_rows_dense(eval_tokens: int, work: Path) -> float:
    """The untrained dense model's perplexity (cached in the work folder)."""
    from secateurs.io import write_json
    from secateurs.models import load_model

    path = work / "dense.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if eval_tokens == quality.PROTOCOL["eval_tokens"] and quality.JSON_PATH.is_file():
        # the quality benchmark's dense row: the same model, the same perplexity code and protocol
        for row in json.loads(quality.JSON_PATH.read_text()):
            if row.get("row") == "dense" and row.get("engine") == "secateurs":
                cached.setdefault(str(eval_tokens), row["ppl"])
    if str(eval_tokens) not in cached:
        loaded = load_model(MODEL)
        _, evaluation = quality._calibration_and_eval(loaded.tokenizer)
        cached[str(eval_tokens)] = evaluate(loaded.model, evaluation, eval_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cached)
    return cached[str(eval_tokens)]


# ---- report ----

def budget_order(budget: dict) -> tuple:
    """Sections of the report: the largest token budget first, then by learning rate."""
    return (-budget["tokens"], budget["lr"], budget["eval_tokens"], budget["bf16"])


def write_report(args, budget: dict) -> None:
    """finetune.md: one table per budget that has rows (the one just run included), largest first."""
    everything = load_rows()
    budgets = [json.loads(b) for b in {json.dumps(r["budget"], sort_keys=True) for r in everything}]
    if budget not in budgets:
        budgets.append(budget)
    budgets.sort(key=budget_order)
    lines = ["# Sparse fine-tuning (SmolLM2-135M, Austen training novels)", "",
             "One table per training budget (token count, learning rate, ...); r = (ppl_oneshot - ppl) / "
             "(ppl_oneshot - ppl_dense_ft), against the dense model fine-tuned under the same budget.", ""]
    subsets = {r["task_subset"] for r in everything if r.get("task_mean") is not None}
    for subset in sorted(subsets):
        reference = dense_task_mean(subset)
        lines += [f"Task mean: accuracy averaged over the seven zero-shot tasks on benchmarks/tasks.py's seeded "
                  f"subset of {subset} documents per task (stderr about 2 points on the mean); the untrained dense "
                  f"model scores {'?' if reference is None else f'{100 * reference:.2f}'} there.", ""]
    for each in budgets:
        dense = [r for r in everything if r["variant"] == "dense" and r["budget"]["tokens"] == each["tokens"]
                 and r["budget"]["eval_tokens"] == each["eval_tokens"] and r.get("seed", 0) == 0]
        best = min(dense, key=lambda r: r["ppl"], default=None)
        lines += budget_section([r for r in everything if r["budget"] == each], each, best)
    lines += ["Rows not yet run are resumed by running the same command again (finished rows are cached, "
              "a killed row continues from its checkpoint).", ""]
    from secateurs.io import write_text

    write_text(MD_PATH, "\n".join(lines) + "\n")
    plot([r for r in everything if r["budget"]["tokens"] >= 250_000], args.work, budget)


def budget_section(rows: list[dict], budget: dict, best_dense: dict | None = None) -> list[str]:
    """One budget's table (seed 0), and where other seeds ran, their rows beside seed 0's with the
    mean; where another budget of the same token count trained a better dense model (another lr),
    r is also given against that one, the stricter ceiling."""
    protocol = budget["eval_tokens"] == quality.PROTOCOL["eval_tokens"]
    eval_tokens = budget["eval_tokens"]
    lines = [f"## {budget['tokens']:,} tokens, lr {budget['lr']}", "",
             f"Budget of every row: {budget['tokens']:,} training tokens (batch {budget['batch']} x {budget['seqlen']}, "
             f"lr {budget['lr']}, warmup {budget['warmup']} steps, linear decay, AdamW, clip 1.0, "
             f"{'bf16 autocast' if budget['bf16'] else 'float32'}), seed 0.",
             "Perplexity: Persuasion, " + (f"the protocol's {eval_tokens:,} tokens" if protocol else
                                          f"**the first {eval_tokens:,} tokens only (not the protocol's 40,960)**")
             + " in windows of 512.", ""]
    if budget["tokens"] < 250_000:
        lines += [f"**This budget is far below the issue's 0.25M tokens** (a smoke-scale run: the trainer measured "
                  f"about {min((r['tokens_per_s'] for r in rows if r.get('tokens_per_s')), default=0):.0f}-"
                  f"{max((r['tokens_per_s'] for r in rows if r.get('tokens_per_s')), default=0):.0f} tokens/s on "
                  f"{rows[0]['cpu'] if rows else 'this CPU'}, "
                  f"{' or '.join(str(t) for t in sorted({r['threads'] for r in rows})) or '?'} threads, shared "
                  "with other jobs).", ""]
    lines += ["| variant | loss | QAT | tokens | ppl one-shot | ppl after | r | task mean | sparsity | train s | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for variant, loss, qat in ROW_ORDER:
        row = find(rows, variant, loss, qat, budget)
        if row is None:  # the budget lists what is still owed; smoke budgets only what ran
            if budget["tokens"] >= 250_000:
                lines.append(f"| {variant} | {loss} | {'yes' if qat else 'no'} | not run yet | | | | | | | |")
            continue
        rec = row.get("recovery") if variant != "dense" else None
        oneshot = row["ppl_oneshot"]
        final = find(rows, "sparsegpt-70", "none", False, budget) if variant.startswith("progressive") else None
        if final is not None:  # judged against the one-shot model of its final sparsity, not its 50% start
            oneshot = final["ppl"]
            rec = (oneshot - row["ppl"]) / (oneshot - row["ppl_dense_ft"])
            notes.append(f"{variant}: the one-shot column is SparseGPT 70% (its final sparsity); it started from "
                         f"SparseGPT 50% at {row['ppl_oneshot']:.2f}.")
        task_mean = "" if row.get("task_mean") is None else f"{100 * row['task_mean']:.2f}"
        lines.append(f"| {variant} | {loss} | {'yes' if qat else 'no'} | {row['tokens']:,} | {oneshot:.2f} | "
                     f"{row['ppl']:.2f} | {'' if rec is None else f'{rec:.2f}'} | "
                     f"{task_mean} | {row['sparsity']:.4f} | "
                     f"{row.get('train_seconds', 0):.0f} | {row['tokens_per_s'] or 0:.1f} |")
    own_dense = find(rows, "dense", "ce", False, budget)
    if best_dense is not None and own_dense is not None and best_dense["ppl"] < own_dense["ppl"]:
        stricter = [f"{r['variant']}/{r['loss']}{'/qat' if r['qat'] else ''} "
                    f"{(r['ppl_oneshot'] - r['ppl']) / (r['ppl_oneshot'] - best_dense['ppl']):.2f}"
                    for r in rows if r["variant"] not in ("dense",) and r["loss"] != "none"
                    and not r["variant"].startswith("progressive") and r.get("seed", 0) == 0]
        notes.append(f"This table's dense row ({own_dense['ppl']:.2f}) is above the best dense model at "
                     f"{budget['tokens']:,} tokens (lr {best_dense['budget']['lr']}: {best_dense['ppl']:.2f}); "
                     "against that one, r is " + (", ".join(stricter) if stricter else "(no sparse row yet)") + ".")
    return lines + ["", *notes, ""] + seeds_section(rows, budget)


def seeds_section(rows: list[dict], budget: dict) -> list[str]:
    """Rows run with more than one seed: perplexity per seed, mean and standard deviation, mean r.
    A seed changes the order of the fine-tuning windows; the one-shot model and the teacher are
    the same for every seed."""
    import statistics

    lines = []
    for variant, loss, qat in ROW_ORDER:
        runs = sorted((r for r in rows if (r["variant"], r["loss"], r["qat"]) == (variant, loss, qat)),
                      key=lambda r: r.get("seed", 0))
        if len(runs) < 2:
            continue
        ppls = [r["ppl"] for r in runs]
        recoveries = [r["recovery"] for r in runs if r.get("recovery") is not None]
        lines.append(f"| {variant} | {loss} | {'yes' if qat else 'no'} | "
                     + ", ".join(f"{r.get('seed', 0)}: {r['ppl']:.2f}" for r in runs)
                     + f" | {statistics.mean(ppls):.2f} ± {statistics.stdev(ppls):.2f} | "
                     + (f"{statistics.mean(recoveries):.2f}" if recoveries else "") + " |")
    if not lines:
        return []
    return [f"Seeds at {budget['tokens']:,} tokens, lr {budget['lr']} (a seed orders the fine-tuning windows; "
            "the one-shot model and the teacher are seed 0's):", "",
            "| variant | loss | QAT | perplexity by seed | mean ± std | mean r |", "|---|---|---|---|---|---|",
            *lines, ""]


def plot(rows: list[dict], work, budget: dict) -> None:
    """Perplexity before and after by row (every 0.25M-token budget, labelled by lr), and the loss
    curves of the budget just run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    rows = sorted((r for r in rows if r.get("seed", 0) == 0), key=lambda r: (budget_order(r["budget"]), ROW_ORDER.index(
        (r["variant"], r["loss"], r["qat"]))))
    labels = [f"{r['variant']}\n{r['loss']}{'/qat' if r['qat'] else ''}\nlr {r['budget']['lr']:g}" for r in rows]
    bars.bar(range(len(rows)), [r["ppl_oneshot"] for r in rows], color="#bbb", label="one-shot")
    bars.bar(range(len(rows)), [r["ppl"] for r in rows], width=0.5, color="#3a7", label="after fine-tuning")
    bars.set_xticks(range(len(rows)), labels, fontsize=6)
    bars.set_yscale("log")
    bars.set_ylabel("perplexity (Persuasion)")
    bars.legend()
    import csv

    for folder in sorted(rows_dir(Path(work), budget).glob("*")):
        if (folder / "loss.csv").is_file():
            with open(folder / "loss.csv") as handle:
                history = list(csv.DictReader(handle))
            curves.plot([int(h["tokens"]) for h in history], [float(h["loss"]) for h in history], label=folder.name)
    curves.set_xlabel(f"tokens (budget {budget['tokens']:,}, lr {budget['lr']:g})")
    curves.set_ylabel("training loss (weighted sum)")
    curves.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(PNG_PATH, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=250_000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=0, help="warmup steps (default 0)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=quality.PROTOCOL["eval_tokens"])
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="rows as variant/loss[/qat], e.g. sparsegpt-70/squarehead")
    parser.add_argument("--task-subset", type=int, default=100,
                        help="documents per task for the zero-shot mean (benchmarks/tasks.py's seeded subset; 0: skip)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown and the plot")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "secateurs" / "finetune-bench"))
    args = parser.parse_args()
    budget = {"tokens": args.tokens, "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr, "warmup": args.warmup,
              "bf16": args.bf16, "eval_tokens": args.eval_tokens}
    order = [] if args.report else ROW_ORDER
    if args.only and not args.report:  # in the order given
        known = {row_key(*row): row for row in ROW_ORDER}
        unknown = [key for key in args.only if key not in known]
        if unknown:
            parser.error(f"unknown row {unknown[0]!r}; rows: {', '.join(known)}")
        order = [known[key] for key in args.only]
    for variant, loss, qat in order:
        key = row_key(variant, loss, qat)
        if args.seed and (variant == "dense" or loss == "none"):
            print(f"{key}: seed 0's row serves every seed (the teacher; no training)", flush=True)
            continue
        if find(load_rows(), variant, loss, qat, budget, args.seed) and not args.force:
            continue
        print(f"{key}: running", flush=True)
        row = run_row(variant, loss, qat, args, budget)
        store(row)
        write_report(args, budget)
        print(json.dumps(row), flush=True)
    write_report(args, budget)


if __name__ == "__main__":
    main()
