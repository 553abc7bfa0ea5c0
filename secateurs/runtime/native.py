"""The native kernel library and the instruction-set path its calls take.

The library is compiled when secateurs is installed (build.py); this module only loads it. When it
is missing or was built from other sources, `native_library()` warns once and returns None, and
the kernels (kernels.py) run their pure-torch fallbacks.

The path: SECATEURS_KERNEL_PATH=avx512vbmi2|avx512|avx2|portable forces one (KernelPathError if this
CPU or build lacks it), =torch the pure-torch fallback, unset the best the CPU supports; read at the
first kernel call and kept (`reset_kernel_path_override()` reads it again at the next call,
`forced_kernel_path(path)` forces a path for a block); `last_kernel_path()` tells the latest call's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import warnings
from pathlib import Path

ENV_VAR = "SECATEURS_KERNEL_PATH"
NATIVE_PATHS = ("avx512vbmi2", "avx512", "avx2", "portable")  # best first
TORCH_PATH = "torch"
PATH_IDS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512vbmi2": 3}
_STATUS_UNSUPPORTED_PATH, _STATUS_INVALID_ARGUMENT, _STATUS_OUT_OF_MEMORY = 1, 2, 3


class KernelPathError(RuntimeError):
    """The requested kernel path cannot run here."""


_library: ctypes.CDLL | None = None
_library_failed = False
_library_lock = threading.Lock()
_last_path: str | None = None
_override: str | None = None  # SECATEURS_KERNEL_PATH as read at first use ("" when unset); None: not read yet


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    head = [i32, i32, ptr, i32, i64, i64, i64]  # path, threads, x, x dtype, batch, rows, cols
    library.secateurs_path_supported.argtypes = [i32]
    library.secateurs_bitmask_mm.argtypes = head + [ptr, ptr, i32, ptr, ptr, i64, ptr, i32, ptr]
    library.secateurs_nm_mm.argtypes = head + [i64, i64, ptr, i32, ptr, ptr]
    library.secateurs_int8_blocks_mm.argtypes = head + [ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr]
    library.secateurs_quant_mm.argtypes = head + [i64, i64, ptr, ptr, ptr, ptr]
    library.secateurs_dense_mm.argtypes = head + [ptr, i32, ptr, ptr]
    library.secateurs_vq_mm.argtypes = head + [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    library.secateurs_sparse_int4_mm.argtypes = head + [i64, ptr, ptr, ptr, ptr, ptr, ptr]
    library.secateurs_obs_span.argtypes = [i32, i32, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64]
    library.secateurs_attention.argtypes = [i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                            ctypes.c_float, i32, ptr]
    return library


def native_library() -> ctypes.CDLL | None:
    """The kernel library, loaded on first use; never compiled here. None, with one warning, when
    it is missing, was built from other sources than those beside it, or fails to load; with
    CI=true that raises build.BuildError instead."""
    global _library, _library_failed
    from . import build  # not at import: `python -m secateurs.runtime.build` imports this package first

    with _library_lock:
        if _library is None and not _library_failed:
            try:
                _library = _declare(ctypes.CDLL(str(_checked_library())))
            except (build.BuildError, OSError) as error:
                if os.environ.get("CI", "").lower() == "true":
                    if isinstance(error, build.BuildError):
                        raise
                    raise build.BuildError(f"loading {build.LIBRARY_PATH} failed: {error}") from error
                _library_failed = True
                warnings.warn(f"secateurs CPU kernels unavailable, using the slower pure-torch fallback: {error}",
                              stacklevel=2)
        return _library


def _checked_library() -> Path:
    """The library's path if it exists and matches its sources, else BuildError saying how to build it."""
    from . import build

    library = build.LIBRARY_PATH
    if not library.exists():
        raise build.BuildError(f"{library} was not built (no C++ compiler when secateurs was installed?); "
                               f"build it with `{build.REBUILD_COMMAND}`")
    if build.SOURCE_DIR.is_dir() and build.is_stale(library, build.SOURCE_DIR):
        raise build.BuildError(f"{library} was built from other sources than those in {build.SOURCE_DIR}; "
                               f"rebuild it with `{build.REBUILD_COMMAND}`")
    return library


@functools.cache
def supported_paths() -> tuple[str, ...]:
    """Native paths this CPU and build can run, best first, then 'torch'."""
    library = native_library()
    native = [p for p in NATIVE_PATHS if library is not None and library.secateurs_path_supported(PATH_IDS[p])]
    return (*native, TORCH_PATH)


def requested_path() -> str:
    """SECATEURS_KERNEL_PATH, validated and lower-cased ("" when unset), read at the first call."""
    global _override
    if _override is None:
        requested = os.environ.get(ENV_VAR, "").strip().lower()
        _check_path_name(requested, f"{ENV_VAR}={requested!r}")
        _override = requested
    return _override


def _check_path_name(path: str, what: str) -> None:
    if path and path not in PATH_IDS and path != TORCH_PATH:
        raise KernelPathError(f"{what}: expected one of {', '.join(NATIVE_PATHS)}, {TORCH_PATH}")


def reset_kernel_path_override() -> None:
    """Forget the SECATEURS_KERNEL_PATH read so far: the next kernel call reads it again."""
    global _override
    _override = None


@contextlib.contextmanager
def forced_kernel_path(path: str | None):
    """Kernel calls in the block behave as with SECATEURS_KERNEL_PATH=path (None or "": unset),
    whatever the environment says; the previous state comes back after it. Process-wide, not
    per thread: for tests and benchmarks."""
    global _override
    requested = (path or "").strip().lower()
    _check_path_name(requested, f"forced kernel path {path!r}")
    previous, _override = _override, requested
    try:
        yield
    finally:
        _override = previous


def kernel_path() -> str:
    """The path the next kernel call will take."""
    requested = requested_path()
    if requested == TORCH_PATH:
        return TORCH_PATH
    available = supported_paths()
    if not requested:
        return available[0]
    if requested not in available:
        reason = "the kernel library is unavailable" if native_library() is None else "this CPU lacks it"
        raise KernelPathError(f"{ENV_VAR}={requested} but {reason}; available: {', '.join(available)}")
    return requested


def last_kernel_path() -> str | None:
    """The path used by the most recent kernel call in this process (None before any)."""
    return _last_path


def record_path(path: str) -> None:
    """Kernels call this with the path they take (last_kernel_path() reports it)."""
    global _last_path
    _last_path = path


def raise_for_status(function_name: str, status: int, path: str) -> None:
    """Turn a native kernel's nonzero status into the matching Python exception."""
    errors = {_STATUS_UNSUPPORTED_PATH: (KernelPathError, f"kernel path {path} is not supported by this CPU"),
              _STATUS_INVALID_ARGUMENT: (ValueError, f"{function_name}: arguments rejected by the native kernel"),
              _STATUS_OUT_OF_MEMORY: (MemoryError, f"{function_name}: out of memory")}
    if status != 0:
        error, message = errors.get(status, (RuntimeError, f"{function_name}: unknown status {status} from the native kernel"))
        raise error(message)
