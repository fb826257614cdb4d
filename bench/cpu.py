"""CPU time per process group over an interval, from /proc (Linux; empty elsewhere).

Groups are lists of pids, given directly or found by process name (`beam.smp` for RabbitMQ,
`postgres` for every PostgreSQL process, whoever it works for). Percentages are of one core, so a
group can exceed 100 on a multi-core machine; `machine` is the busy share of all cores times
their count (at most `cpus * 100`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
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


# --- where the CPU goes: py-spy ---------------------------------------------------------------


class Profiler:
    """py-spy samples processes from outside while a step runs (`--nonblocking`: the target
    is never paused), into collapsed stacks (`<label>.txt`, one `frame;frame;... count` a line:
    flamegraph.pl and speedscope read them). Idle samples are left out, so the counts are where
    the process spent CPU. Needs `py-spy` (dev group) and permission to trace the process."""

    def __init__(self, pids: dict[str, int], directory: Path, *, rate: int = 200) -> None:
        self.pids = pids
        self.directory = directory
        self.rate = rate
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.directory.mkdir(parents=True, exist_ok=True)
        for label, pid in self.pids.items():
            out = self.directory / f"{label}.txt"
            out.unlink(missing_ok=True)
            self._running[label] = subprocess.Popen(
                [
                    *(exe, "record", "--pid", str(pid), "--rate", str(self.rate)),
                    *("--nonblocking", "--format", "raw", "--output", str(out)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> dict[str, Path]:
        """Stop sampling (py-spy writes its file on SIGINT); label -> file written."""
        written = {}
        for label, process in self._running.items():
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            out = self.directory / f"{label}.txt"
            if out.exists() and out.stat().st_size:
                written[label] = out
        self._running.clear()
        return written


def profile_summary(
    path: Path, *, top: int = 20, trunk: float = 0.9
) -> list[tuple[str, float, float]]:
    """The costliest frames of collapsed stacks: (frame, % of samples in it or below it,
    % of samples in it alone), by the first. A frame counts once per stack (recursion). The
    trunk (start-up frames under at least `trunk` of the samples that do nothing themselves)
    is left out."""
    inclusive: dict[str, int] = {}
    alone: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        alone[frames[-1]] = alone.get(frames[-1], 0) + count
    if not total:
        return []
    ranked = sorted(
        (
            (frame, count)
            for frame, count in inclusive.items()
            if count < trunk * total or alone.get(frame, 0) >= 0.05 * total
        ),
        key=lambda item: item[1],
        reverse=True,
    )[:top]
    return [
        (frame, round(count / total * 100, 1), round(alone.get(frame, 0) / total * 100, 1))
        for frame, count in ranked
    ]
