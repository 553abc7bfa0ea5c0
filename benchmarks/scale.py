"""Scale benchmark: stream-compress models block by block; peak memory, time and disk written.

Protocol (also in docs/scaling.md):
  - llama2-7b-shape: a Llama-2-7B-shaped checkpoint with random bf16 weights (32 blocks, hidden 4096,
    intermediate 11008, vocabulary 32000; 13.5 GB in one shard per block), generated shard by shard
    into a scratch folder and deleted afterwards, even on failure; skipped below 35 GB of free disk;
  - smollm2 and gemma3: the embedded SmolLM2-135M and Gemma-3-270M (float32 safetensors in the cache);
  - SparseGPT 50% (`sparsegpt-50`), `--stream`, on 16 windows x 256 random token ids (seed 0);
  - each compression runs in its own child process; peak memory is its VmHWM (the peak resident
    set of the whole process, file-backed pages included). That is ru_maxrss without what the
    launching process passes on: Linux keeps ru_maxrss across execve, so a child of the process that
    generated the checkpoint would report the generator's peak. Disk written is the child's
    write() bytes (/proc/self/io wchar: output shards, checkpoints, activations).

The time of 70B- and 175B-shaped models is extrapolated from the measured per-block costs, split
into the column sweeps (timed per layer) and the rest (block forwards and Hessian products), each
divided by its FLOPs: see `extrapolate`.

    .venv/bin/python benchmarks/scale.py [--models llama2-7b-shape smollm2 gemma3] [--blocks 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES, SEQLEN, RECIPE = 16, 256, "sparsegpt-50"
RSS_TARGET_MB = 8 * 1024
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
# Block shapes for the extrapolation: (hidden, intermediate, key/value width, gated MLP, blocks).
SHAPES = {
    "llama2-7b": (4096, 11008, 4096, True, 32),
    "llama2-70b": (8192, 28672, 1024, True, 80),
    "opt-175b": (12288, 49152, 12288, False, 96),
}


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def generate_llama(folder: Path, blocks: int) -> int:
    """A random Llama-2-7B-shaped bf16 checkpoint, one shard per block; returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA2_7B | {"num_hidden_layers": blocks}, dtype="bfloat16")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    total, weight_map = blocks + 1, {}
    for index in range(blocks + 1):
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        if index < blocks:
            prefix = f"model.layers.{index}."
            tensors = {f"{prefix}{layer}.weight": normal(*shape) for layer, shape in shapes.items()}
            tensors |= {f"{prefix}{norm}.weight": torch.ones(hidden, dtype=torch.bfloat16)
                        for norm in ("input_layernorm", "post_attention_layernorm")}
        else:
            tensors = {"model.embed_tokens.weight": normal(vocab, hidden), "lm_head.weight": normal(vocab, hidden),
                       "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        del tensors
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    return size


def peak_rss_kib() -> int:
    """This process's peak resident set since its exec (VmHWM)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0])


def child(model_dir: str, output: str, device: str | None, threads: int) -> dict:
    """One streamed compression in this process; everything measured is this process's own."""
    from secateurs.pipeline.engine import Engine
    from secateurs.pipeline.job import CompressionJob

    torch.set_num_threads(threads)

    started = time.perf_counter()
    job = CompressionJob(model_dir, output, stream=True)
    vocab = job.source.model.get_input_embeddings().num_embeddings
    calibration = torch.randint(0, vocab, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
    ends = []
    commit = job.partial.commit

    def timed_commit(*args):
        commit(*args)
        ends.append(time.perf_counter())
        log(f"block {len(ends) - 1} done at {ends[-1] - started:.0f} s")

    job.partial.commit = timed_commit
    forward_seconds = [0.0] * len(job.source.blocks)

    def timed(method, index_at: int):  # block forwards with statistics hooks (_gather) and without (_advance)
        def wrapper(engine, *args, **kwargs):
            began = time.perf_counter()
            result = method(engine, *args, **kwargs)
            forward_seconds[args[index_at]] += time.perf_counter() - began
            return result
        return wrapper

    Engine._gather, Engine._advance = timed(Engine._gather, 3), timed(Engine._advance, 2)  # (block, ..., index)
    report = job.run(RECIPE, calibration, device=device, progress=False)
    seconds = time.perf_counter() - started
    prefix = job.source.prefix
    sweeps = [sum(layer.seconds for layer in report.layers if layer.name.startswith(f"{prefix}.{index}."))
              for index in range(len(job.source.blocks))]
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {
        "blocks": len(job.source.blocks),
        "params": sum(p.numel() for p in job.source.model.parameters()),
        "peak_rss_mb": round(peak_rss_kib() / 1024, 1),
        "seconds": round(seconds, 1),
        "seconds_per_block": round((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0] - started, 2),
        "block_seconds": [round(b - a, 2) for a, b in zip([started] + ends, ends)],
        "sweep_seconds": [round(s, 2) for s in sweeps],
        "forward_seconds": [round(s, 2) for s in forward_seconds],
        "disk_written_mb": round(int(io["wchar"]) / 2**20, 1),
        "output_mb": round(sum(p.stat().st_size for p in Path(output).iterdir()) / 2**20, 1),
        "sparsity": report.as_dict()["totals"]["sparsity"],
        "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "threads": torch.get_num_threads(),
    }


def run_child(model_dir: Path, output: Path, device: str | None, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", str(model_dir), str(output), "--threads", str(threads)]
    command += ["--device", device] if device else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"child failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, scratch: Path, blocks: int, device: str | None, threads: int) -> dict | None:
    from secateurs.models import materialize_embedded

    if name == "llama2-7b-shape":
        full_size = 13.5e9 * blocks / 32
        free = shutil.disk_usage(scratch).free
        if free < 2.6 * full_size:  # input + output + activations and a temporary copy: 35 GB for 32 blocks
            log(f"{name}: skipped, {free / 1e9:.1f} GB free on {scratch}, {2.6 * full_size / 1e9:.0f} GB needed")
            return None
        started = time.perf_counter()
        size = generate_llama(scratch / "model", blocks)
        log(f"{name}: generated {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")
        model_dir = scratch / "model"
    else:
        model_dir = materialize_embedded({"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}[name])
    result = run_child(model_dir, scratch / "output", device, threads)
    log(f"{name}: {json.dumps(result)}")
    return {"model": name} | result


def layer_shapes(hidden: int, inter: int, kv: int, gated: bool) -> list[tuple[int, int]]:
    """(rows, columns) of a block's linear layers."""
    attention = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    mlp = [(inter, hidden), (inter, hidden), (hidden, inter)] if gated else [(inter, hidden), (hidden, inter)]
    return attention + mlp


def block_params(shape) -> int:
    return sum(rows * cols for rows, cols in layer_shapes(*shape[:4]))


def block_flops(shape, tokens: int) -> tuple[float, float]:
    """(sweeps, forwards + Hessians) FLOPs of one block on `tokens` calibration tokens.

    Sweep of a [rows, cols] layer: ~rows·cols² for the lazy-batch updates plus ~4/3·cols³ to factor
    the damped inverse Hessian (each layer factors its own). The engine runs the block forward twice
    (statistics, then the next block's inputs): 2 x 2·params·tokens; a Hessian costs 2·cols²·tokens
    per distinct input (q/k/v share one, so do gate/up). Attention scores (~seqlen/hidden of the
    projections) are left out."""
    hidden, inter, kv, gated, _ = shape
    sweeps = sum(rows * cols**2 + 4 / 3 * cols**3 for rows, cols in layer_shapes(hidden, inter, kv, gated))
    hessians = 2 * tokens * (3 * hidden**2 + inter**2)
    return sweeps, 2 * 2 * block_params(shape) * tokens + hessians


def extrapolate(run: dict) -> tuple[list[dict], dict]:
    """Hours per shape from the measured 7B-shape block: sweep time scales with sweep FLOPs,
    forward + Hessian time with their FLOPs, the rest (reading, writing, checkpoints) with the
    block's weights. Without a separate forward timing the 128 x 2048 column is left out."""
    tokens = SAMPLES * SEQLEN
    base = SHAPES["llama2-7b"]
    sweep_flops, compute_flops = block_flops(base, tokens)
    sweep_s = sum(run["sweep_seconds"]) / run["blocks"]
    compute_s = sum(run["forward_seconds"]) / run["blocks"] if "forward_seconds" in run else None
    other_s = run["seconds_per_block"] - sweep_s - (compute_s or 0)
    rows = []
    for name, shape in SHAPES.items():
        row = {"shape": name, "blocks": shape[-1]}
        weights_ratio = block_params(shape) / block_params(base)
        for label, calibration_tokens in (("16x256", tokens), ("128x2048", 128 * 2048)):
            if compute_s is None and calibration_tokens != tokens:
                row[f"hours_{label}"] = None
                continue
            sweeps, compute = block_flops(shape, calibration_tokens)
            seconds = sweeps / sweep_flops * sweep_s + other_s * weights_ratio
            seconds += compute / compute_flops * compute_s if compute_s is not None else 0
            row[f"hours_{label}"] = round(shape[-1] * seconds / 3600, 2)
        rows.append(row)
    rates = {"sweep_gflops": round(sweep_flops / sweep_s / 1e9, 1)}
    if compute_s is not None:
        rates["forward_hessian_gflops"] = round(compute_flops / compute_s / 1e9, 1)
    return rows, rates


def hours(value: float | None) -> str:
    return "n/a (no separate forward timing)" if value is None else f"{value:.2f}"


def write_results(runs: list[dict], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    path = results / "scale.json"
    previous = json.loads(path.read_text())["runs"] if path.is_file() else []
    merged = {(run["model"], run["blocks"], run["device"]): run for run in previous + runs}
    ordered = sorted(merged.values(), key=lambda run: (run["device"], -run["params"]))
    document = {"protocol": {"recipe": RECIPE, "calibration": f"{SAMPLES} x {SEQLEN} random token ids, seed 0",
                             "mode": "--stream"}, "runs": ordered}
    lines = ["# Scale: streamed SparseGPT 50%, 16 x 256 calibration tokens", "",
             "Written by benchmarks/scale.py (protocol in its docstring). CPU rows: one thread on a shared 2-core "
             "machine; a `note` in scale.json qualifies a row.", "",
             "| model | device | blocks | params | peak RSS (MiB) | seconds | s/block | sweeps s/block | disk written (MiB) | output (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in ordered:
        lines.append(f"| {run['model']} | {run['device']} ({run['threads']} threads) | {run['blocks']} | "
                     f"{run['params'] / 1e9:.2f} B | {run['peak_rss_mb']:.0f} | {run['seconds']:.0f} | "
                     f"{run['seconds_per_block']:.1f} | {sum(run['sweep_seconds']) / run['blocks']:.1f} | "
                     f"{run['disk_written_mb']:.0f} | {run['output_mb']:.0f} |")
    document["extrapolation"] = []
    for device in sorted({run["device"] for run in ordered}):
        measured = [run for run in ordered if run["model"] == "llama2-7b-shape" and run["device"] == device]
        if not measured:
            continue
        base = max(measured, key=lambda run: run["blocks"])
        rows, rates = extrapolate(base)
        document["extrapolation"].append({"from": f"llama2-7b-shape, {base['blocks']} blocks, {device}", **rates, "shapes": rows})
        lines += ["", f"Extrapolated from the {base['blocks']}-block 7B-shape run on {device} ({base['threads']} threads; "
                  f"measured GFLOP/s: {json.dumps(rates)}):", "",
                  "| shape | blocks | hours, 16 x 256 tokens | hours, 128 x 2048 tokens |", "|---|---|---|---|"]
        lines += [f"| {row['shape']} | {row['blocks']} | {hours(row['hours_16x256'])} | {hours(row['hours_128x2048'])} |"
                  for row in rows]
    path.write_text(json.dumps(document, indent=2) + "\n")
    (results / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama2-7b-shape", "smollm2", "gemma3"])
    parser.add_argument("--blocks", type=int, default=32, help="blocks of the 7B-shaped model (2 for a quick estimate)")
    parser.add_argument("--device", default=None)
    # One thread by default: on a shared machine a second OpenMP thread that has to wait for a busy
    # core made the SparseGPT sweep 12x slower, not 2x faster.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the compressing process")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for scale.json and scale.md")
    parser.add_argument("--scratch", default=None, help="folder for the generated checkpoint and outputs")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.threads)))
        return
    runs = []
    for name in args.models:
        scratch = Path(tempfile.mkdtemp(prefix="secateurs-scale-", dir=args.scratch))
        try:
            run = measure(name, scratch, args.blocks, args.device, args.threads)
        finally:  # the 13.5 GB checkpoint never outlives the benchmark
            shutil.rmtree(scratch, ignore_errors=True)
        if run is not None:
            runs.append(run)
            write_results(runs, args.results)
    if not runs:
        log("nothing measured")


if __name__ == "__main__":
    main()
