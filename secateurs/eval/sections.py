"""The report's sections beyond the variants table, each recognized by the rows of a results file:

  - sparse fine-tuning (benchmarks/results/finetune.json): rows with "loss" and "ppl_oneshot";
  - encoder pruning (obert.json): rows of "kind" run / accuracy / speed;
  - diffusion (diffusion.json): rows with "bits_per_weight" and "psnr";
  - vector quantization (vq.json): rows with "bits_per_weight" and "ppl", and its "decode" rows.

A section is a titled table (cells already formatted) with its plots as PNG bytes. Also home of the
cell formatting and matplotlib helpers the variants table shares.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field


@dataclass
class Section:
    title: str
    note: str
    header: list[str]
    rows: list[list[str]]
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (slug, caption, PNG)


def cell(value, kind: str = "str") -> str:
    """A table cell: "pct" (a fraction as %), "ppl", "float" (one decimal), "ratio" (two), "int"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "ppl":
        return f"{value:.1f}" if value < 1e4 else f"{value:.3g}"
    if kind == "float":
        return f"{value:.1f}"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "int":
        return f"{int(value):,}"
    return str(value)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def sections(rows: list[dict]) -> list[Section] | None:
    """The sections of a file's rows, or None when they are of none of the kinds above."""
    if all("loss" in r and "ppl_oneshot" in r for r in rows):
        return finetune_sections(rows)
    if all(r.get("kind") in ("run", "accuracy", "speed") and "method" in r for r in rows):
        return encoder_sections(rows)
    if all("bits_per_weight" in r and "psnr" in r for r in rows):
        return diffusion_sections(rows)
    if all(("bits_per_weight" in r and "ppl" in r) or (r.get("kind") == "decode" and "config" in r) for r in rows):
        return vq_sections(rows)
    return None


def _lines_by(points: dict, xlabel: str, ylabel: str, log: bool = False, reference: tuple | None = None):
    """One line per key of points {label: [(x, y)]}, a dashed horizontal reference (label, y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (label, values) in enumerate(sorted(points.items())):
        values = sorted(values)
        ax.plot([x for x, _ in values], [y for _, y in values], "o-", color=f"C{i}", label=label)
    if reference is not None:
        ax.axhline(reference[1], color="0.4", linestyle="--", linewidth=1, label=reference[0])
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


# ---- sparse fine-tuning ----

def finetune_sections(rows: list[dict]) -> list[Section]:
    """One table per training budget (largest first), with before/after perplexity bars."""
    budgets: dict[str, tuple[dict, list[dict]]] = {}  # by the budget's JSON: (the budget, its rows)
    for row in rows:
        budgets.setdefault(json.dumps(row.get("budget"), sort_keys=True), (row.get("budget") or {}, []))[1].append(row)
    made = []
    for budget, group in sorted(budgets.values(), key=lambda item: -(item[0].get("tokens") or 0)):
        header = ["variant", "loss", "QAT", "sparsity %", "tokens", "ppl one-shot", "ppl", "ppl dense fine-tuned",
                  "recovery r", "task mean %", "tokens/s"]
        table = [[r["variant"], r["loss"], "yes" if r.get("qat") else "no", cell(r.get("sparsity"), "pct"),
                  cell(r.get("tokens"), "int"), cell(r.get("ppl_oneshot"), "ppl"), cell(r.get("ppl"), "ppl"),
                  cell(r.get("ppl_dense_ft"), "ppl"), cell(r.get("recovery"), "ratio"), cell(r.get("task_mean"), "pct"),
                  cell(r.get("tokens_per_s"), "float")] for r in group]
        tokens = budget.get("tokens")
        title = "Sparse fine-tuning" + (f", {tokens:,} tokens" if tokens else "")
        note = ("Perplexity before (one-shot) and after fine-tuning with the mask held; "
                "r = (one-shot - after) / (one-shot - dense fine-tuned).")
        slug = f"finetune-{tokens or 'rows'}"
        figure = _finetune_bars(group)
        made.append(Section(title, note, header, table,
                            [(slug, f"{title}: perplexity one-shot and after", figure)] if figure else []))
    return made


def _finetune_bars(rows: list[dict]) -> bytes | None:
    trained = [r for r in rows if r["variant"] != "dense" and r["loss"] != "none" and r.get("ppl")]
    if not trained:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(trained) + 1.2))
    labels = [f"{r['variant']} {r['loss']}" + (" QAT" if r.get("qat") else "") for r in trained]
    positions = range(len(trained))
    ax.barh([p + 0.2 for p in positions], [r["ppl_oneshot"] for r in trained], height=0.4, color="C1", label="one-shot")
    ax.barh([p - 0.2 for p in positions], [r["ppl"] for r in trained], height=0.4, color="C0", label="fine-tuned")
    dense = next((r["ppl_dense_ft"] for r in trained if r.get("ppl_dense_ft")), None)
    if dense:
        ax.axvline(dense, color="0.4", linestyle="--", linewidth=1, label="dense fine-tuned")
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return png(fig)


# ---- encoder pruning ----

def encoder_sections(rows: list[dict]) -> list[Section]:
    made = []
    accuracy = [r for r in rows if r["kind"] == "accuracy"] or [r for r in rows if r["kind"] == "run"]
    if accuracy:
        header = ["method", "structure", "sparsity %", "quant", "KD", "accuracy %", "F1 %", "seeds", "epochs"]
        table, points, dense = [], {}, None
        for r in sorted(accuracy, key=lambda r: (r["method"], r.get("sparsity") or 0)):
            acc = r.get("accuracy", r.get("test_accuracy"))
            spread = f" ± {100 * r['accuracy_std']:.1f}" if r.get("accuracy_std") else ""
            table.append([r["method"], cell(r.get("structure")), cell(r.get("sparsity"), "pct"), cell(r.get("quant")),
                          "yes" if r.get("kd") else "no", cell(acc, "pct") + spread,
                          cell(r.get("f1", r.get("test_f1")), "pct"), cell(r.get("seeds", 1)), cell(r.get("epochs"))])
            if r["method"] == "dense":
                dense = acc
            elif acc is not None and r.get("structure", "unstructured") == "unstructured" and not r.get("quant"):
                points.setdefault(r["method"], []).append((100 * r["sparsity"], 100 * acc))
        figure = _lines_by(points, "sparsity (%)", "test accuracy (%)",
                           reference=("dense", 100 * dense) if dense is not None else None) if points else None
        made.append(Section("Encoder pruning: accuracy", "Test accuracy (mean over seeds, ± their standard deviation).",
                            header, table, [("encoder-accuracy", "Encoder accuracy against sparsity", figure)]
                            if figure else []))
    speed = [r for r in rows if r["kind"] == "speed"]
    for cpu in dict.fromkeys(r.get("cpu") for r in speed):
        group = [r for r in speed if r.get("cpu") == cpu]
        base = {(r.get("threads"), r.get("batch")): r.get("seq_per_s") for r in group
                if r.get("engine") == "torch" and r.get("dtype") == "fp32" and r["method"] == "dense"}
        header = ["threads", "batch", "engine", "model", "sequences/s", "vs torch fp32", "accuracy %", "kernel path"]
        table = []
        for r in group:
            sparsity = f"{100 * r['sparsity']:.0f}% " if r.get("sparsity") is not None else ""
            model = (f"{r['method']} {r.get('dtype', '')}" if r["method"] == "dense"
                     else f"{r['method']} {sparsity}{r.get('quant') or r.get('dtype', '')}")
            rate, reference = r.get("seq_per_s"), base.get((r.get("threads"), r.get("batch")))
            table.append([cell(r.get("threads")), cell(r.get("batch")), cell(r.get("engine")), model.strip(),
                          cell(rate, "float"), cell(rate / reference if rate and reference else None, "ratio"),
                          cell(r.get("accuracy"), "pct"), cell(r.get("isa"))])
        made.append(Section(f"Encoder speed ({cpu})", f"Sequence length {group[0].get('seqlen', '?')}.", header, table))
    return made


# ---- bits against quality ----

def diffusion_sections(rows: list[dict]) -> list[Section]:
    made = []
    for model in dict.fromkeys(r.get("model") for r in rows):
        group = [r for r in rows if r.get("model") == model]
        header = ["method", "config", "bits/weight", "PSNR dB", "rel. L2", "FD", "class acc %"]
        table = [[r["method"], cell(r.get("config")), cell(r["bits_per_weight"], "ratio"), cell(r.get("psnr"), "ratio"),
                  cell(r.get("rel_l2"), "ratio"), cell(r.get("fid"), "float"), cell(r.get("class_acc"), "pct")]
                 for r in group]
        points: dict[str, list] = {}
        for r in group:
            if r.get("psnr") is not None:
                points.setdefault(r["method"], []).append((r["bits_per_weight"], r["psnr"]))
        figure = _lines_by(points, "bits per weight", "PSNR against the dense model (dB)") if points else None
        made.append(Section(f"Diffusion: {model}", "Quality against the dense model at the stored bits per weight.",
                            header, table, [(f"diffusion-{model}", f"{model}: PSNR against bits per weight", figure)]
                            if figure else []))
    return made


def vq_sections(rows: list[dict]) -> list[Section]:
    made = []
    quality = [r for r in rows if "bits_per_weight" in r]
    if quality:
        header = ["model", "engine", "method", "config", "bits/weight", "ppl", "block fine-tuned"]
        table = [[cell(r.get("model")), cell(r.get("engine")), r["method"], cell(r.get("config")),
                  cell(r["bits_per_weight"], "ratio"), cell(r["ppl"], "ppl"), "yes" if r.get("block_finetune") else "no"]
                 for r in sorted(quality, key=lambda r: (r.get("engine", ""), r["method"], r["bits_per_weight"]))]
        points: dict[str, list] = {}
        for r in quality:
            if r.get("ppl"):
                points.setdefault(f"{r.get('engine', '')} {r['method']}".strip(), []).append((r["bits_per_weight"], r["ppl"]))
        figure = _lines_by(points, "bits per weight", "perplexity", log=True) if points else None
        made.append(Section("Quantization: bits against perplexity", "Bits count everything stored for the linear layers.",
                            header, table, [("vq-bits", "Perplexity against bits per weight", figure)] if figure else []))
    decode = [r for r in rows if r.get("kind") == "decode"]
    if decode:
        header = ["model", "engine", "method", "config", "threads", "kernel path", "decode tok/s"]
        table = [[cell(r.get("model")), cell(r.get("engine")), r["method"], cell(r.get("config")), cell(r.get("threads")),
                  cell(r.get("kernel_path")), cell(r.get("decode_tok_s"), "float")] for r in decode]
        made.append(Section("Quantization: decode speed", "Batch 1, tokens per second.", header, table))
    return made
