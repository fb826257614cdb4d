"""Occupancy fan-out: the suite path against an in-process relay, side by side in one run.

    .venv/bin/python -m bench.occupancy_fanout [--quick] [--target relay|suite|both]
        [--before PYTHON]

Targets:
- relay: `bench.inproc_relay`, Omega's path in one process (no broker, no database).
- suite: `edgeway.gateway` + `edgeway.occupancy` on a private RabbitMQ virtual host and a fresh
  PostgreSQL database (camera model -> gateway -> RabbitMQ -> occupancy -> PostgreSQL ->
  RabbitMQ -> gateway -> every client).
- before (with `--before PYTHON`): the suite again, its services run by another checkout's
  interpreter (an earlier commit, after its `make setup`), so that a change is measured against
  the code it replaced in the same run, at the same rates.

For each target: 100 WebSocket clients in 2 worker processes and one producer process, a warm-up,
a correctness probe, the 200 msg/s target point, then a rate ladder until p99 > 100 ms, a loss or
a producer that cannot keep its rate. Prints tables and writes bench/results/occupancy_fanout.json.
It never asserts timings: the verdict columns are information. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import orjson

from bench import loadgen
from bench.cpu import CpuMeter, Profiler, background, pids_named, profile_summary
from edgeway.common.testing import (
    ServiceProcess,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    free_port,
)

RESULTS = Path(__file__).resolve().parent / "results"
P99_LIMIT_MS = 100.0  # a ladder step is sustained when p99 <= this, nothing is lost ...
SEND_SHORTFALL = 0.95  # ... and the producer kept at least this share of the offered rate
POINT_P50_MS, POINT_P99_MS = 10.0, 50.0  # the target point's goal (with no loss)
RATIO_GOAL = 0.6  # suite / relay, best sustained deliveries per second
LADDER = (300, 400, 500, 600, 700, 800, 1000, 1200, 1400, 1700, 2000, 2500, 3000)
DOWN_LADDER = (150, 100, 75, 50, 25)


@dataclass
class Config:
    clients: int = 100
    workers: int = 2
    point_rate: float = 200.0
    point_seconds: float = 8.0
    step_seconds: float = 5.0
    ladder: tuple[float, ...] = LADDER
    # When not even the target point is sustained: these, downwards, until one is.
    down_ladder: tuple[float, ...] = DOWN_LADDER
    warmup_seconds: float = 2.0
    warmup_rate: float = 200.0
    drain_idle: float = 1.0  # stop waiting for deliveries after this long without progress ...
    drain_max: float = 5.0  # ... or this long after the last frame was sent
    ladder_budget: float = 110.0  # seconds of ladder per target at most
    quick: bool = False
    # py-spy records the suite's services during the point step (collapsed stacks here).
    profile: Path | None = None
    profile_rate: int = 200  # samples per second

    @classmethod
    def make(cls, *, quick: bool, clients: int, workers: int, ladder: str | None) -> Config:
        config = cls(clients=clients, workers=workers, quick=quick)
        if quick:
            config.point_seconds = config.step_seconds = 2.0
            config.warmup_seconds = 1.0
            config.ladder = LADDER[:2]
            config.down_ladder = (100, 50)
            config.drain_max = 3.0
            config.ladder_budget = 20.0
        if ladder:
            config.ladder = tuple(float(r) for r in ladder.split(","))
        return config


# --------------------------------------------------------------------------------------------
# Service metrics: where the suite spends a message's time (Prometheus text from /metrics)

Sample = tuple[str, dict[str, str], float]
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# (column, service, histogram, label filters; a value ending in "*" is a prefix). A service's
# per-message paths report through `edgeway.common.amqp` (`edgeway_amqp_*`), its cold paths and
# older versions through FastStream's middleware: a stage takes whichever the service has.
STAGES: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    (
        "gw publish ms",
        "gateway",
        "edgeway_amqp_publish_seconds",
        {"publisher": "gateway-work"},
    ),
    (
        "gw publish ms",
        "gateway",
        "edgeway_published_messages_duration_seconds",
        {"destination": "edgeway.occupancy.observations*"},
    ),
    (
        "occ handler ms",
        "occupancy",
        "edgeway_amqp_handle_seconds",
        {"queue": "edgeway.occupancy.observations"},
    ),
    (
        "occ handler ms",
        "occupancy",
        "edgeway_received_processed_messages_duration_seconds",
        {"handler": "edgeway.occupancy.observations*"},
    ),
    (
        "occ publish ms",
        "occupancy",
        "edgeway_amqp_publish_seconds",
        {"publisher": "occupancy"},
    ),
    (
        "occ publish ms",
        "occupancy",
        "edgeway_published_messages_duration_seconds",
        {"destination": "edgeway.broadcast.*"},
    ),
    (
        "gw fan-out ms",
        "gateway",
        "edgeway_gateway_fanout_seconds",
        {},
    ),
    (
        "gw fan-out ms",
        "gateway",
        "edgeway_received_processed_messages_duration_seconds",
        {"handler": "edgeway.broadcast.*"},
    ),
)
COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("occ stored", "occupancy", "edgeway_occupancy_observations_total", {"outcome": "stored"}),
    ("gw dropped", "gateway", "edgeway_gateway_dropped_total", {}),
)
GAUGES: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("occ in process", "occupancy", "edgeway_amqp_in_process", {"queue": "edgeway.occupancy.*"}),
    (
        "occ in process",
        "occupancy",
        "edgeway_received_messages_in_process",
        {"handler": "edgeway.occupancy.observations*"},
    ),
)


def parse_prometheus(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        with contextlib.suppress(ValueError):
            samples.append((name, dict(_LABEL.findall(labels)), float(value)))
    return samples


def _matches(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    for key, pattern in wanted.items():
        value = labels.get(key)
        if value is None:
            return False
        if pattern.endswith("*") and not value.startswith(pattern[:-1]):
            return False
        if not pattern.endswith("*") and value != pattern:
            return False
    return True


def metric_sum(
    scraped: dict[str, list[Sample]], service: str, name: str, wanted: dict[str, str]
) -> float | None:
    samples = scraped.get(service)
    if samples is None:
        return None
    found = [v for n, labels, v in samples if n == name and _matches(labels, wanted)]
    return sum(found) if found else 0.0


def stage_values(
    before: dict[str, list[Sample]], after: dict[str, list[Sample]]
) -> dict[str, float]:
    """Mean time per message in each stage over the interval, counter deltas, gauges at its end."""

    def delta(service: str, name: str, wanted: dict[str, str]) -> float | None:
        old, new = (metric_sum(x, service, name, wanted) for x in (before, after))
        return None if old is None or new is None else new - old

    values: dict[str, float] = {}
    for column, service, histogram, wanted in STAGES:
        seconds = delta(service, histogram + "_sum", wanted)
        count = delta(service, histogram + "_count", wanted)
        if seconds is not None and count and column not in values:
            values[column] = round(seconds / count * 1000, 2)
    for column, service, counter, wanted in COUNTERS:
        if (value := delta(service, counter, wanted)) is not None:
            values[column] = value
    for column, service, gauge, wanted in GAUGES:
        value = metric_sum(after, service, gauge, wanted)
        if value is not None and (value or column not in values):
            values[column] = value
    return values


# --------------------------------------------------------------------------------------------
# Targets


class Target:
    name = ""
    profiled = False  # `--profile` records its processes with py-spy
    workers: int | None = None  # client worker processes, when not the configured number
    ladder = True  # after the point: the rate ladder

    def __init__(self, logs: Path, *, python: str | None = None) -> None:
        """`python`: the interpreter of its services (default: this one)."""
        self.logs = logs
        self.python = python
        self.processes: dict[str, ServiceProcess] = {}

    def service(self, label: str, module: str, env: dict[str, str]) -> ServiceProcess:
        log_path = self.logs / f"{self.name}-{label}.log"
        log_path.unlink(missing_ok=True)
        process = ServiceProcess(
            module, env=env, port=free_port(), log_path=log_path, python=self.python
        )
        self.processes[label] = process
        return process

    def start(self) -> None:
        raise NotImplementedError

    @property
    def front(self) -> ServiceProcess:
        """The process the producer and the clients connect to."""
        raise NotImplementedError

    def urls(self) -> tuple[str, str]:
        base = f"ws://127.0.0.1:{self.front.port}"
        return base + loadgen.MODEL_PATH, base + loadgen.CLIENT_PATH

    def cpu_groups(self) -> dict[str, Callable[[], list[int]]]:
        def pid_of(process: ServiceProcess) -> Callable[[], list[int]]:
            return lambda: [process.process.pid] if process.process is not None else []

        return {label: pid_of(process) for label, process in self.processes.items()}

    def scrape(self) -> dict[str, list[Sample]]:
        """Each service's /metrics, parsed (nothing for targets without metrics)."""
        return {}

    def wait_snapshots(self, clients: int, timeout: float = 30.0) -> float:
        """Wait until `clients` new clients have had their snapshot; returns the seconds."""
        return 0.0  # the relay sends it synchronously on connect

    def metrics(self) -> dict[str, Any]:
        """The `edgeway_` counters at the end, for the JSON (no histogram buckets)."""
        return {
            service: {
                name
                + (
                    "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
                ): value
                for name, labels, value in samples
                if name.startswith("edgeway_") and not name.endswith(("_bucket", "_created"))
            }
            for service, samples in self.scrape().items()
        }

    def idle(self) -> bool:
        """Nothing left in the target's own queues (the relay has none)."""
        return True

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            with contextlib.suppress(Exception):
                process.stop()


class RelayTarget(Target):
    name = "relay"

    def start(self) -> None:
        self.service("relay", "bench.inproc_relay", {}).start(wait=30)

    @property
    def front(self) -> ServiceProcess:
        return self.processes["relay"]


class SuiteTarget(Target):
    name = "suite"
    profiled = True

    def __init__(self, logs: Path, *, python: str | None = None) -> None:
        super().__init__(logs, python=python)
        self.vhost: str | None = None
        self.database: str | None = None

    def start(self) -> None:
        self.vhost, amqp_url = create_vhost("edgeway-bench")
        self.database = create_postgres_database("edgeway_bench")
        env = {
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_OCCUPANCY_DATABASE_URL": self.database,
            "EDGEWAY_ANONYMOUS_SCOPES": '["occupancy:publish","occupancy:subscribe"]',
            "EDGEWAY_PRODUCER_RATE": "100000",
            "EDGEWAY_PRODUCER_BURST": "100000",
            "EDGEWAY_LOG_LEVEL": "WARNING",
        }
        # The occupancy service first: it answers the gateway's latest-state requests.
        self.service("occupancy", "edgeway.occupancy", env).start(wait=90)
        self.service("gateway", "edgeway.gateway", env).start(wait=60)

    @property
    def front(self) -> ServiceProcess:
        return self.processes["gateway"]

    def cpu_groups(self) -> dict[str, Callable[[], list[int]]]:
        groups = super().cpu_groups()
        groups["rabbitmq"] = lambda: pids_named("beam.smp")
        groups["postgres"] = lambda: pids_named("postgres")
        return groups

    def scrape(self) -> dict[str, list[Sample]]:
        scraped: dict[str, list[Sample]] = {}
        for label, process in self.processes.items():
            with contextlib.suppress(httpx.HTTPError):
                scraped[label] = parse_prometheus(
                    httpx.get(process.url + "/metrics", timeout=5).text
                )
        return scraped

    def idle(self) -> bool:
        # While the occupancy service is behind, its prefetch is full; a pause in deliveries
        # (a slow transaction, a starved process) does not mean the backlog is gone.
        scraped = self.scrape()
        return not any(
            metric_sum(scraped, "occupancy", name, wanted) for _, _, name, wanted in GAUGES
        )

    def wait_snapshots(self, clients: int, timeout: float = 30.0) -> float:
        # The gateway asks the occupancy service for each new client's snapshot after the
        # WebSocket is accepted; nothing is measured until every one is answered, so that the
        # connection storm's requests are not part of the first step.
        started = time.monotonic()
        name = "edgeway_gateway_service_request_seconds_count"
        while time.monotonic() - started < timeout:
            answered = metric_sum(self.scrape(), "gateway", name, {"service": "occupancy"})
            if answered is None or answered >= clients:
                break
            time.sleep(0.1)
        return round(time.monotonic() - started, 2)

    def stop(self) -> None:
        super().stop()
        if self.database is not None:
            with contextlib.suppress(Exception):
                drop_postgres_database(self.database)
            self.database = None
        if self.vhost is not None:
            with contextlib.suppress(Exception):
                drop_vhost(self.vhost)
            self.vhost = None


class SuiteOneProcessTarget(SuiteTarget):
    """The suite with every client in one load-generator process, as an outside user who
    opens 100 connections from one program measures it: the point only."""

    name = "suite-1p"
    workers = 1
    ladder = False


class BeforeTarget(SuiteTarget):
    """The suite as an earlier version of it runs (`--before`): its services started by that
    checkout's interpreter, the load generator and the measures this one's."""

    name = "before"


TARGETS: dict[str, type[Target]] = {
    "relay": RelayTarget,
    "suite": SuiteTarget,
    "suite-1p": SuiteOneProcessTarget,
}


def occupancy_available() -> bool:
    try:
        return importlib.util.find_spec("edgeway.occupancy.__main__") is not None
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------
# Measuring


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass
class Step:
    kind: str  # "point" or "ladder"
    offered: float  # msg/s
    seconds: float
    sent: int = 0
    send_rate: float = 0.0
    producer_max_lag_ms: float = 0.0
    expected: int = 0
    received: int = 0
    deliveries_per_s: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    loss: int = 0
    extra: int = 0  # deliveries of a frame a client had already received
    clients_short: int = 0
    malformed: int = 0
    drain_s: float = 0.0  # how long after the last send the deliveries were counted
    late: int = 0  # of the lost ones: delivered after all, once the drain period was over
    never: int = 0  # of the lost ones: not delivered even when nothing more was arriving
    settle_s: float = 0.0  # waited after the drain until nothing more arrived
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_top_other: dict[str, float] = field(default_factory=dict)  # busiest other processes
    profiles: dict[str, str] = field(default_factory=dict)  # service -> collapsed stacks file
    stages: dict[str, float] = field(default_factory=dict)
    duplicate_samples: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def sustained(self) -> bool:
        return not self.failures


class Session:
    """One target's processes plus the load generator connected to it."""

    def __init__(self, target: Target, config: Config) -> None:
        self.target = target
        self.config = config
        self.pool: loadgen.ClientPool | None = None
        self.producer: loadgen.Producer | None = None
        self.meter: CpuMeter | None = None

    def start(self) -> dict[str, Any]:
        self.target.start()
        model_url, client_url = self.target.urls()
        self.pool = loadgen.ClientPool(
            client_url,
            clients=self.config.clients,
            workers=self.target.workers or self.config.workers,
        )
        connected = self.pool.wait_connected()
        connected["snapshots_wait_s"] = self.target.wait_snapshots(connected["connected"])
        self.producer = loadgen.Producer(model_url)
        producer = self.producer.wait_connected()
        groups = self.target.cpu_groups()
        pool, producer_handle = self.pool, self.producer
        groups["clients"] = lambda: pool.pids
        groups["producer"] = lambda: [pid] if (pid := producer_handle.pid) else []
        self.meter = CpuMeter(groups)
        return {"clients": connected, "producer": producer}

    def idle_cpu(self, seconds: float = 1.0) -> dict[str, float]:
        """CPU use with everything connected and nothing sent (timers, heartbeats, polling)."""
        meter = self.parts()[2]
        meter.start()
        time.sleep(seconds)
        return meter.stop()

    def parts(self) -> tuple[loadgen.ClientPool, loadgen.Producer, CpuMeter]:
        if self.pool is None or self.producer is None or self.meter is None:
            raise RuntimeError("the session is not started")
        return self.pool, self.producer, self.meter

    def warm_up(self) -> dict[str, Any]:
        pool, producer, _ = self.parts()
        pool.arm(float("inf"))  # everything counts as stale
        result = producer.run(
            self.config.warmup_rate, self.config.warmup_seconds, time.time() + 0.1
        )
        time.sleep(0.5)
        return result

    def probe(self, frames: int = 5) -> dict[str, Any]:
        """Known frames, one by one on an idle target: every client must get exactly Omega's
        update of each, timestamp unchanged, once. Also the unloaded end-to-end latency."""
        pool, producer, _ = self.parts()
        pool.arm(time.time())
        sent = []
        for i in range(frames):
            frame = loadgen.frame(loadgen.CAMERAS[i % len(loadgen.CAMERAS)], 100 + i, time.time())
            producer.send(frame)
            sent.append(frame)
            time.sleep(0.1)
        expected_count = frames * pool.connected
        deadline = time.monotonic() + 5
        while pool.count() < expected_count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a second copy would come soon after the first
        data = pool.collect()
        received = {(u := orjson.loads(m))["timestamp"]: u for m in data["samples"]}
        problems, expected = [], [loadgen.omega_update(frame) for frame in sent]
        for update in expected:
            got = received.get(update["timestamp"])
            if got is None:
                problems.append(f"no update carries the timestamp {update['timestamp']!r}")
            else:
                problems += loadgen.check_update(got, update)
        ordered = sorted(data["latencies"])
        return {
            "frames": frames,
            "delivered": len(ordered),
            "expected": expected_count,
            "duplicates": data["duplicates"],
            "duplicate_samples": data["duplicate_samples"],
            "latency_p50_ms": round(percentile(ordered, 50) * 1000, 2) if ordered else None,
            "latency_max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
            "sample": data["samples"][0] if data["samples"] else None,
            "problems": sorted(set(problems)),
            "ok": not problems and len(ordered) == expected_count and not data["duplicates"],
            "snapshot": self.snapshot(expected),
        }

    def snapshot(self, probes: list[dict[str, Any]]) -> dict[str, Any]:
        """A new client's first messages: the latest state of every location."""
        from websockets.sync.client import connect

        url = self.target.urls()[1]
        received: dict[str, Any] = {}
        with (
            connect(url, compression=None, proxy=None, open_timeout=10) as ws,
            contextlib.suppress(TimeoutError),
        ):
            while len(received) < len(loadgen.PLACES):
                update = orjson.loads(ws.recv(timeout=3))
                received.setdefault(update.get("location_name"), update)
        latest = {update["location_name"]: update for update in probes}
        return {
            "locations": len(received),
            "expected_locations": len(loadgen.PLACES),
            "probes_are_latest": all(received.get(k) == v for k, v in latest.items()),
        }

    def step(self, kind: str, rate: float, seconds: float) -> Step:
        pool, producer, meter = self.parts()
        step = Step(kind=kind, offered=rate, seconds=seconds)
        before = self.target.scrape()
        start = time.time() + 0.2
        # Timers may fire a little early, so the first frame can carry a timestamp just before
        # `start`; the previous step's frames are older than `settle()`'s quiet period anyway.
        pool.arm(start - 0.1)
        profiler = self.profiler(kind)
        meter.start()
        if profiler is not None:
            profiler.start()
        sent = producer.run(rate, seconds, start)
        step.cpu = meter.stop()
        if profiler is not None:
            step.profiles = {k: str(v) for k, v in profiler.stop().items()}
        step.cpu_top_other = meter.top_other
        step.sent = sent["sent"]
        step.send_rate = sent["achieved_rate"]
        step.producer_max_lag_ms = sent["max_lag_ms"]
        step.expected = step.sent * pool.connected
        step.drain_s = self._drain(step.expected, sent["last_ts"])
        data = pool.collect()
        step.stages = stage_values(before, self.target.scrape())
        latencies = sorted(data["latencies"])
        step.received = len(latencies)
        if latencies:
            step.p50_ms = percentile(latencies, 50) * 1000
            step.p90_ms = percentile(latencies, 90) * 1000
            step.p99_ms = percentile(latencies, 99) * 1000
            step.max_ms = latencies[-1] * 1000
        # Deliveries over the time from the first frame sent to the last delivery received.
        span = max(data["last_rx"], sent["last_ts"] + 1 / rate) - sent["first_ts"]
        step.deliveries_per_s = step.received / span if span > 0 else 0.0
        step.loss = max(0, step.expected - step.received)
        # What was still in flight: wait for it (the next step must start on a quiet target).
        step.settle_s = self.settle()
        eventually = pool.count()
        step.late = max(0, eventually - step.received)
        step.never = max(0, step.expected - eventually)
        step.extra = data["duplicates"] + max(0, step.received - step.expected)
        step.duplicate_samples = data["duplicate_samples"]
        step.clients_short = sum(1 for count in data["counts"] if count < step.sent)
        step.malformed = data["malformed"]
        if not latencies:
            step.failures.append("nothing received")
        elif not step.p99_ms <= P99_LIMIT_MS:
            step.failures.append(f"p99 {step.p99_ms:.1f} ms > {P99_LIMIT_MS:.0f}")
        if step.loss:
            step.failures.append(f"lost {step.loss}")
        if step.send_rate < SEND_SHORTFALL * rate:
            step.failures.append(f"producer sent {step.send_rate:.0f}/s of {rate:.0f}")
        if step.extra or step.malformed:
            step.failures.append(f"{step.extra} duplicates, {step.malformed} malformed")
        if data["errors"] or data["disconnected"]:
            step.failures.append(f"clients dropped: {data['errors'] or data['disconnected']}")
        return step

    def profiler(self, kind: str) -> Profiler | None:
        """With `--profile`, py-spy on each of the target's own processes in the point step."""
        if self.config.profile is None or kind != "point" or not self.target.profiled:
            return None
        pids = {
            label: process.process.pid
            for label, process in self.target.processes.items()
            if process.process is not None
        }
        return Profiler(pids, self.config.profile / self.target.name, rate=self.config.profile_rate)

    def settle(self, quiet: float = 0.3, limit: float = 60.0) -> float:
        """Wait until no message has arrived for `quiet` s and the target has nothing queued;
        returns how long deliveries kept coming."""
        pool = self.parts()[0]
        started = last_change = time.monotonic()
        last = pool.total()
        while True:
            time.sleep(0.05)
            total, now = pool.total(), time.monotonic()
            if total != last:
                last, last_change = total, now
            elif now - started > limit or (now - last_change >= quiet and self.target.idle()):
                break
        return round(max(0.0, last_change - started), 2)

    def _drain(self, expected: int, last_sent: float) -> float:
        """Wait for the deliveries still in flight; returns how long after the last send."""
        pool = self.parts()[0]
        last_count, last_change = -1, time.monotonic()
        while True:
            count = pool.count()
            now = time.monotonic()
            if count >= expected:
                break
            if count != last_count:
                last_count, last_change = count, now
            if now - last_change > self.config.drain_idle:
                break
            if time.time() - last_sent > self.config.drain_max:
                break
            time.sleep(0.05)
        return round(time.time() - last_sent, 2)

    def stop(self) -> None:
        for part in (self.producer, self.pool):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        self.target.stop()


def run_target(target: Target, config: Config, report: dict[str, Any]) -> None:
    """Fills `report` as it goes, so an interrupted run still leaves what it measured."""
    session = Session(target, config)
    started = time.monotonic()
    report["background_cpu"] = background(1.0)
    try:
        report["connect"] = session.start()
        report["idle_cpu"] = session.idle_cpu()
        report["warmup"] = session.warm_up()
        report["warmup"]["settle_s"] = session.settle()
        report["probe"] = session.probe()
        steps: list[Step] = []
        report["steps"] = steps
        steps.append(session.step("point", config.point_rate, config.point_seconds))
        print_progress(target.name, steps[-1])
        ladder_started = time.monotonic()
        for rate in config.ladder if target.ladder else ():
            if time.monotonic() - ladder_started > config.ladder_budget:
                report["ladder_cut"] = f"ladder budget of {config.ladder_budget:.0f} s used up"
                break
            steps.append(session.step("ladder", rate, config.step_seconds))
            print_progress(target.name, steps[-1])
            if not steps[-1].sustained:
                break
        if target.ladder and not any(step.sustained for step in steps):
            # Not even the target point held: look below it, so the ratio has a numerator.
            for rate in (r for r in config.down_ladder if r < config.point_rate):
                steps.append(session.step("down", rate, config.step_seconds))
                print_progress(target.name, steps[-1])
                if steps[-1].sustained:
                    break
        report["producer_errors"] = session.parts()[1].errors()
        report["metrics"] = target.metrics()
    finally:
        session.stop()
        report["seconds"] = round(time.monotonic() - started, 1)


# --------------------------------------------------------------------------------------------
# Reporting


def print_progress(name: str, step: Step) -> None:
    verdict = "ok" if step.sustained else "; ".join(step.failures)
    print(
        f"  {name:5} {step.kind:6} {step.offered:6.0f} msg/s: {step.deliveries_per_s:8.0f} deliv/s"
        f"  p50 {step.p50_ms:7.1f}  p99 {step.p99_ms:7.1f}  loss {step.loss:6d}  {verdict}",
        flush=True,
    )


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: nothing received


def best_sustained(steps: list[Step]) -> Step | None:
    good = [s for s in steps if s.sustained]
    return max(good, key=lambda s: s.deliveries_per_s) if good else None


def point_verdict(step: Step) -> dict[str, Any]:
    checks = {
        f"p50 <= {POINT_P50_MS:.0f} ms": step.p50_ms <= POINT_P50_MS,
        f"p99 <= {POINT_P99_MS:.0f} ms": step.p99_ms <= POINT_P99_MS,
        "no loss": step.loss == 0 and step.received > 0,
    }
    return {"met": all(checks.values()), "checks": checks}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"targets": {}}
    for name, report in results["targets"].items():
        steps: list[Step] = report.get("steps", [])
        best = best_sustained(steps)
        point = next((s for s in steps if s.kind == "point"), None)
        summary["targets"][name] = {
            "best_sustained_deliveries_per_s": round(best.deliveries_per_s) if best else 0,
            "best_sustained_offered_msg_per_s": best.offered if best else None,
            "point": point_verdict(point) if point else None,
            "producer_rejected": sum(report.get("producer_errors", {}).get("codes", {}).values()),
        }
    targets = summary["targets"]
    measured = [n for n, r in results["targets"].items() if r.get("steps")]
    if "relay" in measured and "suite" in measured:
        relay = targets["relay"]["best_sustained_deliveries_per_s"]
        suite = targets["suite"]["best_sustained_deliveries_per_s"]
        ratio = suite / relay if relay else None
        summary["ratio_suite_over_relay"] = round(ratio, 3) if ratio is not None else None
        summary["ratio_goal"] = RATIO_GOAL
        summary["ratio_met"] = ratio is not None and ratio >= RATIO_GOAL
    if "before" in measured and "suite" in measured:
        summary["suite_vs_before"] = compare_versions(
            results["targets"]["suite"]["steps"], results["targets"]["before"]["steps"]
        )
    return summary


def compare_versions(suite: list[Step], before: list[Step]) -> dict[str, Any]:
    """The suite against its earlier version: server CPU per delivered message at each rate
    both sustained (under overload a service batches more, so its CPU per message is not the
    same quantity), and the best sustained rates."""
    sustained = {step.offered: step for step in before if step.sustained}
    rates = []
    for step in suite:
        old = sustained.get(step.offered)
        now_cost, old_cost = server_cpu(step), server_cpu(old) if old else None
        if step.sustained and now_cost and old_cost:
            rates.append(
                {
                    "offered": step.offered,
                    "suite_us_per_delivery": round(now_cost[1], 1),
                    "before_us_per_delivery": round(old_cost[1], 1),
                    "ratio": round(now_cost[1] / old_cost[1], 2),
                }
            )
    best_now, best_old = best_sustained(suite), best_sustained(before)
    return {
        "same_rates": rates,
        "best_sustained_ratio": (
            round(best_now.deliveries_per_s / best_old.deliveries_per_s, 2)
            if best_now and best_old
            else None
        ),
    }


def render(results: dict[str, Any]) -> str:
    machine, config = results["machine"], results["config"]
    out = [
        "",
        f"Occupancy fan-out: {config['clients']} clients in {config['workers']} processes, "
        f"1 producer; {machine['cpus']} CPUs, Python {machine['python']}, "
        f"load average at start {machine['loadavg_start']}",
        f"Latency = client receive time - frame timestamp. Sustained: p99 <= {P99_LIMIT_MS:.0f} ms,"
        f" no loss, producer >= {SEND_SHORTFALL:.0%} of the offered rate.",
    ]
    if before := results.get("before"):
        out.append(f"before: {before['commit'] or 'no commit found'} (run by {before['python']})")
    rows, cpu_rows, cpu_names = [], [], []
    for name, report in results["targets"].items():
        if report.get("idle_cpu"):
            cpu_rows.append((name, Step(kind="idle", offered=0, seconds=1, cpu=report["idle_cpu"])))
        for step in report.get("steps", []):
            rows.append(
                [
                    name,
                    step.kind,
                    f"{step.offered:.0f}",
                    f"{step.send_rate:.0f}",
                    f"{step.offered * config['clients']:.0f}",
                    f"{step.deliveries_per_s:.0f}",
                    ms(step.p50_ms),
                    ms(step.p90_ms),
                    ms(step.p99_ms),
                    ms(step.max_ms),
                    str(step.loss),
                    str(step.late),
                    str(step.never),
                    "ok" if step.sustained else "; ".join(step.failures),
                ]
            )
            for key in step.cpu:
                if key not in cpu_names:
                    cpu_names.append(key)
            cpu_rows.append((name, step))
    out += [
        "",
        "Steps (latencies in ms)",
        table(
            [
                "target",
                "step",
                "offered/s",
                "sent/s",
                "deliv offered/s",
                "deliv achieved/s",
                "p50",
                "p90",
                "p99",
                "max",
                "loss",
                "late",
                "never",
                "verdict",
            ],
            rows,
        ),
    ]
    if cpu_rows:
        order = ["relay", "gateway", "occupancy", "rabbitmq", "postgres", "clients", "producer"]
        order += [*sorted(set(cpu_names) - {*order, "other", "machine"}), "other", "machine"]
        cpu_names.sort(key=order.index)
        out += [
            "",
            "CPU during the send phase (% of one core; machine = all cores, max "
            f"{machine['cpus'] * 100}; other = machine minus the columns before it)",
            table(
                ["target", "offered/s", *cpu_names],
                [
                    [
                        name,
                        "idle" if step.kind == "idle" else f"{step.offered:.0f}",
                        *(f"{step.cpu.get(k, 0):.0f}" for k in cpu_names),
                    ]
                    for name, step in cpu_rows
                ],
            ),
        ]
    out += cpu_per_frame(cpu_rows)
    stage_rows = [(name, step) for name, step in cpu_rows if step.stages]
    if stage_rows:
        columns = list(dict.fromkeys(c[0] for c in (*STAGES, *COUNTERS, *GAUGES)))
        out += [
            "",
            "Suite stages per step (mean ms per message from the services' /metrics; "
            "counts over the step; in process at its end)",
            table(
                ["target", "offered/s", *columns],
                [
                    [
                        name,
                        f"{step.offered:.0f}",
                        *("-" if (v := step.stages.get(c)) is None else f"{v:g}" for c in columns),
                    ]
                    for name, step in stage_rows
                ],
            ),
        ]
    checks = []
    for name, report in results["targets"].items():
        if "skipped" in report:
            checks.append(f"  {name}: skipped ({report['skipped']})")
            continue
        if "error" in report:
            checks.append(f"  {name}: FAILED: {report['error']}")
        if "background_cpu" in report:
            checks.append(
                f"  {name}: machine busy {report['background_cpu']:.0f}% (of one core) "
                "before it started, from other work"
            )
        probe = report.get("probe")
        if probe:
            snap = probe["snapshot"]
            content = "exact" if not probe["problems"] else probe["problems"]
            checks.append(
                f"  {name}: {probe['frames']} probe frames on the idle target: "
                f"{probe['delivered']}/{probe['expected']} deliveries, {probe['duplicates']} "
                f"duplicates, content {content}, latency p50 {probe['latency_p50_ms']} ms, "
                f"max {probe['latency_max_ms']} ms"
            )
            checks.append(
                f"  {name}: a new client's snapshot: {snap['locations']}/"
                f"{snap['expected_locations']} locations, the probes are the latest state: "
                f"{snap['probes_are_latest']}"
            )
        busiest: dict[str, float] = {}
        for step in report.get("steps", []):
            for who, used in step.cpu_top_other.items():
                busiest[who] = max(busiest.get(who, 0.0), used)
        loud = sorted(((u, w) for w, u in busiest.items() if u >= 10), reverse=True)[:3]
        if loud:
            checks.append(
                f"  {name}: NOT ours, busy during its steps: "
                + "; ".join(f"{w[:70]} (up to {u:.0f}%)" for u, w in loud)
            )
        errors = report.get("producer_errors")
        if errors is not None:
            codes = errors.get("codes", {})
            checks.append(
                f"  {name}: producer got {sum(codes.values())} error frames {codes or ''}".rstrip()
            )
    if checks:
        out += ["", "Checks", *checks]
    summary = results["summary"]
    lines = []
    for name, target in summary["targets"].items():
        point = target["point"]
        point_text = (
            "no point measured"
            if point is None
            else (
                "met"
                if point["met"]
                else "NOT met: " + ", ".join(k for k, v in point["checks"].items() if not v)
            )
        )
        offered = target["best_sustained_offered_msg_per_s"]
        best = target["best_sustained_deliveries_per_s"]
        lines.append(
            f"  {name:5}  best sustained {best:>7} deliveries/s ({offered:.0f} msg/s)"
            if offered
            else f"  {name:5}  best sustained: none"
        )
        lines.append(
            f"         {config['point_rate']:.0f} msg/s point (p50 <= {POINT_P50_MS:.0f} ms, "
            f"p99 <= {POINT_P99_MS:.0f} ms, no loss): {point_text}"
        )
    if "ratio_suite_over_relay" in summary:
        ratio = summary["ratio_suite_over_relay"]
        lines.append(
            f"  ratio suite/relay: {ratio if ratio is not None else '-'} "
            f"(goal >= {RATIO_GOAL}): {'met' if summary['ratio_met'] else 'NOT met'}"
        )
    if "suite_vs_before" in summary:
        versus = summary["suite_vs_before"]
        for rate in versus["same_rates"]:
            lines.append(
                f"  suite/before at {rate['offered']:.0f} msg/s: server CPU per delivered message "
                f"{rate['suite_us_per_delivery']} / {rate['before_us_per_delivery']} µs = "
                f"{rate['ratio']}"
            )
        if not versus["same_rates"]:
            lines.append("  suite/before: no rate sustained by both to compare CPU at")
        lines.append(f"  suite/before, best sustained: {versus['best_sustained_ratio'] or '-'}")
    out += ["", "Summary", *lines, *profile_lines(results), ""]
    return "\n".join(out)


# The processes that serve the path (the load generator's are not counted).
SERVER_GROUPS = ("relay", "gateway", "occupancy", "rabbitmq", "postgres")


def server_cpu(step: Step) -> tuple[dict[str, float], float] | None:
    """A step's server CPU: ms per frame sent by process, and µs per delivered message in all
    (None for the idle row or a step that delivered nothing)."""
    if step.kind == "idle" or not step.send_rate or not step.deliveries_per_s:
        return None
    # % of one core -> CPU seconds per second; over frames (or deliveries) per second.
    per_frame = {k: step.cpu.get(k, 0.0) / 100 / step.send_rate * 1000 for k in SERVER_GROUPS}
    server = sum(step.cpu.get(k, 0.0) for k in SERVER_GROUPS) / 100
    return per_frame, server / step.deliveries_per_s * 1e6


def cpu_per_frame(cpu_rows: list[tuple[str, Step]]) -> list[str]:
    """The CPU table divided out: ms of CPU per frame sent, per server process, and the
    server's total in µs per delivered message."""
    rows = []
    for name, step in cpu_rows:
        if (cost := server_cpu(step)) is None:
            continue
        per_frame, per_delivery = cost
        rows.append(
            [
                name,
                f"{step.offered:.0f}",
                *(f"{per_frame[k]:.2f}" for k in SERVER_GROUPS),
                f"{sum(per_frame.values()):.2f}",
                f"{per_delivery:.1f}",
            ]
        )
    if not rows:
        return []
    return [
        "",
        "Server CPU per frame (ms per frame sent, per process; clients and producer excluded) "
        "and per delivered message (µs)",
        table(["target", "offered/s", *SERVER_GROUPS, "server ms/frame", "server µs/deliv"], rows),
    ]


def profile_lines(results: dict[str, Any], top: int = 25) -> list[str]:
    """The costliest frames of each profiled service (`--profile`), in % of its samples."""
    out = []
    for name, report in results["targets"].items():
        for step in report.get("steps", []):
            for label, path in step.profiles.items():
                ranked = profile_summary(Path(path), top=top)
                if not ranked:
                    continue
                out += [
                    "",
                    f"Profile of {name} {label} at {step.offered:.0f} msg/s (py-spy, CPU samples; "
                    f"{path})",
                    table(
                        ["% in or below", "% alone", "frame"],
                        [[f"{a:.1f}", f"{b:.1f}", frame[:110]] for frame, a, b in ranked],
                    ),
                ]
    return out


def to_json(results: dict[str, Any]) -> bytes:
    def default(value: Any) -> Any:
        if isinstance(value, Step):
            data = asdict(value)
            data["sustained"] = value.sustained
            return data
        if isinstance(value, Path):
            return str(value)
        raise TypeError

    # orjson writes NaN (nothing received) as null.
    options = orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_DATACLASS
    return orjson.dumps(results, default=default, option=options)


# --------------------------------------------------------------------------------------------
# Main


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if Path("/proc/loadavg").exists()
        else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    for package in ("websockets", "uvloop", "orjson", "uvicorn", "faststream", "aio-pika"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            facts.setdefault("packages", {})[package] = importlib.metadata.version(package)
    facts["git_commit"] = head_commit(Path(__file__).resolve().parent.parent, "%h")
    return facts


def head_commit(checkout: Path, form: str) -> str | None:
    """`git log -1 --format=<form>` in `checkout`; None where it is not a git checkout."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return (
            subprocess.run(
                ["git", "-C", str(checkout), "log", "-1", f"--format={form}"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()[:100]
            or None
        )
    return None


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: through the cleanup in every `finally`."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C (or
    # `kill -INT`) must still stop the run through the same cleanup.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Occupancy fan-out: suite vs in-process relay")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: short steps, 2 of the ladder"
    )
    parser.add_argument(
        "--target",
        choices=(*TARGETS, "both", "all"),
        default="all",
        help="both: relay and suite; all: those and suite-1p (the suite's point with every "
        "client in one process)",
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="client worker processes")
    parser.add_argument(
        "--ladder", help="comma-separated msg/s rates instead of the default ladder"
    )
    parser.add_argument(
        "--point", type=float, default=200.0, help="msg/s of the target point (default 200)"
    )
    parser.add_argument(
        "--before",
        metavar="PYTHON",
        help="also run the suite's services with this interpreter: an earlier checkout's "
        ".venv/bin/python, measured beside this one at the same rates (target 'before')",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "occupancy_fanout.json")
    parser.add_argument(
        "--profile-rate", type=int, default=200, help="py-spy samples per second (--profile)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy records the suite's services in the point step (bench/results/profiles/)",
    )
    args = parser.parse_args(argv)
    config = Config.make(
        quick=args.quick, clients=args.clients, workers=args.workers, ladder=args.ladder
    )
    config.point_rate = args.point
    if args.profile:
        config.profile = RESULTS / "profiles"
        config.profile_rate = args.profile_rate

    names = {"both": ["relay", "suite"], "all": list(TARGETS)}.get(args.target, [args.target])
    if args.before:
        names.append(BeforeTarget.name)
    results: dict[str, Any] = {
        "benchmark": "occupancy_fanout",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        "config": asdict(config),
        "targets": {},
    }
    if args.before:
        # `python` is a checkout's .venv/bin/python.
        checkout = Path(args.before).absolute().parents[2]
        results["before"] = {"python": args.before, "commit": head_commit(checkout, "%h %s")}
    print(
        f"occupancy fan-out: targets {', '.join(names)}; {config.clients} clients, "
        f"{'quick' if config.quick else 'full'} run",
        flush=True,
    )
    logs = RESULTS / "logs"
    interrupted = False
    with interrupts_as_keyboard_interrupt():
        try:
            for name in names:
                report: dict[str, Any] = {}
                results["targets"][name] = report
                if name != "relay" and not occupancy_available():
                    report["skipped"] = "edgeway.occupancy has no __main__ yet"
                    print(f"  suite: skipped ({report['skipped']})", flush=True)
                    continue
                target = (
                    BeforeTarget(logs, python=args.before)
                    if name == BeforeTarget.name
                    else TARGETS[name](logs)
                )
                try:
                    run_target(target, config, report)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - report it and go on with the next target
                    report["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  {name}: FAILED: {report['error']}", flush=True)
        except KeyboardInterrupt:
            interrupted = True
            results["interrupted"] = True
            print("\ninterrupted: processes stopped, virtual host and database dropped", flush=True)
    results["machine"]["loadavg_end"] = (
        " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if Path("/proc/loadavg").exists()
        else None
    )
    results["summary"] = summarize(results)
    print(render(results), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(to_json(results))
    print(f"results: {args.output}", flush=True)
    failed = any("error" in report for report in results["targets"].values())
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
