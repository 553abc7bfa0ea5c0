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

llama.cpp rows (`--llama-cpp`): the i-quants and low-bit k-quants scripts/llama_cpp.sh makes of the
same float32 model with an importance matrix from the same 64 calibration windows (IQ2_XS, IQ3_XXS,
Q2_K, Q3_K_S, Q4_K_S), scored by our perplexity code on the GGUF dequantized (gguf-py dequantizes
i-quants), bits per weight measured from the GGUF's tensor bytes over the same linear layers we
count (llama.cpp's 256-wide super-blocks do not fit SmolLM2's 576-wide rows, so those tensors fall
back to other types: each row lists the types it holds). With `--decode`, llama-bench times them in
the same run as our decode path (the decode benchmark's protocol: 32-token prompt, 128 new tokens).

Rows are cached in benchmarks/results/vq.json; a rerun fills in missing rows (`--only CONFIG`).
`--block-steps N` makes the rows with block fine-tuning: after a block's layers are coded, N Adam
steps on their codebooks and scales against the dense block's outputs (one calibration chunk of 4
windows a step, so 32 steps are two passes over the 64 windows). `--finetune-tokens N` then
fine-tunes the coded model end to end (AQLM's global fine-tuning: codes fixed; codebooks, scales
and norms trained with KL to the dense model on N tokens of the calibration text, batch 4 x 512,
lr 1e-4, `secateurs finetune`), resumable from its checkpoints.

    nice .venv/bin/python benchmarks/vq.py [--only 2x8g8 ...] [--rounds N] [--block-steps N] [--llama-cpp] [--decode]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py is a sibling script, not a package
from quality import JSON_PATH as QUALITY_JSON
from quality import PROTOCOL, _calibration_and_eval, _run_child, cpu_name, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "vq.json"
# name -> (codebooks, bits per codebook, group size)
CONFIGS = {"2x8g8": (2, 8, 8), "3x8g8": (3, 8, 8), "4x8g8": (4, 8, 8)}
SCALAR_ROWS = ("gptq-w2g64", "gptq-w3g64", "gptq-w4g64", "rtn-w2g64", "rtn-w3g64", "rtn-w4g64")


# How the engine's VQ starts its codes (algorithms.vq's `init`): "sweep" (error feedback, the default
# since vq_sweep.py) or "kmeans" (nearest codewords: every row measured before it, whose rows carry no
# "init" key).
CODE_INIT = "sweep"


def row_init(row: dict) -> str:
    return row.get("init", "kmeans")


def output_dir(config: str, rounds: int, block_steps: int = 0) -> Path:
    from secateurs.models import cache_dir

    suffix = ("" if CODE_INIT == "kmeans" else f"-{CODE_INIT}") + (f"-tuned{block_steps}" if block_steps else "")
    return cache_dir() / "vq-bench" / f"{PROTOCOL['model']}-vq-{config}-r{rounds}{suffix}"


def recipe(config: str, rounds: int, block_steps: int = 0) -> list:
    """The vq stage; block_steps > 0: each block's codebooks and scales then take that many Adam
    steps against the dense block's outputs, one calibration chunk (4 windows) a step."""
    books, bits, group = CONFIGS[config]
    tuning = {"block_steps": block_steps} if block_steps else {}
    return [{"vq": {"codebooks": books, "bits": bits, "group_size": group, "rounds": rounds} | tuning}]


def quantized_bits(model, config: str) -> float:
    """Bits per weight over the decoder blocks' linear layers: codes + codebooks + scales."""
    from secateurs.algorithms import VQSpec, vq_bits
    from secateurs.structure import find_blocks, linear_layers

    spec = VQSpec(*CONFIGS[config])
    _, blocks = find_blocks(model)
    counts = [vq_bits(*module.weight.shape, spec) for block in blocks for module in linear_layers(block).values()]
    return sum(c.total for c in counts) / sum(c.weights for c in counts)


FINETUNE = {"lr": 1e-4, "batch_size": 4, "seqlen": 512, "checkpoint_every": 10}  # the --finetune-tokens rows


def finetuned_dir(target: Path, tokens: int) -> Path:
    return target.with_name(f"{target.name}-ft{tokens}")


def finetune_vq(target: Path, tokens: int) -> tuple[Path, float]:
    """AQLM's end-to-end fine-tuning of the coded model at `target`: codes fixed, codebooks, scales and
    norms trained for `tokens` calibration-text tokens with KL to the dense model (secateurs
    finetune); checkpoints every 10 steps, so a killed run continues. Returns (its directory, seconds)."""
    from secateurs.training.finetune import finetune
    from secateurs.training.losses import LossWeights
    from secateurs.training.trainer import TrainConfig

    tuned = finetuned_dir(target, tokens)
    record = tuned.with_name(tuned.name + ".json")  # beside the directory: its files are checksummed
    if (tuned / "config.json").is_file():
        return tuned, json.loads(record.read_text())["seconds"]
    config = TrainConfig(tokens=tokens, losses=LossWeights.named("kl"), **FINETUNE)
    started = time.perf_counter()
    training = tuned.with_name(tuned.name + ".training")
    finetune(target, tuned, config, teacher=PROTOCOL["model"], data=PROTOCOL["calib"], resume=training.is_dir())
    seconds = time.perf_counter() - started
    write_json(record, {"seconds": seconds, "config": config.as_dict() | {"losses": "kl"}})
    return tuned, seconds


def worker(config: str, rounds: int, block_steps: int = 0, finetune_tokens: int = 0, integer: bool = False) -> dict:
    import torch

    import secateurs
    from secateurs.eval.perplexity import perplexity
    from secateurs.models import load_model

    loaded = load_model(PROTOCOL["model"])
    calibration, evaluation = _calibration_and_eval(loaded.tokenizer)
    bits = quantized_bits(loaded.model, config)
    target = output_dir(config, rounds, block_steps)
    started = time.perf_counter()
    if not (target / "config.json").is_file():
        # by name, not the loaded model: a killed run resumes from its partial folder
        secateurs.oneshot(PROTOCOL["model"], recipe(config, rounds, block_steps), calibration, target,
                          resume=target.with_name(target.name + ".partial").is_dir())
    seconds = time.perf_counter() - started
    resumed = seconds < 60  # compressed earlier (a finished or resumed run): its own time is in compression.json
    scored, finetuned = target, {}
    if finetune_tokens:
        scored, tune_seconds = finetune_vq(target, finetune_tokens)
        finetuned = {"finetune_tokens": finetune_tokens, "finetune_seconds": tune_seconds, "finetune": FINETUNE | {"loss": "kl"}}
    model = secateurs.load(scored)
    if integer:  # scored as it decodes on int8 codebooks and int8 activations
        from secateurs.runtime import use_integer_vq

        use_integer_vq(model)
    ppl = perplexity(model, evaluation, PROTOCOL["eval_seqlen"], max_tokens=PROTOCOL["eval_tokens"], progress=False)
    report = json.loads((target / "compression.json").read_text())
    seconds = report["totals"]["seconds"] if resumed else seconds
    return {"bits_per_weight": bits, "ppl": ppl.ppl, "eval_tokens": ppl.tokens_evaluated, "seconds": seconds,
            "peak_rss_note": "of the scoring process only" if resumed else "compression and scoring",
            "compression_seconds": report["totals"]["seconds"], "threads": torch.get_num_threads(),
            "layer_loss": report["totals"]["loss"], "integer": integer} | finetuned


LLAMA_TYPES = ("IQ2_XS", "IQ3_XXS", "Q2_K", "Q3_K_S", "Q4_K_S")
LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_ggufs() -> list[dict]:
    """The importance-matrix GGUFs of the protocol's model that scripts/llama_cpp.sh made."""
    import llama_cpp

    if not llama_cpp.available():
        print(f"[vq] llama.cpp is not built: {llama_cpp.BUILD_HINT}", flush=True)
        return []
    return [e for e in llama_cpp.cached_ggufs(include_original=False)
            if e["model"] == PROTOCOL["model"] and e["type"] in LLAMA_TYPES and e.get("imatrix")]


def gguf_linear_bits(path: str) -> tuple[float, dict[str, int]]:
    """(bits per weight, tensors per stored type) over the decoder blocks' linear layers of a GGUF,
    from the bytes each tensor takes in the file."""
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(path).tensors
               if t.name.startswith("blk.") and t.name.split(".")[-2] in LINEAR_TENSORS]
    types: dict[str, int] = {}
    for tensor in tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return sum(int(t.n_bytes) * 8 for t in tensors) / sum(int(t.n_elements) for t in tensors), types


def llama_worker(path: str) -> dict:
    """Our perplexity of a GGUF, dequantized to float32."""
    import llama_cpp

    from secateurs.eval.perplexity import perplexity

    loaded = llama_cpp.gguf_perplexity_model(path)
    _, evaluation = _calibration_and_eval(loaded.tokenizer)
    started = time.perf_counter()
    ppl = perplexity(loaded.model, evaluation, PROTOCOL["eval_seqlen"], max_tokens=PROTOCOL["eval_tokens"], progress=False)
    return {"ppl": ppl.ppl, "eval_tokens": ppl.tokens_evaluated, "eval_seconds": time.perf_counter() - started}


def store(new_rows: list[dict], replaces=lambda row: False) -> list[dict]:
    """The results file read again (a row takes minutes to hours, and another pass may have written
    it meanwhile), less the rows `replaces` picks and quality.json's scalar rows, plus `new_rows`
    and the scalar rows as they are now; written back and returned."""
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    rows = [r for r in rows if r.get("source") != "quality.json" and not replaces(r)] + new_rows + scalar_rows()
    write_json(JSON_PATH, rows)
    return rows


def llama_rows(rows: list[dict]) -> list[dict]:
    """rows plus a quality row for every importance-matrix GGUF not scored yet (each stored as it
    finishes)."""
    for entry in llama_ggufs():
        if any(r["engine"] == "llama.cpp" and r["method"] == entry["type"] and r.get("kind") != "decode" for r in rows):
            continue
        print(f"[vq] llama.cpp {entry['type']}: perplexity of the dequantized GGUF", flush=True)
        bits, types = gguf_linear_bits(entry["path"])
        result, rss = _run_child([sys.executable, __file__, "--llama-worker", entry["path"]])
        rows = store([{"model": PROTOCOL["model"], "engine": "llama.cpp", "method": entry["type"], "config": "imatrix",
                       "bits_per_weight": bits, "linear_types": types, "block_finetune": False, "seconds": None,
                       "decode_tok_s": None, "cpu": cpu_name(), "peak_rss_mb": rss, "gguf_mb": entry["size_mb"],
                       "made_by": entry.get("made_by")} | result])
    return rows


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


def decode_rows(configs: list[str], rounds: int, threads=(1, 2), repeat: int = 7, with_llama: bool = False,
                integer: bool = False) -> list[dict]:
    """Decode tokens/s of the VQ models and, as the baseline measured in the same run, the dense
    model, on our C++ decode path (int8 embeddings; 32-token prompt of Persuasion, 128 new tokens,
    median of `repeat` interleaved rounds; with `integer` each VQ model also on int8 codebooks and
    activations), and with_llama llama-bench on the importance-matrix GGUFs and Q4_1 (after
    32 tokens of context, like ours). Run on a quiet machine: `uptime` goes into every row."""
    import os
    import statistics

    import torch

    import secateurs
    from secateurs.eval.speed import bench_prompt, time_decode_path
    from secateurs.models import load_model
    from secateurs.runtime.decode import DecodeModel

    dense = load_model(PROTOCOL["model"])
    models = {("dense", "fp32"): dense.model}
    for config in configs:
        if (output_dir(config, rounds) / "config.json").is_file():
            models[("vq", config)] = secateurs.load(output_dir(config, rounds))
            if integer:  # the same model, read once, its copy on integer codebooks
                import copy

                from secateurs.runtime import use_integer_vq

                models[("vq-int8", config)] = copy.deepcopy(models[("vq", config)])
                use_integer_vq(models[("vq-int8", config)])
        else:
            models[("vq", f"{config} (codes not fitted)")] = unfitted_vq_model(config)
    prompt = bench_prompt(dense.tokenizer, 32)

    def ours(decoder, count):
        decoder.set_threads(count)
        torch.set_num_threads(count)
        decoder.generate(prompt[:8], 8, eos=None)  # warm: the thread pool and the caches
        return time_decode_path(decoder, prompt, 128)["decode_tokens_per_second"]

    # Every row is timed once per round, rounds in turn, so a slow spell of this VM (process-to-
    # process differences up to 1.8x) falls on every row alike rather than on one engine's block.
    timed = []  # (row fields, a function returning tok/s)
    for (method, config), model in models.items():
        decoder = DecodeModel.from_model(model, embeddings="int8", max_length=32 + 128)
        for count in threads:
            timed.append(({"engine": "secateurs", "method": method, "config": config, "threads": count,
                           "kernel_path": decoder.kernel_path}, lambda decoder=decoder, count=count: ours(decoder, count)))
    if with_llama:
        import llama_cpp

        for entry in llama_ggufs() + [e for e in llama_cpp.cached_ggufs() if e["model"] == PROTOCOL["model"]
                                      and e["type"] == "Q4_1" and e.get("origin") != "original"]:
            for count in threads:
                timed.append(({"engine": "llama.cpp", "method": entry["type"], "config": "imatrix" if entry.get("imatrix") else "",
                               "threads": count, "kernel_path": "llama.cpp"},
                              lambda path=entry["path"], count=count: llama_cpp.run_llama_bench(
                                  path, count, 32, 128, repeat=1, depth=32)["decode_tok_s"]))
    speeds = [[] for _ in timed]
    for round_number in range(repeat):
        for (fields, timer), measured in zip(timed, speeds):
            measured.append(timer())
        print(f"[vq] decode round {round_number + 1}/{repeat} done", flush=True)
    rows = []
    for (fields, _), measured in zip(timed, speeds):
        rows.append({"model": PROTOCOL["model"], **fields, "kind": "decode", "decode_tok_s": statistics.median(measured),
                     "decode_tok_s_rounds": measured, "rounds_interleaved": repeat,
                     "cpu": cpu_name(), "uptime": os.getloadavg()})
        print(f"[vq] decode {fields['engine']} {fields['method']} {fields['config']} threads {fields['threads']}: "
              f"{rows[-1]['decode_tok_s']:.1f} tok/s (rounds {', '.join(f'{v:.1f}' for v in measured)})", flush=True)
    return rows


def unfitted_vq_model(config: str):
    """The model with every block linear layer as a VQLinear of `config` whose codes, codebooks and
    scales are random: for decode speed only, where no compressed model of that config is cached
    (the lookup kernel does the same work whatever the codes; its perplexity is meaningless)."""
    import copy

    import torch

    from secateurs.models import load_model
    from secateurs.runtime import VQLinear
    from secateurs.structure import find_blocks, linear_layers

    books, bits, group = CONFIGS[config]
    model = copy.deepcopy(load_model(PROTOCOL["model"]).model)
    generator = torch.Generator().manual_seed(0)
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, module in linear_layers(block).items():
            rows, cols = module.weight.shape
            codes = torch.randint(0, 2**bits, (rows, cols // group, books), generator=generator)
            codebooks = torch.randn(books, 2**bits, group, generator=generator) * 0.02
            parent, _, attribute = name.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            setattr(owner, attribute, VQLinear(codes, codebooks, torch.ones(rows), module.bias))
    return model


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | method | config | codes start | rounds | bits/weight | block fine-tune | ppl | compress s | peak RSS MB |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for row in sorted((r for r in rows if r.get("kind") != "decode"), key=lambda r: (r["bits_per_weight"], r["method"])):
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f}"
        rss = "" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}"
        start = row_init(row) if row["method"] == "vq" else ""
        config = row["config"] + (" (" + ", ".join(f"{k} x{v}" for k, v in row["linear_types"].items()) + ")"
                                  if row.get("linear_types") else "")
        lines.append(f"| {row['engine']} | {row['method']} | {config} | {start} | {row.get('rounds', '')} | "
                     f"{row['bits_per_weight']:.3f} | "
                     f"{tuning(row)} | {row['ppl']:.2f} | {seconds} | {rss} |")
    decode = [r for r in rows if r.get("kind") == "decode"]
    if decode:
        lines += ["", "| engine | decode path | config | threads | tok/s | kernel path | CPU | load average |",
                  "|---|---|---|---:|---:|---|---|---|"]
        lines += [f"| {r['engine']} | {r['method']} | {r['config']} | {r['threads']} | {r['decode_tok_s']:.1f} | "
                  f"{r['kernel_path']} | {r.get('cpu') or ''} | {', '.join(f'{v:.2f}' for v in r['uptime'])} |"
                  for r in decode]
    return "\n".join(lines) + "\n"


def tuning(row: dict) -> str:
    block = "no" if not row["block_finetune"] else f"{row['block_steps']} steps" if row.get("block_steps") else "yes"
    return (block + (f" + end to end {row['finetune_tokens']:,} tokens" if row.get("finetune_tokens") else "")
            + ("; scored on int8 codebooks + int8 activations" if row.get("integer") else ""))


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, marker in (("vq", "o"), ("gptq", "s"), ("rtn", "^")):
        points = sorted((r["bits_per_weight"], r["ppl"]) for r in rows if r["method"] == method and r.get("kind") != "decode")
        if points:
            axis.plot(*zip(*points), marker=marker, label=method)
    llama = sorted((r["bits_per_weight"], r["ppl"], r["method"]) for r in rows
                   if r["engine"] == "llama.cpp" and r.get("kind") != "decode")
    if llama:
        axis.plot([b for b, _, _ in llama], [p for _, p, _ in llama], "x", color="black", label="llama.cpp (imatrix)")
        for bits, ppl, name in llama:
            axis.annotate(name, (bits, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
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
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=["2x8g8"],
                        help="VQ configs to run (none: only the llama.cpp or decode rows asked for)")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of code search and codebook steps")
    parser.add_argument("--block-steps", type=int, default=0,
                        help="block fine-tuning after each block is coded: Adam steps on its codebooks and scales")
    parser.add_argument("--finetune-tokens", type=int, default=0,
                        help="then fine-tune the coded model end to end (codes fixed, KL to the dense model) on this many "
                             "calibration-text tokens")
    parser.add_argument("--decode", action="store_true",
                        help="time the decode path instead of compressing (a quiet machine only)")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="add llama.cpp's importance-matrix GGUFs (scripts/llama_cpp.sh makes them)")
    parser.add_argument("--integer", action="store_true",
                        help="score (and with --decode, also time) the VQ models on int8 codebooks and int8 activations")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--llama-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds, args.block_steps, args.finetune_tokens, args.integer)))
        return
    if args.llama_worker:
        print(json.dumps(llama_worker(args.llama_worker)))
        return
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    if args.llama_cpp and not args.decode:  # quality rows; a --decode pass only times
        rows = llama_rows(rows)
    if args.decode:  # a timing pass: no compression in it (an uncompressed config is timed unfitted)
        timed = decode_rows(args.only, args.rounds, with_llama=args.llama_cpp, integer=args.integer)
        same_machine = {(r["cpu"], r["kernel_path"]) for r in timed} | {(timed[0]["cpu"], "llama.cpp")}
        rows = store(timed, lambda r: r.get("kind") == "decode" and (r.get("cpu"), r.get("kernel_path")) in same_machine)
    for config in [] if args.decode else args.only:
        if any(r["method"] == "vq" and r["config"] == config and r.get("rounds") == args.rounds and r.get("kind") != "decode"
               and row_init(r) == CODE_INIT and r.get("block_steps", 0) == args.block_steps
               and r.get("finetune_tokens", 0) == args.finetune_tokens and r.get("integer", False) == args.integer
               for r in rows):
            continue
        print(f"[vq] {config}, {args.rounds} rounds, block fine-tuning {args.block_steps} steps, "
              f"end-to-end fine-tuning {args.finetune_tokens} tokens", flush=True)
        result, rss = _run_child([sys.executable, __file__, "--worker", config, "--rounds", str(args.rounds),
                                  "--block-steps", str(args.block_steps), "--finetune-tokens", str(args.finetune_tokens)]
                                 + (["--integer"] if args.integer else []))
        rows = store([{"model": PROTOCOL["model"], "engine": "secateurs", "method": "vq", "config": config,
                       "rounds": args.rounds, "init": CODE_INIT, "block_finetune": args.block_steps > 0,
                       "block_steps": args.block_steps, "decode_tok_s": None, "cpu": cpu_name(), "peak_rss_mb": rss}
                      | result])
    rows = store([])
    (RESULTS / "vq-table.md").write_text(markdown(rows))
    plot(rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
