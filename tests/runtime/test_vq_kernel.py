"""The vector-quantized kernel and VQLinear against a float64 reference, on every dispatch path."""

import pytest
import torch

from conftest import assert_matches_reference
from secateurs.runtime import VQLinear, kernels, layouts

# (rows, cols, codebooks, bits, group size): 8-value groups with 1-4 codebooks (the specialized
# loops: 8-byte words of codes, then groups left over, an odd number of groups for AVX-512's
# pairs, rows of 256 code bytes or more whose next rows are prefetched), groups of 4 and 16
# (generic vector and half-vector loops), 12 and 3 (scalar), 10-bit codebooks (16-bit codes).
CONFIGS = ((37, 48, 2, 8, 8), (19, 56, 1, 8, 8), (13, 88, 1, 8, 8), (8, 64, 3, 6, 8), (5, 72, 4, 4, 8),
           (9, 1040, 2, 8, 8), (6, 1048, 4, 8, 8), (11, 64, 2, 5, 16), (9, 40, 3, 4, 4), (6, 36, 2, 3, 12),
           (7, 21, 1, 2, 3), (9, 32, 2, 10, 8), (1, 8, 1, 1, 8))


def random_vq(rows, cols, books, bits, group, generator):
    codes = torch.randint(0, 2**bits, (rows, cols // group, books), generator=generator)
    codebooks = torch.randn(books, 2**bits, group, generator=generator)
    scale = torch.rand(rows, generator=generator) + 0.5
    return codes, codebooks, scale


def reference_weight(codes, codebooks, scale):
    """float64, one group at a time."""
    rows, groups, books = codes.shape
    group = codebooks.shape[2]
    weight = torch.zeros(rows, groups * group, dtype=torch.float64)
    for i in range(rows):
        for j in range(groups):
            for m in range(books):
                weight[i, j * group:(j + 1) * group] += codebooks[m, codes[i, j, m]].double()
            weight[i, j * group:(j + 1) * group] *= float(scale[i])
    return weight


def half_exact(codebooks):
    """The codebooks rounded to float16 (as the vq files hold them), with subnormal halves, a
    negative zero and the largest half among them so every conversion path meets them."""
    codebooks = codebooks.to(torch.float16).float()
    special = torch.tensor([2.0**-24, -(2.0**-20), -0.0, 65504.0 / 1024, 3 * 2.0**-15, 2.0**-14, -1.5, 0.25])
    codebooks.view(-1)[: special.numel()] = special[: codebooks.numel()]
    return codebooks


@pytest.mark.parametrize("half", (False, True), ids=("fp32-codebooks", "half-codebooks"))
@pytest.mark.parametrize("batch", (1, 2, 3, 5, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_vq_kernel_matches_reference(kernel_path, batch, dtype, half):
    generator = torch.Generator().manual_seed(batch)
    for rows, cols, books, bits, group in CONFIGS:
        codes, codebooks, scale = random_vq(rows, cols, books, bits, group, generator)
        if half:
            codebooks = half_exact(codebooks)
        weight = reference_weight(codes, codebooks, scale)
        assert torch.allclose(layouts.vq_to_dense(codes, codebooks, scale).double(), weight, rtol=1e-6, atol=1e-6)
        stored = codes.to(torch.uint8) if bits <= 8 else codes.to(torch.int16)
        x = torch.randn(batch, cols, generator=generator).to(dtype)
        halves = layouts.vq_half_codebooks(codebooks) if half else None
        assert (halves is not None) == half
        y = kernels.vq_mm(x, stored, codebooks, scale, halves)
        assert kernels.last_kernel_path() == kernel_path
        assert_matches_reference(y, x, weight)


@pytest.mark.parametrize("half", (False, True), ids=("fp32-codebooks", "half-codebooks"))
@pytest.mark.parametrize("batch", (1, 3))
def test_vq_rows_split_between_threads(kernel_path, two_threads, batch, half):
    """Layers whose work puts them on two threads (a thread's range starting inside a four-row
    tile at batch 1), against the float64 reference."""
    generator = torch.Generator().manual_seed(11)
    for rows, cols in ((301, 512), (590, 256)):
        codes, codebooks, scale = random_vq(rows, cols, 2, 8, 8, generator)
        codebooks = half_exact(codebooks) if half else codebooks
        x = torch.randn(batch, cols, generator=generator)
        y = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, scale, layouts.vq_half_codebooks(codebooks) if half else None)
        assert_matches_reference(y, x, reference_weight(codes, codebooks, scale))


def test_vq_linear_module_runs_kernel_and_dense_paths(kernel_path):
    generator = torch.Generator().manual_seed(0)
    codes, codebooks, scale = random_vq(24, 64, 2, 8, 8, generator)
    bias = torch.randn(24, generator=generator)
    module = VQLinear(codes, codebooks, scale, bias)
    weight = reference_weight(codes, codebooks, scale)
    for batch in (1, 4, 40):  # 40 rows: decompressed weight and one matmul
        x = torch.randn(2, batch, 64, generator=generator)
        y = module(x)
        expected = x.double() @ weight.T + bias.double()
        assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(module.unpacked_codes(), codes.to(torch.int32))
    assert torch.equal(module.to_dense(), layouts.vq_to_dense(codes, codebooks, scale))


def test_sixteen_bit_codes_keep_every_code():
    codes = torch.tensor([[[0], [65535], [32768]]])
    module = VQLinear(codes, torch.randn(1, 65536, 2), torch.ones(1))
    assert module.codes.dtype == torch.int16
    assert module.unpacked_codes().flatten().tolist() == [0, 65535, 32768]


def test_bad_vq_arguments_are_refused():
    codes = torch.zeros(4, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="codes must lie"):
        VQLinear(torch.full((4, 2, 2), 16), torch.randn(2, 16, 8), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        VQLinear(codes, torch.randn(2, 16, 8), torch.ones(3))
    with pytest.raises(ValueError, match="codebooks"):
        VQLinear(codes, torch.randn(3, 16, 8), torch.ones(4))
    with pytest.raises(ValueError, match="x must have shape"):
        kernels.vq_mm(torch.randn(1, 15), codes, torch.randn(2, 16, 8), torch.ones(4))
    with pytest.raises(ValueError, match="codes must have dtype"):
        kernels.vq_mm(torch.randn(1, 16), codes.to(torch.int16), torch.randn(2, 16, 8), torch.ones(4))


def test_vq_linear_keeps_half_codebooks_only_when_exact():
    """The kernels read the half copy only when it holds the codebooks' values exactly; it follows
    load_state_dict."""
    generator = torch.Generator().manual_seed(3)
    codes, codebooks, scale = random_vq(8, 32, 2, 4, 8, generator)
    exact = VQLinear(codes, half_exact(codebooks), scale)
    assert exact.codebooks_half is not None and "codebooks_half" not in exact.state_dict()
    assert torch.equal(exact.codebooks_half.view(torch.float16).float(), exact.codebooks)
    inexact = VQLinear(codes, codebooks + 1e-5, scale)
    assert inexact.codebooks_half is None
    inexact.load_state_dict(exact.state_dict())
    assert torch.equal(inexact.codebooks_half, exact.codebooks_half)
    x = torch.randn(1, 32, generator=generator)
    assert torch.equal(inexact(x), exact(x))
    with pytest.raises(ValueError, match="codebooks_half"):
        kernels.vq_mm(x, exact.codes, exact.codebooks, exact.scale, exact.codebooks_half[:1])


@pytest.mark.parametrize("batch", (1, 3))
def test_subnormal_half_codebooks(kernel_path, batch):
    """Codebooks made only of subnormal halves (k * 2^-24): each path converts them exactly."""
    generator = torch.Generator().manual_seed(5)
    codes, _, scale = random_vq(13, 64, 2, 8, 8, generator)
    codebooks = torch.randint(-1023, 1024, (2, 256, 8), generator=generator).float() * 2.0**-24
    halves = layouts.vq_half_codebooks(codebooks)
    assert halves is not None
    x = torch.randn(batch, 64, generator=generator)
    y = kernels.vq_mm(x, codes.to(torch.uint8), codebooks, scale, halves)
    assert_matches_reference(y, x, reference_weight(codes, codebooks, scale))
