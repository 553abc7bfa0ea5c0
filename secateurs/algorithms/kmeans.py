"""Weighted k-means for the vector quantizer's codebooks (vq.py): every point carries its own weight
per coordinate, the diagonal of the loss the codewords will be judged by."""

import torch
from torch import Tensor

# Scores per block when matching points to their nearest center: a [chunk, k] block of 128K floats
# (512 KB) stays in cache between the product that writes it and the argmin that reads it. On a
# 110K-point layer with 256 centers (Zen 3, one thread) a call took 199 ms with blocks of 16K points
# and two products, 70-100 ms like this.
NEAREST_BLOCK = 1 << 17
# ... but never fewer than this many points per product (huge codebooks: the Python loop's cost).
NEAREST_MIN_CHUNK = 64
# k-means++ seeds from at most this many points (a seeded random subset beyond): its k passes over
# the data dominate otherwise, and torch.multinomial takes at most 2**24 categories.
KMEANS_SEED_POINTS = 1 << 18


def nearest_centers(points: Tensor, weights: Tensor, centers: Tensor) -> Tensor:
    """[N] int64: for each point, the center c minimizing sum_t weights_t (point_t - c_t)^2."""
    return _nearest(_features(points, weights), centers)


def _features(points: Tensor, weights: Tensor) -> Tensor:
    """[N, 2 dim]: (w, w x) per point. The weighted distance to c less its part that does not depend
    on c (sum_t w_t x_t^2) is sum_t w_t c_t^2 - 2 sum_t w_t x_t c_t: one product with (c^2, -2c)."""
    return torch.cat([weights, weights * points], 1)


def _nearest(features: Tensor, centers: Tensor) -> Tensor:
    basis = torch.cat([centers.square(), -2 * centers], 1).T  # [2 dim, k]
    chunk = max(NEAREST_MIN_CHUNK, NEAREST_BLOCK // centers.shape[0])
    return torch.cat([(features[start : start + chunk] @ basis).argmin(1)
                      for start in range(0, features.shape[0], chunk)])


def weighted_kmeans(points: Tensor, weights: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """k centers [k, dim] of weighted k-means (each point has its own weight per coordinate):
    k-means++ seeding, then Lloyd iterations, each center coordinate the weighted mean of its
    points' (a coordinate no point weighs keeps its value, as does an empty cluster).

    k-means++ never picks a point already at distance 0 from a center while another is not, so data
    holding at most k distinct points gets every one of them as a center (the exact case).
    """
    seeds, seed_weights = points, weights
    if points.shape[0] > KMEANS_SEED_POINTS:
        subset = torch.randperm(points.shape[0], generator=generator)[:KMEANS_SEED_POINTS]
        seeds, seed_weights = points[subset], weights[subset]
    n = seeds.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = points.new_empty(k, points.shape[1])
    centers[0] = seeds[first]
    distances = (seed_weights * (seeds - centers[0]).square()).sum(1)
    for c in range(1, k):
        cumulative = distances.cumsum(0)
        total = cumulative[-1]
        if total > 0:  # drawn with probability distance / total (multinomial took 4 ms a draw, this 0.2)
            pick = _first_above(cumulative, torch.rand((), generator=generator, dtype=total.dtype) * total)
        else:  # fewer distinct points than centers: the spare centers repeat points
            pick = int(torch.randint(n, (1,), generator=generator))
        centers[c] = seeds[pick]
        distances = torch.minimum(distances, (seed_weights * (seeds - centers[c]).square()).sum(1))
    features = _features(points, weights)
    weighted_points = features[:, points.shape[1]:]
    for _ in range(iters):
        assignment = _nearest(features, centers)
        sums = torch.zeros_like(centers).index_add_(0, assignment, weighted_points)
        mass = torch.zeros_like(centers).index_add_(0, assignment, weights)
        updated = torch.where(mass > 0, sums / mass.clamp(min=torch.finfo(mass.dtype).tiny), centers)
        if torch.equal(updated, centers):
            break
        centers = updated
    return centers


def _first_above(cumulative: Tensor, value: Tensor) -> int:
    """The first index whose cumulative weight exceeds `value` (in [0, total]): its own weight is
    > 0, so a point at distance 0 is never drawn. A value rounded up to the total takes the first
    index that reaches it."""
    index = int(torch.searchsorted(cumulative, value, right=True))
    return index if index < len(cumulative) else int(torch.searchsorted(cumulative, cumulative[-1]))
