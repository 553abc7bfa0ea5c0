"""The Triton span kernel of the OBS sweep (runtime/gpu_sweep.py) gives the torch loop's result.

Without a GPU it runs in Triton's interpreter on CPU tensors: the same kernel source, so its
arithmetic, masking and tiling are checked here; only the GPU's compilation is not."""

import pytest
import torch

from secateurs.algorithms import QuantSpec, gptq, obs, sparsegpt
from secateurs.runtime import gpu_sweep

pytestmark = pytest.mark.skipif(not gpu_sweep.triton_available("cpu"),
                                reason="Triton missing, or imported before its interpreter was enabled")


def _upper_factor(size: int, seed: int, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(size, size, generator=generator, dtype=torch.float64)
    H = A @ A.T + size * torch.eye(size, dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(H), upper=True).to(dtype).contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_span_equals_torch_loop(dtype, grid, masked):
    # 70 rows: not a multiple of the tile's rows; a span [5, 19) inside a 23-column block, whose
    # factor is a strided view of a larger one, as the sweep passes it.
    rows, size, begin, end = 70, 23, 5, 19
    generator = torch.Generator().manual_seed(1)
    hinv = _upper_factor(40, 0, dtype)[3 : 3 + size, 3 : 3 + size]
    block = torch.randn(size, rows, generator=generator, dtype=dtype)
    errors = torch.zeros_like(block)
    keep = torch.rand(end - begin, rows, generator=generator) > 0.4 if masked else None
    scale = (0.05 + 0.2 * torch.rand(rows, generator=generator)).to(dtype) if grid else None
    zero = torch.full((rows,), 7.0, dtype=dtype) if grid else None
    ours_block, ours_errors = block.clone(), errors.clone()
    obs._fix_columns(block, errors, hinv, begin, end, keep, scale, zero, 4)
    gpu_sweep.obs_span_triton(ours_block, ours_errors, hinv, begin, end, keep, scale, zero, 15)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ours_block, block, rtol=tolerance, atol=tolerance)
    assert torch.allclose(ours_errors, errors, rtol=tolerance, atol=tolerance)
    assert torch.equal(ours_block[:begin], block[:begin])  # columns before the span untouched
    if masked:
        assert torch.equal(ours_block[begin:end] == 0, ~keep | (block[begin:end] == 0))


def test_grid_ties_round_half_to_even():
    """Values exactly between two codes go to the even one, as torch.round does (Triton has no
    such rounding built in; a floor(x + 0.5) would also misround 0.49999997)."""
    rows = 8
    scale = torch.ones(rows, dtype=torch.float32)
    zero = torch.zeros(rows, dtype=torch.float32)
    values = torch.tensor([0.5, 1.5, 2.5, 3.5, 0.49999997, 2.4999998, 6.5, -0.5], dtype=torch.float32)
    block = values[None, :].clone()
    errors = torch.zeros_like(block)
    hinv = torch.ones(1, 1)
    gpu_sweep.obs_span_triton(block, errors, hinv, 0, 1, None, scale, zero, 15)
    assert block[0].tolist() == torch.clamp(torch.round(values), 0, 15).tolist() == [0, 2, 2, 4, 0, 2, 6, 0]


CASES = {
    "unstructured": dict(sparsity=0.6),
    "2:4": dict(sparsity=0.0, n=2, m=4),
    "unstructured + w3 asym per row": dict(sparsity=0.5, quant=QuantSpec(bits=3, symmetric=False)),
    "gptq w4 g8 act-order": dict(quant=QuantSpec(bits=4, group_size=8, act_order=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_whole_sweep_with_triton_spans(problem, case):
    """SparseGPT and GPTQ with the Triton span kernel installed: the torch loop's masks, codes and
    grids, and weights within float64 rounding."""
    W, _, H = problem(seed=2, rows=37, cols=48)
    H[5, :], H[:, 5] = 0, 0  # a dead input
    options = dict(CASES[case], block_size=24)

    def run():
        return sparsegpt(W, H, **options) if "sparsity" in options else gptq(W, H, options["quant"], 24)

    reference = run()
    previous = obs.use_span_kernel(lambda *span, fallback: gpu_sweep.obs_span_triton(*span))
    try:
        ours = run()
    finally:
        obs.use_span_kernel(previous)
    assert torch.allclose(ours.weight, reference.weight, rtol=1e-10, atol=1e-10)
    assert ours.loss == pytest.approx(reference.loss, rel=1e-10)
    for field in ("mask", "codes", "scale", "zero"):
        theirs = getattr(reference, field, None)
        if theirs is not None:
            assert torch.equal(getattr(ours, field), theirs), field


@pytest.mark.skipif(not gpu_sweep.triton_available("cuda"), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("case", CASES)
def test_whole_sweep_on_cuda(problem, case):
    """The compiled kernel on a GPU, reached through the kernel dispatch the engine installs: the
    CPU torch loop's masks and codes in float64."""
    from secateurs.runtime import kernels

    W, _, H = problem(seed=2, rows=300, cols=256)
    options = dict(CASES[case], block_size=128)

    def run(W, H):
        return sparsegpt(W, H, **options) if "sparsity" in options else gptq(W, H, options["quant"], 128)

    reference = run(W, H)
    previous = obs.use_span_kernel(kernels.obs_span)
    try:
        ours = run(W.cuda(), H.cuda())
    finally:
        obs.use_span_kernel(previous)
    assert kernels.last_kernel_path() == "triton"
    assert torch.allclose(ours.weight.cpu(), reference.weight, rtol=1e-9, atol=1e-9)
    for field in ("mask", "codes"):
        theirs = getattr(reference, field, None)
        if theirs is not None:
            assert torch.equal(getattr(ours, field).cpu(), theirs), field
