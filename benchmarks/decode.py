"""Decode and prefill tokens/s at batch 1: our C++ decode path over each compressed format, torch
eager (transformers generate), and llama.cpp on the same model, side by side in one run, each beside
its perplexity.

    .venv/bin/python benchmarks/decode.py                       # SmolLM2, 1 and 2 threads
    .venv/bin/python benchmarks/decode.py --models smollm2-135m gemma3-270m --repeat 5

Protocol
- Prompt: the first 32 tokens of Persuasion, then 128 greedy tokens with no early stop; decode
  tok/s counts the 127 forwards after the first new token, prefill tok/s the prompt's one forward.
- Rounds: every round times each variant once, in turn, so a drift in machine load hits all of
  them alike; the table gives the median over the rounds (--repeat). Check `uptime` first and run
  nothing else: this machine has 2 cores.
- Variants (ours): the weights are compressed once, calibrated like the quality benchmark but on
  16 (not 64) windows of 512 tokens from the five Austen novels other than Persuasion, seed 0, so
  the whole table fits in under half an hour of two cores; they are cached under
  ~/.cache/secateurs/decode-bench, keyed by recipe, protocol and code. The embeddings and tied LM
  head are stored as the `embeddings` column says (int8: per-row symmetric codes).
- torch eager: the dense model (fp32, or cast to bf16) under transformers' generate with its KV cache.
- llama.cpp: llama-bench on the GGUFs scripts/llama_cpp.sh builds (F32/F16/Q8_0 of the dequantized
  weights, plus the 4-bit GGUF the package ships), with `-d 32` so it decodes after 32 tokens of
  context like ours, one repetition per round. Skipped with a message when it is not built.
- Perplexity: the quality benchmark's (first 40,960 tokens of Persuasion, windows of 512), through
  transformers on the variant's exact weights, its embeddings rounded as the decode path stores them
  (bf16 variants: weights rounded to bf16, computed in fp32). llama.cpp's GGUFs are dequantized by
  transformers' GGUF loader and evaluated the same way (F32 and the shipped GGUF hold the dense
  model's own weights, so they take its perplexity).
- weight_mb: the bytes the decode path reads for its weights (embedding table once, tied to the
  LM head), the model's parameters for torch, llama-bench's model size for llama.cpp.

- Heads: `--heads fp32 bf16 int8` adds, for every variant, NAME@HEAD with the embedding table and
  tied LM head stored as HEAD (its layers compressed once, shared with NAME), so the layers' effect
  (same head) and the head a user would pick are both in the table.

Writes benchmarks/results/decode.{md,json,png}: a list of rows
{"model", "engine", "variant", "threads", "decode_tok_s", "prefill_tok_s", "ppl", "weight_mb", "isa",
"cpu", "head", "run", ...}, one table per kernel path; a run replaces only the rows it measured again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402  (benchmarks/llama_cpp.py)
import quality  # noqa: E402  (benchmarks/quality.py: protocol, calibration, code hash)

RESULTS = quality.RESULTS
CACHE = Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs")) / "decode-bench"
PROMPT_TOKENS, NEW_TOKENS = 32, 128
CALIBRATION_SAMPLES = 16


@dataclass(frozen=True)
class Variant:
    recipe: list | None  # None: the dense model
    weights: str  # how the block linears are stored
    embeddings: str  # fp32 | bf16 | int8 (the tied LM head too)
    sparsity: float


INT8 = {"gptq": {"bits": 8}}  # per-channel symmetric int8 (GPTQ, act-order)
INT4 = {"gptq": {"bits": 4, "group_size": 64}}
VARIANTS = {
    "dense-fp32": Variant(None, "fp32", "fp32", 0.0),
    "dense-bf16": Variant(None, "bf16", "bf16", 0.0),
    "int8": Variant([INT8], "int8", "int8", 0.0),
    "sparse50": Variant([{"sparsegpt": {"sparsity": 0.5}}], "bitmask fp32", "fp32", 0.5),
    "sparse70": Variant([{"sparsegpt": {"sparsity": 0.7}}], "bitmask fp32", "fp32", 0.7),
    "sparse50-int8": Variant([{"sparsegpt": {"sparsity": 0.5}}, INT8], "bitmask int8", "int8", 0.5),
    "sparse70-int8": Variant([{"sparsegpt": {"sparsity": 0.7}}, INT8], "bitmask int8", "int8", 0.7),
    "2of4": Variant([{"sparsegpt": {"mask": "2:4"}}], "2:4 fp32", "fp32", 0.5),
    # one mask per 4 consecutive rows (SparseGPT mask_rows): the int8 kernel gathers each group's
    # kept activations once, so a row costs its kept values only (docs/kernels.md)
    "sparse50r4-int8": Variant([{"sparsegpt": {"sparsity": 0.5, "mask_rows": 4}}, INT8], "bitmask int8, rows of 4 share masks", "int8", 0.5),
    "sparse70r4-int8": Variant([{"sparsegpt": {"sparsity": 0.7, "mask_rows": 4}}, INT8], "bitmask int8, rows of 4 share masks", "int8", 0.7),
    # 4-bit groups of 64 (GPTQ); the sparse ones load as SparseInt4Linear where the avx512vbmi2
    # kernels run, as dense int4 elsewhere (docs/kernels.md)
    "int4": Variant([INT4], "int4 g64", "int8", 0.0),
    "sparse50-int4": Variant([{"sparsegpt": {"sparsity": 0.5}}, INT4], "bitmask int4 g64", "int8", 0.5),
    "sparse70-int4": Variant([{"sparsegpt": {"sparsity": 0.7}}, INT4], "bitmask int4 g64", "int8", 0.7),
}
EAGER = {"eager-fp32": "fp32", "eager-bf16": "bf16"}
HEADS = ("fp32", "bf16", "int8")
LLAMA_TYPES = ("F32", "F16", "Q8_0", "Q4_1", "Q4_K_M")  # the rest (importance-matrix i-quants) are vq.py's


def variant_of(name: str) -> Variant:
    """A variant by name; `NAME@HEAD` is NAME with its embeddings and tied LM head stored as HEAD
    (its layers compressed once, shared with NAME)."""
    base, _, head = name.partition("@")
    return replace(VARIANTS[base], embeddings=head) if head else VARIANTS[base]


def with_heads(names: list[str], heads: list[str]) -> list[str]:
    """names, each followed by its variants with the other heads asked for."""
    return [n for name in names for n in [name] + [f"{name}@{h}" for h in heads if h != VARIANTS[name].embeddings]]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _cached(path: Path, compute) -> dict:
    """meta.json under path, computed (and written atomically) on the first call."""
    meta = path / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    value = compute()
    path.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, meta)
    return value


def _perplexity(model, evaluation) -> float:
    from secateurs.eval.perplexity import perplexity

    protocol = quality.PROTOCOL
    return perplexity(model, evaluation, protocol["eval_seqlen"], max_tokens=protocol["eval_tokens"], progress=False).ppl


def _round_embeddings(model, embeddings: str) -> None:
    """Give the model's embedding (and tied LM head) the values the decode path stores."""
    import torch

    from secateurs.runtime.decode_plan import embedding_storage

    weight = model.get_input_embeddings().weight
    table, scale = embedding_storage(weight, embeddings)
    with torch.no_grad():
        weight.copy_(table.float() * (1 if scale is None else scale[:, None]))


class Workbench:
    """One model: the dense weights, the evaluation text, and each variant prepared once."""

    def __init__(self, model_name: str):
        from secateurs.models import load_model

        self.name = model_name
        self.loaded = load_model(model_name)
        self.calibration, self.evaluation = quality._calibration_and_eval(self.loaded.tokenizer, CALIBRATION_SAMPLES)
        self.dense_state = {k: v.clone() for k, v in self.loaded.model.state_dict().items()}

    def _fresh(self):
        """The model with the dense weights back (variants compress it in place)."""
        self.loaded.model.load_state_dict(self.dense_state)
        return self.loaded.model

    def variant_dir(self, name: str) -> Path:
        variant = variant_of(name)
        return CACHE / self.name / f"{name}-{_key(variant.recipe, variant.embeddings, quality.PROTOCOL, CALIBRATION_SAMPLES, quality.code_hash())}"

    def prepare(self, name: str) -> dict:
        """Compress (cached as a compressed directory) and measure perplexity; returns meta."""
        import torch

        from secateurs import load
        from secateurs.formats import save_compressed
        from secateurs.pipeline.engine import compress_model

        variant, path = variant_of(name), self.variant_dir(name)
        base = name.partition("@")[0]

        def compute() -> dict:
            model, meta = self._fresh(), {"variant": name}
            if variant.recipe and base != name:  # the base variant's compressed layers, densified
                self.prepare(base)
                model = self._fresh()
                compressed = dict(load(self.model_dir(name)).named_modules())
                with torch.no_grad():
                    for module_name, module in model.named_modules():
                        if hasattr(compressed.get(module_name), "to_dense"):
                            module.weight.copy_(compressed[module_name].to_dense(torch.float32))
            elif variant.recipe:
                print(f"[decode] {self.name} {name}: compressing ...", flush=True)
                started = time.perf_counter()
                report = compress_model(model, variant.recipe, self.calibration, progress=False)
                meta["compress_seconds"] = time.perf_counter() - started
                saved = save_compressed(model, report.storage_plan(), self.model_dir(name), self.loaded.tokenizer)
                meta["formats"] = sorted(set(saved.formats.values()))
            if variant.weights == "bf16":
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.copy_(parameter.to(torch.bfloat16).float())
            _round_embeddings(model, variant.embeddings)
            print(f"[decode] {self.name} {name}: perplexity ...", flush=True)
            meta["ppl"] = _perplexity(model, self.evaluation)
            return meta

        return _cached(path, compute)  # compute leaves the model compressed: users call _fresh()

    def model_dir(self, name: str) -> Path:
        """The compressed model directory of a variant (NAME@HEAD: NAME's)."""
        return self.variant_dir(name.partition("@")[0]) / "model"

    def decoder(self, name: str):
        import torch

        from secateurs import load
        from secateurs.runtime.decode import DecodeModel

        variant = variant_of(name)
        if variant.recipe:
            model = load(self.model_dir(name))
        else:
            model = self._fresh()
            if variant.weights == "bf16":
                import copy

                model = copy.deepcopy(model).to(torch.bfloat16)
        return DecodeModel.from_model(model, embeddings=variant.embeddings, max_length=PROMPT_TOKENS + NEW_TOKENS)

    def eager(self, dtype: str):
        import copy

        import torch

        model = copy.deepcopy(self._fresh())
        return model.to(torch.bfloat16) if dtype == "bf16" else model

    def gguf_ppl(self, entry: dict) -> float:
        gguf = Path(entry["path"])
        stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
        path = CACHE / self.name / f"llama.cpp-{entry['type']}-{_key(stamp, quality.PROTOCOL, quality.code_hash())}"

        def compute() -> dict:
            print(f"[decode] {self.name} llama.cpp {entry['type']}: perplexity ...", flush=True)
            return {"ppl": _perplexity(llama_cpp.gguf_perplexity_model(gguf).model, self.evaluation)}

        return _cached(path, compute)["ppl"]


def _gguf_label(entry: dict) -> str:
    """Q4_1 comes twice (the package's and one llama-quantize made): keep them apart."""
    return entry["type"] + (" (shipped)" if entry.get("origin") == "original" else "")


def _weight_mb(decoder) -> float:
    return sum(t.numel() * t.element_size() for t in decoder._tensors) / 2**20


def _model_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def run_model(model_name: str, threads: list[int], repeat: int, only: list[str] | None, with_llama: bool,
              heads: list[str]) -> list[dict]:
    import torch

    from secateurs.eval.speed import bench_prompt, time_decode_path, time_hf_generate

    started = time.strftime("%Y-%m-%d %H:%M")
    bench = Workbench(model_name)
    names = with_heads([n for n in VARIANTS if not only or n in only], heads)
    eager = [n for n in EAGER if not only or n in only]
    metas = {name: bench.prepare(name) for name in names}
    # Before any decoder shares the model's weights: a perplexity computed later would round them.
    dense_ppl = bench.prepare("dense-fp32")["ppl"]
    eager_ppl = {name: bench.prepare(f"dense-{EAGER[name]}")["ppl"] for name in eager}
    ggufs = []
    if with_llama:
        if llama_cpp.available():
            ggufs = [e for e in llama_cpp.cached_ggufs() if e["model"] == model_name and e["type"] in LLAMA_TYPES]
        else:
            print(f"[decode] llama.cpp is not built: {llama_cpp.BUILD_HINT}; its rows are left out", flush=True)
    # The F32 GGUF holds our dense fp32 weights and the shipped GGUF is what they are dequantized
    # from: both score the dense perplexity exactly, so only llama.cpp's own quantizations are evaluated.
    gguf_ppl = {_gguf_label(e): dense_ppl if e["type"] == "F32" or e.get("origin") == "original" else bench.gguf_ppl(e)
                for e in ggufs}

    prompt = bench_prompt(bench.loaded.tokenizer, PROMPT_TOKENS)
    decoders = {name: bench.decoder(name) for name in names}
    eager_models = {name: bench.eager(EAGER[name]) for name in eager}
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        runs: dict[str, list[dict]] = {}
        for decoder in decoders.values():  # warm up: page in the weights, size the buffers
            decoder.set_threads(count)
            time_decode_path(decoder, prompt[:8], 4)
        for model in eager_models.values():
            time_hf_generate(model, prompt[:8], 2)
        for round_ in range(repeat):
            print(f"[decode] {model_name} threads {count}: round {round_ + 1}/{repeat}", flush=True)
            for name, decoder in decoders.items():
                runs.setdefault(name, []).append(time_decode_path(decoder, prompt, NEW_TOKENS))
            for name, model in eager_models.items():
                runs.setdefault(name, []).append(time_hf_generate(model, prompt, NEW_TOKENS))
            for entry in ggufs:
                result = llama_cpp.run_llama_bench(entry["path"], count, PROMPT_TOKENS, NEW_TOKENS, repeat=1,
                                                   depth=PROMPT_TOKENS)
                runs.setdefault(_gguf_label(entry), []).append(
                    {"prefill_tokens_per_second": result["prefill_tok_s"],
                     "decode_tokens_per_second": result["decode_tok_s"], "weight_mb": result["model_size_mb"]})

        def median(name, key):
            values = [run[key] for run in runs[name] if key in run]
            return statistics.median(values) if values else None

        from secateurs.runtime import kernels

        base = {"model": model_name, "threads": count, "isa": kernels.kernel_path(), "cpu": quality.cpu_name(),
                "load_average": os.getloadavg(), "run": started}
        for name in names:
            variant = variant_of(name)
            rows.append(base | {
                "engine": "secateurs", "variant": name, "weights": variant.weights, "embeddings": variant.embeddings,
                "head": variant.embeddings,
                "sparsity": variant.sparsity, "decode_tok_s": median(name, "decode_tokens_per_second"),
                "prefill_tok_s": median(name, "prefill_tokens_per_second"), "ppl": metas[name]["ppl"],
                "weight_mb": _weight_mb(decoders[name]), "kernel_ms_per_token": median(name, "kernel_ms_per_token"),
                "other_ms_per_token": median(name, "other_ms_per_token"),
                "python_ms_per_token": median(name, "python_ms_per_token"),
                "decode_runs": [run["decode_tokens_per_second"] for run in runs[name]]})
        for name in eager:
            rows.append(base | {
                "engine": "torch", "variant": name, "weights": EAGER[name], "embeddings": EAGER[name],
                "head": EAGER[name], "sparsity": 0.0,
                "decode_tok_s": median(name, "decode_tokens_per_second"),
                "prefill_tok_s": median(name, "prefill_tokens_per_second"),
                "ppl": eager_ppl[name],
                "weight_mb": _model_mb(eager_models[name]),
                "decode_runs": [run["decode_tokens_per_second"] for run in runs[name]]})
        for entry in ggufs:
            name = _gguf_label(entry)
            rows.append(base | {
                "engine": "llama.cpp", "variant": name, "weights": entry["type"],
                "embeddings": entry["type"], "head": entry["type"], "sparsity": 0.0, "origin": entry.get("origin"),
                "decode_tok_s": median(name, "decode_tokens_per_second"),
                "prefill_tok_s": median(name, "prefill_tokens_per_second"), "ppl": gguf_ppl[name],
                "weight_mb": median(name, "weight_mb"),
                "decode_runs": [run["decode_tokens_per_second"] for run in runs[name]]})
    return rows


def _decode_speed(rows, model, isa, threads, engine, variant) -> float | None:
    """decode tok/s of one row; variant "fastest" takes the engine's fastest."""
    speeds = [r["decode_tok_s"] for r in rows if (r["model"], r["isa"], r["threads"], r["engine"]) == (model, isa, threads, engine)
              and (variant == "fastest" or r["variant"] == variant)]
    return max(speeds) if speeds else None


TARGETS = [  # (label, numerator (engine, variant), denominator, at least)
    ("sparse70 / torch eager fp32", ("secateurs", "sparse70"), ("torch", "eager-fp32"), None),
    ("sparse70-int8 / our int8 (both int8 heads)", ("secateurs", "sparse70-int8"), ("secateurs", "int8"), 1.3),
    ("sparse70r4-int8 (rows of 4 share masks) / our int8", ("secateurs", "sparse70r4-int8"), ("secateurs", "int8"), 1.3),
    ("sparse70-int4 / llama.cpp's fastest", ("secateurs", "sparse70-int4"), ("llama.cpp", "fastest"), 1.3),
    ("int4 / llama.cpp's fastest", ("secateurs", "int4"), ("llama.cpp", "fastest"), None),
    ("int8 / llama.cpp Q8_0", ("secateurs", "int8"), ("llama.cpp", "Q8_0"), None),
]


def _context_key(model: str, isa: str) -> str:
    return f"{model} [{isa}]"


def _row_key(row: dict) -> tuple:
    return row["model"], row["isa"], row["engine"], row["variant"], row["threads"]


def write_results(rows: list[dict], context: dict) -> None:
    """Write this run's rows, keeping the earlier rows it did not measure again (other models,
    kernel paths or variants): one table per instruction set. Every row names its run (`run`, a
    timestamp) and ratios are only taken between rows of one run; each (model, ISA)'s context
    (CPU, load, repeat, code) is its latest run's."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    contexts = {_context_key(row["model"], row["isa"]): context for row in rows}
    previous = RESULTS / "decode.json"
    if previous.is_file():
        earlier = json.loads(previous.read_text())
        old_contexts = earlier.get("contexts", {})
        for row in earlier["rows"]:  # rows written before ISA tags: their model's context has the path
            if "isa" not in row:
                old = old_contexts.get(row["model"], {})
                row |= {"isa": old.get("kernel_path", "untagged"), "cpu": old.get("cpu"), "head": row["embeddings"],
                        "run": f"before ISA tags, code {old.get('code')}"}
        measured = {_row_key(row) for row in rows}
        kept = [row for row in earlier["rows"] if _row_key(row) not in measured]
        for row in kept:
            key = _context_key(row["model"], row["isa"])
            contexts.setdefault(key, old_contexts.get(key) or old_contexts.get(row["model"], {}))
        rows = kept + rows
    tmp = RESULTS / "decode.json.tmp"
    tmp.write_text(json.dumps({"contexts": contexts, "rows": rows}, indent=1))
    os.replace(tmp, RESULTS / "decode.json")
    lines = [f"Batch 1, {PROMPT_TOKENS}-token prompt then {NEW_TOKENS} new tokens; one table per kernel path "
             "(instruction set). `head`: how the embedding table and the tied LM head are stored.", ""]
    for isa in dict.fromkeys(r["isa"] for r in rows):
        mine = [r for r in rows if r["isa"] == isa]
        lines += [f"## {isa}", ""]
        for model in dict.fromkeys(r["model"] for r in mine):
            c = contexts.get(_context_key(model, isa), {})
            runs = ", ".join(dict.fromkeys(str(r.get("run")) for r in mine if r["model"] == model))
            lines.append(f"- {model}: median of {c.get('repeat')} rounds, {c.get('cpu')}, load average before its "
                         f"latest run {c.get('load_before')}, code {c.get('code')}; rows from runs {runs}.")
        lines += ["", "| model | engine | variant | weights | head | threads | decode tok/s | prefill tok/s | "
                  "ms/token kernel + other | ppl | weight MB |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in mine:
            split = (f"{r['kernel_ms_per_token']:.2f} + {r['other_ms_per_token']:.2f}"
                     if r.get("kernel_ms_per_token") is not None else "")
            ppl = f"{r['ppl']:.2f}" if r.get("ppl") else ""
            lines.append(f"| {r['model']} | {r['engine']} | {r['variant']} | {r['weights']} | {r.get('head', r['embeddings'])} | "
                         f"{r['threads']} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.1f} | {split} | {ppl} | "
                         f"{r['weight_mb']:.0f} |")
        lines += ["", "| model | threads | ratio of decode tok/s | measured | target |", "|---|---:|---|---:|---|"]
        for model in dict.fromkeys(r["model"] for r in mine):
            for threads in dict.fromkeys(r["threads"] for r in mine):
                for run in dict.fromkeys(r.get("run") for r in mine):
                    same_run = [r for r in mine if r.get("run") == run]
                    for label, numerator, denominator, target in TARGETS:
                        a = _decode_speed(same_run, model, isa, threads, *numerator)
                        b = _decode_speed(same_run, model, isa, threads, *denominator)
                        if a and b:
                            verdict = "" if target is None else f"≥ {target} {'met' if a / b >= target else 'NOT met'}"
                            lines.append(f"| {model} | {threads} | {label} (run {run}) | {a / b:.2f}x | {verdict} |")
        lines.append("")
    text = "\n".join(lines)
    (RESULTS / "decode.md").write_text(text)
    print(text)
    _plot([r for r in rows if r["isa"] == rows[-1]["isa"]])


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (model, threads) in zip(axes[0], panels):
        mine = [r for r in rows if (r["model"], r["threads"]) == (model, threads)]
        for weights, style in (("fp32", "-o"), ("int8", "-s")):
            points = sorted((r["sparsity"], r["decode_tok_s"]) for r in mine if r["engine"] == "secateurs"
                            and r["variant"] != "2of4" and r["embeddings"] == weights)
            if points:
                ax.plot(*zip(*points), style, label=f"secateurs, {weights} values + embeddings")
        for r in mine:
            if r["variant"] == "2of4":
                ax.plot(r["sparsity"], r["decode_tok_s"], "^", color="tab:green", label="secateurs 2:4 fp32")
            elif r["variant"] == "dense-bf16":
                ax.plot(0, r["decode_tok_s"], "D", color="tab:purple", label="secateurs dense bf16")
            elif r["engine"] == "torch":
                ax.plot(0, r["decode_tok_s"], "x", markersize=9, label=f"torch {r['variant']}")
        for r in mine:
            if r["engine"] == "llama.cpp":
                ax.axhline(r["decode_tok_s"], ls="--", lw=0.9, color="gray")
                ax.annotate(f"llama.cpp {r['variant']}", (0.72, r["decode_tok_s"]), fontsize=7, va="bottom")
        ax.set(title=f"{model}, {threads} thread(s)", xlabel="sparsity of the block linears", ylabel="decode tok/s")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(RESULTS / "decode.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5, help="rounds (each times every variant once)")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS) + list(EAGER), help="only these of our variants")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=[],
                        help="also run every variant with its embeddings and tied LM head stored this way (NAME@HEAD)")
    parser.add_argument("--prepare-only", action="store_true", help="compress and evaluate the variants, time nothing")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    for model in args.models:
        if args.prepare_only:
            bench = Workbench(model)
            for name in with_heads([n for n in args.only or VARIANTS if n in VARIANTS], args.heads):  # --only's order
                print(name, bench.prepare(name), flush=True)
            continue
        rows += run_model(model, args.threads, args.repeat, args.only, not args.no_llama_cpp, args.heads)
    if rows:
        from secateurs.runtime import kernels

        write_results(rows, {"repeat": args.repeat, "load_before": round(load_before, 2), "cpu": quality.cpu_name(), "kernel_path": kernels.kernel_path(), "code": quality.code_hash()})


if __name__ == "__main__":
    main()
