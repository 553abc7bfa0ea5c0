"""Quality benchmark: perplexity of every compression method on SmolLM2-135M, ours and the reference.

Protocol (also in docs/evaluation.md):
  - model: SmolLM2-135M-Instruct, its Q4_1 GGUF dequantized to float32 (the "dense" baseline);
  - calibration: 64 windows x 512 tokens, seed 0, from the five Austen novels other than Persuasion;
  - evaluation: perplexity on the first 40,960 tokens of Persuasion, non-overlapping windows of 512;
  - each row runs in its own subprocess, so its peak RSS (ru_maxrss of that process) is its own; ours
    under the malloc settings the `secateurs` command line sets (secateurs.allocator), the reference
    under glibc's defaults (`--reference-malloc tuned`: under ours, as a separate row);
  - reference rows (--engine llmcompressor) run llmcompressor in its own virtualenv on the same model
    and the same calibration windows; the model it writes is evaluated by the same perplexity code.

Every finished row is cached in benchmarks/results/quality.json with the software versions, a hash of
the protocol and a hash of our compression code; a later run only fills in missing or stale rows
(`--only ROW ...` runs some, `--force` reruns them). `--repeat 3` times ours and the reference
alternately and keeps the median seconds.

    .venv/bin/python benchmarks/quality.py [--engine secateurs|llmcompressor|both] [--only ROW ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from secateurs.allocator import malloc_environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "quality.json"
PROTOCOL = {"model": "smollm2-135m", "dtype": "float32", "calib": "austen-calib", "samples": 64, "calib_seqlen": 512,
            "seed": 0, "eval": "austen-eval", "eval_tokens": 40960, "eval_seqlen": 512}
# Ours always run under the malloc settings of the `secateurs` command line (secateurs.allocator); the
# reference under glibc's defaults, or under ours with --reference-malloc tuned (a separate row).
TUNED, DEFAULT_MALLOC = "tuned", "glibc defaults"
REF_VENV = Path(os.environ.get("REF_VENV", Path.home() / ".cache" / "secateurs" / "venv-llmcompressor"))


def cpu_name() -> str:
    """The CPU's model name (every benchmark row records it beside its numbers)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    """What tells two CPUs of the same model name apart here: native bf16, AMX tiles (oneDNN runs bf16
    matmuls on them), and the family/model numbers."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    numbers = {key: line.split(":", 1)[1].strip() for line in info.splitlines()
               for key in ("cpu family", "model") if line.split(":", 1)[0].strip() == key}
    return {"cpu_bf16": "avx512_bf16" in info, "cpu_amx": "amx_tile" in info,
            "cpu_model": f"{numbers.get('cpu family', '?')}/{numbers.get('model', '?')}"}


def cpu_label() -> str:
    """The model name with family/model and AMX: speed rows of two CPUs sold under one name stay apart."""
    features = cpu_features()
    return f"{cpu_name()} ({features['cpu_model']}{', AMX' if features['cpu_amx'] else ''})"


def _row(method, sparsity=None, pattern="unstructured", bits=None, group_size=None, recipe=None):
    return {"method": method, "sparsity": sparsity, "pattern": pattern, "bits": bits, "group_size": group_size,
            "recipe": recipe}


def _rows() -> dict[str, dict]:
    rows = {"dense": _row("dense", 0.0, recipe=None)}
    for method in ("magnitude", "wanda", "sparsegpt"):
        extra = {"per_row": True} if method == "magnitude" else {}
        for level in (50, 60, 70):
            rows[f"{method}-{level}"] = _row(method, level / 100, recipe=[{method: {"sparsity": level / 100} | extra}])
        for n, m in ((2, 4), (4, 8)):
            rows[f"{method}-{n}of{m}"] = _row(method, n / m, f"{n}:{m}", recipe=[{method: {"mask": f"{n}:{m}"} | extra}])
    for method in ("gptq", "rtn"):
        for bits in (4, 3, 2):
            rows[f"{method}-w{bits}g64"] = _row(method, None, bits=bits, group_size=64,
                                                recipe=[{method: {"bits": bits, "group_size": 64}}])
    # ours as the preset runs it: true-sequential (secateurs.recipe); the reference has no such mode
    rows["sparsegpt-2of4"]["recipe"] = "sparsegpt-2of4"
    rows["sparsegpt-50-w4g64"] = _row("sparsegpt+gptq", 0.5, bits=4, group_size=64,
                                      recipe=[{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 64}}])
    return rows


ROWS = _rows()
REFERENCE_ROWS = [name for name in ROWS if not name.startswith("rtn") and name != "dense"]


def _malloc(row: dict) -> str:
    return row.get("malloc", DEFAULT_MALLOC)


def is_current(row: dict, protocol: str, versions: dict, malloc: str | None = None) -> bool:
    """Whether a cached row was measured on this protocol hash, these software versions (and, where
    given, under these malloc settings)."""
    return (row["protocol"] == protocol and row["versions"].items() >= versions.items()
            and (malloc is None or _malloc(row) == malloc))


def split_reference_version(result: dict) -> dict:
    """Pop the reference's own version out of a run's result, to store it with the versions."""
    return {"llmcompressor": result.pop("llmcompressor")} if "llmcompressor" in result else {}


def write_json(path: Path, rows: list[dict]) -> None:
    """Write rows atomically (a finished file or the previous one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def code_hash() -> str:
    """Hash of the sources that decide our numbers: a change there makes our cached rows stale."""
    digest = hashlib.sha256()
    for folder in ("algorithms", "pipeline", "eval"):
        for path in sorted((ROOT / "secateurs" / folder).glob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# ---- worker side: one row in this process ----

def _calibration_and_eval(tokenizer, samples: int = PROTOCOL["samples"], seed: int = PROTOCOL["seed"]):
    from secateurs.data.corpus import calibration_windows, load_text, tokenize

    calibration = calibration_windows(tokenizer, PROTOCOL["calib"], samples, PROTOCOL["calib_seqlen"], seed)
    return calibration, tokenize(tokenizer, load_text(PROTOCOL["eval"]))


def _matmul_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - started) / 1e9


def _compress_flops(model, tokens: int, report) -> float:
    """Two forward passes of every block plus the Hessians X Xᵀ of each distinct layer input (none
    for methods that use no calibration, which run no forward, nor for Wanda): the nominal work, so
    GFLOP/s is an effective rate (the engine computes only XXᵀ's upper triangle and stops the
    statistics pass before the block's last layer)."""
    from secateurs.structure import find_blocks

    if not report.calibration["calibrated_blocks"]:
        return 0.0
    _, blocks = find_blocks(model)
    block_params = sum(p.numel() for p in blocks.parameters())
    # Layers reading the same input share one Hessian: count each input once. Layers reporting no
    # loss gathered only column norms (Wanda), a negligible count.
    hessian_columns = {layer.input_group: layer.shape[1] for layer in report.layers if layer.loss is not None}
    forward = 2 * 2 * tokens * block_params
    hessians = sum(2 * tokens * c * c for c in hessian_columns.values())
    return forward + hessians


def worker(name: str, model_dir: str | None, calib_out: str | None, seed: int) -> dict:
    import torch

    from secateurs.eval.perplexity import perplexity
    from secateurs.models import load_model
    from secateurs.pipeline.engine import Engine

    loaded = load_model(model_dir or PROTOCOL["model"])
    calibration, evaluation = _calibration_and_eval(loaded.tokenizer, seed=seed)
    if calib_out:  # the reference engine calibrates on exactly these windows
        torch.save(calibration, calib_out)
        return {}
    result = {"threads": torch.get_num_threads()}
    recipe = ROWS[name]["recipe"] if model_dir is None else None
    if recipe:
        engine = Engine(loaded.model, recipe, progress=False)
        started = time.perf_counter()
        report = engine.run(calibration)
        result["seconds"] = time.perf_counter() - started
        result["true_sequential"] = engine.recipe.true_sequential
        flops = _compress_flops(loaded.model, calibration.numel(), report)
        result["achieved_sparsity"] = report.as_dict()["totals"]["sparsity"]
        if flops:
            result |= {"tflop": flops / 1e12, "gflops": flops / result["seconds"] / 1e9, "matmul_gflops": _matmul_gflops()}
    ppl = perplexity(loaded.model, evaluation, PROTOCOL["eval_seqlen"], max_tokens=PROTOCOL["eval_tokens"], progress=False)
    result |= {"ppl": ppl.ppl, "eval_tokens": ppl.tokens_evaluated}
    return result


# ---- driver side ----

def _run_child(command: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run a child process; its last stdout line is JSON. Returns (that JSON, its peak RSS in MB)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def run_ours(name: str, seed: int = PROTOCOL["seed"]) -> dict:
    # with the malloc settings the `secateurs` command line runs under (secateurs.allocator)
    result, rss = _run_child([sys.executable, __file__, "--worker", name, "--seed", str(seed)], env=malloc_environment())
    return result | {"peak_rss_mb": rss}


def run_reference(name: str, workdir: Path, malloc: str = DEFAULT_MALLOC, seed: int = PROTOCOL["seed"]) -> dict:
    calib = workdir / f"calib-{seed}.pt"
    if not calib.exists():
        _run_child([sys.executable, __file__, "--worker", "dense", "--calib-out", str(calib), "--seed", str(seed)])
    from secateurs.models import materialize_embedded

    output = workdir / name
    result, rss = _run_child([str(REF_VENV / "bin" / "python"), str(ROOT / "benchmarks" / "llmcompressor_ref.py"),
                              "--model", str(materialize_embedded(PROTOCOL["model"])), "--calib", str(calib),
                              "--row", name, "--output", str(output)],
                             env=malloc_environment() if malloc == TUNED else None)
    evaluated, _ = _run_child([sys.executable, __file__, "--worker", name, "--model-dir", str(output)])
    return result | {"ppl": evaluated["ppl"], "eval_tokens": evaluated["eval_tokens"], "peak_rss_mb": rss}


def versions(engine: str) -> dict:
    import torch
    import transformers

    import secateurs

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    if engine == "secateurs":
        found |= {"secateurs": getattr(secateurs, "__version__", "0.1.0"), "code": code_hash()}
    return found


def row_versions(engine: str, name: str) -> dict:
    """versions(engine), and for ours the digest of the row's recipe: a changed recipe (a preset
    made true-sequential, say) makes the row stale as a code change does."""
    found = versions(engine)
    if engine == "secateurs" and ROWS[name]["recipe"]:
        from secateurs.recipe import load_recipe

        found["recipe"] = load_recipe(ROWS[name]["recipe"]).digest()
    return found


def load_results() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []


def write_results(rows: list[dict]) -> None:
    dense = next((r["ppl"] for r in rows if r["row"] == "dense" and r["engine"] == "secateurs"), None)
    for row in rows:
        row["dense_ppl"] = dense
    order = {name: i for i, name in enumerate(ROWS)}
    rows.sort(key=lambda r: (order.get(r["row"], 99), r["engine"]))
    write_json(JSON_PATH, rows)
    lines = ["| row | engine (code) | ppl | Δ vs dense | seconds (runs) | peak RSS MB | GFLOP/s (matmul) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{r['ppl'] - dense:+.2f}" if dense else ""
        seconds = f"{r['seconds']:.0f} ({len(r.get('seconds_runs', [1]))})" if r.get("seconds") else ""
        rate = f"{r['gflops']:.0f} ({r['matmul_gflops']:.0f})" if r.get("gflops") else ""
        version = r["versions"].get("llmcompressor") or r["versions"].get("code", "")
        if r["engine"] == "llmcompressor" and _malloc(r) == TUNED:
            version += " (our malloc settings)"
        elif r["engine"] == "secateurs" and _malloc(r) != TUNED:
            version += " (glibc malloc defaults)"
        if r.get("true_sequential"):
            version += " (true-sequential)"
        lines.append(f"| {r['row']} | {r['engine']} {version} | {r['ppl']:.2f} | {delta} | "
                     f"{seconds} | {r['peak_rss_mb']:.0f} | {rate} |")
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, dense)


def _plot(rows, dense) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine, style in (("secateurs", "-o"), ("llmcompressor", "--s")):
        for method in ("magnitude", "wanda", "sparsegpt"):
            points = sorted((r["sparsity"], r["ppl"]) for r in rows if r["engine"] == engine and r["method"] == method
                            and r["pattern"] == "unstructured" and (engine == "secateurs" or _malloc(r) != TUNED))
            if points:
                ax.plot(*zip(*points), style, label=f"{method} ({engine})")
    if dense:
        ax.axhline(dense, color="gray", lw=0.8, label="dense")
    ax.set(xlabel="sparsity (unstructured)", ylabel="perplexity on Persuasion (log)", yscale="log",
           title="SmolLM2-135M, 64x512 calibration windows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("secateurs", "llmcompressor", "both"), default="secateurs")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), help="rows to (re)run")
    parser.add_argument("--force", action="store_true", help="rerun the chosen rows even if cached")
    parser.add_argument("--repeat", type=int, default=1, help="timing runs per row (ours and reference alternate)")
    parser.add_argument("--reference-malloc", choices=(DEFAULT_MALLOC, TUNED), default=DEFAULT_MALLOC,
                        help="run llmcompressor under our malloc settings too (a separate row; ours always use them)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--calib-out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=PROTOCOL["seed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.calib_out, args.seed)))
        return
    engines = ["secateurs", "llmcompressor"] if args.engine == "both" else [args.engine]
    protocol = _hash(PROTOCOL)
    malloc = {"secateurs": TUNED, "llmcompressor": args.reference_malloc}
    rows = load_results()
    wanted = args.only or list(ROWS)
    with tempfile.TemporaryDirectory(prefix="quality-") as workdir:
        for name in wanted:
            todo = [e for e in engines if e == "secateurs" or name in REFERENCE_ROWS]
            current = {e: row_versions(e, name) for e in todo}
            fresh = {(r["row"], r["engine"]) for r in rows
                     if r["engine"] in current and is_current(r, protocol, current[r["engine"]], malloc[r["engine"]])}
            todo = [e for e in todo if args.force or (name, e) not in fresh]
            if not todo:
                continue
            runs: dict[str, list[dict]] = {e: [] for e in todo}
            for _ in range(args.repeat):  # alternate engines so load drifts hit both alike
                for engine in todo:
                    print(f"[quality] {name} / {engine} ...", flush=True)
                    runs[engine].append(run_ours(name) if engine == "secateurs"
                                        else run_reference(name, Path(workdir), args.reference_malloc))
            for engine, results in runs.items():
                result = results[-1]
                if result.get("seconds") is not None:
                    result["seconds_runs"] = [r["seconds"] for r in results]
                    result["seconds"] = statistics.median(result["seconds_runs"])
                extra = split_reference_version(result)
                rows = [r for r in rows if (r["row"], r["engine"], _malloc(r)) != (name, engine, malloc[engine])]
                rows.append({"row": name, "engine": engine} | {k: v for k, v in ROWS[name].items() if k != "recipe"}
                            | result | {"protocol": protocol, "versions": current[engine] | extra, "malloc": malloc[engine]})
                write_results(rows)


if __name__ == "__main__":
    main()
