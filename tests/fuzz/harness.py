"""What every fuzz target shares: its budget, its tally of cases and failures, and the watch on
the gateway process (its log for unhandled exceptions, its /metrics for leaks).

Budget: `EDGEWAY_FUZZ_EXAMPLES` (default 20, what `make test` runs) scales every target; each
target multiplies it by its own weight (a pure parser is cheap, a WebSocket round trip is not).
`make fuzz` raises it. Each target's tally is kept for the terminal summary (see conftest.py) and
written to `var/fuzz/<target>.json`, which `python -m tests.fuzz.summary` turns into a table.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from prometheus_client.parser import text_string_to_metric_families

from edgeway.common.testing import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "var" / "fuzz"
DEFAULT_EXAMPLES = 20
SUMMARY_CHARS = 160


def budget() -> int:
    """The base number of examples per target (`EDGEWAY_FUZZ_EXAMPLES`)."""
    value = os.environ.get("EDGEWAY_FUZZ_EXAMPLES", "")
    return max(1, int(value)) if value.strip() else DEFAULT_EXAMPLES


def examples(weight: float = 1.0) -> int:
    return max(1, round(budget() * weight))


def fuzz_settings(target: str, weight: float = 1.0, **overrides: Any) -> settings:
    """Hypothesis settings for a fuzz target: its share of the budget, no deadline (a real
    process answers), the failing example printed, and an example database of its own.

    Its own database, because the targets' tests are functions defined alike inside test
    functions (and parametrized), which Hypothesis would file under one key: one target's
    passing run would then drop another's saved failure instead of replaying it."""
    database = settings().database  # the loaded profile's
    if database is not None:  # a profile that turned the database off keeps it off
        home = Path(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY") or ROOT / ".hypothesis")
        database = DirectoryBasedExampleDatabase(home / "fuzz" / slug(target))
    options: dict[str, Any] = {
        "database": database,
        "max_examples": examples(weight),
        "deadline": None,
        "print_blob": True,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
        "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        **overrides,
    }
    return settings(**options)


def slug(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("_")


def signature(error: BaseException) -> str:
    """A failure's kind, stable across examples: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first}"[:SUMMARY_CHARS]


@dataclass
class Tally:
    """Cases one target ran and the distinct failures it saw (each with its first example)."""

    target: str
    engine: str = "hypothesis"
    budget: int = 0
    tried: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        """Count an outcome worth reporting that is not a failure (a 504, a refused case)."""
        self.notes[what] = self.notes.get(what, 0) + 1

    def fail(self, kind: str, example: Any) -> None:
        self.failures.setdefault(kind[:SUMMARY_CHARS], repr(example)[:2000])

    @contextmanager
    def case(self, example: Any) -> Iterator[None]:
        """One case: counted, and its failure (any exception) recorded before it propagates."""
        self.tried += 1
        try:
            yield
        except Exception as error:
            self.fail(signature(error), example)
            raise

    def run(self, test: Callable[[], None], *, after: Callable[[], None] | None = None) -> None:
        """Run a Hypothesis test built for this target, then `after` (checks on the whole run,
        counted as one more case); the tally is kept however it ends."""
        try:
            test()
            if after is not None:
                with self.case("after the run"):
                    after()
        finally:
            self.finish()

    def finish(self) -> None:
        TALLIES[self.target] = self
        self.save()
        print(
            f"\nfuzz {self.target}: {self.tried} cases, {len(self.failures)} failures"
            + "".join(f"\n  - {kind}" for kind in self.failures)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine,
            "budget": self.budget,
            "tried": self.tried,
            "failures": len(self.failures),
            "failure_kinds": self.failures,
            "notes": self.notes,
            "seconds": round(time.monotonic() - self.started, 2),
        }

    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{slug(self.target)}.json"
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


# Every tally of this pytest session, for the terminal summary.
TALLIES: dict[str, Tally] = {}


def tally(target: str, *, engine: str = "hypothesis", weight: float = 1.0) -> Tally:
    return Tally(target, engine=engine, budget=examples(weight))


# --- the gateway process ------------------------------------------------------------------------

LeakSample = dict[str, float]
TASKS_METRIC = "edgeway_gateway_event_loop_tasks"
CONNECTIONS_METRIC = "edgeway_gateway_connections"
FDS_METRIC = "process_open_fds"
# Tasks and descriptors that may come and go on their own (a broker heartbeat, a background
# refresh, a replaced producer's close): far fewer than the connections each fuzz target opens.
LEAK_SLACK = 6


FRAME = re.compile(r'File "[^"]*/edgeway/([^"]+)", line (\d+), in (\S+)')


def _crash_summary(record: dict[str, Any]) -> str:
    """`TypeError: unhashable type: 'dict' at gateway/video.py:370 in take_text`: the
    exception, and the innermost Edgeway frame it went through."""
    trace = str(record.get("exception", "")).strip()
    last = trace.splitlines()[-1].strip() if trace else str(record.get("event", "")).strip()
    frames = FRAME.findall(trace)
    if not frames:
        return last
    path, line, function = frames[-1]
    return f"{last} at {path}:{line} in {function}"


def _is_access(record: dict[str, Any] | str) -> bool:
    return isinstance(record, dict) and record.get("logger") == "edgeway.gateway.access"


@dataclass
class GatewayWatch:
    """Reads what the real gateway process says about itself: new unhandled exceptions in its
    log, and its /metrics (open WebSockets per endpoint, event-loop tasks, open descriptors)."""

    process: ServiceProcess
    offset: int = 0

    def is_alive(self) -> bool:
        return self.process.process is not None and self.process.process.poll() is None

    def _new_records(self) -> list[dict[str, Any] | str]:
        """Log records written since the last read: JSON objects, or raw lines that are not."""
        with self.process.log_path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records: list[dict[str, Any] | str] = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                records.append(line.decode(errors="replace"))
                continue
            records.append(record if isinstance(record, dict) else str(record))
        return records

    @staticmethod
    def _crashes(records: list[dict[str, Any] | str]) -> list[str]:
        crashes = []
        for record in records:
            if isinstance(record, str):
                if "Traceback" in record:
                    crashes.append(record[:SUMMARY_CHARS])
            elif "exception" in record and record.get("level") in ("error", "critical"):
                crashes.append(_crash_summary(record))
        return crashes

    def new_crashes(self) -> list[str]:
        """Unhandled exceptions logged since the last read (uvicorn's "Exception in ASGI
        application", or any error-level record with a traceback)."""
        return self._crashes(self._new_records())

    def crashes_after_requests(self, count: int, *, wait: float = 5.0) -> list[str]:
        """Wait until the access log has `count` more HTTP requests (a request is logged once
        its handler has ended, however), then the unhandled exceptions logged meanwhile."""
        records = self._new_records()
        deadline = time.monotonic() + wait
        while sum(map(_is_access, records)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
            records += self._new_records()
        time.sleep(0.01)  # uvicorn logs a request's traceback just after its access line
        return self._crashes(records + self._new_records())

    def assert_no_crash(self) -> None:
        crashes = self.new_crashes()
        assert not crashes, "the gateway logged unhandled exceptions: " + "; ".join(crashes)
        assert self.is_alive(), "the gateway process exited:\n" + self.process.log_tail()

    def metrics(self) -> LeakSample:
        text = httpx.get(self.process.url + "/metrics", timeout=10).text
        samples: LeakSample = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def leak_sample(self, endpoint: str) -> LeakSample:
        found = self.metrics()
        return {
            "connections": found.get(f"{CONNECTIONS_METRIC}{{endpoint={endpoint}}}", 0.0),
            "tasks": found.get(TASKS_METRIC, -1.0),
            "fds": found.get(FDS_METRIC, -1.0),
        }

    def baseline(self, endpoint: str) -> LeakSample:
        """The quietest of a few samples (a sample may catch a passing background task)."""
        samples = []
        for _ in range(3):
            samples.append(self.leak_sample(endpoint))
            time.sleep(0.05)
        return {key: min(sample[key] for sample in samples) for key in samples[0]}

    def assert_settled(self, endpoint: str, before: LeakSample, *, wait: float = 15.0) -> None:
        """Once every fuzz connection is closed, the gateway holds no more connections, tasks
        or descriptors than before (give or take LEAK_SLACK tasks and descriptors)."""
        assert before["tasks"] > 0, f"the gateway exports no {TASKS_METRIC} (or it reads 0)"
        deadline = time.monotonic() + wait
        now = self.leak_sample(endpoint)
        while time.monotonic() < deadline:
            if (
                now["connections"] <= before["connections"]
                and now["tasks"] <= before["tasks"] + LEAK_SLACK
                and now["fds"] <= before["fds"] + LEAK_SLACK
            ):
                return
            time.sleep(0.2)
            now = self.leak_sample(endpoint)
        raise AssertionError(
            f"{endpoint}: the gateway did not settle after the fuzz connections closed: "
            f"before {before}, after {now} (a leaked connection, task or descriptor)"
        )
