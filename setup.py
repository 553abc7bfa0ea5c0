"""Compiles the CPU kernels (secateurs/runtime/build.py) as part of `pip install`, editable or not.

Everything else about the package is in pyproject.toml. The library goes where the package is
imported from: into the wheel's secateurs/runtime/, or, for an editable install, into the source
tree's. A failed compile (no compiler) only warns: secateurs then runs its pure-torch fallback and
`python -m secateurs.runtime.build` builds the library later.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RUNTIME = Path("secateurs", "runtime")


def _kernel_build():
    """secateurs/runtime/build.py, loaded by path: importing the package would import torch, which
    pip's isolated build environment does not have."""
    spec = importlib.util.spec_from_file_location("_secateurs_kernel_build", ROOT / RUNTIME / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernels(build_py):
    """build_py, then the kernel library beside the package's modules."""

    def _library(self, kernel_build) -> Path:
        base = ROOT if self.editable_mode else Path(self.build_lib)
        return base / RUNTIME / kernel_build.LIBRARY_NAME

    def run(self):
        super().run()
        kernel_build = _kernel_build()
        library = self._library(kernel_build)
        try:
            kernel_build.build(library=library, source_dir=ROOT / RUNTIME / "csrc")
        except kernel_build.BuildError as error:
            message = (f"WARNING: secateurs CPU kernels not built, the slower pure-torch fallback will run "
                       f"(build them later with `{kernel_build.REBUILD_COMMAND}`): {error}")
            print(message, file=sys.stderr)
            return
        print(f"secateurs CPU kernels: {library}", file=sys.stderr)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        library = self._library(_kernel_build())
        if not self.editable_mode and library.exists():
            outputs.append(str(library))
        return outputs

    def get_output_mapping(self):
        # Editable installs in strict mode link build_lib's files to these sources.
        mapping = super().get_output_mapping()
        kernel_build = _kernel_build()
        if self.editable_mode:
            mapping[str(Path(self.build_lib) / RUNTIME / kernel_build.LIBRARY_NAME)] = str(self._library(kernel_build))
        return mapping


class BinaryDistribution(Distribution):
    """A wheel holding a compiled library is tagged for this platform and Python, not py3-none-any."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=BinaryDistribution)
