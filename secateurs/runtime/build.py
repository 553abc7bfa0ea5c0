"""Build the CPU kernel library (plain C++17 + OpenMP shared object, loaded with ctypes).

`pip install` (editable or not) compiles it: setup.py loads this file by path and calls `build`,
so this module imports only the standard library. At run time the kernels module only loads the
library; after editing csrc/, rebuild it with `python -m secateurs.runtime.build [--force]`.

The library embeds a digest of the sources and flags it was compiled from: it is stale when that
differs from the sources beside it. File times would not do, since installing a wheel gives every
file the moment it was unpacked, in whatever order.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
LIBRARY_NAME = "_secateurs_kernels.so"
LIBRARY_PATH = PACKAGE_DIR / LIBRARY_NAME
REBUILD_COMMAND = "python -m secateurs.runtime.build"
# No -march: the sources pick an instruction set per call at run time (target attributes, cpuid),
# so one library serves every x86-64 CPU it is copied to.
COMPILE_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-fPIC", "-fvisibility=hidden")
LINK_FLAGS = ("-shared", "-fopenmp")
_DIGEST_MARKER = "secateurs-kernel-sources-sha256:"
_DIGEST_LENGTH = 64


class BuildError(RuntimeError):
    pass


def sources(source_dir: Path | None = None) -> list[Path]:
    return sorted((source_dir or SOURCE_DIR).glob("*.cpp"))


def sources_digest(source_dir: Path | None = None) -> str:
    """sha256 of the flags and of every source and header (names and contents)."""
    digest = hashlib.sha256(repr((COMPILE_FLAGS, LINK_FLAGS)).encode())
    for path in sorted(p for p in (source_dir or SOURCE_DIR).iterdir() if p.suffix in (".cpp", ".h") and p.is_file()):
        digest.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def library_digest(library: Path | None = None) -> str | None:
    """The sources digest compiled into `library`; None when it is missing or carries none."""
    try:
        content = (library or LIBRARY_PATH).read_bytes()
    except OSError:
        return None
    start = content.find(_DIGEST_MARKER.encode())
    if start < 0:
        return None
    start += len(_DIGEST_MARKER)
    return content[start:start + _DIGEST_LENGTH].decode("ascii", "replace")


def is_stale(library: Path | None = None, source_dir: Path | None = None) -> bool:
    """True when the library is missing or was compiled from other sources or flags."""
    return library_digest(library) != sources_digest(source_dir)


def compiler() -> list[str]:
    """The compiler command: $CXX (may carry arguments, e.g. "ccache g++"), else g++ or c++."""
    chosen = os.environ.get("CXX")
    if chosen:
        command = shlex.split(chosen)
        if not command or not shutil.which(command[0]):
            raise BuildError(f"no C++ compiler: CXX={chosen!r} is not an executable")
        return command
    found = shutil.which("g++") or shutil.which("c++")
    if not found:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    return [found]


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise BuildError(f"compiling the kernels failed: {error}") from error
    if result.returncode != 0:
        raise BuildError(f"compiling the kernels failed:\n{shlex.join(command)}\n{result.stderr[-4000:]}")


def _digest_source(digest: str) -> str:
    # `used` keeps the string through optimization; library_digest() finds it in the file's bytes.
    return (f'extern "C" __attribute__((visibility("default"), used)) const char '
            f'secateurs_kernel_sources[] = "{_DIGEST_MARKER}{digest}";\n')


def build(force: bool = False, library: Path | None = None, source_dir: Path | None = None) -> Path:
    """Compile the library unless it is up to date; returns its path. Raises BuildError.

    Each source compiles in its own process (as many at once as there are CPUs), then one link
    writes a temporary file in the library's directory that is renamed over the library, so that
    concurrent builders and readers only ever see a complete library."""
    library = Path(library or LIBRARY_PATH)
    source_dir = Path(source_dir or SOURCE_DIR)
    digest = sources_digest(source_dir)
    if not force and library_digest(library) == digest:
        return library
    cxx = compiler()
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="secateurs-build-") as scratch:
        stamp = Path(scratch) / "sources_digest.cpp"
        stamp.write_text(_digest_source(digest))
        inputs = [*sources(source_dir), stamp]
        objects = [Path(scratch) / f"{index}-{path.stem}.o" for index, path in enumerate(inputs)]
        commands = [[*cxx, *COMPILE_FLAGS, "-c", str(path), "-o", str(obj)] for path, obj in zip(inputs, objects)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
            for future in [pool.submit(_run, command) for command in commands]:
                future.result()
        handle, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=library.parent)
        os.close(handle)
        try:
            _run([*cxx, *LINK_FLAGS, *map(str, objects), "-o", temporary])
            os.chmod(temporary, 0o755)
            os.replace(temporary, library)
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
