import statistics

import pytest
import torch

from secateurs.algorithms import QuantSpec, dequantize, gptq, round_to_nearest, sparsegpt


def on_grid(result, group_size, cols):
    groups = torch.arange(cols) // (group_size or cols)
    return torch.equal(result.weight, dequantize(result.codes, result.scale[:, groups], result.zero[:, groups]))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size, block_size", [(None, 128), (8, 8), (8, 5), (12, 16)])
def test_loss_and_layout(problem, loss_of, act_order, group_size, block_size):
    W, _, H = problem(0, rows=10, cols=24)
    spec = QuantSpec(bits=3, symmetric=False, group_size=group_size, act_order=act_order)
    result = gptq(W, H, spec, block_size=block_size)
    assert result.loss == pytest.approx(loss_of(W, result.weight, H, result.damp), rel=1e-9)
    assert result.codes.dtype == torch.uint8 and result.codes.shape == W.shape and int(result.codes.max()) <= 7
    n_groups = 1 if group_size is None else -(-24 // group_size)
    assert result.scale.shape == result.zero.shape == (10, n_groups)
    assert result.scale.dtype == result.zero.dtype == torch.float32
    groups = torch.arange(24) // (group_size or 24)
    exact = dequantize(result.codes, result.scale[:, groups], result.zero[:, groups], torch.float64)
    assert result.weight.dtype == torch.float64 and torch.equal(result.weight, exact)


@pytest.mark.parametrize("act_order", [False, True])
def test_float32_weights_lie_on_the_grid(problem, act_order):
    W, _, H = problem(1, cols=32, dtype=torch.float32)
    result = gptq(W, H, QuantSpec(bits=4, group_size=8, act_order=act_order), block_size=12)
    assert result.weight.dtype == torch.float32 and on_grid(result, 8, 32)
    assert torch.equal(result.zero, torch.full_like(result.zero, 8.0))


def test_block_size_does_not_change_the_result(problem, close):
    W, _, H = problem(2, cols=24)
    spec = QuantSpec(bits=4, group_size=6, act_order=True)
    reference = gptq(W, H, spec, block_size=1)
    for block_size in (4, 7, 128):
        close(gptq(W, H, spec, block_size=block_size).weight, reference.weight, 1e-9)


def test_is_sparsegpt_without_pruning(problem):
    W, _, H = problem(3, dtype=torch.float32)
    spec = QuantSpec(bits=4, group_size=8)
    assert torch.equal(gptq(W, H, spec).weight, sparsegpt(W, H, 0.0, quant=spec).weight)


def test_deterministic_and_dead_inputs(problem):
    W, X, _ = problem(4, tokens=24, dtype=torch.float32)  # rank-deficient
    X[[0, 5]] = 0
    H = 2 * X @ X.T / X.shape[1]
    spec = QuantSpec(bits=4, symmetric=False, group_size=8, act_order=True)
    first, second = gptq(W, H, spec), gptq(W, H, spec)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.codes, second.codes)
    assert (first.weight[:, [0, 5]] == 0).all()


@pytest.mark.parametrize("spec", [QuantSpec(bits=3), QuantSpec(bits=4, group_size=8, act_order=True)])
def test_beats_rtn_on_correlated_inputs(problem, error_of, spec):
    gptq_errors, rtn_errors = [], []
    for seed in range(20):
        W, X, H = problem(200 + seed, dtype=torch.float32)
        gptq_errors.append(error_of(W, gptq(W, H, spec, block_size=16).weight, X))
        rtn_errors.append(error_of(W, round_to_nearest(W, spec).weight, X))
    assert statistics.fmean(gptq_errors) < statistics.fmean(rtn_errors)
