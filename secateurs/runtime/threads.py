"""How many threads to decode with when the user chose none: the CPUs other processes leave free.

Each decode step meets dozens of OpenMP barriers (one per linear layer and attention). A thread
that shares its CPU with another process waits for its time slice at each, and the whole team
with it: on two CPUs shared with other work, two threads decoded 1.7-6.6x slower than one
(benchmarks/results/threads.md). `default_threads()` measures the load; `choose_threads()` is the
rule, a pure function of the counts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# A CPU counts as free for a decode thread when other processes keep it busy less than this much.
_BUSY_TOLERANCE = 0.25


@dataclass(frozen=True)
class ThreadChoice:
    """default_threads()'s answer and what it saw."""

    threads: int
    cpus: int  # CPUs this process may run on
    busy: float  # runnable threads of other processes, on average over the sampling

    def __str__(self) -> str:
        return (f"{self.threads} decode thread{'s' * (self.threads != 1)} ({self.cpus} CPUs, "
                f"{self.busy:.1f} busy with other processes)")


def choose_threads(cpus: int, busy: float, limit: int | None = None) -> int:
    """Decode threads for `cpus` CPUs of which other processes keep `busy` occupied: the free
    ones, at least 1, at most `limit`."""
    free = math.floor(cpus - busy + _BUSY_TOLERANCE)
    return max(1, min(free, cpus, cpus if limit is None else limit))


def _running_threads(stat_paths: Iterable[str]) -> int:
    running = 0
    for path in stat_paths:
        try:
            with open(path) as file:
                fields = file.read().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        running += bool(fields) and fields[0] == "R"
    return running


def other_runnable_threads(samples: int = 20, interval: float = 0.005, proc: str = "/proc") -> float:
    """Runnable threads of other processes, averaged over `samples` readings `interval` seconds
    apart (Linux: /proc/stat's procs_running less this process's running threads, so neither the
    caller nor its own spinning workers count); 0.0 where `proc` cannot tell."""
    total = 0
    for sample in range(samples):
        if sample:
            time.sleep(interval)
        try:
            with open(f"{proc}/stat") as file:
                running = next(int(line.split()[1]) for line in file if line.startswith("procs_running "))
            tasks = [f"{proc}/self/task/{tid}/stat" for tid in os.listdir(f"{proc}/self/task")]
        except (OSError, StopIteration, ValueError, IndexError):
            return 0.0
        total += max(0, running - _running_threads(tasks))
    return total / samples


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(limit: int | None = None) -> ThreadChoice:
    """Threads for decoding when the user chose none: the CPUs other processes leave free right
    now (0.1 s of sampling), at most `limit` (default: torch's thread count)."""
    cpus = usable_cpus()
    busy = other_runnable_threads()
    return ThreadChoice(choose_threads(cpus, busy, torch.get_num_threads() if limit is None else limit), cpus, busy)
