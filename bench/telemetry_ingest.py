"""Telemetry ingest: the vehicle upload path end to end, each part beside its machine limit.

    .venv/bin/python -m bench.telemetry_ingest [--quick] [--profile DIR]

One run, four parts (bench/README.md says how each is measured and how to read it):

1. Single-record POSTs: 32 keep-alive HTTP clients (httpx, 2 processes), one vehicle each, post
   `CompressedVehicleData` for a fixed time to the gateway with the telemetry service behind it;
   requests/s accepted, records/s committed in PostgreSQL, request latency. Beside it, the same
   clients against a bare FastAPI app that only reads the body (`bench.bare_ingest`).
2. Batched records: `CompressedBatch` uploads of 1000 records from several vehicles until every
   record is committed; records/s end to end. Beside it, a raw psycopg COPY of as many rows into
   the service's `telemetry` table in a scratch database.
3. Ingest to dashboard: a dashboard on `WS /ws` while loggers send 1000 records/s on an absolute
   schedule; latency = receive time - the record's timestamp, and loss.
4. Compression: bytes per record on the wire and reconstruction error, highway and city traces.

Services run as real processes (`ServiceProcess`) on a private RabbitMQ virtual host and a fresh
PostgreSQL database; everything is stopped and dropped at the end, also on Ctrl-C or SIGTERM.
Prints tables, the CPU each server process spends per record (gateway, telemetry, RabbitMQ,
PostgreSQL), and with `--profile` where the gateway's and the telemetry service's CPU goes
(py-spy, parts 2 and 3); writes bench/results/telemetry_ingest.json. It never asserts timings.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

from bench.cpu import CpuMeter, Profiler, background, pids_named, profile_summary
from bench.occupancy_fanout import (
    Sample,
    interrupts_as_keyboard_interrupt,
    machine_facts,
    metric_sum,
    parse_prometheus,
    percentile,
    table,
)
from bench.telemetry_loadgen import PERIOD_MS, Dashboard, Fleet, merge, trace, vin
from edgeway.common.settings import async_database_url
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import (
    FIELDS,
    Decoder,
    Encoder,
    PredictorConfig,
    angular_difference,
)
from edgeway.common.testing import (
    ServiceProcess,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    free_port,
)
from edgeway.gateway.tokens import mint
from edgeway.telemetry.bulk import COPY_RECORDS, COPY_TYPES
from edgeway.telemetry.tables import MIGRATIONS, RecordRow

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "telemetry-ingest-bench-secret-long-enough-for-hs256"  # noqa: S105 (a bench's own key)
RATIO_GOAL = 0.5  # gateway + telemetry / bare FastAPI, requests per second accepted
# Records per second committed end to end / a raw COPY at `batch_size` rows per transaction, in
# the same run (issue 22; the earlier absolute goal, 50,000 records/s, was met).
BATCH_RATIO_GOAL = 0.5
P99_GOAL_MS = 100.0  # ingest to dashboard

STORED = "edgeway_telemetry_records_total"
# Uploads in the service's hands: consumed on its own AMQP link (`edgeway.common.amqp`), or by
# FastStream in versions before it.
IN_PROCESS = (
    ("edgeway_amqp_in_process", {"queue": "edgeway.telemetry.raw*"}),
    ("edgeway_received_messages_in_process", {"handler": "edgeway.telemetry.raw*"}),
)
# What the wire's rounding may add to a skipped field's error against the true value: heading
# travels in whole degrees, the rest as float32 (a relative 6e-8; 1e-4 covers every range).
WIRE_ROUNDING = {"speed": 1e-4, "battery": 1e-4, "power": 1e-4, "heading": 0.5}
# Vehicle numbers (the last six characters of their VINs) per part, so parts never share one.
SINGLE_BASE, BATCH_BASE, PACED_BASE = 1, 1001, 2001


@dataclass
class Config:
    clients: int = 32  # part 1: one vehicle per client
    workers: int = 2  # load-generator processes
    warmup_seconds: float = 1.5
    single_seconds: float = 10.0
    batch_records: int = 200_000
    batch_size: int = 1000
    batch_vehicles: int = 8
    # Part 3's rates: the target, then a light load (its latency when the suite keeps up).
    paced_rates: tuple[float, ...] = (1000.0, 250.0)
    paced_seconds: float = 10.0
    paced_vehicles: int = 50
    trace_minutes: float = 20.0
    # Stop waiting for commits after this long without one (the service commits a group of up
    # to 128 uploads, then broadcasts every record of it before it takes the next) ...
    commit_idle: float = 60.0
    commit_limit: float = 240.0  # ... or this long after the last upload was accepted
    quick: bool = False
    # py-spy records the gateway and the telemetry service in parts 2 and 3 (collapsed stacks).
    profile: Path | None = None

    @classmethod
    def make(cls, *, quick: bool) -> Config:
        config = cls(quick=quick)
        if quick:
            config.warmup_seconds = 0.5
            config.single_seconds = 3.0
            config.batch_records = 20_000
            config.batch_vehicles = 4
            config.paced_seconds = 3.0
            config.paced_rates = (1000.0,)
            config.trace_minutes = 3.0
            config.commit_limit = 60.0
        return config


def token(*scopes: str, vins: list[str] | None = None) -> str:
    """A token; a fleet's names its vehicles (the `vin` claim), as the gateway requires."""
    return mint(
        subject="bench-telemetry",
        scopes=list(scopes),
        ttl=3600,
        key=SECRET,
        algorithm="HS256",
        audience="edgeway",
        issuer="edgeway",
        identities={"vin": vins} if vins else None,
    )


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def latency_stats(ordered: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in ms of ascending seconds."""
    if not ordered:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(percentile(ordered, 50) * 1000, 2),
        "p90_ms": round(percentile(ordered, 90) * 1000, 2),
        "p99_ms": round(percentile(ordered, 99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def wait_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------------------------
# The services and what the database holds


class Suite:
    """The telemetry service and the gateway on a private virtual host and a fresh database."""

    def __init__(self, logs: Path, vehicles: list[str]) -> None:
        self.logs = logs
        self.vehicles = vehicles
        self.vhost: str | None = None
        self.database: str | None = None
        self.processes: dict[str, ServiceProcess] = {}

    def start(self) -> None:
        self.vhost, amqp_url = create_vhost("edgeway-bench")
        self.database = create_postgres_database("edgeway_bench_telemetry")
        env = {
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_JWT_SECRET": SECRET,
            "EDGEWAY_TELEMETRY_DATABASE_URL": self.database,
            "EDGEWAY_TELEMETRY_VEHICLES": json.dumps(self.vehicles),
            "EDGEWAY_LOG_LEVEL": "WARNING",
        }
        # The telemetry service first: it declares the upload queue and answers the gateway's
        # vehicle list.
        for label, module, wait in (
            ("telemetry", "edgeway.telemetry", 120),
            ("gateway", "edgeway.gateway", 60),
        ):
            log_path = self.logs / f"telemetry_ingest-{label}.log"
            log_path.unlink(missing_ok=True)
            process = ServiceProcess(module, env=env, port=free_port(), log_path=log_path)
            self.processes[label] = process
            process.start(wait=wait)

    @property
    def gateway(self) -> ServiceProcess:
        return self.processes["gateway"]

    def groups(self) -> dict[str, Callable[[], list[int]]]:
        def pid_of(process: ServiceProcess) -> Callable[[], list[int]]:
            return lambda: [process.process.pid] if process.process is not None else []

        groups = {label: pid_of(process) for label, process in self.processes.items()}
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

    def progress(self) -> tuple[float, float]:
        """(records the telemetry service stored and broadcast, uploads in its hands now).

        `edgeway_telemetry_records_total{outcome="stored"}` moves once a group is committed and
        its records broadcast (just before the uploads are acked)."""
        scraped = {"telemetry": self.scrape().get("telemetry", [])}
        stored = metric_sum(scraped, "telemetry", STORED, {"outcome": "stored"}) or 0.0
        busy = sum(
            metric_sum(scraped, "telemetry", name, wanted) or 0.0 for name, wanted in IN_PROCESS
        )
        return stored, busy

    def settle(self, limit: float = 120.0) -> float:
        """Wait until the telemetry service holds no upload (twice, 0.2 s apart); seconds."""
        started = time.monotonic()
        quiet = 0
        while quiet < 2 and time.monotonic() - started < limit:
            quiet = quiet + 1 if self.progress()[1] == 0 else 0
            time.sleep(0.2)
        return round(time.monotonic() - started, 2)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Each service's `edgeway_` counters (no histogram buckets)."""
        found: dict[str, dict[str, float]] = {}
        for label, process in self.processes.items():
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(process.url + "/metrics", timeout=5).text
                found[label] = {
                    name
                    + (
                        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                        if labels
                        else ""
                    ): value
                    for name, labels, value in parse_prometheus(text)
                    if name.startswith("edgeway_")
                    and not name.endswith(("_bucket", "_created", "_sum", "_count"))
                }
        return found

    def profiler(self, config: Config, step: str) -> Profiler | None:
        """With `--profile`, py-spy on the gateway and the telemetry service for one step."""
        if config.profile is None:
            return None
        pids = {
            label: process.process.pid
            for label, process in self.processes.items()
            if process.process is not None
        }
        return Profiler(pids, config.profile / step)

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            with contextlib.suppress(Exception):
                process.stop()
        if self.database is not None:
            with contextlib.suppress(Exception):
                drop_postgres_database(self.database)
            self.database = None
        if self.vhost is not None:
            with contextlib.suppress(Exception):
                drop_vhost(self.vhost)
            self.vhost = None


class Commits:
    """What the telemetry database has committed, polled from the coordinator.

    `total()` is the sum of the daily compression statistics, which the service updates in the
    same transaction as the records (cheap to poll); `rows()` counts the records themselves."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.connection = psycopg.connect(url, autocommit=True)
        self.interval = interval
        self.base = 0
        self.value = 0
        self.landed = 0.0  # time.time() of the poll that first saw `value`
        self._polled = 0.0

    def total(self) -> int:
        row = self.connection.execute(
            "SELECT coalesce(sum(total_packets), 0) FROM compression_stats"
        ).fetchone()
        return int(row[0]) if row else 0

    def rows(self, vins: list[str]) -> int:
        row = self.connection.execute(
            "SELECT count(*) FROM telemetry t JOIN vehicles v ON v.id = t.vehicle_id"
            " WHERE v.vin = ANY(%s)",
            (vins,),
        ).fetchone()
        return int(row[0]) if row else 0

    def offline_sessions(self, vins: list[str]) -> int:
        row = self.connection.execute(
            "SELECT count(*) FROM offline_sessions s JOIN vehicles v ON v.id = s.vehicle_id"
            " WHERE v.vin = ANY(%s)",
            (vins,),
        ).fetchone()
        return int(row[0]) if row else 0

    def arm(self) -> None:
        """Count from here on."""
        self.base = self.total()
        self.value = 0
        self.landed = time.time()

    def poll(self) -> None:
        now = time.monotonic()
        if now - self._polled < self.interval:
            return
        self._polled = now
        value = self.total() - self.base
        if value != self.value:
            self.value, self.landed = value, time.time()

    def drain(self, expected: int, *, idle: float, limit: float) -> float:
        """Poll until `expected` records are committed, nothing was committed for `idle` s, or
        `limit` s passed; returns how long it waited."""
        started = time.monotonic()
        while self.value < expected:
            self.poll()
            now = time.monotonic()
            if now - started > limit or time.time() - self.landed > idle:
                break
            time.sleep(0.01)
        return round(time.monotonic() - started, 2)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def meter(groups: dict[str, Callable[[], list[int]]]) -> CpuMeter:
    pid = os.getpid()
    return CpuMeter({**groups, "bench": lambda: [pid]})


# --------------------------------------------------------------------------------------------
# Part 1: single-record POSTs


def single_part(
    label: str,
    base_url: str,
    config: Config,
    groups: dict[str, Callable[[], list[int]]],
    commits: Commits | None,
) -> dict[str, Any]:
    vins = [vin(SINGLE_BASE + i) for i in range(config.clients)]
    fleet = Fleet(base_url, token("telemetry:publish", vins=vins), vins, workers=config.workers)
    try:
        warm = merge(fleet.run(("single", time.time() + 0.1, config.warmup_seconds)))
        if commits is not None:
            commits.arm()
            commits.drain(warm["records_accepted"], idle=5.0, limit=30.0)
            rows_before = commits.rows(vins)
            commits.arm()
        cpu = meter({**groups, "loadgen": lambda: fleet.pids})
        start = time.time() + 0.3
        for child in fleet.children:
            child.conn.send(("single", start, config.single_seconds))
        wait_until(start)
        cpu.start()
        replies = fleet.run(while_waiting=commits.poll if commits else None, send=False)
        usage = cpu.stop()
    finally:
        fleet.stop()
    result = merge(replies)
    span = result["last_done"] - start
    accepted = result["statuses"].get("202", 0)
    report: dict[str, Any] = {
        "target": label,
        "clients": config.clients,
        "workers": config.workers,
        "seconds": config.single_seconds,
        "requests": result["sent"],
        "statuses": result["statuses"],
        "accepted": accepted,
        "accepted_per_s": round(rate(accepted, span), 1),
        "requests_per_s": round(rate(result["sent"], span), 1),
        "mean_body_bytes": round(rate(result["bytes_sent"], result["sent"]), 1),
        "warmup_requests": warm["sent"],
        **latency_stats(result["latencies"]),
        "cpu": usage,
        "cpu_top_other": cpu.top_other,
    }
    if commits is not None:
        report["drain_s"] = commits.drain(
            accepted, idle=config.commit_idle, limit=config.commit_limit
        )
        committed = commits.value
        report["committed"] = committed
        report["rows_counted"] = commits.rows(vins) - rows_before
        report["last_commit_after_s"] = round(commits.landed - start, 2)
        report["committed_per_s"] = round(rate(committed, commits.landed - start), 1)
    return report


# --------------------------------------------------------------------------------------------
# Part 2: batches end to end, and the database's own COPY limit


def record_rows(config: Config, start_ms: int) -> list[RecordRow]:
    """As many rows as part 2 uploads, shaped as the service writes them."""
    per_vehicle = config.batch_records // config.batch_vehicles
    received = datetime.now(UTC)
    rows = []
    for index in range(config.batch_vehicles):
        samples = trace(index, start_ms=start_ms)
        for sequence in range(1, per_vehicle + 1):
            s = next(samples)
            rows.append(
                RecordRow(
                    vehicle_id=index + 1,
                    timestamp_ms=s.timestamp_ms,
                    speed=s.speed,
                    battery=s.battery,
                    power=s.power,
                    odometer=s.odometer,
                    heading=s.heading,
                    reconstructed=sequence % 16,
                    uncertain=False,
                    sequence=sequence,
                    predictor_version=1 if sequence % 100 == 1 else None,
                    compressed=True,
                    received_at=received,
                )
            )
    return rows


def copy_baseline(
    config: Config, groups: dict[str, Callable[[], list[int]]]
) -> list[dict[str, Any]]:
    """A raw COPY of part 2's rows into the service's own `telemetry` table (its migrations, in a
    scratch database): all in one transaction, then 1000 rows per transaction."""
    url = create_postgres_database("edgeway_bench_copy")
    reports = []
    try:
        MIGRATIONS.upgrade(async_database_url(url, service="bench", data_dir=RESULTS))
        rows = record_rows(config, start_ms=1_717_228_800_000)
        with psycopg.connect(url) as connection:
            connection.execute(
                "INSERT INTO vehicles (vin) SELECT 'BENCH' || lpad(g::text, 12, '0')"
                " FROM generate_series(1, %s) g",
                (config.batch_vehicles,),
            )
            connection.commit()
            for label, chunk in (
                ("COPY, one transaction", len(rows)),
                (f"COPY, {config.batch_size} rows per transaction", config.batch_size),
            ):
                connection.execute("TRUNCATE telemetry")
                connection.commit()
                cpu = meter(groups)
                cpu.start()
                started = time.perf_counter()
                for first in range(0, len(rows), chunk):
                    with connection.cursor() as cursor, cursor.copy(COPY_RECORDS) as copy:
                        copy.set_types(COPY_TYPES)
                        for row in rows[first : first + chunk]:
                            copy.write_row(row)
                    connection.commit()
                seconds = time.perf_counter() - started
                usage = cpu.stop()
                counted = connection.execute("SELECT count(*) FROM telemetry").fetchone()
                reports.append(
                    {
                        "target": label,
                        "records": len(rows),
                        "rows_counted": int(counted[0]) if counted else 0,
                        "seconds": round(seconds, 3),
                        "committed_per_s": round(rate(len(rows), seconds), 1),
                        "cpu": usage,
                        "cpu_top_other": cpu.top_other,
                    }
                )
    finally:
        with contextlib.suppress(Exception):
            drop_postgres_database(url)
    return reports


def batch_part(
    suite: Suite, config: Config, groups: dict[str, Callable[[], list[int]]], commits: Commits
) -> dict[str, Any]:
    vins = [vin(BATCH_BASE + i) for i in range(config.batch_vehicles)]
    per_vehicle = config.batch_records // config.batch_vehicles
    total = per_vehicle * config.batch_vehicles
    # A logger's outbox replayed: readings at the trace's period that ended a minute ago.
    start_ms = int(time.time() * 1000) - per_vehicle * PERIOD_MS - 60_000
    fleet = Fleet(
        suite.gateway.url, token("telemetry:publish", vins=vins), vins, workers=config.workers
    )
    try:
        prepared = fleet.run(("prepare_batch", per_vehicle, config.batch_size, start_ms))
        body_bytes = sum(p["bytes"] for p in prepared)
        stored_before = suite.progress()[0]
        commits.arm()
        cpu = meter({**groups, "loadgen": lambda: fleet.pids})
        profiler = suite.profiler(config, "batch")
        start = time.time() + 0.3
        for child in fleet.children:
            child.conn.send(("batch", start))
        wait_until(start)
        cpu.start()
        if profiler is not None:
            profiler.start()
        replies = fleet.run(while_waiting=commits.poll, send=False)
        result = merge(replies)
        drain = commits.drain(total, idle=config.commit_idle, limit=config.commit_limit)
        # Then until the service has broadcast every record and acked every upload (its
        # /metrics every 0.5 s: a scrape costs it about 5 ms).
        acked = time.time()
        deadline = time.monotonic() + config.commit_limit
        while time.monotonic() < deadline:
            acked = time.time()
            if suite.progress()[0] - stored_before >= commits.value:
                break
            time.sleep(0.5)
        usage = cpu.stop()
        profiles = {k: str(v) for k, v in profiler.stop().items()} if profiler else {}
    finally:
        fleet.stop()
    committed = commits.value
    upload_span = result["last_done"] - start
    return {
        "target": "gateway + telemetry",
        "vehicles": config.batch_vehicles,
        "batch_size": config.batch_size,
        "records": total,
        "uploads": result["sent"],
        "statuses": result["statuses"],
        "records_accepted": result["records_accepted"],
        "body_bytes_per_record": round(rate(body_bytes, total), 2),
        "upload_seconds": round(upload_span, 2),
        "accepted_per_s": round(rate(result["records_accepted"], upload_span), 1),
        **{f"upload_{k}": v for k, v in latency_stats(result["latencies"]).items()},
        "drain_s": drain,
        "committed": committed,
        "rows_counted": commits.rows(vins),
        "offline_sessions": commits.offline_sessions(vins),
        "seconds": round(commits.landed - start, 2),
        "committed_per_s": round(rate(committed, commits.landed - start), 1),
        # Every record stored and broadcast, every upload acked (metrics polled every 0.5 s).
        "acked_s": round(acked - start, 2),
        "acked_per_s": round(rate(committed, acked - start), 1),
        "cpu": usage,
        "cpu_top_other": cpu.top_other,
        "profiles": profiles,
    }


# --------------------------------------------------------------------------------------------
# Part 3: ingest to dashboard


def paced_part(
    suite: Suite,
    config: Config,
    groups: dict[str, Callable[[], list[int]]],
    steps: list[dict[str, Any]],
) -> None:
    """Every rate of `config.paced_rates`, one after the other, with one dashboard; appends to
    `steps` as it goes."""
    vins = [vin(PACED_BASE + i) for i in range(config.paced_vehicles)]
    ws_url = (
        suite.gateway.url.replace("http", "ws", 1) + f"/ws?token={token('telemetry:subscribe')}"
    )
    dashboard = Dashboard(ws_url)
    fleet: Fleet | None = None
    try:
        fleet = Fleet(
            suite.gateway.url, token("telemetry:publish", vins=vins), vins, workers=config.workers
        )
        groups = {**groups, "loadgen": fleet_pids(fleet), "dashboard": dashboard_pids(dashboard)}
        # Warm-up (not measured): connections open, the gateway's vehicle list, code paths.
        paced_step(fleet, dashboard, config.paced_rates[0], config.warmup_seconds, groups)
        time.sleep(0.5)
        for number, offered in enumerate(config.paced_rates):
            profiler = suite.profiler(config, f"paced-{offered:.0f}") if number == 0 else None
            steps.append(
                paced_step(fleet, dashboard, offered, config.paced_seconds, groups, profiler)
            )
            progress("paced", steps[-1])
            time.sleep(0.5)
    finally:
        if fleet is not None:
            fleet.stop()
        dashboard.stop()


def paced_step(
    fleet: Fleet,
    dashboard: Dashboard,
    offered: float,
    seconds: float,
    groups: dict[str, Callable[[], list[int]]],
    profiler: Profiler | None = None,
) -> dict[str, Any]:
    start = time.time() + 0.3
    # Records stamped before the start (an earlier step's stragglers) are not counted. Timers
    # may fire a little early, so the first record can carry a time just before `start` (it
    # was counted as lost, though the dashboard had it); the earlier step's records are older
    # than its drain anyway.
    dashboard.arm([v[-6:] for v in fleet.vins], int((start - 0.1) * 1000))
    cpu = meter(groups)
    size = len(fleet.vins)
    for child, offset in zip(fleet.children, fleet.offsets, strict=True):
        child.conn.send(("paced", start, offered, seconds, offset, size))
    wait_until(start)
    cpu.start()
    if profiler is not None:
        profiler.start()
    result = merge(fleet.run(send=False))
    usage = cpu.stop()
    profiles = {k: str(v) for k, v in profiler.stop().items()} if profiler else {}
    accepted = {tuple(key) for key in result["accepted"]}
    last_send = result["last_done"]
    # Deliveries still in flight: until all arrived, 1 s without one, or 5 s after the end.
    while True:
        count, last_rx, closed = dashboard.count()
        now = time.time()
        if count >= len(accepted) or closed:
            break
        if now - max(last_rx, last_send) > 1.0 or now - last_send > 5.0:
            break
        time.sleep(0.05)
    data = dashboard.collect()
    first: dict[tuple[str, int], float] = {}
    duplicates = 0
    for short, stamp, received in zip(data["vins"], data["stamps"], data["received"], strict=True):
        key = (short, stamp)
        if key in first:
            duplicates += 1
        else:
            first[key] = received - stamp / 1000
    latencies = sorted(first.values())
    received_keys = set(first)
    report = {
        "offered_per_s": offered,
        "seconds": seconds,
        "vehicles": size,
        "sent": result["sent"],
        "sent_per_s": round(rate(result["sent"], last_send - start), 1),
        "statuses": result["statuses"],
        "accepted": len(accepted),
        "received": len(received_keys & accepted),
        "lost": len(accepted - received_keys),
        "unexpected": len(received_keys - accepted),
        "duplicates": duplicates,
        "malformed": data["malformed"],
        "dashboard_closed": data["closed"],
        "other_messages": data["other"],
        "max_send_lag_ms": round(result["max_lag"] * 1000, 1),
        **latency_stats(latencies),
        **{f"request_{k}": v for k, v in latency_stats(result["latencies"]).items()},
        "cpu": usage,
        "cpu_top_other": cpu.top_other,
        "profiles": profiles,
    }
    report["p99_met"] = report["p99_ms"] is not None and report["p99_ms"] <= P99_GOAL_MS
    return report


def fleet_pids(fleet: Fleet) -> Callable[[], list[int]]:
    return lambda: fleet.pids


def dashboard_pids(dashboard: Dashboard) -> Callable[[], list[int]]:
    return lambda: [pid] if (pid := dashboard.pid) is not None else []


# --------------------------------------------------------------------------------------------
# Part 4: compression


def compression_part(config: Config) -> list[dict[str, Any]]:
    records = int(config.trace_minutes * 60_000 / PERIOD_MS)
    predictor = PredictorConfig()
    reports = []
    for index, name in ((0, "highway"), (1, "city")):
        samples = list(itertools.islice(trace(index, start_ms=1_717_228_800_000), records))
        encoder, decoder = Encoder(predictor), Decoder(predictor)
        packets = [encoder.encode(s) for s in samples]
        # Largest |decoded - true| over all records, over the records where the field was sent
        # (the wire's rounding alone) and where it was skipped (the prediction stood in for it).
        errors = dict.fromkeys((*FIELDS, "odometer"), 0.0)
        sent_errors = dict.fromkeys((*FIELDS, "odometer"), 0.0)
        skipped_errors = dict.fromkeys(FIELDS, 0.0)
        over_band = dict.fromkeys(FIELDS, 0)
        skipped = dict.fromkeys(FIELDS, 0)
        for sample, packet in zip(samples, packets, strict=True):
            decoded = decoder.decode(packet).sample
            for field in FIELDS:
                truth, rebuilt = getattr(sample, field), getattr(decoded, field)
                error = (
                    abs(angular_difference(truth, rebuilt))
                    if field == "heading"
                    else abs(rebuilt - truth)
                )
                errors[field] = max(errors[field], error)
                if getattr(packet, field) is None:
                    skipped[field] += 1
                    skipped_errors[field] = max(skipped_errors[field], error)
                    over_band[field] += error > predictor.band(field) + WIRE_ROUNDING[field]
                else:
                    sent_errors[field] = max(sent_errors[field], error)
            error = abs(decoded.odometer - sample.odometer)
            errors["odometer"] = max(errors["odometer"], error)
            sent_errors["odometer"] = errors["odometer"]
        packet_bytes = sum(len(wire.encode_packet(p)) for p in packets)
        batch_bytes = sum(
            len(wire.encode_batch(packets[i : i + config.batch_size]))
            for i in range(0, len(packets), config.batch_size)
        )
        plain_bytes = sum(len(wire.encode_sample(s)) for s in samples)
        json_bytes = sum(
            len(
                orjson.dumps(
                    {
                        "timestamp": s.timestamp_ms,
                        "speed": s.speed,
                        "battery": s.battery,
                        "power": s.power,
                        "odometer": s.odometer,
                        "heading": s.heading,
                    }
                )
            )
            for s in samples
        )
        reports.append(
            {
                "trace": name,
                "records": records,
                "minutes": config.trace_minutes,
                "resyncs": sum(p.is_resync for p in packets),
                "compressed_bytes_per_record": round(packet_bytes / records, 2),
                "batch_bytes_per_record": round(batch_bytes / records, 2),
                "vehicledata_bytes_per_record": round(plain_bytes / records, 2),
                "json_bytes_per_record": round(json_bytes / records, 2),
                "fields_skipped_share": round(sum(skipped.values()) / (len(FIELDS) * records), 4),
                "skipped_share": {f: round(skipped[f] / records, 4) for f in FIELDS},
                "max_error": {f: round(e, 6) for f, e in errors.items()},
                "max_error_sent": {f: round(e, 6) for f, e in sent_errors.items()},
                "max_error_skipped": {f: round(e, 6) for f, e in skipped_errors.items()},
                "band": {f: predictor.band(f) for f in FIELDS},
                "over_band": over_band,
            }
        )
    return reports


# --------------------------------------------------------------------------------------------
# Reporting


def fmt(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


SERVICE_GROUPS = ("bare", "gateway", "telemetry", "rabbitmq", "postgres", "bench")


def service_ms(usage: dict[str, float], per_s: float | None) -> float | None:
    """CPU ms of the measured side (servers, broker, database; not the load generator, the
    dashboard or other people's work) per unit of `per_s`."""
    if not per_s:
        return None
    return sum(usage.get(group, 0.0) for group in SERVICE_GROUPS) * 10 / per_s


def statuses_text(statuses: dict[str, int]) -> str:
    others = {k: v for k, v in statuses.items() if k != "202"}
    return ", ".join(f"{k}: {v}" for k, v in sorted(others.items())) or "none"


CPU_ORDER = (
    "bare",
    "gateway",
    "telemetry",
    "rabbitmq",
    "postgres",
    "loadgen",
    "dashboard",
    "bench",
    "other",
    "machine",
)


def render(results: dict[str, Any]) -> str:
    machine, config, parts = results["machine"], results["config"], results["parts"]
    out = [
        "",
        f"Telemetry ingest: {machine['cpus']} CPUs, Python {machine['python']}, load average at "
        f"start {machine['loadavg_start']}, machine busy {results.get('background_cpu', 0):.0f}% "
        "(of one core) before it started",
    ]
    cpu_rows: list[list[str]] = []

    def cpu_row(label: str, usage: dict[str, float]) -> None:
        cpu_rows.append([label, *(fmt(usage.get(k)) if k in usage else "" for k in CPU_ORDER)])

    single = parts.get("single", {})
    if single.get("targets"):
        rows = []
        for r in single["targets"]:
            rows.append(
                [
                    r["target"],
                    fmt(r["requests_per_s"]),
                    fmt(r["accepted_per_s"]),
                    statuses_text(r["statuses"]),
                    fmt(r.get("committed_per_s")),
                    fmt(r.get("committed"))
                    + ("" if "committed" not in r else f" / {r['accepted']}"),
                    fmt(r.get("last_commit_after_s"), ".2f"),
                    fmt(r["p50_ms"], ".1f"),
                    fmt(r["p90_ms"], ".1f"),
                    fmt(r["p99_ms"], ".1f"),
                    fmt(r["max_ms"], ".1f"),
                    fmt(service_ms(r["cpu"], r["accepted_per_s"]), ".3f"),
                ]
            )
            cpu_row(f"1 single: {r['target']}", r["cpu"])
        out += [
            "",
            f"1. Single-record POSTs: {config['clients']} clients (a vehicle each, keep-alive) in "
            f"{config['workers']} processes, {config['single_seconds']:.0f} s; latencies in ms",
            table(
                [
                    "target",
                    "requests/s",
                    "accepted/s",
                    "not 202",
                    "committed/s",
                    "committed/accepted",
                    "last commit s",
                    "p50",
                    "p90",
                    "p99",
                    "max",
                    "CPU ms/req",
                ],
                rows,
            ),
        ]
        if "ratio" in single:
            ratio = single["ratio"]
            out.append(
                f"   ratio gateway+telemetry / bare FastAPI (accepted/s): {fmt(ratio, '.2f')} "
                f"(target >= {RATIO_GOAL}): {'met' if single['ratio_met'] else 'NOT met'}"
            )
    if "error" in single:
        out.append(f"   part 1 FAILED: {single['error']}")

    batch = parts.get("batch", {})
    rows = []
    for r in batch.get("baselines", []):
        rows.append(
            [
                r["target"],
                fmt(r["records"]),
                "-",
                fmt(r["seconds"], ".2f"),
                "-",
                "-",
                fmt(r["committed_per_s"]),
                "-",
                fmt(r["rows_counted"]),
                fmt(service_ms(r["cpu"], r["committed_per_s"] / 1000), ".1f"),
            ]
        )
        cpu_row(f"2 batch: {r['target']}", r["cpu"])
    suite_batch = batch.get("suite")
    if suite_batch:
        rows.insert(
            0,
            [
                "gateway + telemetry",
                fmt(suite_batch["records"]),
                fmt(suite_batch["upload_seconds"], ".2f"),
                fmt(suite_batch["seconds"], ".2f"),
                fmt(suite_batch["acked_s"], ".2f"),
                fmt(suite_batch["accepted_per_s"]),
                fmt(suite_batch["committed_per_s"]),
                fmt(suite_batch["acked_per_s"]),
                fmt(suite_batch["rows_counted"]),
                fmt(service_ms(suite_batch["cpu"], suite_batch["acked_per_s"] / 1000), ".1f"),
            ],
        )
        cpu_row("2 batch: gateway + telemetry", suite_batch["cpu"])
    if rows:
        out += [
            "",
            f"2. Batched records: CompressedBatch of {config['batch_size']}, "
            f"{config['batch_vehicles']} vehicles, {config['batch_records']} records; times in s "
            "from the first upload",
            table(
                [
                    "target",
                    "records",
                    "uploaded",
                    "committed",
                    "broadcast",
                    "accepted rec/s",
                    "committed rec/s",
                    "broadcast rec/s",
                    "rows counted",
                    "CPU ms/1000",
                ],
                rows,
            ),
        ]
        if suite_batch:
            ratio = batch.get("ratio")
            out.append(
                f"   end to end {fmt(suite_batch['committed_per_s'])} records/s committed, "
                f"{fmt(ratio, '.2f')} x COPY at {config['batch_size']} rows per transaction "
                f"(target >= {BATCH_RATIO_GOAL}): "
                f"{'met' if batch.get('ratio_met') else 'NOT met'}; "
                f"{suite_batch['body_bytes_per_record']} body bytes per record, upload p50 "
                f"{fmt(suite_batch['upload_p50_ms'], '.1f')} ms, p99 "
                f"{fmt(suite_batch['upload_p99_ms'], '.1f')} ms; not 202: "
                f"{statuses_text(suite_batch['statuses'])}"
            )
    if "error" in batch:
        out.append(f"   part 2 FAILED: {batch['error']}")

    paced = parts.get("paced", {})
    steps = paced.get("steps", [])
    if steps:
        for r in steps:
            cpu_row(f"3 dashboard: {r['offered_per_s']:.0f}/s", r["cpu"])
        out += [
            "",
            f"3. Ingest to dashboard: {steps[0]['vehicles']} loggers, single records on an "
            f"absolute schedule, {steps[0]['seconds']:.0f} s per rate; latency = dashboard "
            "receive time - record timestamp, ms",
            table(
                [
                    "offered/s",
                    "sent/s",
                    "accepted",
                    "received",
                    "lost",
                    "dup",
                    "p50",
                    "p90",
                    "p99",
                    "max",
                    "max send lag",
                    "request p50",
                    "request p99",
                    "CPU ms/rec",
                ],
                [
                    [
                        fmt(r["offered_per_s"]),
                        fmt(r["sent_per_s"]),
                        fmt(r["accepted"]),
                        fmt(r["received"]),
                        fmt(r["lost"]),
                        fmt(r["duplicates"]),
                        fmt(r["p50_ms"], ".1f"),
                        fmt(r["p90_ms"], ".1f"),
                        fmt(r["p99_ms"], ".1f"),
                        fmt(r["max_ms"], ".1f"),
                        fmt(r["max_send_lag_ms"], ".1f"),
                        fmt(r["request_p50_ms"], ".1f"),
                        fmt(r["request_p99_ms"], ".1f"),
                        fmt(service_ms(r["cpu"], r["sent_per_s"]), ".3f"),
                    ]
                    for r in steps
                ],
            ),
            *(
                f"   at {r['offered_per_s']:.0f}/s: p99 {fmt(r['p99_ms'], '.1f')} ms (target <= "
                f"{P99_GOAL_MS:.0f} ms): {'met' if r['p99_met'] else 'NOT met'}; not 202: "
                f"{statuses_text(r['statuses'])}"
                for r in steps
            ),
        ]
    if "error" in paced:
        out.append(f"   part 3 FAILED: {paced['error']}")

    compression = parts.get("compression", {})
    if compression.get("traces"):
        traces = compression["traces"]
        out += [
            "",
            f"4. Compression: {traces[0]['minutes']:g} minutes per trace at {PERIOD_MS} ms "
            "(bytes per record on the wire)",
            table(
                [
                    "trace",
                    "records",
                    "compressed",
                    "in a batch",
                    "VehicleData",
                    "JSON",
                    "compressed/JSON",
                    "fields skipped",
                    "resyncs",
                ],
                [
                    [
                        t["trace"],
                        fmt(t["records"]),
                        fmt(t["compressed_bytes_per_record"], ".2f"),
                        fmt(t["batch_bytes_per_record"], ".2f"),
                        fmt(t["vehicledata_bytes_per_record"], ".2f"),
                        fmt(t["json_bytes_per_record"], ".2f"),
                        f"{t['compressed_bytes_per_record'] / t['json_bytes_per_record']:.0%}",
                        f"{t['fields_skipped_share']:.1%}",
                        fmt(t["resyncs"]),
                    ]
                    for t in traces
                ],
            ),
            "",
            "   Largest reconstruction error |decoded - true sample| (the predictor's Decoder), "
            "where the field was skipped and where it was sent (the wire's rounding: whole degrees "
            "for heading, float32 for the rest); over = skipped values off by more than band + "
            "rounding",
            table(
                ["trace", "field", "skipped", "band", "max error", "skipped", "sent", "over"],
                [
                    [
                        t["trace"],
                        f,
                        f"{t['skipped_share'][f]:.1%}" if f in t["skipped_share"] else "-",
                        fmt(t["band"].get(f), "g"),
                        fmt(t["max_error"][f], ".4f"),
                        fmt(t["max_error_skipped"].get(f), ".4f"),
                        fmt(t["max_error_sent"][f], ".4f"),
                        fmt(t["over_band"].get(f)),
                    ]
                    for t in traces
                    for f in (*FIELDS, "odometer")
                ],
            ),
        ]
    if "error" in compression:
        out.append(f"   part 4 FAILED: {compression['error']}")

    if cpu_rows:
        used = [i for i, k in enumerate(CPU_ORDER) if any(row[i + 1] for row in cpu_rows)]
        out += [
            "",
            "CPU per process group (% of one core; machine = all cores, max "
            f"{machine['cpus'] * 100}; other = machine minus the groups): parts 1 and 3 during the "
            "send phase, part 2 from the first upload until every record is broadcast",
            table(
                ["step", *(CPU_ORDER[i] for i in used)],
                [[row[0], *(row[i + 1] or "-" for i in used)] for row in cpu_rows],
            ),
        ]
    out += cpu_per_record(parts)
    out += profile_lines(parts)
    checks = results.get("checks", [])
    if checks:
        out += ["", "Checks", *(f"  {line}" for line in checks)]
    out.append("")
    return "\n".join(out)


# The processes that serve the path (not the load generator, the dashboard or the bench).
SERVER_GROUPS = ("bare", "gateway", "telemetry", "rabbitmq", "postgres")


def cpu_per_record(parts: dict[str, Any]) -> list[str]:
    """The CPU table divided out: µs of CPU per record, per server process, and their total."""
    steps: list[tuple[str, dict[str, float], float | None]] = []
    for r in parts.get("single", {}).get("targets", []):
        steps.append((f"1 single: {r['target']}", r["cpu"], r["accepted_per_s"]))
    batch = parts.get("batch", {})
    if batch.get("suite"):
        steps.append(("2 batch: gateway + telemetry", batch["suite"]["cpu"], None))
    for r in batch.get("baselines", []):
        steps.append((f"2 batch: {r['target']}", r["cpu"], r["committed_per_s"]))
    for r in parts.get("paced", {}).get("steps", []):
        steps.append((f"3 dashboard: {r['offered_per_s']:.0f}/s", r["cpu"], r["sent_per_s"]))
    rows = []
    for label, usage, per_s in steps:
        if per_s is None:  # part 2: the whole run's CPU over every record it committed
            suite = batch["suite"]
            per_s = rate(suite["committed"], suite["acked_s"])
        if not per_s:
            continue
        # % of one core -> CPU seconds per second; over records per second -> µs per record.
        per_record = {k: usage[k] / 100 / per_s * 1e6 for k in SERVER_GROUPS if k in usage}
        rows.append(
            [
                label,
                *(fmt(per_record.get(k), ".1f") for k in SERVER_GROUPS),
                fmt(sum(per_record.values()), ".1f"),
            ]
        )
    if not rows:
        return []
    return [
        "",
        "CPU per record, µs, by server process (part 1: per accepted request; part 2: per "
        "committed record, until every record is broadcast; part 3: per record sent)",
        table(["step", *SERVER_GROUPS, "servers"], rows),
    ]


def profile_lines(parts: dict[str, Any], top: int = 25) -> list[str]:
    """The costliest frames of each profiled process (`--profile`), in % of its samples."""
    profiled = [("2 batch", parts.get("batch", {}).get("suite") or {})]
    profiled += [
        (f"3 dashboard {r['offered_per_s']:.0f}/s", r)
        for r in parts.get("paced", {}).get("steps", [])
    ]
    out = []
    for step, report in profiled:
        for label, path in report.get("profiles", {}).items():
            ranked = profile_summary(Path(path), top=top)
            if ranked:
                out += [
                    "",
                    f"Profile of {label} in {step} (py-spy, CPU samples; {path})",
                    table(
                        ["% in or below", "% alone", "frame"],
                        [[f"{a:.1f}", f"{b:.1f}", frame[:110]] for frame, a, b in ranked],
                    ),
                ]
    return out


def reports(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured step's report."""
    parts = results["parts"]
    found = [
        *parts.get("single", {}).get("targets", []),
        *parts.get("batch", {}).get("baselines", []),
    ]
    if parts.get("batch", {}).get("suite"):
        found.append(parts["batch"]["suite"])
    found += parts.get("paced", {}).get("steps", [])
    return found


def checks(results: dict[str, Any]) -> list[str]:
    lines = []
    metrics = results.get("metrics", {})
    telemetry = metrics.get("telemetry", {})
    if telemetry:
        outcomes = {
            k.split('"')[1]: v
            for k, v in telemetry.items()
            if k.startswith("edgeway_telemetry_records_total")
        }
        rejected = {
            k.split('"')[1]: v
            for k, v in telemetry.items()
            if k.startswith("edgeway_telemetry_rejected_uploads_total") and v
        }
        failures = telemetry.get("edgeway_telemetry_broadcast_failures_total", 0)
        lines.append(
            f"telemetry service records: {', '.join(f'{k} {v:.0f}' for k, v in outcomes.items())}; "
            f"rejected uploads {rejected or 'none'}; broadcast failures {failures:.0f}"
        )
        # Upload messages by what became of them (`edgeway.common.amqp.Consumer`): all but
        # acked should be 0.
        consumed = {
            k.rsplit('outcome="', 1)[1].split('"')[0]: v
            for k, v in telemetry.items()
            if k.startswith("edgeway_amqp_consumed_total") and "edgeway.telemetry.raw" in k
        }
        if consumed:
            lines.append(
                "telemetry upload messages: "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(consumed.items()))
            )
    for r in reports(results):
        if "committed" in r and "rows_counted" in r and r["committed"] != r["rows_counted"]:
            lines.append(
                f"{r['target']}: the statistics counted {r['committed']} records, the table "
                f"holds {r['rows_counted']}"
            )
    batch = results["parts"].get("batch", {}).get("suite")
    if batch:
        lines.append(
            f"batch: {batch['committed']}/{batch['records']} committed, "
            f"{batch['offline_sessions']} offline sessions (the replay is late by design)"
        )
    busiest: dict[str, float] = {}
    for report in reports(results):
        for who, used in report.get("cpu_top_other", {}).items():
            busiest[who] = max(busiest.get(who, 0.0), used)
    loud = sorted(((u, w) for w, u in busiest.items() if u >= 10), reverse=True)[:3]
    if loud:
        lines.append(
            "NOT ours, busy during the steps: "
            + "; ".join(f"{w[:70]} (up to {u:.0f}%)" for u, w in loud)
        )
    return lines


# --------------------------------------------------------------------------------------------
# Main


def run(config: Config, results: dict[str, Any], logs: Path) -> None:
    """Fills `results` as it goes, so an interrupted run still reports what it measured."""
    parts: dict[str, Any] = results["parts"]
    single: dict[str, Any] = {"targets": []}
    parts["single"] = single
    batch: dict[str, Any] = {"baselines": []}
    parts["batch"] = batch
    parts["paced"] = {"steps": []}

    # The machine limits first, while no service of ours runs.
    with contextlib.ExitStack() as stack:
        log_path = logs / "telemetry_ingest-bare.log"
        log_path.unlink(missing_ok=True)
        bare = ServiceProcess("bench.bare_ingest", env={}, port=free_port(), log_path=log_path)
        stack.callback(bare.stop)
        try:
            bare.start(wait=30)
            groups = {"bare": lambda: [bare.process.pid] if bare.process is not None else []}
            single["targets"].append(single_part("bare FastAPI", bare.url, config, groups, None))
            progress("1 single", single["targets"][-1])
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - report it and go on
            single["error"] = f"bare FastAPI: {type(exc).__name__}: {exc}"
            print(f"  part 1 baseline FAILED: {single['error']}", flush=True)
    try:
        batch["baselines"] = copy_baseline(config, {"postgres": lambda: pids_named("postgres")})
        for r in batch["baselines"]:
            progress("2 batch", r)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        batch["error"] = f"COPY baseline: {type(exc).__name__}: {exc}"
        print(f"  part 2 baseline FAILED: {batch['error']}", flush=True)

    vehicles = [
        *(vin(SINGLE_BASE + i) for i in range(config.clients)),
        *(vin(BATCH_BASE + i) for i in range(config.batch_vehicles)),
        *(vin(PACED_BASE + i) for i in range(config.paced_vehicles)),
    ]
    suite = Suite(logs, vehicles)
    commits: Commits | None = None
    try:
        print("  starting the telemetry service and the gateway", flush=True)
        suite.start()
        assert suite.database is not None
        commits = Commits(suite.database)
        groups = suite.groups()
        for part, label, body in (
            (
                "single",
                "gateway + telemetry",
                lambda: single_part(
                    "gateway + telemetry", suite.gateway.url, config, groups, commits
                ),
            ),
            ("batch", "", lambda: batch_part(suite, config, groups, commits)),
            ("paced", "", lambda: paced_part(suite, config, groups, parts["paced"]["steps"])),
        ):
            try:
                # Nothing left of the previous part in the service's hands.
                results.setdefault("settle_s", {})[part] = suite.settle()
                report = body()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - report it and go on with the next part
                parts[part]["error"] = f"{label or part}: {type(exc).__name__}: {exc}"
                print(f"  part {part} FAILED: {parts[part]['error']}", flush=True)
                continue
            if part == "single":
                single["targets"].append(report)
            elif part == "batch":
                batch["suite"] = report
            if report is not None:  # paced: each rate was shown as it was measured
                progress(part, report)
        results["metrics"] = suite.metrics()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - the suite did not start: the other parts still run
        results["suite_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  suite FAILED: {results['suite_error']}", flush=True)
    finally:
        if commits is not None:
            commits.close()
        suite.stop()

    try:
        parts["compression"] = {"traces": compression_part(config)}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        parts["compression"] = {"error": f"{type(exc).__name__}: {exc}"}


def progress(part: str, report: dict[str, Any]) -> None:
    if part == "paced":
        text = (
            f"sent {report['sent_per_s']:.0f}/s, p50 {fmt(report['p50_ms'], '.1f')} ms, "
            f"p99 {fmt(report['p99_ms'], '.1f')} ms, lost {report['lost']}"
        )
    elif "accepted_per_s" in report and "batch_size" not in report:
        text = f"{report['target']}: {report['accepted_per_s']:.0f} requests/s accepted" + (
            f", {report['committed_per_s']:.0f} records/s committed"
            if "committed_per_s" in report
            else ""
        )
    else:
        text = f"{report['target']}: {report['committed_per_s']:.0f} records/s committed"
    print(f"  {part}: {text}", flush=True)


def summarize(results: dict[str, Any]) -> None:
    single = results["parts"].get("single", {})
    targets = {r["target"]: r for r in single.get("targets", [])}
    if "bare FastAPI" in targets and "gateway + telemetry" in targets:
        bare = targets["bare FastAPI"]["accepted_per_s"]
        ratio = targets["gateway + telemetry"]["accepted_per_s"] / bare if bare else None
        single["ratio"] = round(ratio, 3) if ratio is not None else None
        single["ratio_goal"] = RATIO_GOAL
        single["ratio_met"] = ratio is not None and ratio >= RATIO_GOAL
    batch = results["parts"].get("batch", {})
    suite = batch.get("suite")
    copy = next((r for r in batch.get("baselines", []) if "per transaction" in r["target"]), None)
    if suite and copy and copy["committed_per_s"]:
        ratio = suite["committed_per_s"] / copy["committed_per_s"]
        batch["ratio"] = round(ratio, 3)
        batch["ratio_goal"] = BATCH_RATIO_GOAL
        batch["ratio_met"] = suite["committed"] >= suite["records"] and ratio >= BATCH_RATIO_GOAL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Telemetry ingest end to end vs machine limits")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s steps, 20k records")
    parser.add_argument("--output", type=Path, default=RESULTS / "telemetry_ingest.json")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy the gateway and the telemetry service in parts 2 and 3 (collapsed stacks "
        "in DIR) and print where their CPU goes",
    )
    args = parser.parse_args(argv)
    config = Config.make(quick=args.quick)
    config.profile = args.profile
    results: dict[str, Any] = {
        "benchmark": "telemetry_ingest",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        "config": asdict(config),
        "parts": {},
    }
    print(f"telemetry ingest: {'quick' if config.quick else 'full'} run", flush=True)
    started = time.monotonic()
    interrupted = False
    with interrupts_as_keyboard_interrupt():
        try:
            results["background_cpu"] = background(1.0)
            run(config, results, RESULTS / "logs")
        except KeyboardInterrupt:
            interrupted = True
            results["interrupted"] = True
            print(
                "\ninterrupted: processes stopped, virtual host and databases dropped", flush=True
            )
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_end"] = (
        " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if Path("/proc/loadavg").exists()
        else None
    )
    summarize(results)
    results["checks"] = checks(results)
    print(render(results), flush=True)
    print(f"took {results['seconds']:.0f} s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2, default=str))
    print(f"results: {args.output}", flush=True)
    failed = any("error" in part for part in results["parts"].values()) or "suite_error" in results
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
