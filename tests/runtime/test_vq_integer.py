"""Integer VQ decode (int8 codebooks, int8 activations): the kernels equal layouts.vq_int8_matmul
exactly on every dispatch path, the integer codebooks keep their bound, and a hand computation
of one group checks the reference itself."""

import pytest
import torch

from secateurs.runtime import VQLinear, kernels, layouts
from secateurs.runtime import use_integer_vq
from test_vq_kernel import random_vq

# (rows, cols, codebooks): 1-4 books; rows in 4-row tiles and leftovers; groups in steps of 4 and
# leftovers; rows of 256 code bytes or more (the prefetch branch).
CONFIGS = ((37, 48, 2), (19, 56, 1), (13, 88, 3), (9, 72, 4), (9, 1040, 2), (6, 1048, 4), (4, 32, 2), (1, 8, 1),
           (8, 544, 3))


def integer_books(books, generator):
    codebooks = torch.randn(books, 256, 8, generator=generator) * torch.rand(8, generator=generator) * 3
    return codebooks, layouts.vq_int8_codebooks(codebooks)


def test_integer_codebooks_fit_int8_and_approximate_the_floats():
    generator = torch.Generator().manual_seed(0)
    for books in (1, 2, 3, 4):
        codebooks, (q, position_scale) = integer_books(books, generator)
        assert q.dtype == torch.int8 and position_scale.shape == (8,)
        assert int(q.to(torch.int32).abs().amax(dim=1).sum(dim=0).max()) <= 127  # any one codeword per book
        error = (q.float() * position_scale - codebooks).abs()
        assert bool((error <= position_scale / 2 + 1e-6).all())
    assert layouts.vq_int8_codebooks(torch.randn(2, 256, 4)) is None  # groups of 4: no integer kernel
    assert layouts.vq_int8_codebooks(torch.randn(2, 1024, 8)) is None


def test_reference_by_hand():
    codes = torch.tensor([[[1, 0]]])  # one row, one group, two books
    books = torch.zeros(2, 2, 8, dtype=torch.int8)
    books[0, 1] = torch.arange(8, dtype=torch.int8)
    books[1, 0] = 1
    position_scale = torch.full((8,), 0.5)
    x = torch.tensor([[2.0, -4.0, 0.0, 1.0, 0.5, 3.0, -1.0, 4.0]])
    # x * 0.5 -> largest 2.0 -> q = round(x * 0.5 * 63.5) ; weights = arange(8) + 1
    q = torch.round(x * 0.5 * 63.5)
    expected = (q * (torch.arange(8) + 1)).sum() * (2.0 / 127) * 3.0
    y = layouts.vq_int8_matmul(x, codes, books, position_scale, torch.tensor([3.0]))
    assert torch.allclose(y, expected.reshape(1, 1).float(), rtol=1e-6)


@pytest.mark.parametrize("batch", (1, 2, 5))
def test_integer_kernel_equals_the_reference_exactly(kernel_path, batch):
    generator = torch.Generator().manual_seed(batch)
    for rows, cols, books in CONFIGS:
        codes, _, scale = random_vq(rows, cols, books, 8, 8, generator)
        codebooks, integer = integer_books(books, generator)
        x = torch.randn(batch, cols, generator=generator) * torch.rand(cols, generator=generator) * 4
        y = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, scale, None, integer)
        assert kernels.last_kernel_path() == kernel_path
        expected = layouts.vq_int8_matmul(x, codes, *integer, scale)
        assert torch.equal(y, expected), (rows, cols, books, (y - expected).abs().max())
        # against the rounded codebooks on exact activations: off by at most half an activation step
        # (the row's largest |x * position scale| / 127 / 2) times each weight's integer magnitude
        q, position_scale = integer
        rounded = layouts.vq_to_dense(codes, q.float() * position_scale, scale).double()
        magnitudes = layouts.vq_to_dense(codes, q.float(), scale).double().abs()
        x_scale = (x.double() * position_scale.double().repeat(cols // 8)).abs().amax(dim=1, keepdim=True) / 127
        bound = 0.5 * x_scale * magnitudes.sum(dim=1) * (1 + 1e-4) + 1e-4
        assert bool(((y.double() - x.double() @ rounded.T).abs() <= bound).all())


def test_integer_kernel_split_between_threads(kernel_path, two_threads):
    generator = torch.Generator().manual_seed(3)
    codes, _, scale = random_vq(301, 512, 2, 8, 8, generator)
    codebooks, integer = integer_books(2, generator)
    x = torch.randn(1, 512, generator=generator)
    y = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, scale, None, integer)
    assert torch.equal(y, layouts.vq_int8_matmul(x, codes, *integer, scale))


def test_a_row_that_is_not_finite_takes_the_float_codebooks(kernel_path):
    generator = torch.Generator().manual_seed(4)
    codes, _, scale = random_vq(8, 64, 2, 8, 8, generator)
    codebooks, integer = integer_books(2, generator)
    x = torch.randn(2, 64, generator=generator)
    x[1, 5] = float("inf")
    y = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, scale, None, integer)
    floats = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, scale)
    assert torch.equal(y[0], floats[0]) and not torch.isfinite(y[1]).all()


def test_integer_codebooks_refused_for_layouts_without_a_kernel():
    generator = torch.Generator().manual_seed(5)
    codes, codebooks, scale = random_vq(4, 32, 2, 4, 4, generator)
    books = torch.zeros(2, 16, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="groups of 8"):
        kernels.vq_mm(torch.randn(1, 32), codes.to(torch.uint8), codebooks, scale, None, (books, torch.ones(8)))


def test_vq_linear_switches_to_integers_and_back(kernel_path):
    generator = torch.Generator().manual_seed(6)
    codes, _, scale = random_vq(12, 64, 2, 8, 8, generator)
    codebooks, integer = integer_books(2, generator)
    integer = layouts.vq_int8_codebooks(codebooks, codes)  # VQLinear scales by the sums its codes use
    model = torch.nn.Sequential(VQLinear(codes, codebooks, scale), VQLinear(codes[:, :4], codebooks[:, :, :4].contiguous(), scale))
    x = torch.randn(3, 64, generator=generator)
    before = model[0](x)
    assert use_integer_vq(model) == 1  # groups of 4 have no integer kernel
    assert torch.equal(model[0](x), layouts.vq_int8_matmul(x, codes, *integer, scale))
    use_integer_vq(model, on=False)
    assert torch.equal(model[0](x), before) and model[0].codebooks_int8 is None


def test_many_rows_take_the_integer_numerics_too():
    """Above the kernel's batch (a perplexity run) VQLinear computes the same integer model in torch."""
    generator = torch.Generator().manual_seed(7)
    codes, _, scale = random_vq(16, 64, 2, 8, 8, generator)
    codebooks, integer = integer_books(2, generator)
    integer = layouts.vq_int8_codebooks(codebooks, codes)
    module = VQLinear(codes, codebooks, scale)
    module.use_integer_codebooks()
    x = torch.randn(module.kernel_max_batch + 3, 64, generator=generator)
    y = module(x)
    assert torch.allclose(y, layouts.vq_int8_matmul(x, codes, *integer, scale), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x @ module.to_dense().T, rtol=1e-5, atol=1e-5)  # not the float codebooks


def test_the_codes_in_use_allow_a_finer_scale_that_still_fits():
    """With the layer's codes, the scale follows the codeword sums that occur (never coarser than
    the bound over every combination), and every occurring sum still fits int8."""
    generator = torch.Generator().manual_seed(8)
    codebooks = torch.randn(2, 256, 8, generator=generator)
    codes = torch.randint(0, 64, (40, 16, 2), generator=generator)  # the largest codewords mostly unused
    codebooks[0, 200:] *= 4
    (q_any, scale_any), (q_used, scale_used) = layouts.vq_int8_codebooks(codebooks), layouts.vq_int8_codebooks(codebooks, codes)
    assert bool((scale_used <= scale_any).all()) and bool((scale_used < scale_any).any())
    sums = layouts.vq_to_dense(codes, q_used.float(), torch.ones(40))
    assert sums.abs().max() <= 127
    assert (q_used.float() * scale_used - codebooks)[:, :64].abs().max() < (q_any.float() * scale_any - codebooks)[:, :64].abs().max()
    x = torch.randn(3, 128, generator=generator)
    y = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, torch.ones(40), None, (q_used, scale_used))
    assert torch.equal(y, layouts.vq_int8_matmul(x, codes, q_used, scale_used, torch.ones(40)))
