"""A report a person reads at a glance: one self-contained HTML file (or markdown) from result files.

Inputs are the JSON files the benchmarks and the engine write, recognized by their content:
  - task rows (benchmarks/results/tasks.json: rows with "task", "variant", "acc");
  - quality rows (benchmarks/results/quality.json: rows with "row", "method", "ppl");
  - decode rows (benchmarks/results/decode.json: {"rows": [... "decode_tok_s" ...]});
  - compression reports (compression.json: {"layers": [{"name", "loss", ...}]});
  - fine-tuning, encoder, diffusion and vector quantization rows (eval/sections.py), each a section.
The HTML embeds its plots as base64 PNGs and its style inline: nothing is fetched when it opens. The
markdown writes the same tables, its plots as PNG files beside it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.eval.sections import Section, cell, png, pyplot, sections
from secateurs.io import check_writable, replace_atomically, write_text

TASK_COLUMNS = ("lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")
_NM = re.compile(r"-(\d+)of(\d+)")
_LEVEL = re.compile(r"-(\d+)(?:-|$)")
_BITS = re.compile(r"w(\d+)g(\d+)")
_BLOCK = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


@dataclass
class Results:
    tasks: list[dict] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    compressions: dict[str, list[dict]] = field(default_factory=dict)  # label -> layers
    sections: list[Section] = field(default_factory=list)


def _classify(path: Path, data, results: Results) -> None:
    rows = data.get("rows") if isinstance(data, dict) else data
    if isinstance(data, dict) and isinstance(data.get("layers"), list):
        if not all(isinstance(layer, dict) and "name" in layer for layer in data["layers"]):
            raise SecateursError(f"{path}: its \"layers\" entries need a \"name\"")
        label = path.parent.name if path.name == "compression.json" else path.stem
        results.compressions[label] = data["layers"]
    elif isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows):
        if all("task" in row and "variant" in row for row in rows):
            results.tasks += rows
        elif all("row" in row and "ppl" in row for row in rows):
            results.quality += rows
        elif (found := sections(rows)) is not None:
            results.sections += found
        elif any("decode_tok_s" in row for row in rows):
            results.decode += [row for row in rows if "decode_tok_s" in row]
        else:
            raise SecateursError(f"{path}: rows of an unknown kind (expected task, quality, decode, fine-tuning, "
                                 "encoder, diffusion or quantization results)")
    else:
        raise SecateursError(f"{path}: not a results file (task/quality/decode rows or a compression report)")


def load_results(paths) -> Results:
    """Read and sort result files by kind; an unreadable or unknown file is one SecateursError."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise SecateursError("report needs at least one results file")
    results = Results()
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SecateursError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SecateursError(f"{path}: not readable JSON ({exc})") from None
        _classify(path, data, results)
    return results


# ---- the variants table ----

def describe(name: str, quality_row: dict | None = None) -> dict:
    """Method, sparsity, pattern and bits of a variant: from its quality row, else from its name
    ("sparsegpt-50", "wanda-2of4", "gptq-w4g64", "sparsegpt-50-w4g64")."""
    if quality_row is not None:
        return {key: quality_row.get(key) for key in ("method", "sparsity", "pattern", "bits", "group_size")}
    method = name.split("-")[0]
    info = {"method": method, "sparsity": 0.0 if name.startswith("dense") else None, "pattern": "unstructured",
            "bits": None, "group_size": None}
    if match := _NM.search(name):
        info["sparsity"], info["pattern"] = int(match[1]) / int(match[2]), f"{match[1]}:{match[2]}"
    elif (match := _LEVEL.search(name)) and not name[match.start() + 1 :].startswith("w"):
        info["sparsity"] = int(match[1]) / 100
    if match := _BITS.search(name):
        info["bits"], info["group_size"] = int(match[1]), int(match[2])
    return info


def _main_subset(rows: list[dict]):
    """The subset most task rows share (whole sets, None, win ties): one comparable set of numbers."""
    counts: dict = {}
    for row in rows:
        counts[row["subset"]] = counts.get(row["subset"], 0) + 1
    return max(counts, key=lambda s: (counts[s], s is None)) if counts else None


def variant_table(results: Results) -> tuple[list[str], list[dict]]:
    """(task columns present, one dict per variant), our engine's task rows on their main subset."""
    ours = [row for row in results.tasks if row.get("engine", "secateurs") == "secateurs"]
    # one model per table (the first one's rows); quality.py rows carry no model name: they are of the
    # tasks' model, else of the first decode model
    models = [row["model"] for row in ours if "model" in row] + [row["model"] for row in results.decode if "model" in row]
    model = models[0] if models else None
    ours = [row for row in ours if row.get("model", model) == model]
    subset = _main_subset(ours)
    ours = [row for row in ours if row["subset"] == subset]
    quality = {row["row"]: row for row in results.quality if row.get("engine", "secateurs") == "secateurs"}
    decode = {}  # per variant, the run with the most threads
    for row in results.decode:
        ours_decode = row.get("engine", "secateurs") == "secateurs" and row.get("model") == model
        if ours_decode and row.get("threads", 0) >= decode.get(row["variant"], {}).get("threads", 0):
            decode[row["variant"]] = row
    names = list(dict.fromkeys([row["variant"] for row in ours] + list(quality)))
    columns = [task for task in TASK_COLUMNS if any(row["task"] == task for row in ours)]
    table = []
    for name in names:
        accs = {row["task"]: row["acc"] for row in ours if row["variant"] == name}
        speed = decode.get(name) or (decode.get("dense-fp32") if name == "dense" else None)
        size = (quality.get(name) or {}).get("file_bytes") or (speed or {}).get("weight_mb")
        size_mb = size / 2**20 if isinstance(size, int) and size > 10**5 else size
        table.append(describe(name, quality.get(name)) | {
            "variant": name, "ppl": (quality.get(name) or {}).get("ppl"), "accs": accs,
            "mean": sum(accs.values()) / len(accs) if accs else None, "tasks": len(accs),
            "decode_tok_s": (speed or {}).get("decode_tok_s"), "size_mb": size_mb, "subset": subset,
        })
    return columns, table


def _table_cells(columns: list[str], table: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "method", "sparsity", "pattern", "bits", "size MB", "ppl"] + columns + ["mean acc", "decode tok/s"]
    rows = []
    for entry in table:
        bits = entry["bits"] and f"{entry['bits']} (g{entry['group_size']})"
        rows.append([entry["variant"], cell(entry["method"], "str"), cell(entry["sparsity"], "pct"),
                     cell(entry["pattern"], "str"), cell(bits, "str"), cell(entry["size_mb"], "float"),
                     cell(entry["ppl"], "ppl")] + [cell(entry["accs"].get(c), "pct") for c in columns]
                    + [cell(entry["mean"], "pct") + (f" ({entry['tasks']})" if entry["mean"] is not None else ""),
                       cell(entry["decode_tok_s"], "float")])
    return header, rows


# ---- plots ----

def plot_vs_sparsity(table: list[dict], key: str, label: str, log: bool = False) -> bytes | None:
    """`key` against sparsity, one line per pruning method (unstructured), N:M variants as markers."""
    points: dict[str, list] = {}
    dense = next((e[key] for e in table if e["variant"] == "dense" and e[key] is not None), None)
    for entry in table:
        if entry[key] is None or entry["sparsity"] is None or entry["bits"] or entry["variant"] == "dense":
            continue
        points.setdefault((entry["method"], entry["pattern"]), []).append((entry["sparsity"], entry[key]))
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colors = {method: f"C{i}" for i, method in enumerate(sorted({method for method, _ in points}))}
    markers = dict(zip(sorted({pattern for _, pattern in points} - {"unstructured"}), "s^vDP*"))
    for (method, pattern), values in sorted(points.items()):
        values = sorted(values + ([(0.0, dense)] if dense is not None and pattern == "unstructured" else []))
        style = "o-" if pattern == "unstructured" else markers[pattern]
        ax.plot([100 * s for s, _ in values], [v if key == "ppl" else 100 * v for _, v in values], style,
                color=colors[method], label=method if pattern == "unstructured" else f"{method} {pattern}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def plot_speed_size(decode: list[dict]) -> bytes | None:
    """Our decode rows, the run with the most threads of each (model, variant), one colour per model."""
    best: dict[tuple, dict] = {}
    for row in decode:
        if row.get("weight_mb") and row.get("decode_tok_s") and row.get("engine", "secateurs") == "secateurs":
            key = row.get("model"), row["variant"]
            if row.get("threads", 0) >= best.get(key, {}).get("threads", 0):
                best[key] = row
    if not best:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    models = list(dict.fromkeys(model for model, _ in best))
    for (model, variant), row in best.items():
        color = f"C{models.index(model)}"
        ax.scatter(row["weight_mb"], row["decode_tok_s"], s=18, color=color,
                   label=model if variant == next(v for m, v in best if m == model) else None)
        ax.annotate(variant, (row["weight_mb"], row["decode_tok_s"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points", color=color)
    ax.legend(fontsize=8)
    ax.set_xlabel("weights (MB)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    return png(fig)


def layer_grid(layers: list[dict]) -> tuple[list[int], list[str], list[list[float]]]:
    """(blocks, layer types, loss[block][type]) from layer names "...<block>.<type>"; NaN where absent."""
    cells: dict[tuple[int, str], float] = {}
    for layer in layers:
        match = _BLOCK.search(layer["name"])
        if match and layer.get("loss") is not None:
            cells[int(match[1]), match[2]] = float(layer["loss"])
    blocks = sorted({b for b, _ in cells})
    types = list(dict.fromkeys(t for layer in layers if (m := _BLOCK.search(layer["name"])) for t in [m[2]]))
    types = [t for t in types if any((b, t) in cells for b in blocks)]
    return blocks, types, [[cells.get((b, t), math.nan) for t in types] for b in blocks]


def plot_layer_losses(label: str, layers: list[dict]) -> bytes | None:
    blocks, types, grid = layer_grid(layers)
    if not blocks:
        return None
    import numpy as np

    plt = pyplot()
    values = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(types), 1.0 + 0.22 * len(blocks)))
    with np.errstate(divide="ignore", invalid="ignore"):
        image = ax.imshow(np.log10(np.where(values > 0, values, np.nan)), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(types)), [t.split(".")[-1] for t in types], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_ylabel("block")
    ax.set_title(f"{label}: log10 reconstruction loss", fontsize=9)
    fig.colorbar(image, ax=ax)
    return png(fig)


def figures(results: Results, table: list[dict]) -> list[tuple[str, str, bytes]]:
    """(slug, caption, PNG) of every plot the results allow."""
    made = [
        ("ppl-vs-sparsity", "Perplexity against sparsity, per method", plot_vs_sparsity(table, "ppl", "perplexity", log=True)),
        ("tasks-vs-sparsity", "Mean task accuracy against sparsity, per method",
         plot_vs_sparsity(table, "mean", "mean task accuracy (%)")),
        ("speed-vs-size", "Decode speed against weight size", plot_speed_size(results.decode)),
    ]
    for label, layers in results.compressions.items():
        slug = "layers-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", label)
        made.append((slug, f"Per-layer reconstruction loss, {label} (blocks x layer type)", plot_layer_losses(label, layers)))
    return [(slug, caption, image) for slug, caption, image in made if image is not None]


# ---- rendering ----

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:1em 1em 0 0}figcaption{font-size:13px;color:#555}"""


def _blocks(results: Results) -> list[Section]:
    """The variants table with the plots of the task, quality, decode and compression files, then
    the sections of the other result kinds."""
    columns, table = variant_table(results)
    header, rows = _table_cells(columns, table)
    subset = table[0]["subset"] if table else None
    scope = "whole sets" if subset is None else f"the seeded subset of {subset} documents per task"
    note = (f"Task accuracy (%) on {scope}; mean acc over the tasks present (their count in brackets); "
            "ppl from the quality rows.")
    return [Section("Compressed variants", note, header, rows, figures(results, table))] + results.sections


def render_html(results: Results, title: str = "secateurs report") -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for number, block in enumerate(_blocks(results)):
        if not block.rows and not block.figures:
            continue
        parts.append(f"<h2>{esc(block.title)}</h2>")
        if block.rows:
            table_id = "variants" if number == 0 else f"section-{number}"
            parts += [f"<p>{esc(block.note)}</p>", f"<table id=\"{table_id}\"><thead><tr>"]
            parts += [f"<th>{esc(h)}</th>" for h in block.header] + ["</tr></thead><tbody>"]
            parts += ["<tr>" + "".join(f"<td>{esc(text)}</td>" for text in row) + "</tr>" for row in block.rows]
            parts.append("</tbody></table>")
        for slug, caption, image in block.figures:
            data = base64.b64encode(image).decode("ascii")
            parts.append(f"<figure id=\"{esc(slug)}\"><img alt=\"{esc(caption)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(results: Results, image_prefix: str | None = None, title: str = "secateurs report") -> tuple[str, dict[str, bytes]]:
    """(markdown text, {file name: PNG}) — the images referenced as `<image_prefix>-<slug>.png`."""
    lines, images = [f"# {title}", ""], {}
    for block in _blocks(results):
        if not block.rows and not (block.figures and image_prefix is not None):
            continue
        lines += [f"## {block.title}", ""]
        if block.rows:
            lines += [block.note, "", "| " + " | ".join(block.header) + " |", "|---|" + "---:|" * (len(block.header) - 1)]
            lines += ["| " + " | ".join(text.replace("|", "\\|") for text in row) + " |" for row in block.rows] + [""]
        for slug, caption, image in block.figures if image_prefix is not None else []:
            name = f"{image_prefix}-{slug}.png"
            images[name] = image
            lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines), images


def write_report(paths, output) -> Path:
    """Write the report of `paths` to `output`: HTML for .html/.htm, markdown (PNGs beside it) for .md."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".html", ".htm", ".md"):
        raise SecateursError(f"{output}: the report is .html or .md")
    check_writable(output, directory=False)
    results = load_results(paths)
    if suffix == ".md":
        text, images = render_markdown(results, image_prefix=output.stem)
        for name, image in images.items():
            replace_atomically(output.parent / name, lambda staging, image=image: staging.write_bytes(image))
    else:
        text = render_html(results)
    write_text(output, text)
    return output
