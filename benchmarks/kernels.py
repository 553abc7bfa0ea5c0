"""Per-layer benchmark of the secateurs CPU kernels at Llama-7B shapes.

    .venv/bin/python benchmarks/kernels.py [--quick]

Batch-1 decoding is bound by the bytes of the weight, so each format is reported against the
memory bandwidth measured in the same run (floor = its bytes / read bandwidth) and against dense
torch fp32 / bf16 matmuls timed in the same run. Several copies of every weight are rotated so
that the total exceeds 4x the L3 cache and no call finds its weight cached.

Writes benchmarks/results/kernels.json (one row per measurement), kernels.md and kernels.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from secateurs.runtime import kernels, layouts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from quality import cpu_name  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
SPARSE_FORMATS = ("bitmask-fp32", "bitmask-bf16", "bitmask-int8", "bitmask-int4", "bitmask-int8-rows4")
BATCH1_ONLY = ("bitmask-int4", "bitmask-int8-rows4")  # int4: one activation row; rows4: the shared-mask path is batch 1
GROUP_SIZE = 128

Layout = tuple[torch.Tensor, ...]
Apply = Callable[..., torch.Tensor]  # apply(*layout, x) -> y


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, KeyError, ValueError):
        return 32 << 20


def median_seconds(fn: Callable[[], object], runs: int = 7) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(threads: int) -> dict[str, float]:
    """GB/s of a large read (sum) and a large copy (read + write counted), median of runs."""
    torch.set_num_threads(threads)
    source = torch.ones(1 << 27)  # 512 MiB, touched so pages are real
    target = torch.zeros_like(source)
    read = source.nbytes / median_seconds(source.sum) / 1e9
    copy = 2 * source.nbytes / median_seconds(lambda: target.copy_(source)) / 1e9
    return {"read": read, "copy": copy}


# --- formats -----------------------------------------------------------------------------------

def dense_formats(weight: torch.Tensor) -> dict[str, tuple[Layout, Apply, torch.dtype]]:
    """Formats whose cost does not depend on sparsity: name -> (layout, apply, activation dtype)."""
    cols = weight.shape[1]
    int8 = layouts.quantize_rtn(weight, 8, GROUP_SIZE)
    int4 = layouts.quantize_rtn(weight, 4, GROUP_SIZE)
    row_scale = weight.abs().amax(1) / 127
    int8pack = (torch.round(weight / row_scale[:, None]).to(torch.int8), row_scale)
    keep_24 = torch.arange(cols) % 4 < 2  # 2 of every 4 columns
    nm_values, nm_indices = layouts.nm_from_dense(weight * keep_24, 2, 4)
    f32, bf16 = torch.float32, torch.bfloat16
    return {
        "dense-fp32": ((weight,), lambda w, x: x @ w.T, f32),
        "dense-bf16": ((weight.to(bf16),), lambda w, x: x @ w.T, bf16),
        "torch-int8pack": (int8pack, lambda w, s, x: torch._weight_int8pack_mm(x, w, s), f32),
        "int8": (int8, lambda q, s, z, x: kernels.quant_mm(x, q, s, z, 8, cols, GROUP_SIZE), f32),
        "int4": ((layouts.pack_int4(int4[0]), *int4[1:]),
                 lambda q, s, z, x: kernels.quant_mm(x, q, s, z, 4, cols, GROUP_SIZE), f32),
        "2:4-fp32": ((nm_values, nm_indices), lambda v, i, x: kernels.nm_mm(x, v, i, 2, 4), f32),
        "vq-2x8": (vq_layout(weight), lambda c, b, s, x: kernels.vq_mm(x, c, b, s), f32),
    }


def vq_layout(weight: torch.Tensor) -> Layout:
    """Random codes into two 256-word codebooks of groups of 8 (the kernel's cost does not depend
    on the values): codes uint8, codebooks float32 [2, 256, 8], row scales."""
    generator = torch.Generator().manual_seed(1)
    rows, cols = weight.shape
    codes = torch.randint(0, 256, (rows, cols // 8, 2), generator=generator, dtype=torch.uint8)
    return codes, torch.randn(2, 256, 8, generator=generator) * 0.02, weight.abs().mean(1)


def sparse_formats(weight: torch.Tensor, sparsity: float, generator: torch.Generator):
    cols = weight.shape[1]
    pruned = weight * (torch.rand(weight.shape, generator=generator) >= sparsity)
    bitmask, values, row_offsets = layouts.bitmask_from_dense(pruned)
    row_scale = pruned.abs().amax(1).clamp(min=1e-12) / 127
    codes = torch.round(pruned / row_scale[:, None]).to(torch.int8)[pruned != 0]
    bitmask_apply = lambda m, v, o, x: kernels.bitmask_mm(x, m, v, o, cols)  # noqa: E731
    # one mask per 4 consecutive rows (SparseGPT mask_rows: 4): the kernel gathers a group's kept
    # activations once and multiplies each row's kept values densely
    rows4 = weight * (torch.rand(weight.shape[0] // 4, cols, generator=generator) >= sparsity).repeat_interleave(4, 0)
    rows4_scale = rows4.abs().amax(1).clamp(min=1e-12) / 127
    rows4_codes = torch.round(rows4 / rows4_scale[:, None]).to(torch.int8)
    rows4_mask, _, rows4_offsets = layouts.bitmask_from_dense(rows4)
    rows4_group = layouts.mask_row_group(rows4_mask)
    int4_codes, int4_scale, int4_zero = layouts.quantize_rtn(weight, 4, GROUP_SIZE)
    int4 = layouts.sparse_int4_pack(torch.where(pruned != 0, int4_codes, 0), pruned != 0)
    return {
        "bitmask-int4": ((*int4, int4_scale, int4_zero),
                         lambda m, c, o, s, z, x: kernels.sparse_int4_mm(x, m, c, o, s, z, cols, GROUP_SIZE), torch.float32),
        "bitmask-fp32": ((bitmask, values, row_offsets), bitmask_apply, torch.float32),
        "bitmask-bf16": ((bitmask, values.to(torch.bfloat16), row_offsets), bitmask_apply, torch.float32),
        "bitmask-int8": ((bitmask, codes, row_offsets, row_scale),
                         lambda m, v, o, s, x: kernels.bitmask_mm(x, m, v, o, cols, s), torch.float32),
        "bitmask-int8-rows4": ((rows4_mask, rows4_codes[rows4 != 0], rows4_offsets, rows4_scale),
                               lambda m, v, o, s, x: kernels.bitmask_mm(x, m, v, o, cols, s, mask_group=rows4_group),
                               torch.float32),
    }


# --- timing ------------------------------------------------------------------------------------

def weight_copies(layout: Layout, min_total_bytes: int) -> list[Layout]:
    nbytes = sum(t.nbytes for t in layout)
    count = max(2, math.ceil(min_total_bytes / nbytes))
    return [layout] + [tuple(t.clone() for t in layout) for _ in range(count - 1)]


def median_ms(apply: Apply, copies: list[Layout], x: torch.Tensor, reps: int) -> float:
    """Median time of one call, each call on the next copy of the weight."""
    for copy in copies[:2]:
        apply(*copy, x)
    times = []
    for i in range(max(reps, len(copies))):
        copy = copies[i % len(copies)]
        start = time.perf_counter()
        apply(*copy, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(shapes, batches, thread_counts, sparsities, reps) -> tuple[list[dict], dict]:
    generator = torch.Generator().manual_seed(0)
    bandwidth = {threads: measure_bandwidth(threads) for threads in thread_counts}
    min_total = 4 * l3_bytes()
    rows = []
    for shape in shapes:
        weight = torch.randn(shape, generator=generator) * 0.02
        cases = [(0.0, name, case) for name, case in dense_formats(weight).items()]
        cases += [(s, name, case) for s in sparsities for name, case in sparse_formats(weight, s, generator).items()]
        for sparsity, name, (layout, apply, x_dtype) in cases:
            sparsity = 0.5 if name == "2:4-fp32" else sparsity
            copies = weight_copies(layout, min_total)
            nbytes = sum(t.nbytes for t in layout)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for batch in batches:
                    if batch > 1 and name in BATCH1_ONLY:
                        continue
                    x = torch.randn(batch, shape[1], generator=generator).to(x_dtype)
                    ms = median_ms(apply, copies, x, reps)
                    floor_ms = nbytes / (bandwidth[threads]["read"] * 1e9) * 1e3
                    rows.append({
                        "isa": kernels.kernel_path(), "cpu": cpu_name(),
                        "shape": list(shape), "batch": batch, "threads": threads, "sparsity": sparsity,
                        "format": name, "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 2),
                        "floor_pct": round(100 * floor_ms / ms, 1), "bytes": nbytes,
                    })
                    print(f"{shape} b{batch} t{threads} {name:15s} s={sparsity:.1f} {ms:9.3f} ms "
                          f"{rows[-1]['gbps']:6.1f} GB/s {rows[-1]['floor_pct']:5.1f}% of floor", flush=True)
            del copies
    add_speedups(rows)
    return rows, bandwidth


def add_speedups(rows: list[dict]) -> None:
    reference = {(r.get("isa"), tuple(r["shape"]), r["batch"], r["threads"], r["format"]): r["ms"] for r in rows}
    for r in rows:
        key = (r.get("isa"), tuple(r["shape"]), r["batch"], r["threads"])
        for suffix, dense in (("fp32", "dense-fp32"), ("bf16", "dense-bf16")):
            r[f"speedup_vs_dense_{suffix}"] = round(reference[(*key, dense)] / r["ms"], 2)


# --- reports -----------------------------------------------------------------------------------

# The runtime issue's targets: % of the bandwidth floor at batch 1, per ISA family and format.
FLOOR_TARGETS = {"avx512": {"bitmask-fp32": 85, "bitmask-bf16": 85, "bitmask-int8": 70, "bitmask-int8-rows4": 70},
                 "avx2": {"bitmask-int8": 70, "bitmask-int8-rows4": 70}}


def target_checks(rows: list[dict]) -> list[str]:
    """The goals of the kernels per kernel path, on the best thread count of each case."""
    def best(**match):
        found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
        return max(found, key=lambda r: r["floor_pct"]) if found else None

    lines = []
    for isa in sorted({r.get("isa") for r in rows}):
        family = "avx512" if str(isa).startswith("avx512") else isa
        for shape in sorted({tuple(r["shape"]) for r in rows}):
            for name, target in FLOOR_TARGETS.get(family, {}).items():
                for sparsity in (0.5, 0.7) if family == "avx512" else (0.7,):
                    r = best(isa=isa, shape=list(shape), batch=1, format=name, sparsity=sparsity)
                    if r:
                        verdict = "PASS" if r["floor_pct"] >= target else "MISS"
                        lines.append(f"- {verdict} [{isa}] {shape} {name} {sparsity:.0%} batch 1: {r['floor_pct']}% of its "
                                     f"bandwidth floor (target >= {target}%, {r['threads']} thread(s))")
            batch16 = [r for r in rows if r.get("isa") == isa and tuple(r["shape"]) == shape and r["batch"] == 16
                       and r["sparsity"] >= 0.7 and (r["format"] in SPARSE_FORMATS)]
            if batch16:
                slowest = min(batch16, key=lambda r: r["speedup_vs_dense_bf16"])
                verdict = "PASS" if slowest["speedup_vs_dense_bf16"] >= 1 else "MISS"
                lines.append(f"- {verdict} [{isa}] {shape} batch 16 at 70%: slowest sparse format ({slowest['format']}, "
                             f"{slowest['threads']} thread(s)) is {slowest['speedup_vs_dense_bf16']}x dense bf16 (target >= 1x)")
    return lines


def _table(rows: list[dict]) -> list[str]:
    lines = ["| isa | shape | batch | threads | format | sparsity | ms | GB/s | % of floor | vs dense fp32 | vs dense bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('isa')} | {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['threads']} | {r['format']} | "
                     f"{r['sparsity']:.0%} | {r['ms']:.3f} | {r['gbps']:.1f} | {r['floor_pct']:.0f} | "
                     f"{r['speedup_vs_dense_fp32']:.2f} | {r['speedup_vs_dense_bf16']:.2f} |")
    return lines


def write_markdown(rows: list[dict], bandwidth: dict, header: list[str], path: Path, earlier: list[dict]) -> None:
    """This run (its header, bandwidth, target checks and rows), then the kept rows of every other
    kernel path, a section each (their CPU, target checks and rows; bandwidth in their floors)."""
    lines = ["# CPU kernel benchmark", "", *header, ""]
    lines += [f"- bandwidth with {t} thread(s): read {b['read']:.1f} GB/s, copy {b['copy']:.1f} GB/s"
              for t, b in bandwidth.items()]
    lines += ["", "## Targets", "", *target_checks(rows), "", "## Measurements", "", *_table(rows)]
    for isa in dict.fromkeys(r["isa"] for r in earlier):
        mine = [r for r in earlier if r["isa"] == isa]
        cpus = ", ".join(sorted({str(r.get("cpu")) for r in mine}))
        lines += ["", f"## Earlier run: {isa} ({cpus})", "",
                  "Rows kept from an earlier run on that kernel path (kernels.json); its bandwidth is in each row's "
                  "% of floor.", "", *target_checks(mine), "", *_table(mine)]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(tuple(r["shape"]), r["batch"], r["threads"]) for r in rows})
    sparsities = sorted({r["sparsity"] for r in rows})
    columns = min(4, len(panels))
    figure, axes = plt.subplots(math.ceil(len(panels) / columns), columns, squeeze=False,
                                figsize=(4.5 * columns, 3.6 * math.ceil(len(panels) / columns)))
    for axis, (shape, batch, threads) in zip(axes.flat, panels):
        panel = [r for r in rows if (tuple(r["shape"]), r["batch"], r["threads"]) == (shape, batch, threads)]
        for name in dict.fromkeys(r["format"] for r in panel):
            points = sorted((r["sparsity"], r["speedup_vs_dense_fp32"]) for r in panel if r["format"] == name)
            if name in SPARSE_FORMATS:
                axis.plot(*zip(*points), marker="o", label=name)
            elif name == "2:4-fp32":
                axis.plot(*zip(*points), marker="s", linestyle="none", label=name)
            else:  # independent of sparsity: a flat reference line
                axis.plot([sparsities[0], sparsities[-1]], [points[0][1]] * 2, linestyle="--", label=name)
        axis.set_title(f"{shape[0]}x{shape[1]}, batch {batch}, {threads} thread(s)", fontsize=9)
        axis.set_xlabel("sparsity")
        axis.set_ylabel("speedup vs dense fp32")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, one thread, 50/70%% sparsity, fewer runs")
    parser.add_argument("--paths", nargs="+", default=None,
                        help="kernel paths to run one after the other (default: the best this CPU has)")
    args = parser.parse_args()
    if args.quick:
        config = dict(shapes=[(4096, 4096)], batches=(1, 16), thread_counts=(1,), sparsities=(0.5, 0.7), reps=5)
    else:
        config = dict(shapes=[(4096, 4096), (11008, 4096)], batches=(1, 16), thread_counts=(1, 2),
                      sparsities=(0.0, 0.5, 0.7, 0.9), reps=9)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows, bandwidth = [], {}
    for path in args.paths or [kernels.kernel_path()]:
        with kernels.forced_kernel_path(path):
            path_rows, bandwidth = run(**config)
        rows += path_rows
    isas = {r["isa"] for r in rows}
    previous = json.loads((RESULTS_DIR / "kernels.json").read_text()) if (RESULTS_DIR / "kernels.json").is_file() else []
    kept = [r | {"isa": r.get("isa", "untagged (before isa tags)")} for r in previous if r.get("isa") not in isas]
    header = [
        f"- {'quick' if args.quick else 'full'} run on {cpu_name()}, kernel paths {', '.join(sorted(isas))}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, L3 {l3_bytes() >> 20} MiB, {time.perf_counter() - started:.0f} s",
        f"- load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} (other processes share the machine)",
        "- ms = median of calls rotating weight copies totalling > 4x L3; floor = format bytes / read bandwidth; "
        "activations fp32 except dense-bf16 (int8 and bitmask-int8 at batch 1 round them to int16 per 64 columns); "
        "int8/int4 use groups of 128, bitmask-int8 per-row scales",
    ]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "kernels.json").write_text(json.dumps(kept + rows, indent=1) + "\n")  # other ISAs' rows kept
    write_markdown(rows, bandwidth, header, RESULTS_DIR / "kernels.md", kept)
    write_plot(rows, RESULTS_DIR / "kernels.png")
    print("\n".join(target_checks(rows)))


if __name__ == "__main__":
    main()
