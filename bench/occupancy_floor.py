"""The occupancy service beside its client libraries alone, doing one frame's work each.

    .venv/bin/python -m bench.occupancy_floor [--rates 200,800] [--rounds 2] [--profile]

A producer publishes Omega frames to the occupancy work exchange at each rate, as the gateway
does (persistent, mandatory, confirmed, with the gateway's envelope). One consumer at a time
takes them from the service's own quorum queue, on a private virtual host and a fresh database:

- service: `python -m edgeway.occupancy`, as it ships;
- libraries: a consumer of a few lines with no Edgeway code on the per-message path, built up
  layer by layer: `consume` (aiormq's consumer, acks sent as the service sends them: one
  `basic.ack multiple` 20 ms after the first falls due), `publish` (and a confirmed publish of
  the frame's client update on the broadcast exchange, as the service publishes it), `psycopg`
  (and the service's own statement, `store._STORE_GROUP`, through psycopg: what the service
  does for a frame, with nothing else), `asyncpg` (the same statement through asyncpg instead).

CPU comes from /proc for the consumer, RabbitMQ and PostgreSQL (the producer is left out),
over `--seconds` after a 2 s warm-up, as ms per frame sent. After each step of a consumer that
stores, every frame of the step must be in the `observations` table: each did the real work.
`service - psycopg` is what Edgeway's own code costs per frame. The producer also listens on the
broadcast exchange, as a gateway does: latency is from a frame's timestamp (set as it is
published) to its client update's arrival, through RabbitMQ twice and the consumer, for every
frame after the warm-up (the `consume` layer publishes no updates). Prints tables, writes
bench/results/occupancy_floor.json; never asserts timings. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiormq
import orjson
import psycopg
import uvloop

from bench import loadgen
from bench.cpu import CpuMeter, Profiler, pids_named
from bench.occupancy_fanout import RESULTS, percentile
from edgeway.common.amqp import ACK_DELAY_S, properties
from edgeway.common.broker import DEFAULT_PREFETCH
from edgeway.common.envelope import Envelope
from edgeway.common.schemas.occupancy import OBSERVATION_TYPE, UPDATE_TYPE
from edgeway.common.settings import ExchangeNames
from edgeway.common.testing import (
    ServiceProcess,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    free_port,
)
from edgeway.common.topology import Channels, Topology
from edgeway.occupancy.settings import OMEGA_PLACES
from edgeway.occupancy.store import _STORE_GROUP, psycopg_conninfo

LAYERS = ("consume", "publish", "psycopg", "asyncpg")
WARM_UP_S = 2.0

TOPOLOGY = Topology(ExchangeNames())
QUEUE = TOPOLOGY.occupancy_observations_queue.name
WORK_EXCHANGE = TOPOLOGY.names.occupancy_observations
BROADCAST_EXCHANGE = TOPOLOGY.names.broadcast


# --------------------------------------------------------------------------------------------
# The producer and the libraries-only consumer (subprocesses of the benchmark)


async def produce(url: str, rate: float, seconds: float, *, listen: bool) -> None:
    """Frames at `rate` for `seconds`, as the gateway publishes them; prints how many and, when
    `listen`, the latency of their client updates (those of frames sent after the warm-up)."""
    connection = await aiormq.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    templates = loadgen.frame_templates()
    reply_channel = Channels.producer("bench", "floor")
    measured_from = time.time() + WARM_UP_S
    latencies: list[float] = []
    if listen:
        updates = await connection.channel()
        await updates.exchange_declare(BROADCAST_EXCHANGE, exchange_type="topic", durable=True)
        declared = await updates.queue_declare(exclusive=True, auto_delete=True)
        assert declared.queue is not None
        await updates.queue_bind(declared.queue, BROADCAST_EXCHANGE, Channels.OCCUPANCY_LOCATIONS)

        async def on_update(message: aiormq.abc.DeliveredMessage) -> None:
            arrived = time.time()
            for line in message.body.split(b"\n"):  # a batch: one update a line
                timestamp = orjson.loads(line)["timestamp"]
                if timestamp >= measured_from:
                    latencies.append((arrived - timestamp) * 1000)

        await updates.basic_consume(declared.queue, on_update, no_ack=True)
    started, sent, measured = time.perf_counter(), 0, 0
    confirms: set[asyncio.Task[Any]] = set()
    while (now := time.perf_counter()) - started < seconds:
        due = started + sent / rate
        if due > now:
            await asyncio.sleep(due - now)
        frame = dict(templates[sent % len(templates)], timestamp=time.time())
        measured += frame["timestamp"] >= measured_from
        envelope = Envelope(
            type=OBSERVATION_TYPE,
            producer="bench-floor",
            captured_at=frame["timestamp"],
            reply_channel=reply_channel,
        )
        task = asyncio.create_task(
            channel.basic_publish(
                orjson.dumps(frame),
                exchange=WORK_EXCHANGE,
                properties=properties(envelope, durable=True),
                mandatory=True,
            )
        )
        confirms.add(task)
        task.add_done_callback(confirms.discard)
        sent += 1
    if confirms:
        await asyncio.wait(confirms)
    # The last updates, until every measured frame's is in or none came for a second.
    heard, quiet_since = len(latencies), time.monotonic()
    while listen and len(latencies) < measured and time.monotonic() - quiet_since < 1.0:
        await asyncio.sleep(0.05)
        if len(latencies) > heard:
            heard, quiet_since = len(latencies), time.monotonic()
    await connection.close()
    ordered = sorted(latencies)
    latency = (
        {
            "p50": round(percentile(ordered, 50), 2),
            "p99": round(percentile(ordered, 99), 2),
            "max": round(ordered[-1], 2),
            "updates": len(ordered),
        }
        if listen and ordered
        else None
    )
    print(json.dumps({"sent": sent, "latency_ms": latency}), flush=True)


class Statement:
    """The service's store statement for one frame, through psycopg or asyncpg."""

    def __init__(self, driver: str, url: str) -> None:
        self.driver = driver
        self.url = url
        self.run: Callable[[str], Any] | None = None
        self._lock = asyncio.Lock()  # one statement at a time per connection, as the service

    async def connect(self) -> None:
        if self.driver == "psycopg":
            connection = await psycopg.AsyncConnection.connect(
                psycopg_conninfo(self.url), autocommit=True
            )

            async def run(rows: str) -> Any:
                cursor = await connection.execute(_STORE_GROUP, (rows,))
                return await cursor.fetchall()

        else:
            import asyncpg  # type: ignore[import-untyped]

            connection = await asyncpg.connect(psycopg_conninfo(self.url))
            statement = _STORE_GROUP.replace("%s", "$1")

            async def run(rows: str) -> Any:
                return await connection.fetch(statement, rows)

        self.run = run

    async def store(self, rows: str) -> None:
        assert self.run is not None
        async with self._lock:
            await self.run(rows)


async def consume(url: str, database: str, layer: str) -> None:
    """The libraries alone: each frame read, stored, its update published and acked."""
    connection = await aiormq.connect(url)
    channel = cast(aiormq.Channel, await connection.channel(publisher_confirms=True))
    await channel.basic_qos(prefetch_count=DEFAULT_PREFETCH)  # as the service consumes
    layers = LAYERS[: LAYERS.index(layer) + 1] if layer != "asyncpg" else LAYERS
    statement = None
    if "psycopg" in layers or "asyncpg" in layers:
        statement = Statement("asyncpg" if layer == "asyncpg" else "psycopg", database)
        await statement.connect()
    async with await psycopg.AsyncConnection.connect(psycopg_conninfo(database)) as db:
        cursor = await db.execute("SELECT id, location_id FROM cameras")
        locations: dict[str, int] = dict(await cursor.fetchall())
    # The highest tag done, acked with `multiple` 20 ms after the first falls due. A lower one
    # still in hand would go with it: the service keeps those back, which costs it a set
    # operation or two; here nothing fails, so nothing is lost.
    ack: dict[str, Any] = {"tag": 0, "timer": None}
    sending: set[asyncio.Task[Any]] = set()

    def send_acks() -> None:
        ack["timer"] = None
        task = asyncio.create_task(channel.basic_ack(ack["tag"], multiple=True, wait=False))
        sending.add(task)
        task.add_done_callback(sending.discard)

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        frame = orjson.loads(message.body)
        summary = frame["summary"]
        zones = len(summary["free"]) + len(summary["occupied"])
        percent = len(summary["occupied"]) / zones * 100 if zones else 0.0
        update = orjson.dumps(
            {
                "location_name": OMEGA_PLACES[frame["camera"]],
                "timestamp": frame["timestamp"],
                "people_detected": summary["total_people"],
                "occupancy_percent": percent,
            }
        )
        if statement is not None:
            await statement.store(
                orjson.dumps(
                    [
                        {
                            "message_id": props.message_id,
                            "camera_id": frame["camera"],
                            "location_id": locations[frame["camera"]],
                            "captured_at": datetime.fromtimestamp(frame["timestamp"], UTC),
                            "received_at": datetime.now(UTC),
                            "total_people": summary["total_people"],
                            "free_zones": len(summary["free"]),
                            "occupied_zones": len(summary["occupied"]),
                            "occupancy_percent": percent,
                            "timestamp_raw": str(frame["timestamp"]),
                            "zones": {"free": summary["free"], "occupied": summary["occupied"]},
                            "segments": frame["segments"],
                            "client_update": update.decode(),
                            "arrival": 0,
                        }
                    ]
                ).decode()
            )
        if "publish" in layers:
            await channel.basic_publish(
                update,
                exchange=BROADCAST_EXCHANGE,
                routing_key=Channels.occupancy_location(locations[frame["camera"]]),
                properties=aiormq.spec.Basic.Properties(
                    content_type="application/json",
                    headers=props.headers,
                    delivery_mode=1,
                    correlation_id=props.message_id,
                    message_id=uuid.uuid4().hex,
                    message_type=UPDATE_TYPE,
                ),
                wait=False,
            )
        deliver = message.delivery
        assert isinstance(deliver, aiormq.spec.Basic.Deliver)
        ack["tag"] = max(ack["tag"], deliver.delivery_tag or 0)
        if ack["timer"] is None:
            ack["timer"] = asyncio.get_running_loop().call_later(ACK_DELAY_S, send_acks)

    await channel.basic_consume(QUEUE, on_message)
    print("ready", flush=True)
    await asyncio.Event().wait()


# --------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.logs = RESULTS / "logs"
        self.vhost, self.amqp_url = create_vhost("edgeway-floor")
        self.database = create_postgres_database("edgeway_floor")
        self.service: ServiceProcess | None = None
        self.sent = 0
        self.stored = 0

    def start_service(self) -> subprocess.Popen[bytes]:
        self.service = ServiceProcess(
            "edgeway.occupancy",
            env={
                "EDGEWAY_AMQP_URL": self.amqp_url,
                "EDGEWAY_OCCUPANCY_DATABASE_URL": self.database,
                "EDGEWAY_LOG_LEVEL": "WARNING",
            },
            port=free_port(),
            log_path=self.logs / "floor-occupancy.log",
        ).start(wait=90)
        assert self.service.process is not None
        return self.service.process

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def start_layer(self, layer: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.occupancy_floor", "consume", self.amqp_url],
            env={**os.environ, "FLOOR_DATABASE": self.database, "FLOOR_LAYER": layer},
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the {layer} consumer did not start")
        return process

    def step(self, name: str, consumer: subprocess.Popen[bytes], rate: float) -> dict[str, Any]:
        """One consumer at `rate`; checks that it stored every frame, where it stores."""
        args = self.args
        duration = args.seconds + WARM_UP_S + 0.5
        producer = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.occupancy_floor", "produce", self.amqp_url),
                *(str(rate), str(duration), "0" if name == "consume" else "1"),
            ],
            stdout=subprocess.PIPE,
        )
        meter = CpuMeter(
            {
                "consumer": lambda: [consumer.pid],
                "rabbitmq": lambda: pids_named("beam.smp"),
                "postgres": lambda: pids_named("postgres"),
                "producer": lambda: [producer.pid],
            }
        )
        time.sleep(WARM_UP_S)
        user_sys = _user_sys(consumer.pid)
        profiler = (
            Profiler({name: consumer.pid}, RESULTS / "profiles" / "floor", rate=args.profile_rate)
            if args.profile
            else None
        )
        meter.start()
        if profiler is not None:
            profiler.start()
        time.sleep(args.seconds)
        cpu = meter.stop()
        if profiler is not None:
            profiler.stop()
        user, system = (a - b for a, b in zip(_user_sys(consumer.pid), user_sys, strict=True))
        out, _ = producer.communicate(timeout=60)
        produced = json.loads(out)
        sent = produced["sent"]
        self.sent += sent
        stores = name not in ("consume", "publish")
        stored = self.wait_stored(self.stored + sent) - self.stored if stores else 0
        self.stored += stored
        achieved = sent / duration  # the producer may fall short of `rate`
        frames = achieved * args.seconds
        result = {
            "target": name,
            "rate": rate,
            "achieved_rate": round(achieved, 1),
            "cpu_percent": cpu,
            "ms_per_frame": {
                group: round(cpu[group] / 100 * 1000 / achieved, 3)
                for group in ("consumer", "rabbitmq", "postgres")
            },
            "consumer_user_ms": round(user * 1000 / frames, 3),
            "consumer_sys_ms": round(system * 1000 / frames, 3),
            "sent": sent,
            "stored": stored if stores else None,
            "latency_ms": produced["latency_ms"],
        }
        latency = result["latency_ms"]
        print(
            f"  {rate:5g}/s {name:8} consumer {result['ms_per_frame']['consumer']:.3f} ms/frame "
            f"(user {result['consumer_user_ms']:.3f}, sys {result['consumer_sys_ms']:.3f}), "
            f"rabbitmq {result['ms_per_frame']['rabbitmq']:.3f}, "
            f"postgres {result['ms_per_frame']['postgres']:.3f}; "
            + (f"stored {stored} of {sent}" if stores else f"{sent} sent")
            + (
                f"; latency p50 {latency['p50']} ms, p99 {latency['p99']} ms "
                f"({latency['updates']} updates)"
                if latency
                else ""
            ),
            flush=True,
        )
        return result

    def wait_stored(self, expected: int, timeout: float = 30.0) -> int:
        """The observations stored so far, once `expected` are (or after `timeout`)."""
        deadline, count = time.monotonic() + timeout, -1
        with psycopg.connect(psycopg_conninfo(self.database), autocommit=True) as connection:
            while time.monotonic() < deadline:
                row = connection.execute("SELECT count(*) FROM observations").fetchone()
                count = row[0] if row else 0
                if count >= expected:
                    break
                time.sleep(0.2)
        return count

    def run(self) -> list[dict[str, Any]]:
        results = []
        for round_ in range(self.args.rounds):
            print(f"round {round_ + 1} of {self.args.rounds}", flush=True)
            process = self.start_service()
            try:
                results += [self.step("service", process, rate) for rate in self.args.rates]
            finally:
                self.stop_service()
            for layer in self.args.layers:
                consumer = self.start_layer(layer)
                try:
                    results += [self.step(layer, consumer, rate) for rate in self.args.rates]
                finally:
                    consumer.terminate()
                    consumer.wait(timeout=20)
        return results

    def close(self) -> None:
        self.stop_service()
        with contextlib.suppress(Exception):
            drop_postgres_database(self.database)
        with contextlib.suppress(Exception):
            drop_vhost(self.vhost)


def _user_sys(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def render(results: list[dict[str, Any]], rate: float) -> str:
    """The table of one rate."""
    results = [r for r in results if r["rate"] == rate]
    names = list(dict.fromkeys(r["target"] for r in results))
    rows = []
    for name in names:
        runs = [r for r in results if r["target"] == name]

        def mean(key: Callable[[dict[str, Any]], float], runs: list[dict[str, Any]] = runs) -> str:
            return f"{sum(key(r) for r in runs) / len(runs):.3f}"

        def latency(which: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r["latency_ms"][which] for r in runs if r.get("latency_ms")]
            return f"{sum(values) / len(values):.1f}" if values else "-"

        rows.append(
            [
                name,
                " / ".join(f"{r['ms_per_frame']['consumer']:.3f}" for r in runs),
                mean(lambda r: r["ms_per_frame"]["consumer"]),
                mean(lambda r: r["consumer_user_ms"]),
                mean(lambda r: r["consumer_sys_ms"]),
                mean(lambda r: r["ms_per_frame"]["rabbitmq"]),
                mean(lambda r: r["ms_per_frame"]["postgres"]),
                latency("p50"),
                latency("p99"),
            ]
        )
    headers = [
        *("consumer", "per round", "mean", "user", "sys", "rabbitmq", "postgres"),
        *("p50 ms", "p99 ms"),
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        f"CPU per frame at {rate:g} frames/s (ms; consumer per round, then means over rounds) "
        "and the client updates' latency (means over rounds)",
        "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    means = {row[0]: float(row[2]) for row in rows}
    if "service" in means and "psycopg" in means:
        own = means["service"] - means["psycopg"]
        lines.append(
            f"Edgeway's own code: service - psycopg = {own:.3f} ms per frame "
            f"({own / means['service'] * 100:.0f} % of the service)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "command", nargs="?", default="bench", choices=("bench", "produce", "consume")
    )
    parser.add_argument("url", nargs="?")
    parser.add_argument("produce_args", nargs="*")
    parser.add_argument("--rates", default="200,800", help="frames/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--profile", action="store_true", help="py-spy records each consumer")
    parser.add_argument("--profile-rate", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=RESULTS / "occupancy_floor.json")
    args = parser.parse_args()
    if args.command == "produce":
        rate, seconds, listen = (float(value) for value in args.produce_args)
        uvloop.run(produce(args.url, rate, seconds, listen=bool(listen)))
        return
    if args.command == "consume":
        uvloop.run(consume(args.url, os.environ["FLOOR_DATABASE"], os.environ["FLOOR_LAYER"]))
        return
    args.layers = [layer for layer in args.layers.split(",") if layer]
    args.rates = [float(rate) for rate in args.rates.split(",") if rate]
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.close()
    for rate in args.rates:
        print()
        print(render(results, rate))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps({"results": results}, option=orjson.OPT_INDENT_2))
    print(f"\nresults: {args.output}")


if __name__ == "__main__":
    main()
