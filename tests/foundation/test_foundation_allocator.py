"""The malloc settings the command line runs under (secateurs.allocator)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from secateurs.allocator import SETTINGS, malloc_environment

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")


@glibc
def test_environment_adds_the_settings_unless_set():
    assert malloc_environment({"A": "1"}) == {"A": "1", **SETTINGS}
    assert malloc_environment({"MALLOC_TRIM_THRESHOLD_": "5"})["MALLOC_TRIM_THRESHOLD_"] == "5"


def _run(tmp_path, source: str, env: dict) -> str:
    (tmp_path / "probe.py").write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@glibc
def test_reexec_only_when_opted_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "SECATEURS_MALLOC"}
    out = _run(tmp_path, """
        import os, sys
        print("started")
        from secateurs.allocator import reexec_with_malloc_settings
        reexec_with_malloc_settings("probe")
        print(os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    """, env)
    assert out.splitlines() == ["started", "None"]


@glibc
def test_reexec_runs_the_module_once_with_the_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS} | {"SECATEURS_MALLOC": "tuned"}
    out = _run(tmp_path, """
        import os, sys
        print("started", sys.argv[1:])
        from secateurs.allocator import SETTINGS, reexec_with_malloc_settings
        reexec_with_malloc_settings("probe")
        print([os.environ.get(name) for name in SETTINGS])
    """, env)
    assert out.splitlines() == ["started []", "started []", str(list(SETTINGS.values()))]


@glibc
def test_settings_stop_the_page_faults_of_reallocated_tensors(tmp_path):
    """What they are for: a freed 48 MiB tensor (over the 32 MiB up to which glibc raises its own
    mmap threshold) stays in the process, so allocating it again costs no page faults (glibc's
    defaults: a fault per 4 KiB page, every time)."""
    source = """
        import resource, torch
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):  # the heap settles after a few rounds of (aligned) reuse
            torch.ones(12 << 20)
        before = faults()
        for _ in range(20):
            torch.ones(12 << 20)  # 48 MiB, freed at once
        print(faults() - before)
    """
    plain = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    default_faults = int(_run(tmp_path, source, plain))
    tuned_faults = int(_run(tmp_path, source, malloc_environment(plain)))
    assert default_faults > 20 * 10000  # 12288 pages per allocation
    assert tuned_faults < 100
