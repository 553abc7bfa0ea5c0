"""Column-sweep benchmark: one layer's SparseGPT / GPTQ sweep with the torch loop against the span
kernel of the device (CUDA: the Triton kernel of runtime/gpu_sweep.py; CPU: the native C++ one).

Protocol: W [rows, cols] Gaussian, H = 2 X Xᵀ / n from n = 2048 Gaussian inputs (seed 0), float32,
block size 128; each method is timed after one warm-up run (which also compiles the Triton kernel),
both paths in the same run, and their losses compared (within 1%: in float32 the paths round
differently and one flipped code moves every later column; the tests compare them exactly in float64).
GFLOP/s is the sweep's nominal rows·cols² (the lazy-batch updates) plus 4/3·cols³ (factoring),
as benchmarks/scale.py counts it, so the rates compare with its rows.

    python benchmarks/gpu_sweep.py [--device cuda|cpu] [--shapes 4096x4096 11008x4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
METHODS = {
    "sparsegpt-50": dict(sparsity=0.5),
    "sparsegpt-2of4": dict(sparsity=0.0, n=2, m=4),
    "gptq-w4g128": dict(bits=4, group_size=128),
}


def _run(method: str, W, H):
    from secateurs.algorithms import QuantSpec, gptq, sparsegpt

    options = METHODS[method]
    if "bits" in options:
        return gptq(W, H, QuantSpec(**options), 128)
    return sparsegpt(W, H, block_size=128, **options)


def _timed(method: str, W, H, kernel) -> tuple[float, object]:
    from secateurs.algorithms import obs

    previous = obs.use_span_kernel(kernel)
    try:
        _run(method, W, H)  # warm-up (Triton compiles here)
        if W.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = _run(method, W, H)
        if W.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, result
    finally:
        obs.use_span_kernel(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=["4096x4096", "11008x4096"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="one 1024 x 1024 layer (a smoke run)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_sweep: --device cuda needs a CUDA device (torch.cuda.is_available() is False)")
    from secateurs.runtime import kernels

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    shapes = ["1024x1024"] if args.quick else args.shapes
    rows_out = []
    print(f"{'shape':>11} {'method':>15} {'torch loop s':>12} {'kernel s':>9} {'speedup':>8} {'kernel GFLOP/s':>14}")
    for shape in shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        generator = torch.Generator().manual_seed(0)
        W = torch.randn(rows, cols, generator=generator).to(device)
        X = torch.randn(2048, cols, generator=generator).to(device)
        H = 2 * X.T @ X / X.shape[0]
        flops = rows * cols**2 + 4 / 3 * cols**3
        for method in args.methods:
            loop_s, reference = _timed(method, W, H, None)
            kernel_s, ours = _timed(method, W, H, kernels.obs_span)
            path = kernels.last_kernel_path()
            # float32 paths round differently, and one flipped code or mask entry moves every later
            # column, so they are compared by their loss, not weight by weight
            loss_diff = abs(ours.loss - reference.loss) / reference.loss
            agree = loss_diff < 1e-2
            row = {"device": name, "device_type": device.type, "shape": shape, "method": method,
                   "kernel_path": path, "torch_loop_s": round(loop_s, 4), "kernel_s": round(kernel_s, 4),
                   "speedup": round(loop_s / kernel_s, 2), "kernel_gflops": round(flops / kernel_s / 1e9, 1),
                   "torch_loop_gflops": round(flops / loop_s / 1e9, 1), "loss_rel_diff": loss_diff, "outputs_agree": agree,
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
            rows_out.append(row)
            print(f"{shape:>11} {method:>15} {loop_s:>12.3f} {kernel_s:>9.3f} {loop_s / kernel_s:>7.2f}x "
                  f"{row['kernel_gflops']:>14.1f}  ({path}{'' if agree else ', LOSSES DIFFER'}, loss diff {loss_diff:.1e})", flush=True)
    path = RESULTS / "gpu_sweep.json"
    kept = [r for r in (json.loads(path.read_text()) if path.is_file() else [])
            if (r["device"], r["shape"], r["method"]) not in {(o["device"], o["shape"], o["method"]) for o in rows_out}]
    from secateurs.io import write_json

    write_json(path, kept + rows_out)
    if not all(r["outputs_agree"] for r in rows_out):
        sys.exit(1)


if __name__ == "__main__":
    main()
