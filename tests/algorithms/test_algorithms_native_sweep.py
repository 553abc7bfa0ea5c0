"""The native span kernel of the OBS sweep gives the torch loop's result, for every kind of sweep."""

import pytest
import torch

from secateurs.algorithms import QuantSpec, gptq, obs, sparsegpt
from secateurs.runtime import kernels

pytestmark = pytest.mark.skipif(kernels.native_library() is None, reason="the kernel library could not be built")


@pytest.fixture(autouse=True)
def native_span_kernel():
    """The algorithms run the torch loop unless a caller installs the kernel, as the engine does."""
    previous = obs.use_span_kernel(kernels.obs_span)
    yield
    obs.use_span_kernel(previous)

CASES = {
    "unstructured": dict(sparsity=0.6),
    "2:4": dict(sparsity=0.0, n=2, m=4),
    "4:8 + w4 g16": dict(sparsity=0.0, n=4, m=8, quant=QuantSpec(bits=4, group_size=16)),
    "unstructured + w3 asym per row": dict(sparsity=0.5, quant=QuantSpec(bits=3, symmetric=False)),
    "gptq w4 g8": dict(quant=QuantSpec(bits=4, group_size=8)),
    "gptq w2 g16 act-order": dict(quant=QuantSpec(bits=2, group_size=16, act_order=True)),
    "gptq w8 per row mse": dict(quant=QuantSpec(bits=8, mse_clip=True)),
}


def _run(case, W, H, block_size):
    options = dict(CASES[case], block_size=block_size)
    if "sparsity" in options:
        return sparsegpt(W, H, **options)
    return gptq(W, H, options["quant"], block_size)


def _both_paths(case, W, H, block_size):
    with kernels.forced_kernel_path("torch"):
        reference = _run(case, W, H, block_size)
    assert kernels.last_kernel_path() == "torch"
    with kernels.forced_kernel_path(None):
        native = _run(case, W, H, block_size)
    assert kernels.last_kernel_path() != "torch"
    return reference, native


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [8, 24])
def test_native_sweep_equals_torch_loop_float64(problem, case, block_size):
    # 37 rows: not a multiple of the kernel's 16-row thread chunks; 48 columns: a partial last block.
    W, _, H = problem(seed=block_size, rows=37, cols=48)
    H[5, :], H[:, 5] = 0, 0  # a dead input
    reference, native = _both_paths(case, W, H, block_size)
    assert torch.allclose(native.weight, reference.weight, rtol=1e-10, atol=1e-10)
    assert native.loss == pytest.approx(reference.loss, rel=1e-10)
    for field in ("mask", "codes", "scale", "zero"):
        ours, theirs = getattr(native, field, None), getattr(reference, field, None)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert torch.equal(ours, theirs), field


def test_native_sweep_float32_with_threads(problem):
    """float32 on two threads (rows split between them): same mask, weights within rounding."""
    W, _, H = problem(seed=3, rows=300, cols=64, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reference, native = _both_paths("unstructured", W, H, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(native.mask, reference.mask)
    assert torch.allclose(native.weight, reference.weight, rtol=1e-4, atol=1e-5)


def test_native_span_rejects_bad_arguments():
    block, errors = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="hinv"):
        kernels.obs_span(block, errors, torch.eye(4).T[:, :3], 0, 4, None, None, None, 1, fallback=None)
    with pytest.raises(ValueError, match="begin"):
        kernels.obs_span(block, errors, torch.eye(4), 2, 5, None, None, None, 1, fallback=None)
    with pytest.raises(ValueError, match="keep"):
        kernels.obs_span(block, errors, torch.eye(4), 0, 4, torch.ones(3, 3, dtype=torch.bool), None, None, 1,
                         fallback=None)


def test_tensors_off_the_cpu_take_the_torch_loop():
    """A sweep on a GPU (here the meta device) never reaches the CPU kernel."""
    calls = []
    block, errors, hinv = (torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"),
                           torch.empty(4, 4, device="meta"))
    kernels.obs_span(block, errors, hinv, 0, 4, None, None, None, 1, fallback=lambda: calls.append(True))
    assert calls == [True] and kernels.last_kernel_path() == "torch"
