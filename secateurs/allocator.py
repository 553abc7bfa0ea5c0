"""glibc malloc settings for long tensor work on CPU.

PyTorch frees and re-allocates the same large activations for every chunk of every layer. With
glibc's defaults, blocks over 32 MiB (the most its adaptive mmap threshold rises to) are mapped
for each allocation and unmapped when freed, and the heap's top is trimmed, so the memory is faulted
in again page by page on every use: a SmolLM2 block's forward over the protocol's 64 x 512
calibration tokens took about 200,000 minor page faults and 1.9-2.0 s, against no faults and
1.75 s with freed memory kept in the process. glibc reads these settings reliably only
at start-up (`mallopt` after torch was imported left more faults, not fewer), so the command line
re-executes itself once with them in its environment; programs using the Python API can export
`malloc_environment()`'s variables before Python starts. Peak memory is unchanged; memory freed
late in a run is kept by the process until it exits. SECATEURS_MALLOC=default opts out.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

# Never serve tensors by mmap (4 GiB threshold) and never trim the heap's top (16 GiB threshold).
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def malloc_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` with the settings added, where they apply (glibc, not opted out, not already set)."""
    env = dict(environ)
    if env.get("SECATEURS_MALLOC") != "default" and platform.libc_ver()[0] == "glibc":
        for name, value in SETTINGS.items():
            env.setdefault(name, value)
    return env


def reexec_with_malloc_settings(module: str) -> None:
    """Replace this process by `python -m module <same arguments>` with the settings in its
    environment, unless they are already there (or do not apply). Call before any heavy import."""
    env = malloc_environment()
    if any(env.get(name) != os.environ.get(name) for name in SETTINGS):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
