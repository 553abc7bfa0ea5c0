import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` from anywhere, without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from secateurs.runtime import kernels  # noqa: E402

ALL_PATHS = ("portable", "avx2", "avx512", "avx512vbmi2", "torch")


# `with forced_path(path):` runs as with SECATEURS_KERNEL_PATH=path (also inside hypothesis tests).
forced_path = kernels.forced_kernel_path


@pytest.fixture(params=ALL_PATHS)
def kernel_path(request):
    """Each dispatch path forced as SECATEURS_KERNEL_PATH would; skipped where it cannot run."""
    path = request.param
    if path not in kernels.supported_paths():
        pytest.skip(f"{path} kernels cannot run here (supported: {', '.join(kernels.supported_paths())})")
    with forced_path(path):
        yield path


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread by default: the machine is shared, and OpenMP barriers stall when another
    process holds the second core. Tests of the row split ask for `threads` explicitly."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def two_threads(_one_thread):
    torch.set_num_threads(2)


def reference_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64) @ weight.to(torch.float64).T


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, int8: bool = False) -> None:
    """y ~= x @ weight^T within fp32 accumulation error (plus bf16 output rounding), scaled by
    sum |x| |w| so that cancellations don't make the check flaky. With `int8` (int8 weights or
    codes), a native kernel at batch 1 also rounds x to int16 (kernels.h): that bound is added."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], weight.shape[0])
    magnitude = x.to(torch.float64).abs() @ weight.to(torch.float64).abs().T
    relative = 2e-5 if y.dtype == torch.float32 else 2**-7
    allowance = relative * magnitude + 1e-6
    if int8 and x.shape[0] == 1 and kernels.last_kernel_path() != "torch":
        allowance = allowance + weight.to(torch.float64).abs() @ int16_activations(x)[1]
    error = (y.to(torch.float64) - reference_matmul(x, weight)).abs()
    worst = (error - allowance).max() if error.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"max error {error.max():.3g} exceeds tolerance"


def int16_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.h's quantize_int16 of one row, emulated: (x as the kernels see it, float64; the
    rounding bound per column, half its block's scale)."""
    cols = x.numel()
    blocks = -(-cols // 64)
    padded = torch.zeros(blocks * 64)
    padded[:cols] = x.float().reshape(-1)
    largest = padded.view(blocks, 64).abs().amax(1)
    tiny = largest < 1e-30
    scale = torch.where(tiny, 0.0, largest / 32767.0)
    inverse = torch.where(tiny, 0.0, torch.tensor(32767.0) / largest)
    q = (padded.view(blocks, 64) * inverse[:, None]).clamp(-32767, 32767).round()
    seen = (q.double() * scale.double()[:, None]).reshape(-1)[:cols]
    return seen, (scale.double() / 2).repeat_interleave(64)[:cols]



def stored_weight(weight: torch.Tensor, value_dtype: torch.dtype, generator: torch.Generator):
    """(weight as stored in value_dtype, the float32 weight it stands for, row_scale or None):
    int8 stores codes in [-127, 127] with per-row scales."""
    row_scale = None
    if value_dtype == torch.int8:
        weight = (weight * 40).round().clamp(-127, 127)
        row_scale = torch.rand(weight.shape[0], generator=generator) + 0.5
    weight = weight.to(value_dtype)
    return weight, weight.to(torch.float32) * (1 if row_scale is None else row_scale[:, None]), row_scale
