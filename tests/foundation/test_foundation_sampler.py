"""The calibration sampler: seeded random contiguous windows."""

import pytest
import torch

from secateurs.data.corpus import sample_windows
from secateurs.errors import SecateursError


def distinct_ids(n: int) -> torch.Tensor:
    return torch.randperm(10 * n, generator=torch.Generator().manual_seed(0))[:n]


def starts_of(windows: torch.Tensor, ids: torch.Tensor) -> list[int]:
    """Start offset of each window in ids, asserting it is a contiguous slice (ids are distinct)."""
    position = {value: index for index, value in enumerate(ids.tolist())}
    starts = []
    for window in windows:
        start = position[window[0].item()]
        assert torch.equal(window, ids[start : start + window.numel()])
        starts.append(start)
    return starts


def test_shape_and_dtype():
    ids = distinct_ids(300)
    windows = sample_windows(ids, samples=7, seqlen=32, seed=1)
    assert windows.shape == (7, 32) and windows.dtype == ids.dtype


def test_windows_are_contiguous_slices_covering_both_ends():
    ids = distinct_ids(40)
    starts = starts_of(sample_windows(ids, samples=400, seqlen=10, seed=3), ids)
    assert min(starts) == 0 and max(starts) == 30  # the last possible window is reachable


def test_deterministic_by_seed():
    ids = distinct_ids(500)
    assert torch.equal(sample_windows(ids, 8, 16, seed=5), sample_windows(ids, 8, 16, seed=5))
    assert torch.equal(sample_windows(ids, 8, 16), sample_windows(ids, 8, 16, seed=0))
    torch.manual_seed(123)  # the global RNG plays no part
    first = sample_windows(ids, 8, 16, seed=5)
    torch.manual_seed(456)
    assert torch.equal(first, sample_windows(ids, 8, 16, seed=5))


def test_different_seeds_differ():
    ids = distinct_ids(500)
    draws = [sample_windows(ids, 8, 16, seed=s) for s in range(4)]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i + 1, 4))


def test_window_as_long_as_the_text():
    ids = distinct_ids(16)
    assert torch.equal(sample_windows(ids, 3, 16), ids.expand(3, 16))


def test_text_shorter_than_one_window():
    with pytest.raises(SecateursError, match="shorter than one window of 17"):
        sample_windows(distinct_ids(16), 1, 17)
    with pytest.raises(SecateursError, match="0 tokens"):
        sample_windows(torch.empty(0, dtype=torch.long), 1, 4)


@pytest.mark.parametrize("samples, seqlen", [(0, 8), (-1, 8), (4, 0), (4, -3)])
def test_bad_sizes(samples, seqlen):
    with pytest.raises(SecateursError, match="samples >= 1 and seqlen >= 1"):
        sample_windows(distinct_ids(100), samples, seqlen)
