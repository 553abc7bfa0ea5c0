"""Diffusion benchmark: vector quantization (VQ) of two real denoisers against scalar GPTQ and RTN.

Models
- terrain-consistency: the pretrained ONNX UNet of PyPI `adaptive-terrain-diffusion==0.4.2` (10.46M
  parameters, one-step consistency model, EDM constants), converted to torch (secateurs.onnx_graph,
  equal to onnxruntime to 1e-5), compressed, written back to ONNX with the dequantized weights and
  scored *through onnxruntime*: the compressed file runs where the original ran. Inputs: 256 fixed
  (noise, sigma, difficulty) triples, seed 0; the clean image under the noise is the dense model's own
  one-step sample D(80 n; 80) (no real terrains ship with the package), sigma from the EDM log-normal
  (P_mean -1.2, P_std 1.2) clipped to [0.002, 80]. Metrics: PSNR of the compressed D(x; sigma) against the
  dense one (peak = the dense outputs' range over the set) and relative L2 ||D' - D|| / ||D||.
- fmnist-ddpm: the class-conditional DDPM trained here on Fashion-MNIST (benchmarks/fmnist_train.py;
  weights committed in benchmarks/assets/fmnist/). 2,000 samples (200 per class, fixed seeds), DDIM 50
  steps; class accuracy of the samples by the CNN classifier trained on the same data, and the
  Fréchet distance (FD) of the classifier's penultimate features against 2,000 test images (200 per
  class; two disjoint real sets of that size are the floor, fd_real_vs_real); and, because this small
  model's FD and accuracy move by chance as much as by compression, the samples against the dense
  model's own samples from the same noise: mean per-image PSNR (pixels in [-1, 1]) and relative L2.

Calibration runs along the dense model's own inputs: for the DDPM, the DDIM trajectories of 64
samples (every 5th of 50 steps: 10 calls of 64); for the terrain model, 32 other (noise, sigma,
difficulty) triples (seed 1) of the same distribution, 8,192 random patches per call and layer.
The layer-wise engine (secateurs.pipeline.layerwise) compresses runs of layers in call order, each
calibrated through the model whose earlier runs are compressed (--groups).

The quantized layer set is the same for every method: the Linear and Conv2d layers with at least
--min-weights weights whose VQ groups fit (input channels a multiple of g); the rest stays as shipped
(float32) and is listed in the results. Bits per weight count, over that set, everything stored for
it: codes, codebooks and scales (float16) for VQ; codes and float32 per-row scales for GPTQ/RTN
(per-channel, symmetric: no zero points). The dense row counts 32 (its file is float32).

Each row runs in its own subprocess (its peak RSS is its own) and is cached in
benchmarks/results/diffusion.json; a rerun fills in missing rows.

    nice .venv/bin/python benchmarks/diffusion.py [--models fmnist terrain] [--only vq-2x6g4 ...] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from quality import _run_child, cpu_name, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "diffusion.json"
MODELS = {"fmnist": "fmnist-ddpm", "terrain": "terrain-consistency"}
# row name -> (method, recipe stage options). VQ "MxBgG": M codebooks of 2**B words of G values, so
# M*B/G bits of codes per weight plus the codebooks, M * 2**B * G float16 values per layer. The
# codebooks are small because the layers are (4k-300k weights): 2x6g4 costs 8,192 bits a layer,
# 2x5g4 4,096, where AQLM's 2x8g8 would cost 65,536 (1.8 bits per weight on a 36k-weight layer).
METHODS = {
    "dense": ("dense", None),
    "rtn-w4": ("rtn", {"bits": 4}),
    "gptq-w4": ("gptq", {"bits": 4}),
    "gptq-w3": ("gptq", {"bits": 3}),
    "gptq-w2": ("gptq", {"bits": 2}),
    "vq-2x6g4": ("vq", {"codebooks": 2, "bits": 6, "group_size": 4}),
    "vq-2x5g4": ("vq", {"codebooks": 2, "bits": 5, "group_size": 4}),
    "vq-1x8g4": ("vq", {"codebooks": 1, "bits": 8, "group_size": 4}),
    "vq-1x6g4": ("vq", {"codebooks": 1, "bits": 6, "group_size": 4}),
    # one set of codebooks for every layer (stored once): no per-layer codebook cost on these small layers
    "vq-2x6g4-shared": ("vq", {"codebooks": 2, "bits": 6, "group_size": 4, "shared": True}),
    "vq-1x12g4-shared": ("vq", {"codebooks": 1, "bits": 12, "group_size": 4, "shared": True}),
    "vq-1x11g4-shared": ("vq", {"codebooks": 1, "bits": 11, "group_size": 4, "shared": True}),
    "vq-2x5g4-shared": ("vq", {"codebooks": 2, "bits": 5, "group_size": 4, "shared": True}),
    # AQLM's configurations, affordable once shared: 8-value groups (the same layer set as groups of 4
    # on both models), 2 or 3 bits of codes plus 2-3 x 256 x 8 float16 values for the whole model
    "vq-2x8g8-shared": ("vq", {"codebooks": 2, "bits": 8, "group_size": 8, "shared": True}),
    "vq-3x8g8-shared": ("vq", {"codebooks": 3, "bits": 8, "group_size": 8, "shared": True}),
    # the same codes, then every codebook and scale trained on the dense model's outputs (codes fixed)
    "vq-2x6g4-tuned": ("vq", {"codebooks": 2, "bits": 6, "group_size": 4}),
    "vq-2x5g4-tuned": ("vq", {"codebooks": 2, "bits": 5, "group_size": 4}),
}
TUNE = {"fmnist": {"tune_steps": 300, "tune_lr": 5e-4}, "terrain": {"tune_steps": 40, "tune_lr": 5e-4}}
VQ_GROUP = 4  # the quantized layer set is the one every VQ row can code
VQ_ROUNDS = {"rounds": 8, "adam_steps": 20}
WORK = Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs")) / "diffusion-bench"
EDM = {"p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0}


# --- the models --------------------------------------------------------------------------------------

def terrain_onnx() -> Path:
    from importlib.resources import files

    from secateurs.errors import SecateursError

    try:
        path = Path(str(files("terrain_diffusion") / "weights" / "terrain_consistency_unet_difficulty100.onnx"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.exists():
        raise SecateursError("the terrain model is missing: pip install --no-deps adaptive-terrain-diffusion==0.4.2")
    return path


def terrain_inputs(count: int, seed: int, dense_session) -> list[dict[str, np.ndarray]]:
    """Batches of 8 (noisy, sigma, difficulty): the dense model's one-step samples, re-noised."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, count, 8):
        n = min(8, count - start)
        difficulty = ((rng.integers(1, 101, n) - 1) / 99).astype(np.float32)  # the package's labels: (d - 1) / 99
        start_noise = rng.standard_normal((n, 1, 128, 128)).astype(np.float32) * EDM["sigma_max"]
        clean = dense_session.run(["denoised"], {"noisy": start_noise, "sigma": np.full(n, EDM["sigma_max"], np.float32),
                                                 "difficulty": difficulty})[0]
        sigma = np.clip(np.exp(rng.normal(EDM["p_mean"], EDM["p_std"], n)), EDM["sigma_min"], EDM["sigma_max"])
        noisy = clean + sigma[:, None, None, None].astype(np.float32) * rng.standard_normal(clean.shape).astype(np.float32)
        batches.append({"noisy": noisy.astype(np.float32), "sigma": sigma.astype(np.float32), "difficulty": difficulty})
    return batches


def terrain_evaluation(count: int, dense_session) -> tuple[list[dict], list[np.ndarray]]:
    """The evaluation batches and the dense model's outputs on them, cached (they are the same for
    every row: seed 0, onnxruntime on the original file)."""
    cache = WORK / f"terrain-eval-{count}.npz"
    if cache.exists():
        stored = np.load(cache)
        batches = [{name: stored[f"{i}.{name}"] for name in ("noisy", "sigma", "difficulty")}
                   for i in range(int(stored["batches"]))]
        return batches, [stored[f"{i}.reference"] for i in range(len(batches))]
    batches = terrain_inputs(count, 0, dense_session)
    references = [dense_session.run(["denoised"], batch)[0] for batch in batches]
    arrays = {"batches": np.array(len(batches))}
    for i, (batch, reference) in enumerate(zip(batches, references)):
        arrays |= {f"{i}.{name}": value for name, value in batch.items()} | {f"{i}.reference": reference}
    WORK.mkdir(parents=True, exist_ok=True)
    staging = cache.with_suffix(".tmp.npz")
    np.savez(staging, **arrays)
    os.replace(staging, cache)
    return batches, references


def ort_session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fmnist_trajectory_calls(unet, samples: int, every: int, seed: int):
    """The (x_t, t, class) inputs the dense DDPM sees along DDIM trajectories, every `every`-th step."""
    import fmnist

    from secateurs.eval.images import ddim_sample

    calls, step = [], [0]
    inner = fmnist.denoiser_fn(unet)

    def recording(x, t, labels):
        if step[0] % every == 0:
            timesteps = t.expand(x.shape[0]) if torch.is_tensor(t) and t.dim() == 0 else t
            calls.append(((x.clone(), torch.as_tensor(timesteps).clone()), {"class_labels": labels.clone()}))
        step[0] += 1
        return inner(x, t, labels)

    labels = fmnist.balanced_labels(samples)
    ddim_sample(recording, labels, seed=seed, steps=50, batch_size=samples, scheduler_config=fmnist.SCHEDULER_CONFIG,
                progress=False)
    return calls


# --- one row -------------------------------------------------------------------------------------------

def layer_set(model, min_weights: int):
    """The layers every method quantizes: those the VQ rows can code, with at least min_weights."""
    from secateurs.pipeline.layerwise import select_layers
    from secateurs.recipe import load_recipe

    probe = load_recipe([{"vq": {"codebooks": 1, "bits": 8, "group_size": VQ_GROUP}}])
    chosen, skipped = select_layers(model, probe, min_weights)
    return list(chosen), skipped


def row_recipe(method: str, layers: list[str]):
    import re

    from secateurs.recipe import load_recipe

    kind, options = METHODS[method]
    extra = VQ_ROUNDS if kind == "vq" else {}
    targets = [f"^{re.escape(name)}$" for name in layers]
    return load_recipe([{kind: dict(options) | extra | {"targets": targets, "ignore": []}}])


def compress_row(model, method: str, calls, layers, args, patches):
    """Compress `model` in place; (seconds, the saved directory's SavedModel, the engine's report)."""
    from secateurs.formats.module_file import save_compressed_module
    from secateurs.pipeline.layerwise import compress_layerwise

    started = time.perf_counter()
    tuning = TUNE[args.worker] if method.endswith("-tuned") else {}
    report = compress_layerwise(model, row_recipe(method, layers), calls, groups=args.groups, patches_per_call=patches,
                                work_dir=WORK / f"{args.worker}-{method}-work", progress=args.progress, **tuning)
    seconds = time.perf_counter() - started
    if report.tuning:
        print(f"{method}: tuning {report.tuning}", file=sys.stderr)
    saved = save_compressed_module(model, report.plan, WORK / f"{args.worker}-{method}", {"model": args.worker})
    return seconds, saved, report


def bits_per_weight(model, saved, layers) -> float:
    weights = sum(model.get_submodule(name).weight.numel() for name in layers)
    compressed = sum(size for fmt, size in saved.bytes_by_format.items() if fmt != "dense")
    return 8 * compressed / weights


def terrain_row(method: str, args) -> dict:
    from secateurs.onnx_graph import OnnxGraphModule, write_onnx_with_weights

    source = terrain_onnx()
    dense = ort_session(source)
    evaluation, reference = terrain_evaluation(args.eval_inputs, dense)
    model = OnnxGraphModule.from_onnx(source).eval()
    layers, skipped = layer_set(model, args.min_weights)
    row = {"layers": len(layers), "left_dense": len(skipped)}
    if method == "dense":
        session, bits, seconds = dense, 32.0, 0.0
        size = source.stat().st_size
    else:
        calibration = [((torch.from_numpy(b["noisy"]), torch.from_numpy(b["sigma"]), torch.from_numpy(b["difficulty"])), {})
                       for b in terrain_inputs(args.calibration, 1, dense)]
        seconds, saved, report = compress_row(model, method, calibration, layers, args, patches=8192)
        compressed_onnx = WORK / f"terrain-{method}.onnx"
        write_onnx_with_weights(source, model, compressed_onnx)
        session, bits, size = ort_session(compressed_onnx), bits_per_weight(model, saved, layers), saved.file_bytes
        row["calibration_seconds"] = round(report.calibration_seconds, 1)
        row["tuning"] = report.tuning
    outputs = reference if method == "dense" else [session.run(["denoised"], batch)[0] for batch in evaluation]
    ref, out = np.concatenate(reference).astype(np.float64), np.concatenate(outputs).astype(np.float64)
    mse = float(np.mean((out - ref) ** 2))
    peak = float(ref.max() - ref.min())
    row |= {"psnr": None if mse == 0 else round(float(10 * np.log10(peak**2 / mse)), 2),
            "rel_l2": round(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), 5),
            "fid": None, "class_acc": None, "bits_per_weight": round(bits, 3), "seconds": round(seconds, 1),
            "size_mb": round(size / 2**20, 3)}
    return row


def dense_fmnist_samples(count: int, args) -> torch.Tensor:
    """The dense DDPM's samples for the benchmark's seeds, cached: each compressed row is compared with
    them image by image (DDIM from the same noise: the same image but for what compression changed)."""
    import fmnist

    from secateurs.eval.images import ddim_sample

    cache = WORK / f"fmnist-dense-samples-{count}.npy"
    if not cache.exists():
        images = ddim_sample(fmnist.denoiser_fn(fmnist.load_unet().eval()), fmnist.balanced_labels(count), seed=0,
                             steps=50, batch_size=250, scheduler_config=fmnist.SCHEDULER_CONFIG, progress=args.progress)
        WORK.mkdir(parents=True, exist_ok=True)
        staging = cache.with_suffix(".tmp.npy")
        np.save(staging, images.numpy())
        os.replace(staging, cache)
    return torch.from_numpy(np.load(cache))


def mean_image_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the PSNR of each against its reference image (pixels span [-1, 1]: peak 2)."""
    squared = (images.double() - reference.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(4 / squared.clamp(min=1e-12))).mean())


def fmnist_row(method: str, args) -> dict:
    import fmnist

    from secateurs.eval.images import ddim_sample, frechet_distance, save_image_grid
    from secateurs.formats.module_file import read_compressed_module

    unet = fmnist.load_unet().eval()
    classifier = fmnist.load_classifier()
    layers, skipped = layer_set(unet, args.min_weights)
    row = {"layers": len(layers), "left_dense": len(skipped)}
    per_class = args.samples // fmnist.NUM_CLASSES
    count = per_class * fmnist.NUM_CLASSES
    _, reference = fmnist.classify(classifier, fmnist.test_subset(per_class)[0])
    if method == "dense":
        bits, seconds, size = 32.0, 0.0, fmnist.DDPM_PATH.stat().st_size
        # the floor: a disjoint real set of the same size against the same reference
        _, real = fmnist.classify(classifier, fmnist.test_subset(per_class, per_class)[0])
        row["fd_real_vs_real"] = round(frechet_distance(real, reference), 3)
    else:
        calibration = fmnist_trajectory_calls(unet, args.calibration, 5, seed=10_000)
        seconds, saved, report = compress_row(unet, method, calibration, layers, args, patches=None)
        bits, size = bits_per_weight(unet, saved, layers), saved.file_bytes
        _, state, _ = read_compressed_module(saved.path)  # sample from what the file holds
        unet = fmnist.load_unet().eval()
        unet.load_state_dict(state)
        row["calibration_seconds"] = round(report.calibration_seconds, 1)
        row["tuning"] = report.tuning
    labels = fmnist.balanced_labels(count)
    if method == "dense":
        images = dense_fmnist_samples(count, args)
    else:
        images = ddim_sample(fmnist.denoiser_fn(unet), labels, seed=0, steps=50, batch_size=250,
                             scheduler_config=fmnist.SCHEDULER_CONFIG, progress=args.progress)
    save_image_grid(images[:100], RESULTS / "diffusion-grids" / f"fmnist-{method}.png", nrow=10, title=method)
    judged = fmnist.judge(classifier, images, labels, reference)
    dense = dense_fmnist_samples(count, args).double()
    row |= {"psnr": round(mean_image_psnr(images, dense), 2),
            "rel_l2": round(float((images.double() - dense).norm() / dense.norm()), 5),
            "fid": round(judged["frechet_distance"], 3), "class_acc": round(judged["class_accuracy"], 4),
            "bits_per_weight": round(bits, 3), "seconds": round(seconds, 1), "size_mb": round(size / 2**20, 3)}
    if method == "dense":
        row |= {"psnr": None, "rel_l2": 0.0}
    return row


def worker(model: str, method: str, args) -> dict:
    torch.manual_seed(0)
    row = (fmnist_row if model == "fmnist" else terrain_row)(method, args)
    kind, options = METHODS[method]
    return {"model": MODELS[model], "method": kind, "config": method, **row,
            "options": options, "groups": args.groups, "min_weights": args.min_weights,
            "cpu": cpu_name(), "threads": torch.get_num_threads()}


# --- the table -----------------------------------------------------------------------------------------

def load_rows() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []


def write_report(rows: list[dict]) -> None:
    write_json(JSON_PATH, rows)
    lines = ["| model | config | bits/weight | PSNR dB | rel L2 | FD | class acc | compress s | peak RSS MB | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["model"], row["config"], row["bits_per_weight"], row["psnr"], row["rel_l2"], row["fid"],
                 row["class_acc"], row["seconds"], row.get("peak_rss_mb"), row["size_mb"]]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    (RESULTS / "diffusion-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("terrain-consistency", "psnr", "PSNR vs dense (dB), higher is better"),
              ("fmnist-ddpm", "fid", "Fréchet distance to test set, lower is better")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (model, metric, title) in zip(axes, panels):
        for row in rows:
            if row["model"] != model or row[metric] is None or row["method"] == "dense":
                continue
            axis.scatter(row["bits_per_weight"], row[metric], label=row["config"])
            axis.annotate(row["config"], (row["bits_per_weight"], row[metric]), fontsize=8)
        dense = next((r for r in rows if r["model"] == model and r["method"] == "dense"), None)
        if dense and dense[metric] is not None:
            axis.axhline(dense[metric], color="gray", linestyle="--", label="dense")
        axis.set_title(f"{model}: {title}", fontsize=9)
        axis.set_xlabel("bits per weight (quantized layers, all stored bits)")
    figure.tight_layout()
    figure.savefig(RESULTS / "diffusion.png", dpi=120)
    plt.close(figure)
    sample_montage(rows, plt)


def sample_montage(rows: list[dict], plt) -> None:
    """The Fashion-MNIST sample grids of every method side by side (same seeds, one class a column)."""
    grids = [(row["config"], row["bits_per_weight"], RESULTS / "diffusion-grids" / f"fmnist-{row['config']}.png")
             for row in rows if row["model"] == "fmnist-ddpm"]
    grids = [(name, bits, path) for name, bits, path in grids if path.exists()]
    if not grids:
        return
    columns = min(4, len(grids))
    lines = -(-len(grids) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.4 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (name, bits, path) in zip(axes.flat, grids):
        axis.imshow(plt.imread(path))
        axis.set_title(f"{name} ({bits:g} bits)" if name != "dense" else "dense (32 bits)", fontsize=9)
    figure.tight_layout()
    figure.savefig(RESULTS / "diffusion-fmnist-samples.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--only", nargs="*", choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--eval-inputs", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=None, help="default: 64 trajectories (fmnist), 32 inputs (terrain)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--min-weights", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        args.calibration = args.calibration or (64 if args.worker == "fmnist" else 32)
        print(json.dumps(worker(args.worker, args.method, args)))
        return
    rows = load_rows()
    if not args.report:
        for model in args.models:
            for method in args.only or list(METHODS):
                if any(r["model"] == MODELS[model] and r["config"] == method for r in rows) and not args.force:
                    continue
                command = [sys.executable, __file__, "--worker", model, "--method", method, "--threads", str(args.threads),
                           "--samples", str(args.samples), "--eval-inputs", str(args.eval_inputs), "--groups", str(args.groups),
                           "--min-weights", str(args.min_weights)] + (["--progress"] if args.progress else []) + (
                    ["--calibration", str(args.calibration)] if args.calibration else [])
                row, rss = _run_child(command)
                row["peak_rss_mb"] = round(rss)
                # re-read: another model's rows may have been written meanwhile by a parallel run
                rows = [r for r in load_rows() if not (r["model"] == row["model"] and r["config"] == method)] + [row]
                rows.sort(key=lambda r: (r["model"], list(METHODS).index(r["config"])))
                write_report(rows)
    rows = load_rows()
    write_report(rows)


if __name__ == "__main__":
    main()
