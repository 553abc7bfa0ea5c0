"""Weighted k-means for the vector quantizer's codebooks (vq.py): every point carries its own weight
per coordinate, the diagonal of the loss the codewords will be judged by."""

import torch
from torch import Tensor

# Points per chunk when matching groups to their nearest codeword (bounds a [chunk, 2**B] block).
NEAREST_CHUNK = 16384
# k-means++ seeds from at most this many points (a seeded random subset beyond): its k passes over
# the data dominate otherwise, and torch.multinomial takes at most 2**24 categories.
KMEANS_SEED_POINTS = 1 << 18


def nearest_centers(points: Tensor, weights: Tensor, centers: Tensor) -> Tensor:
    """[N] int64: for each point, the center c minimizing sum_t weights_t (point_t - c_t)^2, by
    chunks of points (sum_t w_t c_t^2 - 2 sum_t w_t x_t c_t: two [chunk, dim] x [dim, k] products)."""
    squares = centers.square().T
    return torch.cat([
        torch.addmm(weights[chunk] @ squares, weights[chunk] * points[chunk], centers.T, alpha=-2).argmin(1)
        for chunk in (slice(start, start + NEAREST_CHUNK) for start in range(0, points.shape[0], NEAREST_CHUNK))
    ])


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
        total = distances.sum()
        if total > 0:
            pick = int(torch.multinomial(distances / total, 1, generator=generator))
        else:  # fewer distinct points than centers: the spare centers repeat points
            pick = int(torch.randint(n, (1,), generator=generator))
        centers[c] = seeds[pick]
        distances = torch.minimum(distances, (seed_weights * (seeds - centers[c]).square()).sum(1))
    weighted_points = weights * points
    for _ in range(iters):
        assignment = nearest_centers(points, weights, centers)
        sums = torch.zeros_like(centers).index_add_(0, assignment, weighted_points)
        mass = torch.zeros_like(centers).index_add_(0, assignment, weights)
        updated = torch.where(mass > 0, sums / mass.clamp(min=torch.finfo(mass.dtype).tiny), centers)
        if torch.equal(updated, centers):
            break
        centers = updated
    return centers
