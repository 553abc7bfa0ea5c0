"""Building the native library, loading it without ever compiling at run time (torch fallback when
it is missing or stale), and reading SECATEURS_KERNEL_PATH once."""

import ctypes
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO_ROOT
from secateurs.runtime import build, kernels, layouts, native

# Two sources and a header: the build's parallel compiles, its link with OpenMP and its digest.
TINY_SOURCES = {
    "tiny.h": "int tiny_threads();\n",
    "one.cpp": '#include <omp.h>\n#include "tiny.h"\nint tiny_threads() { return omp_get_max_threads(); }\n',
    "two.cpp": '#include "tiny.h"\nextern "C" __attribute__((visibility("default"))) int tiny(int x) '
               "{ return 3 * x + (tiny_threads() > 0); }\n",
}


@pytest.fixture
def tiny_sources(tmp_path):
    source_dir = tmp_path / "csrc"
    source_dir.mkdir()
    for name, text in TINY_SOURCES.items():
        (source_dir / name).write_text(text)
    return source_dir


def test_build_compiles_links_and_stamps_its_sources(tiny_sources, tmp_path, monkeypatch):
    library = tmp_path / "out" / "tiny.so"
    assert build.is_stale(library, tiny_sources)
    assert build.build(library=library, source_dir=tiny_sources) == library
    assert ctypes.CDLL(str(library)).tiny(5) == 16
    assert build.library_digest(library) == build.sources_digest(tiny_sources)
    assert not build.is_stale(library, tiny_sources)
    assert sorted(p.name for p in library.parent.iterdir()) == ["tiny.so"]  # no temporary left behind

    def no_compiler():
        raise AssertionError("an up-to-date library was compiled again")

    monkeypatch.setattr(build, "compiler", no_compiler)
    assert build.build(library=library, source_dir=tiny_sources) == library
    (tiny_sources / "tiny.h").write_text(TINY_SOURCES["tiny.h"] + "// a header counts too\n")
    assert build.is_stale(library, tiny_sources)


def test_installed_library_matches_its_sources():
    if kernels.native_library() is None:
        pytest.skip("the kernel library is not built here")
    assert not build.is_stale()
    assert build.library_digest() == build.sources_digest()


def test_build_module_entry_point_reports_the_library():
    result = subprocess.run([sys.executable, "-m", "secateurs.runtime.build"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(build.LIBRARY_PATH)
    assert "RuntimeWarning" not in result.stderr


@pytest.mark.parametrize("cxx, message", [("false", "compiling the kernels failed"),
                                          ("/nonexistent/g++", "not an executable")])
def test_failed_compile_raises_build_error_and_leaves_nothing(tiny_sources, tmp_path, monkeypatch, cxx, message):
    monkeypatch.setenv("CXX", cxx)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(build.BuildError, match=message):
        build.build(force=True, library=out / "library.so", source_dir=tiny_sources)
    assert list(out.iterdir()) == []


@pytest.fixture
def unloaded(monkeypatch):
    """Kernels module state as before its first call, with any compile failing the test."""
    def compile_attempt(*args, **kwargs):
        raise AssertionError("the kernels module compiled the library")

    monkeypatch.setattr(build, "build", compile_attempt)
    monkeypatch.setattr(build, "compiler", compile_attempt)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_library_failed", False)
    monkeypatch.delenv("CI", raising=False)
    kernels.supported_paths.cache_clear()
    with kernels.forced_kernel_path(None):
        yield
    kernels.supported_paths.cache_clear()


def _falls_back_to_torch(match: str) -> None:
    weight = torch.randn(5, 16) * (torch.rand(5, 16) < 0.5)
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match=match) as warned:
        y = kernels.bitmask_mm(x, *layouts.bitmask_from_dense(weight), 16)
    assert any("python -m secateurs.runtime.build" in str(w.message) for w in warned)
    assert kernels.last_kernel_path() == "torch"
    assert torch.allclose(y, x @ weight.T, atol=1e-5)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        kernels.bitmask_mm(x, *layouts.bitmask_from_dense(weight), 16)
    assert again == []  # one warning per process
    with kernels.forced_kernel_path("portable"), pytest.raises(kernels.KernelPathError, match="unavailable"):
        kernels.kernel_path()


def test_missing_library_warns_and_falls_back_without_compiling(unloaded, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "LIBRARY_PATH", tmp_path / build.LIBRARY_NAME)
    _falls_back_to_torch("was not built")
    assert list(tmp_path.iterdir()) == []


def test_stale_library_warns_and_falls_back_without_compiling(unloaded, tmp_path, monkeypatch):
    if not build.LIBRARY_PATH.exists():
        pytest.skip("the kernel library is not built here")
    before = build.LIBRARY_PATH.read_bytes()
    edited = tmp_path / "csrc"
    shutil.copytree(build.SOURCE_DIR, edited)
    with open(edited / "dispatch.cpp", "a") as source:
        source.write("// a developer's edit\n")
    monkeypatch.setattr(build, "SOURCE_DIR", edited)
    _falls_back_to_torch("built from other sources")
    assert build.LIBRARY_PATH.read_bytes() == before


def test_unavailable_library_is_an_error_on_ci(unloaded, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "LIBRARY_PATH", tmp_path / build.LIBRARY_NAME)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(build.BuildError, match="was not built"):
        kernels.native_library()


@pytest.fixture
def unread_override():
    kernels.reset_kernel_path_override()
    yield
    kernels.reset_kernel_path_override()


def test_kernel_path_variable_is_read_once_until_reset(unread_override, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.kernel_path() == "torch"
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.kernel_path() == "torch"  # the first read holds
    kernels.reset_kernel_path_override()
    best = kernels.supported_paths()[0]
    assert kernels.kernel_path() == best
    monkeypatch.setenv(kernels.ENV_VAR, " TORCH ")
    assert kernels.kernel_path() == best
    with kernels.forced_kernel_path("torch"):
        assert kernels.kernel_path() == "torch"
    assert kernels.kernel_path() == best
    kernels.reset_kernel_path_override()
    assert kernels.kernel_path() == "torch"


def test_bad_kernel_path_variable_raises_each_time_until_fixed(unread_override, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "sse9")
    for _ in range(2):
        with pytest.raises(kernels.KernelPathError, match="expected one of"):
            kernels.kernel_path()
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.kernel_path() == "torch"
    with pytest.raises(kernels.KernelPathError, match="expected one of"), kernels.forced_kernel_path("sse9"):
        pass
