"""Weighted k-means for the vector quantizer: nearest centers against a brute-force float64 loop,
the k-means++ draw."""

import importlib

import torch

from secateurs.algorithms.kmeans import nearest_centers, weighted_kmeans

kmeans_module = importlib.import_module("secateurs.algorithms.kmeans")


def brute_force_nearest(points, weights, centers):
    best = []
    for x, w in zip(points.double(), weights.double()):
        distances = [float((w * (x - c.double()).square()).sum()) for c in centers]
        best.append(min(range(len(centers)), key=distances.__getitem__))
    return torch.tensor(best)


def test_nearest_centers_match_brute_force_across_chunks(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    points, weights = torch.randn(300, 8, generator=generator), torch.rand(300, 8, generator=generator)
    centers = torch.randn(20, 8, generator=generator)
    expected = brute_force_nearest(points, weights, centers)
    assert torch.equal(nearest_centers(points, weights, centers), expected)
    monkeypatch.setattr(kmeans_module, "NEAREST_BLOCK", 20 * 7)  # chunks of 7 points, a ragged last one
    monkeypatch.setattr(kmeans_module, "NEAREST_MIN_CHUNK", 1)
    assert torch.equal(nearest_centers(points, weights, centers), expected)


def test_weights_decide_which_center_is_nearest():
    point = torch.tensor([[1.0, 1.0]])
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nearest_centers(point, torch.tensor([[1.0, 10.0]]), centers).item() == 1
    assert nearest_centers(point, torch.tensor([[10.0, 1.0]]), centers).item() == 0


def test_first_above_never_draws_a_weightless_point():
    cumulative = torch.tensor([0.0, 0.0, 1.0, 1.0, 4.0, 4.0])  # weights 0, 0, 1, 0, 3, 0
    assert [kmeans_module._first_above(cumulative, torch.tensor(v)) for v in (0.0, 0.5, 1.0, 3.9, 4.0)] == [2, 2, 4, 4, 4]


def test_kmeans_plus_plus_draws_in_proportion_to_distance():
    """Seeding 2 centers from 3 points, the first drawn uniformly: the second is drawn with
    probability distance / total, measured over many seeds against the exact frequencies."""
    points = torch.tensor([[0.0], [1.0], [3.0]])
    weights = torch.ones(3, 1)
    counts = torch.zeros(3, 3)
    for seed in range(3000):
        generator = torch.Generator().manual_seed(seed)
        centers = weighted_kmeans(points, weights, 2, 0, generator)
        first = int((points[:, 0] == centers[0, 0]).nonzero())
        second = int((points[:, 0] == centers[1, 0]).nonzero())
        assert second != first
        counts[first, second] += 1
    distances = (points - points.T).square()  # [first, second]
    expected = distances / distances.sum(1, keepdim=True)
    observed = counts / counts.sum(1, keepdim=True)
    assert (observed - expected).abs().max() < 0.05


def test_as_many_distinct_points_as_centers_become_the_centers():
    points = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]).repeat(10, 1)
    centers = weighted_kmeans(points, torch.ones_like(points), 3, 5, torch.Generator().manual_seed(1))
    assert sorted(map(tuple, centers.tolist())) == [(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)]
