"""Build the CPU kernel library (plain C++17 + OpenMP shared object, loaded with ctypes).

`python -m secateurs.runtime.build [--force]` compiles it into the package directory; the kernels
module also builds it on first use when the library is missing or older than its sources.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
LIBRARY_PATH = PACKAGE_DIR / "_secateurs_kernels.so"


class BuildError(RuntimeError):
    pass


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cpp"))


def is_stale(library: Path = LIBRARY_PATH) -> bool:
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(path.stat().st_mtime > built for path in SOURCE_DIR.iterdir())


def compiler() -> str:
    chosen = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not chosen:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    return chosen


def build(force: bool = False, library: Path = LIBRARY_PATH) -> Path:
    """Compile the library unless it is up to date; returns its path. Raises BuildError."""
    if not force and not is_stale(library):
        return library
    # Compile under a temporary name in the same directory, then rename: concurrent builders and
    # readers only ever see a complete library.
    handle, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=library.parent)
    os.close(handle)
    command = [
        compiler(), "-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fvisibility=hidden",
        *map(str, sources()), "-o", temporary,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"compiling the kernels failed:\n{' '.join(command)}\n{result.stderr[-4000:]}")
        os.replace(temporary, library)
    except OSError as error:
        raise BuildError(f"compiling the kernels failed: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
