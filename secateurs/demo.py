"""`secateurs demo`: the main job on the embedded defaults, end to end in a few minutes.

SmolLM2-135M (dequantized from its 4-bit GGUF) is evaluated on the first tokens of *Persuasion*,
compressed with a recipe calibrated on the five other Austen novels, and evaluated again.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from secateurs.data.corpus import AUSTEN_EVAL, calibration_windows, load_text, tokenize
from secateurs.eval.perplexity import perplexity
from secateurs.formats import save_compressed
from secateurs.io import WEIGHTS_FILE
from secateurs.models import DEFAULT_MODEL, load_model
from secateurs.pipeline.engine import Engine

EVAL_SEQLEN = 512


def run_demo(args) -> dict:
    started = time.perf_counter()
    print(f"loading {DEFAULT_MODEL} (its GGUF's dequantized weights are the dense baseline)")
    loaded = load_model(DEFAULT_MODEL)
    evaluation = tokenize(loaded.tokenizer, load_text(AUSTEN_EVAL))
    print(f"dense perplexity on the first {args.eval_tokens} tokens of Persuasion (windows of {EVAL_SEQLEN}; "
          f"the benchmark protocol uses 40960, see benchmarks/quality.py)")
    dense = perplexity(loaded.model, evaluation, EVAL_SEQLEN, max_tokens=args.eval_tokens)
    calibration = calibration_windows(loaded.tokenizer, args.calib, args.samples, args.seqlen, args.seed)
    print(f"compressing with {args.recipe}: {args.samples} calibration windows x {args.seqlen} tokens "
          f"from {args.calib} (the papers use 128 x 2048)")
    report = Engine(loaded.model, args.recipe).run(calibration)
    with tempfile.TemporaryDirectory(prefix="secateurs-demo-") as scratch:
        # Sizes on disk: the compressed checkpoint (bitmask / N:M / packed integers) vs the dense
        # float32 file it came from.
        dense_mb = (Path(loaded.source) / WEIGHTS_FILE).stat().st_size / 2**20
        saved = save_compressed(loaded.model, report.storage_plan(), Path(scratch) / "compressed", loaded.tokenizer)
        compressed_mb = saved.file_bytes / 2**20
    compressed = perplexity(loaded.model, evaluation, EVAL_SEQLEN, max_tokens=args.eval_tokens)
    totals = report.as_dict()["totals"]
    rows = [
        ("dense fp32", dense.ppl, "", 0.0, dense_mb, "", dense.seconds),
        (args.recipe, compressed.ppl, f"{compressed.ppl - dense.ppl:+.2f}", totals["sparsity"], compressed_mb,
         f"{report.seconds:.1f}", compressed.seconds),
    ]
    print()
    print(f"{'model':<16}{'perplexity':>12}{'Δ':>9}{'sparsity':>10}{'size MB':>9}{'compress s':>12}{'eval s':>9}")
    for name, ppl, delta, sparsity, size, seconds, eval_seconds in rows:
        print(f"{name:<16}{ppl:>12.2f}{delta:>9}{sparsity:>10.3f}{size:>9.1f}{seconds:>12}{eval_seconds:>9.1f}")
    print(f"(size: model.safetensors on disk, {', '.join(sorted(set(saved.formats.values())))} layers; "
          "the float32 embedding is stored as is)")
    print(f"\n{dense.tokens_evaluated} tokens evaluated per model; total {time.perf_counter() - started:.0f} s")
    return {"dense_ppl": dense.ppl, "compressed_ppl": compressed.ppl, "report": totals}
