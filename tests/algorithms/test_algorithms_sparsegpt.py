import statistics

import pytest
import torch

from secateurs.algorithms import QuantSpec, dequantize, magnitude_mask, sparsegpt, wanda_mask


def sequential_obs_reference(W, H, keep):
    """Fix columns left to right (kept: unchanged, pruned: 0) and compensate on the remaining
    columns with the explicit inverse of their Hessian block: the OBS update of the paper."""
    W = W.clone()
    for j in range(W.shape[1]):
        hinv = torch.linalg.inv(H[j:, j:])
        target = torch.where(keep[:, j], W[:, j], 0.0)
        W[:, j:] -= (W[:, j] - target)[:, None] * hinv[0] / hinv[0, 0]
        W[:, j] = target
    return W


def test_fixed_mask_matches_sequential_obs_reference(problem, loss_of, close):
    W, _, H = problem(0, cols=24)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    result = sparsegpt(W, H, 0.0, fixed_mask=keep, block_size=5, percdamp=0.0)
    close(result.weight, sequential_obs_reference(W, H, keep), 1e-9)
    assert torch.equal(result.mask, keep) and (result.weight[~keep] == 0).all()
    assert result.loss == pytest.approx(loss_of(W, result.weight, H), rel=1e-9)


def test_fixed_prefix_mask_is_the_exact_least_squares_reconstruction(problem, close):
    # The sweep only compensates to the right, so it is the exact least-squares optimum when every
    # pruned weight of a row precedes its kept ones.
    W, X, H = problem(2, rows=6, cols=20)
    prefix = torch.tensor([0, 3, 7, 10, 15, 19])
    keep = torch.arange(20)[None, :] >= prefix[:, None]
    result = sparsegpt(W, H, 0.0, fixed_mask=keep, block_size=8, percdamp=0.0)
    for row, start in enumerate(prefix.tolist()):
        target = X.T @ W[row]
        best = torch.linalg.lstsq(X[start:].T, target[:, None]).solution.flatten()
        close(result.weight[row, start:], best, 1e-8)


@pytest.mark.parametrize("sparsity, block_size", [(0.5, 8), (0.3, 7), (0.77, 128), (0.0, 4), (1.0, 16)])
def test_exact_unstructured_sparsity(problem, loss_of, sparsity, block_size):
    W, _, H = problem(3, rows=9, cols=30, dtype=torch.float32)
    result = sparsegpt(W, H, sparsity, block_size=block_size)
    target = int(sparsity * W.numel() + 0.5)
    assert int((~result.mask).sum()) == target == int((result.weight == 0).sum())
    assert result.weight.dtype == torch.float32
    assert result.loss == pytest.approx(loss_of(W, result.weight, H, result.damp), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("n, m, block_size", [(2, 4, 128), (4, 8, 16), (1, 4, 6)])
def test_nm_pattern_in_every_group(problem, n, m, block_size):
    W, _, H = problem(4, cols=32, dtype=torch.float32)
    result = sparsegpt(W, H, 0.0, n=n, m=m, block_size=block_size)
    assert (result.mask.reshape(W.shape[0], -1, m).sum(-1) == n).all()
    assert torch.equal(result.weight != 0, result.mask)


@pytest.mark.parametrize("dead, sparsity", [([1, 9, 30], 0.5), (list(range(24, 32)), 0.5), (list(range(8)), 0.1)])
def test_dead_and_rank_deficient_inputs(problem, dead, sparsity):
    W, X, _ = problem(5, cols=32, tokens=20, dtype=torch.float32)  # rank 20 < 32
    X[dead] = 0
    H = 2 * X @ X.T / X.shape[1]
    result = sparsegpt(W, H, sparsity, block_size=8)
    assert torch.isfinite(result.weight).all()
    assert not result.mask[:, dead].any()  # dead inputs are pruned and counted
    expected = max(int(sparsity * W.numel() + 0.5), W.shape[0] * len(dead))
    assert int((~result.mask).sum()) == expected == int((result.weight == 0).sum())
    nm = sparsegpt(W, H, 0.0, n=2, m=4)
    assert (nm.mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all() and (nm.weight[:, dead] == 0).all()


def test_deterministic(problem):
    W, _, H = problem(6, dtype=torch.float32)
    first, second = sparsegpt(W, H, 0.6, block_size=8), sparsegpt(W, H, 0.6, block_size=8)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)


# Damping by 0.01 x mean(diag H) swamps the small inputs when their scales span 4 decades (the
# mean is set by the largest ones): SparseGPT then loses to Wanda, so that case uses less damping.
@pytest.mark.parametrize("decades, percdamp", [(1, 0.01), (2, 1e-4)])
def test_beats_wanda_beats_magnitude_on_correlated_inputs(problem, error_of, decades, percdamp):
    errors = {"sparsegpt": [], "wanda": [], "magnitude": []}
    for seed in range(20):
        W, X, H = problem(100 + seed, dtype=torch.float32, decades=decades)
        errors["sparsegpt"].append(error_of(W, sparsegpt(W, H, 0.5, percdamp=percdamp).weight, X))
        errors["wanda"].append(error_of(W, wanda_mask(W, X.norm(dim=1), 0.5).weight, X))
        errors["magnitude"].append(error_of(W, W * magnitude_mask(W, 0.5), X))
    mean = {name: statistics.fmean(values) for name, values in errors.items()}
    assert mean["sparsegpt"] <= mean["wanda"] <= mean["magnitude"], mean


@pytest.mark.parametrize("group_size", [None, 8, 12])
def test_joint_sparse_quant(problem, group_size):
    W, _, H = problem(7, rows=10, cols=24, dtype=torch.float32)
    spec = QuantSpec(bits=3, symmetric=False, group_size=group_size)
    result = sparsegpt(W, H, 0.5, block_size=8, quant=spec)
    assert int((~result.mask).sum()) == 120
    assert (result.weight[~result.mask] == 0).all()
    groups = torch.arange(24) // (group_size or 24)
    scale, zero = result.scale[:, groups], result.zero[:, groups]
    assert torch.equal(result.weight, dequantize(result.codes, scale, zero))
    assert torch.equal(result.codes[~result.mask].float(), zero[~result.mask])
    assert result.scale.shape == (10, len(groups.unique()))


def test_joint_nm_quant_and_fixed_mask_with_act_order(problem):
    W, _, H = problem(8, cols=16, dtype=torch.float32)
    spec = QuantSpec(bits=4, group_size=8)
    nm = sparsegpt(W, H, 0.0, n=2, m=4, quant=spec)
    assert (nm.mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all() and (nm.weight[~nm.mask] == 0).all()
    keep = nm.mask
    ordered = sparsegpt(W, H, 0.0, fixed_mask=keep, quant=QuantSpec(bits=4, group_size=8, act_order=True))
    assert torch.equal(ordered.mask, keep) and (ordered.weight[~keep] == 0).all()
    groups = torch.arange(16) // 8
    assert torch.equal(ordered.weight, dequantize(ordered.codes, ordered.scale[:, groups], ordered.zero[:, groups]))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsity": 1.3}, "sparsity"),
        ({"sparsity": 0.0, "n": 3, "m": 2}, "n:m"),
        ({"sparsity": 0.0, "n": 2, "m": 3}, "divisible"),
        ({"sparsity": 0.0, "n": 2, "m": 4, "quant": QuantSpec(act_order=True)}, "act_order"),
        ({"sparsity": 0.5, "block_size": 0}, "block_size"),
        ({"sparsity": 0.5, "fixed_mask": torch.ones(3, 3, dtype=torch.bool)}, "fixed_mask"),
    ],
)
def test_validation(problem, kwargs, field):
    W, _, H = problem(9, rows=4, cols=8)
    with pytest.raises(ValueError, match=field):
        sparsegpt(W, H, **kwargs)


@pytest.mark.parametrize("group, sparsity, block_size", [(4, 0.7, 128), (2, 0.5, 7), (4, 0.3, 8), (8, 0.9, 16)])
def test_row_groups_share_one_mask(problem, loss_of, group, sparsity, block_size):
    W, _, H = problem(11, rows=16, cols=32, dtype=torch.float32)
    result = sparsegpt(W, H, sparsity, block_size=block_size, mask_rows=group)
    shared = result.mask.reshape(-1, group, W.shape[1])
    assert (shared == shared[:, :1]).all()  # every row of a group keeps the same columns
    assert int((~shared[:, 0]).sum()) == int(sparsity * W.numel() / group + 0.5)
    assert torch.equal(result.weight != 0, result.mask)
    assert result.loss == pytest.approx(loss_of(W, result.weight, H, result.damp), rel=1e-4, abs=1e-6)
    # given its mask, the sweep is the fixed-mask OBS reconstruction
    fixed = sparsegpt(W, H, 0.0, block_size=block_size, fixed_mask=result.mask)
    assert torch.allclose(fixed.weight, result.weight, atol=1e-5)


def test_row_group_selection_prunes_the_lowest_summed_obs_scores(problem):
    # One selection over the whole layer (block_size >= cols), on the original weights: a group's
    # column goes when the sum of its rows' w^2 / [chol(H^-1)]_jj^2 is among the lowest.
    W, _, H = problem(12, rows=8, cols=12)
    group, sparsity = 4, 0.5
    result = sparsegpt(W, H, sparsity, block_size=12, percdamp=0.0, mask_rows=group)
    u = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).diagonal()
    scores = (W / u).square().reshape(-1, group, 12).sum(1).flatten()
    pruned = scores.argsort()[: int(sparsity * scores.numel())]
    expected = torch.ones_like(scores, dtype=torch.bool)
    expected[pruned] = False
    assert torch.equal(result.mask.reshape(-1, group, 12)[:, 0].flatten(), expected)


@pytest.mark.parametrize("kwargs", [{"mask_rows": 3}, {"mask_rows": 0}, {"mask_rows": 2, "n": 2, "m": 4}])
def test_row_group_validation(problem, kwargs):
    W, _, H = problem(13, rows=4, cols=8)
    with pytest.raises(ValueError, match="mask_rows"):
        sparsegpt(W, H, 0.5, **kwargs)
