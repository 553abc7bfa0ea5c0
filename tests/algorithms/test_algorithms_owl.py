import pytest
import torch

from secateurs.algorithms import outlier_fraction, owl_ratios


@pytest.mark.parametrize("target, lam", [(0.5, 0.08), (0.7, 0.1), (0.05, 0.08), (0.6, 0.0)])
def test_mean_bounds_and_monotonicity(target, lam):
    fractions = [0.01, 0.05, 0.002, 0.03, 0.2, 0.011]
    ratios = owl_ratios(fractions, target, lam)
    assert sum(ratios) / len(ratios) == pytest.approx(target, abs=1e-12)
    width = min(lam, target, 1 - target)
    assert all(abs(r - target) <= width + 1e-12 for r in ratios)
    if width > 0:
        assert max(abs(r - target) for r in ratios) == pytest.approx(width)
    by_fraction = [r for _, r in sorted(zip(fractions, ratios))]
    assert all(a >= b for a, b in zip(by_fraction, by_fraction[1:]))


def test_dict_input_and_equal_fractions():
    assert owl_ratios({"a": 0.1, "b": 0.1}, 0.5) == {"a": 0.5, "b": 0.5}
    ratios = owl_ratios({"a": 0.3, "b": 0.1}, 0.5, lam=0.05)
    assert ratios == pytest.approx({"a": 0.45, "b": 0.55})


def test_outlier_fraction():
    W = torch.ones(4, 10)
    W[0, 0] = 100.0  # score 100 > 5 x mean (~3.5): the only outlier
    assert outlier_fraction(W, torch.ones(10)) == pytest.approx(1 / 40)
    # pooled over a block: the mean (so the threshold) is shared by both layers
    assert outlier_fraction([W, torch.ones(2, 10)], [torch.ones(10), torch.ones(10)]) == pytest.approx(1 / 60)


def test_validation():
    with pytest.raises(ValueError, match="sparsity"):
        owl_ratios([0.1, 0.2], 1.3)
    with pytest.raises(ValueError, match="lam"):
        owl_ratios([0.1, 0.2], 0.5, lam=-1)
