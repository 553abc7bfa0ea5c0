"""Fine-tuning step throughput on this CPU: SmolLM2-135M at 50% sparsity (SparseGPT-free magnitude
mask: the step's cost does not depend on which weights are kept), SquareHead + CE against the dense
teacher, batch 4 x 512 tokens, AdamW with mask enforcement, in float32 and under bf16 autocast.
Answers the fine-tuning issue's question "does bf16 autocast pay on this CPU?" (a Zen 3 has no
native bf16; a Zen 5 has AVX512-BF16).

Each configuration runs STEPS optimizer steps after WARMUP untimed ones, with every thread torch
has (2 here) and nothing else running (`uptime` in the row). Rows of other CPUs are kept.

    .venv/bin/python benchmarks/train_speed.py     -> benchmarks/results/train_speed.{json,md}
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import PROTOCOL, cpu_features, cpu_name, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "train_speed.json"
BATCH, SEQLEN, WARMUP, STEPS = 4, 512, 1, 3


def measure(bf16: bool) -> dict:
    import torch

    from secateurs.algorithms.magnitude import magnitude_mask
    from secateurs.data.corpus import load_text, tokenize
    from secateurs.models import load_model
    from secateurs.training.losses import LossWeights
    from secateurs.training.masks import block_linear_layers, masks_from_zeros
    from secateurs.training.trainer import TrainConfig, Trainer

    loaded = load_model(PROTOCOL["model"])
    teacher = copy.deepcopy(loaded.model).eval()
    model = loaded.model
    with torch.no_grad():
        for module in block_linear_layers(model).values():
            module.weight.mul_(magnitude_mask(module.weight, 0.5))
    data = tokenize(loaded.tokenizer, load_text(PROTOCOL["calib"]))
    timings = []
    for steps in (WARMUP, WARMUP + STEPS):  # the difference of two runs from the same start: steps alone
        student = copy.deepcopy(model)
        config = TrainConfig(lr=1e-5, steps=steps, batch_size=BATCH, seqlen=SEQLEN, seed=0, bf16=bf16,
                             losses=LossWeights.named("squarehead"), checkpoint_every=0)
        started = time.perf_counter()
        Trainer(student, data, config, teacher=teacher, masks=masks_from_zeros(student), progress=False).train()
        timings.append(time.perf_counter() - started)
    seconds = (timings[1] - timings[0]) / STEPS
    return {"model": PROTOCOL["model"], "loss": "squarehead", "sparsity": 0.5, "bf16": bf16, "batch": BATCH,
            "seqlen": SEQLEN, "steps": STEPS, "seconds_per_step": seconds, "tokens_per_s": BATCH * SEQLEN / seconds,
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "uptime": os.getloadavg(),
            **cpu_features()}


def same_cpu(a: dict, b: dict) -> bool:
    """Rows measured before the AMX/model fields existed came from CPUs without AMX."""
    return (a["cpu"], a["cpu_bf16"], a.get("cpu_amx", False)) == (b["cpu"], b["cpu_bf16"], b.get("cpu_amx", False))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autocast", nargs="+", choices=["float32", "bf16"], default=["float32", "bf16"],
                        help="which to measure (each row is written as soon as it is measured)")
    args = parser.parse_args()
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    for kind in args.autocast:
        row = measure(kind == "bf16")
        print(f"[train_speed] bf16={row['bf16']}: {row['tokens_per_s']:.1f} tokens/s ({row['seconds_per_step']:.1f} s/step)")
        rows = [r for r in rows if not (same_cpu(r, row) and r["bf16"] == row["bf16"])] + [row]
        write_json(JSON_PATH, rows)
        write_markdown(rows)


def write_markdown(rows: list[dict]) -> None:
    lines = ["Fine-tuning step throughput: SmolLM2-135M at 50% sparsity, SquareHead + CE with the dense teacher, "
             f"batch {BATCH} x {SEQLEN}, AdamW with masks enforced (benchmarks/train_speed.py).", "",
             "| CPU | family/model | native bf16 | AMX | threads | autocast | tokens/s | s/step | vs float32 | load average |",
             "|---|---|---|---|---:|---|---:|---:|---:|---|"]
    for row in rows:
        base = next((r for r in rows if same_cpu(r, row) and not r["bf16"]), None)
        ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        lines.append(f"| {row['cpu']} | {row.get('cpu_model', 'not recorded')} | {'yes' if row['cpu_bf16'] else 'no'} | "
                     f"{'yes' if row.get('cpu_amx') else 'no'} | {row['threads']} | "
                     f"{'bf16' if row['bf16'] else 'float32'} | {row['tokens_per_s']:.1f} | {row['seconds_per_step']:.1f} | "
                     f"{ratio} | {', '.join(f'{v:.2f}' for v in row['uptime'])} |")
    (RESULTS / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
