"""Vector quantization benchmark: SmolLM2-135M coded with additive codebooks (AQLM-style) at about 2,
3 and 4 bits per weight, beside our GPTQ and RTN rows at 2, 3 and 4 bits, on quality.py's protocol.

Protocol: quality.py's (the embedded SmolLM2-135M-Instruct dequantized to float32; calibration 64
windows x 512 tokens, seed 0, austen-calib; perplexity on the first 40,960 tokens of Persuasion in
windows of 512). Each VQ row runs in its own subprocess (its peak RSS is its own), compresses
with the engine (`vq` recipe stage), writes the compressed directory (the `vq` format) to the cache
and scores the model loaded back from it, so the perplexity is that of the file. Bits per weight are
counted over the quantized linear layers: codes + float16 codebooks + float16 scales for VQ
(algorithms.vq_bits); codes + float32 group scales for the GPTQ/RTN rows (symmetric: no zero points),
which are quality.json's rows of the same protocol.

Rows are cached in benchmarks/results/vq.json; a rerun fills in missing rows (`--only CONFIG`).

    nice .venv/bin/python benchmarks/vq.py [--only 2x8g8 ...] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py is a sibling script, not a package
from quality import JSON_PATH as QUALITY_JSON
from quality import PROTOCOL, _calibration_and_eval, _run_child, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "vq.json"
# name -> (codebooks, bits per codebook, group size)
CONFIGS = {"2x8g8": (2, 8, 8), "3x8g8": (3, 8, 8), "4x8g8": (4, 8, 8)}
SCALAR_ROWS = ("gptq-w2g64", "gptq-w3g64", "gptq-w4g64", "rtn-w2g64", "rtn-w3g64", "rtn-w4g64")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# How the engine's VQ starts its codes (algorithms.vq's `init`): "sweep" (error feedback, the default
# since vq_sweep.py) or "kmeans" (nearest codewords: every row measured before it, whose rows carry no
# "init" key).
CODE_INIT = "sweep"


def row_init(row: dict) -> str:
    return row.get("init", "kmeans")


def output_dir(config: str, rounds: int) -> Path:
    from secateurs.models import cache_dir

    suffix = "" if CODE_INIT == "kmeans" else f"-{CODE_INIT}"
    return cache_dir() / "vq-bench" / f"{PROTOCOL['model']}-vq-{config}-r{rounds}{suffix}"


def recipe(config: str, rounds: int) -> list:
    books, bits, group = CONFIGS[config]
    return [{"vq": {"codebooks": books, "bits": bits, "group_size": group, "rounds": rounds}}]


def quantized_bits(model, config: str) -> float:
    """Bits per weight over the decoder blocks' linear layers: codes + codebooks + scales."""
    from secateurs.algorithms import VQSpec, vq_bits
    from secateurs.structure import find_blocks, linear_layers

    spec = VQSpec(*CONFIGS[config])
    _, blocks = find_blocks(model)
    counts = [vq_bits(*module.weight.shape, spec) for block in blocks for module in linear_layers(block).values()]
    return sum(c.total for c in counts) / sum(c.weights for c in counts)


def worker(config: str, rounds: int) -> dict:
    import torch

    import secateurs
    from secateurs.eval.perplexity import perplexity
    from secateurs.models import load_model

    loaded = load_model(PROTOCOL["model"])
    calibration, evaluation = _calibration_and_eval(loaded.tokenizer)
    bits = quantized_bits(loaded.model, config)
    target = output_dir(config, rounds)
    started = time.perf_counter()
    if not (target / "config.json").is_file():
        # by name, not the loaded model: a killed run resumes from its partial folder
        secateurs.oneshot(PROTOCOL["model"], recipe(config, rounds), calibration, target,
                          resume=target.with_name(target.name + ".partial").is_dir())
    seconds = time.perf_counter() - started
    resumed = seconds < 60  # compressed earlier (a finished or resumed run): its own time is in compression.json
    model = secateurs.load(target)
    ppl = perplexity(model, evaluation, PROTOCOL["eval_seqlen"], max_tokens=PROTOCOL["eval_tokens"], progress=False)
    report = json.loads((target / "compression.json").read_text())
    seconds = report["totals"]["seconds"] if resumed else seconds
    return {"bits_per_weight": bits, "ppl": ppl.ppl, "eval_tokens": ppl.tokens_evaluated, "seconds": seconds,
            "peak_rss_note": "of the scoring process only" if resumed else "compression and scoring",
            "compression_seconds": report["totals"]["seconds"], "threads": torch.get_num_threads(),
            "layer_loss": report["totals"]["loss"]}


def scalar_rows() -> list[dict]:
    """quality.json's GPTQ and RTN rows (ours), with their bits per weight counted as stored."""
    rows = []
    for row in json.loads(QUALITY_JSON.read_text()):
        if row.get("row") in SCALAR_ROWS and row.get("engine") == "secateurs":
            bits = row["bits"] + 32 / row["group_size"]  # codes + a float32 scale per group
            rows.append({"model": PROTOCOL["model"], "engine": "secateurs", "method": row["method"],
                         "config": f"w{row['bits']}g{row['group_size']}", "bits_per_weight": bits,
                         "block_finetune": False, "ppl": row["ppl"], "seconds": row.get("seconds"),
                         "peak_rss_mb": row.get("peak_rss_mb"), "decode_tok_s": None, "threads": row.get("threads"),
                         "cpu": None, "source": "quality.json"})
    unique = {}
    for row in rows:  # the latest row of each config
        unique[(row["method"], row["config"])] = row
    return list(unique.values())


def decode_rows(configs: list[str], rounds: int, threads=(1, 2), repeat: int = 3) -> list[dict]:
    """Decode tokens/s of the VQ models and, as the baseline measured in the same run, the dense
    model, on our C++ decode path (int8 embeddings; 32-token prompt of Persuasion, 128 new tokens,
    median of `repeat`). Run on a quiet machine: `uptime` goes into every row."""
    import os
    import statistics

    import torch

    import secateurs
    from secateurs.eval.speed import bench_prompt, time_decode_path
    from secateurs.models import load_model
    from secateurs.runtime.decode import DecodeModel

    dense = load_model(PROTOCOL["model"])
    models = {("dense", "fp32"): dense.model}
    models |= {("vq", config): secateurs.load(output_dir(config, rounds)) for config in configs
               if (output_dir(config, rounds) / "config.json").is_file()}
    prompt = bench_prompt(dense.tokenizer, 32)
    rows = []
    for (method, config), model in models.items():
        decoder = DecodeModel.from_model(model, embeddings="int8", max_length=32 + 128)
        for count in threads:
            decoder.set_threads(count)
            torch.set_num_threads(count)
            decoder.generate(prompt[:8], 8, eos=None)
            speeds = [time_decode_path(decoder, prompt, 128)["decode_tokens_per_second"] for _ in range(repeat)]
            rows.append({"model": PROTOCOL["model"], "engine": "secateurs", "method": method, "config": config,
                         "kind": "decode", "decode_tok_s": statistics.median(speeds), "threads": count,
                         "kernel_path": decoder.kernel_path, "cpu": cpu_name(), "uptime": os.getloadavg()})
            print(f"[vq] decode {method} {config} threads {count}: {rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | method | config | codes start | rounds | bits/weight | block fine-tune | ppl | compress s | peak RSS MB |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for row in sorted((r for r in rows if r.get("kind") != "decode"), key=lambda r: (r["bits_per_weight"], r["method"])):
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f}"
        rss = "" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}"
        start = row_init(row) if row["method"] == "vq" else ""
        lines.append(f"| {row['engine']} | {row['method']} | {row['config']} | {start} | {row.get('rounds', '')} | "
                     f"{row['bits_per_weight']:.3f} | "
                     f"{'yes' if row['block_finetune'] else 'no'} | {row['ppl']:.2f} | {seconds} | {rss} |")
    decode = [r for r in rows if r.get("kind") == "decode"]
    if decode:
        lines += ["", "| decode path | config | threads | tok/s | kernel path | load average |", "|---|---|---:|---:|---|---|"]
        lines += [f"| {r['method']} | {r['config']} | {r['threads']} | {r['decode_tok_s']:.1f} | {r['kernel_path']} | "
                  f"{', '.join(f'{v:.2f}' for v in r['uptime'])} |" for r in decode]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, marker in (("vq", "o"), ("gptq", "s"), ("rtn", "^")):
        points = sorted((r["bits_per_weight"], r["ppl"]) for r in rows if r["method"] == method and r.get("kind") != "decode")
        if points:
            axis.plot(*zip(*points), marker=marker, label=method)
    dense = next((r["dense_ppl"] for r in json.loads(QUALITY_JSON.read_text()) if r.get("dense_ppl")), None)
    if dense:
        axis.axhline(dense, color="grey", linestyle="--", label=f"dense {dense:.1f}")
    axis.set(xlabel="bits per weight (measured, quantized layers)", ylabel="perplexity (Persuasion)", yscale="log",
             title="SmolLM2-135M: vector vs scalar quantization")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "vq.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=["2x8g8"])
    parser.add_argument("--rounds", type=int, default=4, help="alternations of code search and codebook steps")
    parser.add_argument("--decode", action="store_true", help="time the decode path (a quiet machine only)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds)))
        return
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    if args.decode:
        rows = [r for r in rows if r.get("kind") != "decode"] + decode_rows(args.only, args.rounds)
    for config in args.only:
        if any(r["method"] == "vq" and r["config"] == config and r.get("rounds") == args.rounds and r.get("kind") != "decode"
               and row_init(r) == CODE_INIT for r in rows):
            continue
        print(f"[vq] {config}, {args.rounds} rounds", flush=True)
        result, rss = _run_child([sys.executable, __file__, "--worker", config, "--rounds", str(args.rounds)])
        rows.append({"model": PROTOCOL["model"], "engine": "secateurs", "method": "vq", "config": config,
                     "rounds": args.rounds, "init": CODE_INIT, "block_finetune": False, "decode_tok_s": None, "cpu": cpu_name(),
                     "peak_rss_mb": rss} | result)
        write_json(JSON_PATH, [r for r in rows if r.get("source") != "quality.json"] + scalar_rows())
    rows = [r for r in rows if r.get("source") != "quality.json"] + scalar_rows()
    write_json(JSON_PATH, rows)
    (RESULTS / "vq-table.md").write_text(markdown(rows))
    plot(rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
