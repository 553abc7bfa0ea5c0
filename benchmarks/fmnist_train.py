"""Train the Fashion-MNIST diffusion benchmark's models (benchmarks/fmnist.py) from a fixed seed and
write them to benchmarks/assets/fmnist/: the classifier that judges samples, then the DDPM.

DDPM: epsilon-prediction MSE on the 60,000 training images (padded to 32x32, in [-1, 1]), AdamW with
a linear warm-up and cosine decay, gradient clipping at 1, and an exponential moving average of the
weights (decay 0.999, warmed up as (1 + step) / (10 + step) so the first steps' weights fade out
quickly); the EMA weights are the ones saved (with the learning rate already decayed to 2% they
score only a little better than the last iterate: class accuracy 0.525 against 0.515 on 200 samples). Convolutions run under bfloat16 autocast (the weights, optimizer and
EMA stay float32), which is ~1.4x faster on CPUs with AMX / AVX512-BF16; `--precision fp32` turns it
off. Classifier: Adam, a few epochs, test accuracy reported. A full run ends with `--only evaluate`'s
work: the sample grid benchmarks/results/fmnist-samples-dense.png and the sample scores in assets.json.

Determinism: each epoch's data order and each step's timesteps and noise come from generators
seeded by (seed, epoch) and (seed, step), so a resumed run draws exactly what an uninterrupted one
would, and the checkpoint needs no RNG state. A run killed part-way resumes from its checkpoint in
$SECATEURS_CACHE/fmnist-train/ (written every --checkpoint-minutes, tensors and numbers only, read
back with weights_only=True); a checkpoint of different settings is set aside and training starts over.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist_train.py [--steps 1600] [--only ddpm|classifier|evaluate]

The committed assets are the defaults' (1600 steps of 128, lr 1e-3, 3 classifier epochs): ~34 + 6
minutes on one core of a shared Xeon, then ~3 minutes of sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fmnist.py is a sibling script, not a package
import fmnist  # noqa: E402
from quality import cpu_name  # noqa: E402

from secateurs.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist  # noqa: E402
from secateurs.io import cache_dir, replace_atomically, write_json, write_safetensors  # noqa: E402

SEED = 0
WARMUP_STEPS = 100
FINAL_LR_FRACTION = 0.02  # the cosine decays to this fraction of --lr
EMA_DECAY = 0.999
LOSS_WINDOW = 100  # the reported final loss is the mean over the last this many steps


def work_dir() -> Path:
    return cache_dir() / "fmnist-train"


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda staging: torch.save(state, staging))


def load_checkpoint(path: Path, settings: dict) -> dict | None:
    """The checkpoint at `path` if it was made with the same `settings`; one of other settings is
    renamed aside (kept for inspection) and None returned."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    if json.loads(state["settings"]) != settings:
        aside = path.with_suffix(".other-settings.pt")
        path.replace(aside)
        print(f"{path.name} was made with other settings; moved to {aside.name}, starting over", flush=True)
        return None
    return state


def epoch_order(epoch: int, count: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch))


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to FINAL_LR_FRACTION x peak at `total`."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def update_record(section: str, record: dict) -> None:
    """Put `record` under `section` of assets.json, keeping the other model's record."""
    data = json.loads(fmnist.ASSETS_JSON.read_text()) if fmnist.ASSETS_JSON.is_file() else {}
    data[section] = record
    data["data"] = "Fashion-MNIST from Debian's dataset-fashion-mnist, 28x28 padded to 32x32 with -1, scaled to [-1, 1]"
    write_json(fmnist.ASSETS_JSON, data)


def train_ddpm(args, images: torch.Tensor, labels: torch.Tensor) -> None:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tqdm import tqdm

    settings = {"model": "ddpm", "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": SEED,
                "precision": args.precision, "unet": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in fmnist.UNET_CONFIG.items()}}
    torch.manual_seed(SEED)  # the UNet's initial weights
    unet = fmnist.build_unet().train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    ema = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    scheduler = fmnist.ddpm_scheduler()
    checkpoint_path = work_dir() / "ddpm.pt"
    start, losses, seconds = 0, [], 0.0
    state = load_checkpoint(checkpoint_path, settings)
    if state is not None:
        unet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
        start, losses, seconds = int(state["step"]), list(state["losses"].tolist()), float(state["seconds"])
        print(f"resuming the DDPM at step {start} of {args.steps}", flush=True)

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoint_path, {"settings": json.dumps(settings), "step": step, "model": unet.state_dict(),
                                          "optimizer": optimizer.state_dict(), "ema": ema, "seconds": seconds,
                                          "losses": torch.tensor(losses, dtype=torch.float64)})

    # bfloat16 autocast for the convolutions; the math attention kernel, since the CPU flash kernel's
    # backward is several times slower on these 64-token sequences.
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    batches_per_epoch = len(images) // args.batch  # the remainder of each shuffled epoch is dropped
    order_epoch, order = -1, None
    last_checkpoint = time.monotonic()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="ddpm", unit="step",
               mininterval=5, dynamic_ncols=True)
    for step in bar:
        began = time.perf_counter()
        epoch, position = divmod(step, batches_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(epoch, len(images))
        chosen = order[position * args.batch:(position + 1) * args.batch]
        clean, batch_labels = fmnist.to_model_input(images[chosen]), labels[chosen]
        draw = torch.Generator().manual_seed(SEED * 1_000_003 + 7_919 * step + 1)
        noise = torch.randn(clean.shape, generator=draw)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=draw)
        noisy = scheduler.add_noise(clean, noise, timesteps)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        with autocast(), sdpa_kernel(SDPBackend.MATH):
            predicted = unet(noisy, timesteps, class_labels=batch_labels).sample
        loss = F.mse_loss(predicted.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, tensor in unet.state_dict().items():
                if tensor.is_floating_point():
                    ema[name].lerp_(tensor, 1 - decay)
                else:
                    ema[name].copy_(tensor)
        losses.append(loss.item())
        seconds += time.perf_counter() - began
        bar.set_postfix(loss=f"{sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]):.4f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        if time.monotonic() - last_checkpoint > 60 * args.checkpoint_minutes:
            checkpoint(step + 1)
            last_checkpoint = time.monotonic()
    bar.close()
    checkpoint(args.steps)

    fmnist.ASSETS.mkdir(parents=True, exist_ok=True)
    write_safetensors(fmnist.DDPM_PATH, {name: tensor.contiguous() for name, tensor in ema.items()})
    final_loss = sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])
    update_record("ddpm", {
        "unet_config": settings["unet"], "scheduler_config": fmnist.SCHEDULER_CONFIG,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "weights": "EMA of the training weights (decay 0.999 with warm-up (1+step)/(10+step))",
        "training": {"steps": args.steps, "batch": args.batch, "optimizer": "AdamW (weight decay 0.01)",
                     "lr": args.lr, "schedule": f"linear warm-up {WARMUP_STEPS} steps, cosine to {FINAL_LR_FRACTION} x lr",
                     "grad_clip": 1.0, "precision": args.precision, "seed": SEED,
                     "epochs": round(args.steps * args.batch / len(images), 2)},
        "final_train_loss": round(final_loss, 5), "final_loss_window_steps": LOSS_WINDOW,
        "train_seconds": round(seconds, 1), "threads": args.threads, "cpu": cpu_name(),
    })
    print(f"DDPM: {args.steps} steps in {seconds:.0f} s, final loss {final_loss:.4f}; wrote {fmnist.DDPM_PATH}", flush=True)


@torch.no_grad()
def accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.eval()
    predicted, _ = fmnist.classify(classifier, fmnist.to_model_input(images))
    return (predicted == labels).double().mean().item()


def train_classifier(args, images: torch.Tensor, labels: torch.Tensor) -> None:
    from tqdm import tqdm

    batch, lr = 128, 1e-3
    settings = {"model": "classifier", "epochs": args.classifier_epochs, "batch": batch, "lr": lr, "seed": SEED}
    torch.manual_seed(SEED)
    classifier = fmnist.Classifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    checkpoint_path = work_dir() / "classifier.pt"
    start_epoch, seconds = 0, 0.0
    state = load_checkpoint(checkpoint_path, settings)
    if state is not None:
        classifier.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, seconds = int(state["epoch"]), float(state["seconds"])
        print(f"resuming the classifier after epoch {start_epoch}", flush=True)
    batches_per_epoch = len(images) // batch
    test_images, test_labels = load_fashion_mnist("test")
    for epoch in range(start_epoch, args.classifier_epochs):
        classifier.train()
        order = epoch_order(10_000 + epoch, len(images))  # its own orders, apart from the DDPM's
        began, total = time.perf_counter(), 0.0
        bar = tqdm(range(batches_per_epoch), desc=f"classifier epoch {epoch + 1}/{args.classifier_epochs}",
                   unit="batch", mininterval=5, dynamic_ncols=True)
        for position in bar:
            chosen = order[position * batch:(position + 1) * batch]
            loss = F.cross_entropy(classifier(fmnist.to_model_input(images[chosen])), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (position + 1):.4f}", refresh=False)
        bar.close()
        seconds += time.perf_counter() - began
        save_checkpoint(checkpoint_path, {"settings": json.dumps(settings), "epoch": epoch + 1, "seconds": seconds,
                                          "model": classifier.state_dict(), "optimizer": optimizer.state_dict()})
        print(f"classifier epoch {epoch + 1}: train loss {total / batches_per_epoch:.4f}, "
              f"test accuracy {accuracy(classifier, test_images, test_labels):.4f}", flush=True)

    test_accuracy = accuracy(classifier, test_images, test_labels)
    fmnist.ASSETS.mkdir(parents=True, exist_ok=True)
    write_safetensors(fmnist.CLASSIFIER_PATH, {name: t.contiguous() for name, t in classifier.state_dict().items()})
    update_record("classifier", {
        "architecture": "conv3x3 1->32, pool, conv3x3 32->64, pool, conv3x3 64->128, pool, linear 2048->128 "
                        "(ReLU: the features), linear 128->10; input [N, 1, 32, 32] in [-1, 1]",
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "training": {"epochs": args.classifier_epochs, "batch": batch, "optimizer": "Adam", "lr": lr, "seed": SEED},
        "test_accuracy": round(test_accuracy, 4), "train_seconds": round(seconds, 1),
        "threads": args.threads, "cpu": cpu_name(),
    })
    print(f"classifier: test accuracy {test_accuracy:.4f} after {args.classifier_epochs} epochs "
          f"({seconds:.0f} s); wrote {fmnist.CLASSIFIER_PATH}", flush=True)


def evaluate(args) -> None:
    """Sample the trained DDPM (EMA weights, float32, 50 DDIM steps, seed 0): a grid of 10 samples
    per class, one row per class, to benchmarks/results/fmnist-samples-dense.png; and the class
    accuracy and Fréchet distance of 500 samples (50 per class) against 500 test images, with the
    distance between two disjoint sets of 500 test images as the floor. Recorded in assets.json."""
    from secateurs.eval.images import ddim_sample, save_image_grid

    unet, classifier = fmnist.load_unet(), fmnist.load_classifier()
    denoiser = fmnist.denoiser_fn(unet)
    began = time.perf_counter()
    grid_labels = torch.arange(fmnist.NUM_CLASSES).repeat_interleave(10)
    grid = ddim_sample(denoiser, grid_labels, seed=SEED, steps=50, scheduler_config=fmnist.SCHEDULER_CONFIG, progress=True)
    grid_path = fmnist.ROOT / "benchmarks" / "results" / "fmnist-samples-dense.png"
    grid_accuracy = (fmnist.classify(classifier, grid)[0] == grid_labels).double().mean().item()
    save_image_grid(grid, grid_path, nrow=10, title=f"dense DDPM (EMA weights), 50 DDIM steps, seed {SEED}\nrows: "
                    + ", ".join(CLASS_NAMES[:5]) + ",\n" + ", ".join(CLASS_NAMES[5:]))

    count = 500
    labels = fmnist.balanced_labels(count)
    samples = ddim_sample(denoiser, labels, seed=SEED, steps=50, scheduler_config=fmnist.SCHEDULER_CONFIG, progress=True)
    sampling_seconds = time.perf_counter() - began
    reference_images, _ = fmnist.test_subset(count // fmnist.NUM_CLASSES)
    other_images, other_labels = fmnist.test_subset(count // fmnist.NUM_CLASSES, skip_per_class=count // fmnist.NUM_CLASSES)
    reference_features = fmnist.classify(classifier, reference_images)[1]
    scores = fmnist.judge(classifier, samples, labels, reference_features)
    real = fmnist.judge(classifier, other_images, other_labels, reference_features)
    record = {"protocol": f"{count} samples (labels i % 10), seed {SEED}, 50 DDIM steps (eta 0), float32 EMA weights; "
                          "FD on the classifier's 128-d features vs the first 50 test images of each class",
              "class_accuracy": round(scores["class_accuracy"], 4), "frechet_distance": round(scores["frechet_distance"], 3),
              "per_class_accuracy": {name: round(value, 3) for name, value in scores["per_class_accuracy"].items()},
              "real_vs_real_frechet_distance": round(real["frechet_distance"], 3),
              "real_class_accuracy": round(real["class_accuracy"], 4),
              "grid_class_accuracy": round(grid_accuracy, 4), "sampling_seconds": round(sampling_seconds, 1)}
    update_record("samples", record)
    print(json.dumps(record, indent=2), f"\nwrote {grid_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600, help="DDPM optimizer steps")
    parser.add_argument("--batch", type=int, default=128, help="DDPM batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="DDPM peak learning rate")
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="DDPM forward/backward")
    parser.add_argument("--checkpoint-minutes", type=float, default=4.0)
    parser.add_argument("--only", choices=("ddpm", "classifier", "evaluate"),
                        help="train just one of the two, or just sample and score the trained DDPM")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.only == "evaluate":
        evaluate(args)
        return
    images, labels = load_fashion_mnist("train")
    if args.only in (None, "classifier"):
        train_classifier(args, images, labels)
    if args.only in (None, "ddpm"):
        train_ddpm(args, images, labels)
    if args.only is None:
        evaluate(args)


if __name__ == "__main__":
    main()
