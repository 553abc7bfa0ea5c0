"""Building the native library and falling back to torch when it cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from secateurs.runtime import build, kernels, layouts


def test_build_is_up_to_date_after_first_use():
    kernels.native_library()
    assert not build.is_stale()
    assert build.build() == build.LIBRARY_PATH


def test_build_module_entry_point_reports_the_library():
    result = subprocess.run([sys.executable, "-m", "secateurs.runtime.build"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(build.LIBRARY_PATH)
    assert "RuntimeWarning" not in result.stderr


def test_failed_compile_raises_build_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(build.BuildError, match="compiling the kernels failed"):
        build.build(force=True, library=tmp_path / "library.so")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def unbuildable(monkeypatch):
    """Kernels module state as if the library had never been loaded and cannot be built."""
    def failing_build(*args, **kwargs):
        raise build.BuildError("no compiler in this test")

    monkeypatch.setattr(build, "build", failing_build)
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_library_failed", False)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.supported_paths.cache_clear()
    yield
    kernels.supported_paths.cache_clear()


def test_failed_build_warns_and_falls_back_to_torch(unbuildable, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    weight = torch.randn(5, 16) * (torch.rand(5, 16) < 0.5)
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match="pure-torch fallback"):
        y = kernels.bitmask_mm(x, *layouts.bitmask_from_dense(weight), 16)
    assert kernels.last_kernel_path() == "torch"
    assert torch.allclose(y, x @ weight.T, atol=1e-5)
    monkeypatch.setenv(kernels.ENV_VAR, "portable")
    with pytest.raises(kernels.KernelPathError, match="could not be built"):
        kernels.kernel_path()


def test_failed_build_is_an_error_on_ci(unbuildable, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(build.BuildError):
        kernels.native_library()
