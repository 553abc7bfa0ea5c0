"""The decode thread count chosen when the user gives none: free CPUs, measured from /proc."""

import os
import subprocess
import sys
import time

import pytest

from secateurs.runtime import threads
from secateurs.runtime.threads import ThreadChoice, choose_threads


@pytest.mark.parametrize("cpus, busy, limit, expected", [
    (2, 0.0, None, 2),
    (2, 0.2, None, 2),    # a little background work leaves both CPUs usable
    (2, 0.3, None, 1),    # beyond the tolerance a CPU counts as taken
    (2, 1.0, None, 1),
    (2, 4.9, None, 1),    # never fewer than one
    (16, 3.0, None, 13),
    (16, 3.0, 8, 8),      # torch's thread count (or the caller's) caps it
    (16, 0.0, 32, 16),    # never more threads than CPUs
    (1, 0.0, None, 1),
])
def test_choose_threads_takes_the_free_cpus(cpus, busy, limit, expected):
    assert choose_threads(cpus, busy, limit) == expected


def test_choose_threads_against_brute_force():
    """The largest count t <= min(cpus, limit) whose CPUs are each busy less than the tolerance."""
    for cpus in range(1, 9):
        for limit in (None, 1, 3, 12):
            for tenths in range(0, 10 * cpus + 15):
                busy = tenths / 10
                fits = [t for t in range(1, cpus + 1) if cpus - t >= busy - 0.25 - 1e-9 and (limit is None or t <= limit)]
                assert choose_threads(cpus, busy, limit) == max(fits, default=1), (cpus, busy, limit)


def test_choice_describes_itself():
    assert str(ThreadChoice(1, 2, 1.04)) == "1 decode thread (2 CPUs, 1.0 busy with other processes)"
    assert str(ThreadChoice(4, 4, 0.0)) == "4 decode threads (4 CPUs, 0.0 busy with other processes)"


def test_default_threads_combines_the_measurements(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "other_runnable_threads", lambda: 2.5)
    assert threads.default_threads(limit=16) == ThreadChoice(5, 8, 2.5)
    assert threads.default_threads(limit=4) == ThreadChoice(4, 8, 2.5)


def _fake_proc(root, procs_running, states):
    (root / "self" / "task").mkdir(parents=True)
    (root / "stat").write_text(f"cpu  1 2 3 4\nctxt 99\nprocs_running {procs_running}\nprocs_blocked 0\n")
    for tid, state in enumerate(states, start=100):
        (root / "self" / "task" / str(tid)).mkdir()
        # The command name may hold spaces and parentheses: the state follows the last ")".
        (root / "self" / "task" / str(tid) / "stat").write_text(f"{tid} (py (worker) {tid}) {state} 1 2 3\n")
    return str(root)


@pytest.mark.parametrize("procs_running, states, expected", [
    (5, "RRS", 3.0),     # our two running threads are not other processes' load
    (1, "RSSS", 0.0),    # just the caller
    (2, "RRRS", 0.0),    # never below zero when the two readings disagree
])
def test_other_runnable_threads_reads_proc(tmp_path, procs_running, states, expected):
    proc = _fake_proc(tmp_path, procs_running, states)
    assert threads.other_runnable_threads(samples=3, interval=0.0, proc=proc) == expected


def test_other_runnable_threads_is_zero_where_proc_cannot_tell(tmp_path):
    assert threads.other_runnable_threads(samples=2, interval=0.0, proc=str(tmp_path / "none")) == 0.0
    (tmp_path / "stat").write_text("cpu  1 2 3 4\n")
    assert threads.other_runnable_threads(samples=2, interval=0.0, proc=str(tmp_path)) == 0.0


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_other_runnable_threads_sees_a_spinning_process():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = threads.other_runnable_threads(samples=40, interval=0.002)
    finally:
        child.kill()
        child.wait()
    assert busy >= 0.5  # the child is running or waiting for a CPU nearly all the time
