"""Where a measurement was taken: numbers without their machine are meaningless."""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def pin_cpus(threads: int, cpus: str = "auto") -> list[int] | None:
    """Keep this process, its runtime's threads and the tools it starts (children inherit the mask) on a fixed set
    of CPUs, as latency benchmarks do: left free, the calling thread and the runtime's worker land on different
    cores from call to call, and OpenVINO's batch-1 call on a 2-core machine measured ~10 us slower (its own timer
    too) than pinned. `cpus`: "auto" = the last `threads` usable CPUs (CPU 0 takes most interrupts), "none", or a
    list like "2,3". Returns the CPUs pinned to, or None where nothing was pinned (threads 0 = all, more threads
    than CPUs, or no affinity API: macOS)."""
    if cpus == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    if cpus == "auto":
        if not threads or threads >= len(usable):
            return None
        chosen = usable[-threads:]
    else:
        chosen = parse_cpus(cpus)
        if not set(chosen) <= set(usable):
            raise ValueError(f"CPUs {cpus} are not all usable here (usable: {','.join(map(str, usable))})")
    os.sched_setaffinity(0, chosen)
    return chosen


@contextmanager
def pinned_cpus(threads: int, cpus: str = "auto") -> Iterator[list[int] | None]:
    """pin_cpus for the duration of a `with` block, then the CPU mask the process had before: a measurement run
    in-process must not leave its caller (the validate stage, pytest, a benchmark) on one CPU."""
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    chosen = pin_cpus(threads, cpus)
    try:
        yield chosen
    finally:
        if chosen is not None and before is not None:
            os.sched_setaffinity(0, before)


def parse_cpus(text: str) -> list[int]:
    try:
        chosen = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        chosen = []
    if not chosen or min(chosen) < 0:
        raise ValueError(f"'{text}' is not a list of CPU numbers: write e.g. 1 or 2,3, or auto / none")
    return chosen


def environment() -> dict:
    return {"hostname": socket.gethostname(), "os": platform.platform(), "machine": platform.machine(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
            "python": platform.python_version(), "numpy": np.__version__, "executable": sys.executable}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return peak_rss_mb()
