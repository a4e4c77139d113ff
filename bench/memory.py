"""Process memory readings for benchmarks and tests (Linux ``/proc/self/status``)."""

from __future__ import annotations

__all__ = ["memory_status_mb", "peak_memory_mb", "resident_memory_mb"]


def memory_status_mb() -> dict[str, float]:
    """This process's ``Vm*`` and ``Rss*`` lines from /proc/self/status, in MiB.

    ``VmRSS`` is what is resident now, ``VmHWM`` its high-water mark, and ``RssAnon`` /
    ``RssFile`` split the resident pages into private memory and pages of mapped files (a
    memory-mapped checkpoint counts under ``RssFile`` while it is being read).
    """
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
                    values[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return values


def resident_memory_mb() -> float:
    """Current resident set size of this process in MiB."""
    return memory_status_mb().get("VmRSS", float("nan"))


def peak_memory_mb() -> float:
    """The highest resident set size this process has had, in MiB."""
    return memory_status_mb().get("VmHWM", float("nan"))
