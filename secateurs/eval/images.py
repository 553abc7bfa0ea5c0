"""Judging image diffusion models: deterministic DDIM sampling, the Fréchet distance between two
sets of features, and a PNG grid of samples to look at.

Sampling is reproducible per sample: sample i of a given seed starts from noise drawn from its own
generator (seeded from (seed, i)), and DDIM with eta 0 adds no further noise, so the image depends
only on the denoiser, the seed, i and its label, never on the batch size or on how many samples are
drawn alongside it. A compressed model can thus be compared with the dense one sample by sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from secateurs.errors import SecateursError
from secateurs.io import replace_atomically


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of sample `index` under `seed`: a float32 tensor of `shape` from a generator
    seeded by numpy's SeedSequence of (seed, index), so that nearby seeds give unrelated noise."""
    generator_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(generator_seed))


@torch.no_grad()
def ddim_sample(denoiser, labels: torch.Tensor, *, seed: int, steps: int = 50, batch_size: int = 250,
                image_size: int = 32, channels: int = 1, scheduler_config: dict, progress: bool = False) -> torch.Tensor:
    """Float32 images [N, channels, image_size, image_size] in [-1, 1], one per entry of `labels`
    (int64 [N]), by `steps` DDIM steps with eta 0 from the training scheduler's config (a DDPM
    scheduler's `config`, or the dict it was built from). `denoiser(x, t, labels)` returns the
    predicted noise for a batch x [B, C, H, W] at integer timesteps t [B]."""
    from diffusers import DDIMScheduler
    from tqdm import tqdm

    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 1:
        raise SecateursError(f"ddim_sample wants a 1-D tensor of labels, got shape {tuple(labels.shape)}")
    if steps < 1 or batch_size < 1:
        raise SecateursError(f"ddim_sample needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    scheduler = DDIMScheduler.from_config(dict(scheduler_config))
    scheduler.set_timesteps(steps)  # the step function is otherwise stateless, so batches can share it
    shape = (channels, image_size, image_size)
    images = torch.empty(len(labels), *shape)
    batches = range(0, len(labels), batch_size)
    bar = tqdm(total=len(batches) * steps, desc="ddim", unit="step", disable=not progress, dynamic_ncols=True)
    for start in batches:
        batch_labels = labels[start:start + batch_size]
        x = torch.stack([sample_noise(seed, index, shape) for index in range(start, start + len(batch_labels))])
        for t in scheduler.timesteps:
            timesteps = torch.full((len(x),), int(t), dtype=torch.long)
            predicted_noise = denoiser(x, timesteps, batch_labels).float()
            x = scheduler.step(predicted_noise, t, x, eta=0.0).prev_sample
            bar.update(1)
        images[start:start + len(x)] = x.clamp(-1.0, 1.0)
    bar.close()
    return images


def covariance_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix; eigenvalues a rounding
    error below zero are taken as zero."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(features_a, features_b) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets [N, D] (rows are samples;
    torch tensors or numpy arrays), in float64:
        ||mu_a - mu_b||² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½)
    with unbiased sample covariances. The trace of the matrix square root is the sum of the square
    roots of the eigenvalues of the symmetric matrix S_a^½ S_b S_a^½, so symmetric eigendecompositions
    suffice (no scipy.linalg.sqrtm)."""
    sets = []
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise SecateursError(f"frechet_distance: {name} must be [N >= 2, D], got shape {features.shape}")
        if not np.isfinite(features).all():
            raise SecateursError(f"frechet_distance: {name} holds NaN or infinite values")
        sets.append(features)
    a, b = sets
    if a.shape[1] != b.shape[1]:
        raise SecateursError(f"frechet_distance: feature widths differ ({a.shape[1]} and {b.shape[1]})")
    mean_gap = a.mean(axis=0) - b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = covariance_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(middle_eigenvalues, 0.0, None)).sum()
    distance = mean_gap @ mean_gap + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # the true value is >= 0; below it is rounding error


def image_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] -> one [rows*(H+1)+1, nrow*(W+1)+1] float array in [0, 1], the images
    in row-major order separated by 1-pixel mid-grey lines; missing cells stay grey."""
    count, _, height, width = images.shape
    rows = -(-count // nrow)
    grid = np.full((rows * (height + 1) + 1, nrow * (width + 1) + 1), 0.5)
    pixels = ((images[:, 0].detach().cpu().double().clamp(-1, 1) + 1) / 2).numpy()
    for index in range(count):
        row, column = divmod(index, nrow)
        top, left = 1 + row * (height + 1), 1 + column * (width + 1)
        grid[top:top + height, left:left + width] = pixels[index]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, title: str | None = None) -> None:
    """Write single-channel images [N, 1, H, W] in [-1, 1] as a PNG grid, `nrow` images per row, with
    an optional title; the file is replaced atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.ndim != 4 or images.shape[1] != 1:
        raise SecateursError(f"save_image_grid wants single-channel images [N, 1, H, W], got {tuple(images.shape)}")
    if nrow < 1 or len(images) == 0:
        raise SecateursError(f"save_image_grid needs nrow >= 1 and at least one image (nrow {nrow}, {len(images)} images)")
    grid = image_grid(images, nrow)
    scale = 3.0 / 100  # inches per grid pixel: 3 screen pixels per image pixel at dpi 100
    title_inches = 0.1 + 0.18 * (title.count("\n") + 1) if title else 0.0
    figure = plt.figure(figsize=(grid.shape[1] * scale, grid.shape[0] * scale + title_inches), dpi=100)
    axes = figure.add_axes((0.0, 0.0, 1.0, grid.shape[0] * scale / figure.get_figheight()))
    axes.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9, y=1.0 - 0.05 / figure.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_atomically(path, lambda staging: figure.savefig(staging, format="png"))
    finally:
        plt.close(figure)
