"""glibc malloc settings for long tensor work on CPU.

PyTorch frees and re-allocates the same activations (megabytes each) for every chunk of every
layer. glibc's defaults hand such memory back to the kernel: it trims the free top of the heap
beyond twice its adaptive mmap threshold, and maps every block above that threshold (at most
32 MiB) afresh. The memory is then faulted in again, page by page, on its next use: a SmolLM2
block's forward over the protocol's 64 x 512 calibration tokens took about 200,000 minor page
faults and 1.8-2.0 s, against none and 1.7-1.75 s with these settings. Blocks over 64 MiB are
still mapped, so large one-off tensors (an embedding matrix and its temporaries while loading) go
back to the kernel: with a 4 GiB threshold a SparseGPT run's peak RSS rose from 2.4 to 2.9 GB.
glibc reads these settings reliably only at start-up (`mallopt` after torch was imported left more
faults, not fewer). They are opt-in: with SECATEURS_MALLOC=tuned, `secateurs compress` and `demo`
re-execute themselves once with them in their environment (no other command, never for --help);
programs using the Python API can export `malloc_environment()`'s variables before Python starts.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

# Serve blocks up to 64 MiB from the heap and keep up to 256 MiB free at its top.
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


OPT_IN = "SECATEURS_MALLOC"  # =tuned


def malloc_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` with the settings added, where they apply (glibc, not already set)."""
    env = dict(environ)
    if platform.libc_ver()[0] == "glibc":
        for name, value in SETTINGS.items():
            env.setdefault(name, value)
    return env


def reexec_with_malloc_settings(module: str) -> None:
    """Replace this process by `python -m module <same arguments>` with the settings in its
    environment, when SECATEURS_MALLOC=tuned asks for them and they are not there yet (or do not
    apply). Call before any heavy import."""
    if os.environ.get(OPT_IN) != "tuned":
        return
    env = malloc_environment()
    if any(env.get(name) != os.environ.get(name) for name in SETTINGS):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
