"""Load generator of the telemetry benchmark: vehicle loggers over HTTP, and one dashboard.

Each part runs in its own process (asyncio on uvloop) and is driven by the coordinator over a
pipe, one command and one reply at a time (the plumbing of `bench.loadgen`):

- `Fleet`: `workers` processes sharing the vehicles. Each process has one `httpx.AsyncClient`
  (HTTP/1.1, keep-alive, one connection per vehicle it drives) and, per vehicle, a driving trace
  (`edgeway.edge.traces`) and its own predictor `Encoder`, so every vehicle's packets are a valid
  stream in sequence order. A vehicle waits for the answer to one upload before it sends the next,
  as the edge logger does. Jobs:
  - `single`: every vehicle posts one `CompressedVehicleData` after the other for `seconds`.
  - `prepare_batch` / `batch`: `CompressedBatch` bodies encoded up front (a logger replaying its
    outbox), then posted one after the other per vehicle, each until it gets its 202.
  - `paced`: single records on an absolute schedule, `rate` per second over the whole fleet
    (vehicle `g` of `V` sends record `j` at `start + (g + j * V) / rate`).
  A record's timestamp is taken right before it is encoded and sent (`time.time()` in ms, and
  after the vehicle's previous one), so it is the moment it left the logger.
- `Dashboard`: one `WS /ws` connection; records `time.time()` at the receipt of every
  `telemetry` message of the vehicles it is armed with.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import orjson

from bench.loadgen import _Child, _command_queue, _process_main
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import Encoder, Sample
from edgeway.edge.traces import city, highway

UPLOAD_PATH = "/telemetry"
DASHBOARD_PATH = "/ws"
PROTOBUF = "application/x-protobuf"
PERIOD_MS = 300  # the seed logger's period; the traces' values change at this pace
VIN_PREFIX = "5YJ3E1EA1BN"  # 11 characters; the last 6 (a number) are what dashboards see
REPLY_TIMEOUT = 300.0
BATCH_RETRIES = 5


def vin(number: int) -> str:
    return f"{VIN_PREFIX}{number:06d}"


def trace(index: int, *, start_ms: int, period_ms: int = PERIOD_MS) -> Iterator[Sample]:
    """Vehicle `index`'s drive: highway for even indexes, city for odd ones, seeded by index."""
    maker = highway if index % 2 == 0 else city
    return maker(index + 1, start_ms=start_ms, period_ms=period_ms)


# --------------------------------------------------------------------------------------------
# Fleet worker process


class _Vehicle:
    def __init__(self, vin: str, index: int) -> None:
        self.vin = vin
        self.short = vin[-6:]
        self.index = index
        self.headers = {"X-Vehicle-VIN": vin, "X-Compressed": "true", "Content-Type": PROTOBUF}
        self.batch_headers = {**self.headers, "X-Batch": "true"}
        self.trace = trace(index, start_ms=int(time.time() * 1000))
        self.encoder = Encoder()
        self.last_ms = 0
        self.batches: list[tuple[int, bytes]] = []  # (records, CompressedBatch body)

    def next_record(self) -> tuple[int, bytes]:
        """The next reading, stamped now, as a CompressedVehicleData body."""
        sample = next(self.trace)
        stamp = max(self.last_ms + 1, int(time.time() * 1000))
        self.last_ms = stamp
        packet = self.encoder.encode(replace(sample, timestamp_ms=stamp))
        return stamp, wire.encode_packet(packet)


@dataclass
class _Tally:
    """What one job saw, merged by the coordinator over the processes."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: array[float] = field(default_factory=lambda: array("d"))  # seconds per request
    first_send: float = math.inf
    last_done: float = 0.0
    sent: int = 0
    records_accepted: int = 0
    bytes_sent: int = 0
    max_lag: float = 0.0  # paced: how late a send was against its schedule, at most
    accepted: list[tuple[str, int]] = field(default_factory=list)  # paced: (vin6, timestamp)

    def result(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "latencies": self.latencies.tobytes(),
            "first_send": self.first_send,
            "last_done": self.last_done,
            "sent": self.sent,
            "records_accepted": self.records_accepted,
            "bytes_sent": self.bytes_sent,
            "max_lag": self.max_lag,
            "accepted": self.accepted,
        }


async def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _cheap_httpcore() -> None:
    """httpcore 1.0 imports `sniffio` whenever it sets up a lock, and anyio 4.16 no longer
    brings sniffio along: every failed import searches sys.path again, about twice per request,
    which doubles what a request costs the client. A None in sys.modules fails it at once, and
    httpcore then assumes asyncio, which it is."""
    if importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


class _FleetWorker:
    def __init__(self, base_url: str, token: str, vins: list[str], first_index: int) -> None:
        _cheap_httpcore()
        import httpx

        self.httpx = httpx
        self.vehicles = [_Vehicle(v, first_index + i) for i, v in enumerate(vins)]
        # One client (one keep-alive connection) per vehicle: httpcore's pool costs more per
        # request the more connections it holds (2.5x at 16), and a logger has its own anyway.
        self.clients = {
            vehicle.vin: httpx.AsyncClient(
                base_url=base_url,
                headers={"Authorization": f"Bearer {token}"},
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                timeout=httpx.Timeout(60.0),
                verify=False,  # noqa: S501 (plain HTTP to 127.0.0.1: no TLS context to build)
            )
            for vehicle in self.vehicles
        }

    async def post(
        self, tally: _Tally, body: bytes, headers: dict[str, str], records: int = 1
    ) -> bool:
        client = self.clients[headers["X-Vehicle-VIN"]]
        sent = time.time()
        started = time.perf_counter()
        try:
            response = await client.post(UPLOAD_PATH, content=body, headers=headers)
            status = str(response.status_code)
        except self.httpx.HTTPError as exc:
            status = type(exc).__name__
        tally.latencies.append(time.perf_counter() - started)
        tally.first_send = min(tally.first_send, sent)
        tally.last_done = time.time()
        tally.sent += 1
        tally.bytes_sent += len(body)
        tally.statuses[status] += 1
        if status == "202":
            tally.records_accepted += records
            return True
        return False

    async def single(self, start: float, seconds: float) -> dict[str, Any]:
        tally, end = _Tally(), start + seconds

        async def drive(vehicle: _Vehicle) -> None:
            await _sleep_until(start)
            while time.time() < end:
                _, body = vehicle.next_record()
                await self.post(tally, body, vehicle.headers)

        await asyncio.gather(*(drive(vehicle) for vehicle in self.vehicles))
        return tally.result()

    def prepare_batch(self, records: int, batch_size: int, start_ms: int) -> dict[str, Any]:
        """Each vehicle's `records` readings from `start_ms` on, at the trace's period, encoded
        and cut into CompressedBatch bodies of `batch_size`."""
        total_bytes = 0
        for vehicle in self.vehicles:
            encoder = Encoder()
            samples = trace(vehicle.index, start_ms=start_ms)
            packets = [encoder.encode(next(samples)) for _ in range(records)]
            vehicle.batches = [
                (
                    len(packets[i : i + batch_size]),
                    wire.encode_batch(packets[i : i + batch_size], device_id=vehicle.vin),
                )
                for i in range(0, records, batch_size)
            ]
            total_bytes += sum(len(body) for _, body in vehicle.batches)
        return {"bytes": total_bytes}

    async def batch(self, start: float) -> dict[str, Any]:
        tally = _Tally()

        async def drive(vehicle: _Vehicle) -> None:
            await _sleep_until(start)
            for records, body in vehicle.batches:
                for attempt in range(BATCH_RETRIES + 1):
                    if await self.post(tally, body, vehicle.batch_headers, records):
                        break
                    if attempt < BATCH_RETRIES:
                        await asyncio.sleep(0.2)
            vehicle.batches = []

        await asyncio.gather(*(drive(vehicle) for vehicle in self.vehicles))
        return tally.result()

    async def paced(
        self, start: float, rate: float, seconds: float, offset: int, fleet_size: int
    ) -> dict[str, Any]:
        tally, end = _Tally(), start + seconds

        async def drive(vehicle: _Vehicle, number: int) -> None:
            for j in range(math.ceil(seconds * rate)):
                due = start + (number + j * fleet_size) / rate
                if due >= end:
                    break
                await _sleep_until(due)
                tally.max_lag = max(tally.max_lag, time.time() - due)
                stamp, body = vehicle.next_record()
                if await self.post(tally, body, vehicle.headers):
                    tally.accepted.append((vehicle.short, stamp))

        await asyncio.gather(
            *(drive(vehicle, offset + i) for i, vehicle in enumerate(self.vehicles))
        )
        return tally.result()


async def _fleet_worker(
    conn: Connection, base_url: str, token: str, vins: list[str], first_index: int
) -> None:
    worker = _FleetWorker(base_url, token, vins, first_index)
    commands = _command_queue(conn)
    conn.send({"vehicles": len(vins)})
    try:
        while True:
            command = await commands.get()
            match command:
                case ("single", start, seconds):
                    conn.send(await worker.single(start, seconds))
                case ("prepare_batch", records, batch_size, start_ms):
                    conn.send(worker.prepare_batch(records, batch_size, start_ms))
                case ("batch", start):
                    conn.send(await worker.batch(start))
                case ("paced", start, rate, seconds, offset, fleet_size):
                    conn.send(await worker.paced(start, rate, seconds, offset, fleet_size))
                case ("stop",):
                    break
    finally:
        await asyncio.gather(*(client.aclose() for client in worker.clients.values()))


def fleet_worker_main(
    conn: Connection, base_url: str, token: str, vins: list[str], first_index: int
) -> None:
    _process_main(_fleet_worker, conn, base_url, token, vins, first_index)


# --------------------------------------------------------------------------------------------
# Dashboard process


@dataclass
class _Watch:
    vehicles: frozenset[str] = frozenset()
    since_ms: int = 0
    vins: list[str] = field(default_factory=list)
    stamps: array[int] = field(default_factory=lambda: array("q"))
    received: array[float] = field(default_factory=lambda: array("d"))
    other: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    last_rx: float = 0.0


async def _dashboard(conn: Connection, url: str) -> None:
    from websockets.asyncio.client import connect

    commands = _command_queue(conn)
    watch = _Watch()
    loads, clock = orjson.loads, time.time
    async with connect(
        url, compression=None, ping_interval=None, max_size=None, proxy=None, open_timeout=30
    ) as ws:
        greeting = [loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(3)]

        async def read() -> None:
            async for raw in ws:
                now = clock()
                try:
                    message = loads(raw)
                    kind = message.get("type")
                    if kind == "telemetry" and message["vehicle_vin"] in watch.vehicles:
                        stamp = message["data"]["timestamp"]
                        if stamp >= watch.since_ms:
                            watch.vins.append(message["vehicle_vin"])
                            watch.stamps.append(stamp)
                            watch.received.append(now)
                            watch.last_rx = now
                            continue
                    watch.other[str(kind)] += 1
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    watch.malformed += 1

        reader = asyncio.create_task(read())
        conn.send({"greeting": [message.get("type") for message in greeting]})
        try:
            while True:
                command = await commands.get()
                match command:
                    case ("arm", vehicles, since_ms):
                        watch = _Watch(vehicles=frozenset(vehicles), since_ms=since_ms)
                        conn.send(True)
                    case ("count",):
                        conn.send((len(watch.stamps), watch.last_rx, reader.done()))
                    case ("collect",):
                        conn.send(
                            {
                                "vins": watch.vins,
                                "stamps": watch.stamps.tobytes(),
                                "received": watch.received.tobytes(),
                                "other": dict(watch.other),
                                "malformed": watch.malformed,
                                "closed": reader.done(),
                            }
                        )
                    case ("stop",):
                        break
        finally:
            reader.cancel()


def dashboard_main(conn: Connection, url: str) -> None:
    _process_main(_dashboard, conn, url)


# --------------------------------------------------------------------------------------------
# Coordinator-side handles


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One job's results from every process, as one."""
    statuses: Counter[str] = Counter()
    latencies = array("d")
    merged: dict[str, Any] = {
        "first_send": math.inf,
        "last_done": 0.0,
        "sent": 0,
        "records_accepted": 0,
        "bytes_sent": 0,
        "max_lag": 0.0,
        "accepted": [],
    }
    for result in results:
        statuses.update(result["statuses"])
        latencies.frombytes(result["latencies"])
        merged["first_send"] = min(merged["first_send"], result["first_send"])
        merged["last_done"] = max(merged["last_done"], result["last_done"])
        merged["max_lag"] = max(merged["max_lag"], result["max_lag"])
        for key in ("sent", "records_accepted", "bytes_sent"):
            merged[key] += result[key]
        merged["accepted"] += result["accepted"]
    merged["statuses"] = dict(statuses)
    merged["latencies"] = sorted(latencies)
    return merged


class Fleet:
    """`vins` driven by `workers` processes (vehicles dealt out in contiguous slices)."""

    def __init__(self, base_url: str, token: str, vins: list[str], *, workers: int) -> None:
        self.vins = vins
        self.children: list[_Child] = []
        share = [
            len(vins) // workers + (1 if i < len(vins) % workers else 0) for i in range(workers)
        ]
        first = 0
        for number, size in enumerate(share):
            if size:
                self.children.append(
                    _Child(
                        fleet_worker_main,
                        base_url,
                        token,
                        vins[first : first + size],
                        first,
                        name=f"fleet-{number}",
                    )
                )
            first += size
        self.offsets = [sum(share[:i]) for i in range(len(self.children))]
        for child in self.children:
            child.reply(REPLY_TIMEOUT)

    @property
    def pids(self) -> list[int]:
        return [pid for child in self.children if (pid := child.pid) is not None]

    def run(
        self,
        *commands: tuple[Any, ...],
        while_waiting: Callable[[], None] | None = None,
        timeout: float = REPLY_TIMEOUT,
        send: bool = True,
    ) -> list[Any]:
        """Send `commands[i]` to process i (or `commands[0]` to all; nothing with `send=False`,
        when the caller sent them); return their replies, calling `while_waiting` about every
        0.05 s until all have answered."""
        if send:
            for i, child in enumerate(self.children):
                child.conn.send(commands[i] if len(commands) > 1 else commands[0])
        replies: list[Any] = [None] * len(self.children)
        waiting = set(range(len(self.children)))
        deadline = time.monotonic() + timeout
        while waiting:
            for i in sorted(waiting):
                if self.children[i].conn.poll(0.0):
                    replies[i] = self.children[i].reply(1.0)
                    waiting.discard(i)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet processes {sorted(waiting)} did not answer")
            if while_waiting is not None:
                while_waiting()
            time.sleep(0.02)
        return replies

    def stop(self) -> None:
        for child in self.children:
            child.stop()


class Dashboard:
    def __init__(self, url: str) -> None:
        self.child = _Child(dashboard_main, url, name="dashboard")
        self.greeting = self.child.reply(60)

    def arm(self, vehicles: list[str], since_ms: int) -> None:
        self.child.ask("arm", vehicles, since_ms)

    def count(self) -> tuple[int, float, bool]:
        count, last_rx, closed = self.child.ask("count")
        return count, last_rx, closed

    def collect(self) -> dict[str, Any]:
        data: dict[str, Any] = self.child.ask("collect")
        stamps, received = array("q"), array("d")
        stamps.frombytes(data["stamps"])
        received.frombytes(data["received"])
        data["stamps"], data["received"] = list(stamps), list(received)
        return data

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def stop(self) -> None:
        self.child.stop()
