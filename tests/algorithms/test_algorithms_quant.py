import pytest
import torch

from secateurs.algorithms import QuantSpec, dequantize, fit_grid, quantize_codes, round_to_nearest


@pytest.mark.parametrize(
    "kwargs, field",
    [({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"bits": 4.0}, "bits"), ({"group_size": 0}, "group_size")],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_group_size_minus_one_means_per_row():
    assert QuantSpec(group_size=-1).group_size is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_zero_point(bits):
    scale, zero = fit_grid(torch.randn(5, 7), QuantSpec(bits=bits))
    assert torch.equal(zero, torch.full((5,), 2.0 ** (bits - 1)))
    assert scale.dtype == zero.dtype == torch.float32 and (scale > 0).all()


def test_asymmetric_grid_represents_zero_and_the_range():
    w = torch.randn(6, 9) + torch.arange(6)[:, None] - 2.0
    spec = QuantSpec(bits=4, symmetric=False)
    scale, zero = fit_grid(w, spec)
    assert torch.equal(zero, zero.round()) and ((zero >= 0) & (zero <= 15)).all()
    w_hat = dequantize(quantize_codes(w, scale[:, None], zero[:, None], 4), scale[:, None], zero[:, None])
    # zero is on the grid, and a range that includes 0 is covered up to half a step
    assert (dequantize(zero.to(torch.uint8), scale, zero) == 0).all()
    assert ((w - w_hat).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_rows_get_a_usable_grid(symmetric):
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    result = round_to_nearest(w, QuantSpec(bits=3, symmetric=symmetric))
    assert torch.isfinite(result.scale).all() and (result.scale > 0).all()
    assert (result.weight[[0, 2]] == 0).all()


@pytest.mark.parametrize("group_size, n_groups", [(None, 1), (4, 3), (5, 2), (16, 1)])
def test_rtn_layout(group_size, n_groups):
    W = torch.randn(7, 10)
    spec = QuantSpec(bits=3, symmetric=False, group_size=group_size)
    result = round_to_nearest(W, spec)
    assert result.scale.shape == result.zero.shape == (7, n_groups)
    assert result.codes.dtype == torch.uint8 and int(result.codes.max()) <= 7
    groups = torch.arange(10) // (group_size or 10)
    assert torch.equal(result.weight, dequantize(result.codes, result.scale[:, groups], result.zero[:, groups]))
    # each group's grid is fitted on that group's columns only
    scale, zero = fit_grid(W[:, : group_size or 10], spec)
    assert torch.equal(result.scale[:, 0], scale) and torch.equal(result.zero[:, 0], zero)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_never_increases_the_error(symmetric):
    W = torch.randn(32, 64) ** 3  # heavy tails: clipping pays off
    plain = round_to_nearest(W, QuantSpec(bits=3, symmetric=symmetric))
    clipped = round_to_nearest(W, QuantSpec(bits=3, symmetric=symmetric, mse_clip=True))
    plain_error = (W - plain.weight).square().sum(1)
    clipped_error = (W - clipped.weight).square().sum(1)
    assert (clipped_error <= plain_error * (1 + 1e-6)).all()
    assert clipped_error.sum() < plain_error.sum()


def test_float64_rtn_is_exact_on_the_float32_grid():
    W = torch.randn(4, 8, dtype=torch.float64)
    result = round_to_nearest(W, QuantSpec(bits=4, group_size=4))
    groups = torch.arange(8) // 4
    exact = dequantize(result.codes, result.scale[:, groups], result.zero[:, groups], torch.float64)
    assert result.weight.dtype == torch.float64 and torch.equal(result.weight, exact)
