"""Where a measurement was taken: numbers without their machine are meaningless."""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys

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
