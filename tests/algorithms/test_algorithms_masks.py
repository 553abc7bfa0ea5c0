import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.algorithms import magnitude_mask, wanda_mask


def rounded(x: float) -> int:
    return int(x + 0.5)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 17), sparsity=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_magnitude_exact_counts(rows, cols, sparsity, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    kept = magnitude_mask(W, sparsity)
    assert int((~kept).sum()) == rounded(sparsity * rows * cols)
    magnitude = W.abs().flatten()
    assert torch.cat([magnitude[kept.flatten()], torch.tensor([torch.inf])]).min() >= torch.cat(
        [magnitude[~kept.flatten()], torch.tensor([0.0])]
    ).max()
    per_row = magnitude_mask(W, sparsity, per_row=True)
    assert ((~per_row).sum(1) == rounded(sparsity * cols)).all()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), blocks=st.integers(1, 5), unit=st.sampled_from([2, 4]), sparsity=st.floats(0, 1),
       per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_magnitude_blocks_pruned_whole_by_their_norm(rows, blocks, unit, sparsity, per_row, seed):
    W = torch.randn(rows, blocks * unit, generator=torch.Generator().manual_seed(seed))
    kept = magnitude_mask(W, sparsity, per_row=per_row, unit=unit).reshape(rows, blocks, unit)
    assert (kept.all(-1) | ~kept.any(-1)).all()  # every block whole
    block_kept, norms = kept[..., 0], W.reshape(rows, blocks, unit).norm(dim=-1)
    expected = [rounded(sparsity * blocks)] * rows if per_row else [rounded(sparsity * rows * blocks)]
    groups = [(block_kept[r], norms[r]) for r in range(rows)] if per_row else [(block_kept.flatten(), norms.flatten())]
    for (keep, norm), count in zip(groups, expected):
        assert int((~keep).sum()) == count
        if keep.any() and (~keep).any():  # every kept block at least as large as every pruned one
            assert norm[keep].min() >= norm[~keep].max() - 1e-6


def test_magnitude_unit_must_divide_the_rows():
    with pytest.raises(ValueError, match="unit"):
        magnitude_mask(torch.randn(2, 6), 0.5, unit=4)


def test_ties_are_broken_by_index():
    W = torch.ones(2, 4)
    assert magnitude_mask(W, 0.5).tolist() == [[False, False, False, False], [True, True, True, True]]
    assert magnitude_mask(W, 0.5, per_row=True).tolist() == [[False, False, True, True]] * 2


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_patterns(n, m):
    W = torch.randn(6, 16)
    col_norm = torch.rand(16) + 0.1
    for mask, score in [
        (magnitude_mask(W, 0.0, n=n, m=m), W.abs()),
        (wanda_mask(W, col_norm, 0.0, n=n, m=m).mask, W.abs() * col_norm),
    ]:
        groups, scores = mask.reshape(6, -1, m), score.reshape(6, -1, m)
        assert (groups.sum(-1) == n).all()
        kept_min = torch.where(groups, scores, torch.inf).amin(-1)
        pruned_max = torch.where(groups, -torch.inf, scores).amax(-1)
        assert (kept_min >= pruned_max).all()


def test_wanda_prunes_per_row_by_score():
    W = torch.randn(8, 20)
    col_norm = torch.logspace(-2, 2, 20)
    result = wanda_mask(W, col_norm, 0.35)
    assert ((~result.mask).sum(1) == 7).all()
    score = W.abs() * col_norm
    for row in range(8):
        assert score[row][result.mask[row]].min() >= score[row][~result.mask[row]].max()
    assert torch.equal(result.weight, torch.where(result.mask, W, 0.0))
    # the column norms matter: magnitude alone picks a different mask here
    assert not torch.equal(result.mask, magnitude_mask(W, 0.35, per_row=True))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsity": 1.3}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "n": 3, "m": 2}, "n:m"),
        ({"sparsity": 0.5, "n": 2, "m": 0}, "n:m"),
        ({"sparsity": 0.5, "n": 2, "m": 3}, "divisible"),
    ],
)
def test_validation(kwargs, field):
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match=field):
        magnitude_mask(W, **kwargs)
    with pytest.raises(ValueError, match=field):
        wanda_mask(W, torch.ones(8), **kwargs)
