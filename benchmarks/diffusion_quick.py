"""A quick look at one DDPM configuration at a time (not the protocol of benchmarks/diffusion.py):
compress the Fashion-MNIST DDPM with a method of diffusion.py's METHODS (same layer set and
calibration), then sample 200 images (20 per class, the same DDIM seeds) and report the bits per
weight of the saved file, the summed layer loss, and the mean PSNR of the samples against the
dense model's from the same noise. Minutes per method instead of the protocol's hour (2,000 samples).

    .venv/bin/python benchmarks/diffusion_quick.py vq-2x6g4-shared gptq-w3 ...
        -> prints one line per method and adds it to benchmarks/results/diffusion-quick.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffusion  # noqa: E402  (the layer set, calibration and recipes of the protocol)
import fmnist  # noqa: E402

SAMPLES = 200
JSON_PATH = diffusion.RESULTS / "diffusion-quick.json"


def main() -> None:
    from secateurs.eval.images import ddim_sample
    from secateurs.formats.module_file import save_compressed_module
    from secateurs.io import write_json
    from secateurs.pipeline.layerwise import compress_layerwise

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+", choices=[m for m in diffusion.METHODS if m != "dense"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = fmnist.load_unet().eval()
    layers, _ = diffusion.layer_set(unet, 4096)
    calls = diffusion.fmnist_trajectory_calls(unet, 64, 5, seed=10_000)
    labels = fmnist.balanced_labels(SAMPLES)

    def sample(model):
        return ddim_sample(fmnist.denoiser_fn(model), labels, seed=0, steps=50, batch_size=SAMPLES,
                           scheduler_config=fmnist.SCHEDULER_CONFIG).double()

    dense = sample(unet)
    rows = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else []
    for method in args.methods:
        model = fmnist.load_unet().eval()
        started = time.perf_counter()
        report = compress_layerwise(model, diffusion.row_recipe(method, layers), calls, groups=4, progress=False)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            saved = save_compressed_module(model, report.plan, Path(folder) / "out", {})
            bits = diffusion.bits_per_weight(model, saved, layers)
        row = {"method": method, "samples": SAMPLES, "bits_per_weight": round(bits, 3),
               "layer_loss": round(sum(r["loss"] for r in report.layers.values()), 4),
               "psnr": round(diffusion.mean_image_psnr(sample(model), dense), 2),
               "compress_seconds": round(seconds, 1), "cpu": diffusion.cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["method"] != method] + [row]
        write_json(JSON_PATH, rows)


if __name__ == "__main__":
    main()
