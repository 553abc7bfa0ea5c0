"""2:4 semi-structured sparsity on an NVIDIA GPU vs dense, through secateurs' NMLinear.

Llama-7B layer shapes, fp16 and bf16, several token counts; median of timed repeats, CUDA-synchronized.
Writes benchmarks/results/semi_structured_cuda.{json,md}. Needs a CUDA GPU (exits with a message otherwise).
"""

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensor

from secateurs.runtime.modules import NMLinear

RESULTS = Path(__file__).resolve().parent / "results"


def two_four(rows, cols):
    weight = torch.randn(rows, cols)
    groups = weight.reshape(rows, -1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * mask).reshape(rows, cols)


def median_ms(fn, repeats=7, inner=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / inner * 1e3)
    return statistics.median(times)


def main():
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: nothing to measure")
    rows = []
    # On Hopper PyTorch runs 2:4 through cuSPARSELt (its CUTLASS kernels support compute capability 8.x only).
    backend = "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    for shape, dtype in itertools.product(((4096, 4096), (11008, 4096)), (torch.float16, torch.bfloat16)):
        weight = two_four(*shape)
        module = NMLinear.from_dense(weight, n=2, m=4).cuda()
        dense = weight.cuda().to(dtype)
        for tokens in (64, 4096, 16384):
            x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
            sparse_ms = median_ms(lambda: module._semi_structured_forward(x))  # bypass the size policy
            dense_ms = median_ms(lambda: F.linear(x, dense))
            rows.append({"shape": list(shape), "dtype": str(dtype).split(".")[-1], "tokens": tokens,
                         "backend": backend, "sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms,
                         "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "semi_structured_cuda.json").write_text(json.dumps(rows, indent=1))
    lines = ["| shape | backend | dtype | tokens | 2:4 ms | dense ms | speedup |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['backend']} | {r['dtype']} | {r['tokens']} | {r['sparse_ms']:.3f} | "
              f"{r['dense_ms']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    text = f"2:4 semi-structured vs dense on {rows[0]['device']}, torch {rows[0]['torch']}\n\n" + "\n".join(lines) + "\n"
    (RESULTS / "semi_structured_cuda.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
