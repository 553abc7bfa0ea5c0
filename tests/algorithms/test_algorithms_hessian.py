import math
import warnings

import pytest
import torch

from secateurs.algorithms import HessianError, prepare_hessian


def test_factor_is_upper_cholesky_of_damped_inverse(problem, close):
    W, _, H = problem(0)
    prepared = prepare_hessian(H, W, percdamp=0.01)
    U = prepared.hinv_chol
    assert prepared.damp == pytest.approx(0.01 * H.diagonal().mean().item())
    assert torch.equal(U, U.triu()) and U.dtype == torch.float64
    expected = torch.linalg.inv(H + prepared.damp * torch.eye(H.shape[0], dtype=H.dtype))
    close(U.T @ U, expected, 1e-9)
    assert not prepared.dead.any() and torch.equal(prepared.weight, W)


def test_float32_stays_float32_and_inputs_are_not_modified(problem):
    W, _, H = problem(1, dtype=torch.float32)
    W_before, H_before = W.clone(), H.clone()
    prepared = prepare_hessian(H, W)
    assert prepared.hinv_chol.dtype == prepared.weight.dtype == torch.float32
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


def test_dead_inputs_are_zeroed_and_reported(problem):
    W, X, _ = problem(2)
    X[[3, 7]] = 0
    H = 2 * X @ X.T / X.shape[1]
    prepared = prepare_hessian(H, W)
    assert prepared.dead.nonzero().flatten().tolist() == [3, 7]
    assert (prepared.weight[:, [3, 7]] == 0).all()
    assert torch.isfinite(prepared.hinv_chol).all()


def test_mildly_indefinite_recovers_with_more_damping(problem):
    W, _, H = problem(3, decades=0)
    mean_diag = H.diagonal().mean().item()
    shift = torch.linalg.eigvalsh(H).min().item() + 0.05 * mean_diag  # min eigenvalue -0.05 mean
    H = H - shift * torch.eye(H.shape[0], dtype=H.dtype)
    with pytest.warns(RuntimeWarning, match="retrying with 0.1") as record:
        prepared = prepare_hessian(H, W, percdamp=0.01)
    assert len(record) == 1
    assert prepared.damp == pytest.approx(0.1 * H.diagonal().mean().item())


def test_hugely_indefinite_raises_after_max_tries(problem):
    W, _, H = problem(4, decades=0)
    H[0, 1] = H[1, 0] = 1e4 * H.diagonal().mean()  # eigenvalue around -1e4 x mean diag
    with pytest.warns(RuntimeWarning) as record, pytest.raises(HessianError, match=r"0\.01, 0\.1, 1, 10") as info:
        prepare_hessian(H, W, percdamp=0.01, max_tries=4, name="layers.0.mlp")
    assert len(record) == 3
    assert "layers.0.mlp" in str(info.value) and info.value.name == "layers.0.mlp"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_hessian_raises(problem, bad):
    W, _, H = problem(5)
    H[2, 2] = bad
    with pytest.raises(HessianError, match="NaN or Inf"):
        prepare_hessian(H, W)


def test_zero_damping_on_positive_definite_needs_no_warning(problem):
    W, _, H = problem(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_hessian(H, W, percdamp=0.0).damp == 0.0
