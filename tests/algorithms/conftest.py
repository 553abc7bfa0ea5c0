"""Small calibration problems shared by the algorithm tests (exposed as fixtures)."""

import pytest
import torch


def make_problem(seed: int, rows: int = 16, cols: int = 32, tokens: int = 256, dtype=torch.float64, decades: float = 2.0):
    """W [rows, cols], X [cols, tokens] correlated (X = A Z), its rows scaled by a shuffled
    logspace(-decades, decades), and H = 2 X X^T / tokens."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    X = mixing @ torch.randn(cols, tokens, generator=gen, dtype=torch.float64)
    X = X * torch.logspace(-decades, decades, cols, dtype=torch.float64)[torch.randperm(cols, generator=gen), None]
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    H = 2 * X @ X.T / tokens
    return W.to(dtype), X.to(dtype), H.to(dtype)


def objective(W, W_hat, H, damp: float = 0.0) -> float:
    """sum over rows of (w - w_hat)^T (H + damp I) (w - w_hat) / 2, in float64."""
    delta = (W - W_hat).double()
    H = H.double() + damp * torch.eye(H.shape[0], dtype=torch.float64)
    return ((delta @ H) * delta).sum().item() / 2


def recon_error(W, W_hat, X) -> float:
    """||(W - W_hat) X||_F^2."""
    return ((W - W_hat).double() @ X.double()).square().sum().item()


def assert_close(actual, expected, tol: float):
    """Like torch.testing.assert_close, without its ~1 s first-call import."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"max abs diff {(actual - expected).abs().max()}"


@pytest.fixture
def close():
    return assert_close


@pytest.fixture
def problem():
    return make_problem


@pytest.fixture
def loss_of():
    return objective


@pytest.fixture
def error_of():
    return recon_error
