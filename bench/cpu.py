"""CPU time per process group over an interval, from /proc (Linux; empty elsewhere).

Groups are lists of pids, given directly or found by process name (`beam.smp` for RabbitMQ,
`postgres` for every PostgreSQL process, whoever it works for). Percentages are of one core, so a
group can exceed 100 on a multi-core machine; `machine` is the busy share of all cores times
their count (at most `cpus * 100`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def pids_named(*names: str) -> list[int]:
    pids = []
    for entry in PROC.glob("[0-9]*"):
        try:
            if (entry / "comm").read_text().strip() in names:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _machine() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot."""
    try:
        first = (PROC / "stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    values = [float(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def _all_processes() -> dict[int, float]:
    seconds = {}
    for entry in PROC.glob("[0-9]*"):
        pid = int(entry.name)
        seconds[pid] = process_seconds(pid)
    return seconds


def _describe(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return f"pid {pid} (gone)"
    words = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not words:  # a kernel thread
        with contextlib.suppress(OSError):
            words = "[" + (PROC / str(pid) / "comm").read_text().strip() + "]"
    return f"{pid} {words[:90]}"


class CpuMeter:
    """`start()`, then `stop()` gives each group's CPU use in % of one core over the interval."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self._t = 0.0
        self._everyone: dict[int, float] = {}
        # The busiest processes outside the groups over the last interval ("pid cmdline": %).
        self.top_other: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        return {
            name: sum(process_seconds(pid) for pid in pids()) for name, pids in self.groups.items()
        }

    def start(self) -> None:
        self._everyone = _all_processes()
        self._start = self._sample()
        self._machine = _machine()
        self._t = time.monotonic()

    def stop(self) -> dict[str, float]:
        end, machine, elapsed = self._sample(), _machine(), time.monotonic() - self._t
        everyone = _all_processes()
        if elapsed <= 0:
            return {}
        ours = {pid for pids in self.groups.values() for pid in pids()}
        others = sorted(
            (
                (seconds - self._everyone.get(pid, 0.0), pid)
                for pid, seconds in everyone.items()
                if pid not in ours
            ),
            reverse=True,
        )
        self.top_other = {
            _describe(pid): round(used / elapsed * 100, 1)
            for used, pid in others[:4]
            if used / elapsed >= 0.02
        }
        result = {
            name: round(max(0.0, end[name] - self._start.get(name, 0.0)) / elapsed * 100, 1)
            for name in self.groups
        }
        busy, total = machine[0] - self._machine[0], machine[1] - self._machine[1]
        cpus = os.cpu_count() or 1
        result["machine"] = round(busy / total * 100 * cpus, 1) if total > 0 else 0.0
        # Everything outside the groups: other people's work on a shared machine.
        counted = sum(v for k, v in result.items() if k != "machine")
        result["other"] = round(max(0.0, result["machine"] - counted), 1)
        return result


def background(seconds: float = 1.0) -> float:
    """Busy % (of one core) of the whole machine over `seconds`, with nothing of ours running."""
    meter = CpuMeter({})
    meter.start()
    time.sleep(seconds)
    return meter.stop().get("machine", 0.0)
