"""How many CPU threads torch may use in this process.

A process takes its threads from the resources it has, not from the machine:
the CPUs it may run on (its affinity), capped by its cgroup's CPU quota (a
container's ``--cpus``) and by ``OMP_NUM_THREADS`` when set (Ray sets it to a
task's or actor's ``num_cpus``: a simulated ClientApp's share). The run config's
``torch-threads`` (0: from these resources) overrides it.

On a CPU that other processes use too, torch's threads wait on each other at
every operation's barrier while one of them is descheduled: a server epoch beside
one busy process ran at 0.29x of its speed alone with 2 threads on 2 cores, and at
0.49x with 1 (``benchmarks/shared_cpu.py``). :class:`FairThreads` therefore
watches how much CPU the other processes take (``/proc/stat`` less this
process's own time) and, between training steps, uses only the CPUs they leave.
The price: PyTorch's results depend on the thread count (a reduction split over
more threads adds in another order), so a run whose threads changed does not
repeat bit for bit a run on a quiet CPU; results.json names the counts each
round's server training used (``server_threads``), and a positive
``torch-threads`` fixes them.

This module imports no Flower code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["FairThreads", "available_cpus", "resolve_threads"]

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")


def _quota(text: str) -> float | None:
    """CPUs of a cgroup v2 ``cpu.max`` line (``"max 100000"``: no quota)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(environ: dict[str, str] | None = None, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process has: its affinity, capped by its cgroup's quota and
    by a positive integer ``OMP_NUM_THREADS``; at least 1."""
    environ = dict(os.environ) if environ is None else environ
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota = _quota(cpu_max.read_text())
    except OSError:
        quota = None
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdecimal() and int(omp) > 0:
        cpus = min(cpus, int(omp))
    return max(1, cpus)


def resolve_threads(setting: int = 0, environ: dict[str, str] | None = None) -> int:
    """The threads for ``torch-threads = setting``: the setting itself when
    positive, else :func:`available_cpus`. ValueError for a negative setting."""
    if setting < 0:
        raise ValueError(
            f"torch-threads must be 0 (from the process's resources) or more, got {setting}"
        )
    return setting if setting > 0 else available_cpus(environ)


def machine_busy_seconds(proc_stat: Path = PROC_STAT) -> float | None:
    """CPU seconds all processes have run since boot (``/proc/stat``'s first line
    less idle and iowait); None where there is no such file."""
    try:
        with proc_stat.open() as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    try:
        ticks = [int(value) for value in fields[1:]]
    except ValueError:
        return None
    busy = sum(ticks[:8]) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # no guest twice
    return busy / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process (all its threads) has run."""
    times = os.times()
    return times.user + times.system


class FairThreads:
    """Torch's intra-op threads, set from the CPUs other processes leave free.

    Call :meth:`update` between steps: at most every ``interval`` seconds it
    measures the CPU the other processes took since the last measurement (the
    machine's busy time less this process's own) and sets the threads to the
    process's CPUs (:func:`resolve_threads` of ``setting``) less those, at least
    one. With a positive ``setting`` the threads stay fixed at it; where the
    machine's CPU time cannot be read (not Linux) they stay at the process's
    CPUs.

    Parameters
    ----------
    setting : int (default: 0)
        ``torch-threads``: 0 adapts; a positive count is used as it is.
    interval : float (default: 0.5)
        Seconds between measurements; the first after :meth:`start` comes after
        ``first_interval`` (0.1 s: one step at the wrong count costs much more
        than a short measurement's error).
    busy_seconds, process_seconds, clock
        Where the machine's busy CPU seconds (None: :func:`machine_busy_seconds`),
        this process's CPU seconds and the wall clock come from (for tests).
    """

    def __init__(
        self,
        setting: int = 0,
        interval: float = 0.5,
        first_interval: float = 0.1,
        busy_seconds: Callable[[], float | None] | None = None,
        process_seconds: Callable[[], float] = own_seconds,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cpus = resolve_threads(setting)
        self.adaptive = setting == 0
        self.interval = interval
        self.first_interval = first_interval
        self._wait = interval  # until the next measurement
        # the machine's busy time: looked up when measured (None: this module's)
        self._busy = busy_seconds or (lambda: machine_busy_seconds())
        self._own, self._clock = process_seconds, clock
        self._last = self._sample()
        self.threads = self.cpus
        self.others = 0.0  # CPUs the other processes took in the last interval
        self.used: set[int] = set()  # the thread counts set since the last start()

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own()

    def start(self) -> int:
        """Begin work: measure the others from now on (what they took while this
        process was idle says nothing about the CPU it will share), keep the
        count the last work ended with (a busy neighbour usually still is; one
        that has gone shows within ``first_interval``) and set it."""
        self._last = self._sample()
        self.used = set()
        self._wait = self.first_interval
        return self.update()

    def update(self) -> int:
        """Re-measure (when ``interval`` has passed), set and return the threads."""
        if self.adaptive:
            now = self._sample()
            elapsed = now[0] - self._last[0]
            if elapsed >= self._wait and elapsed > 0:
                if now[1] is not None and self._last[1] is not None:
                    others = (now[1] - self._last[1]) - (now[2] - self._last[2])
                    self.others = max(0.0, others / elapsed)
                    self.threads = max(1, min(self.cpus, int(self.cpus - self.others + 0.5)))
                self._last, self._wait = now, self.interval
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self.used.add(self.threads)
        return self.threads
