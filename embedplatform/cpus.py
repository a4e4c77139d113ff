"""How many cores this process may really use: the affinity mask, capped by a container's CPU
quota (cgroup v2, then v1), which the mask does not show: on a 64-core host a container limited
to 2 CPUs must not start 32 workers or 64 torch threads."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2, then v1), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        # Rounded up, as the JVM and Go do: a 1.5-CPU limit still runs two threads usefully.
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def torch_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Each worker's share of the cores: workers x torch threads above the core count makes
    every forward pass wait on the others (measured: 2 workers x 2 threads on 2 cores is 8x
    slower than 2 x 1)."""
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))
