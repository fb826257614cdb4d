"""Load generator for the Omega occupancy path: WebSocket clients and one camera-model producer.

Each part runs in its own process (asyncio, the `websockets` library, uvloop when installed) and
is driven by the coordinator over a pipe, one request and one reply at a time:

- `ClientPool`: `workers` processes, each holding `clients // workers` connections to the client
  endpoint. A client records, for every message whose `timestamp` is at or after the armed step
  start, `time.time() - timestamp` (older ones are the snapshot or a previous step: counted apart).
- `Producer`: one connection to the model endpoint that sends frame results on an absolute
  schedule (`start + i / rate`), several per wake-up when the rate is above the timer's
  resolution, and counts the error frames it gets back.

The coordinator itself never runs an event loop; it only talks to the pipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import orjson

from edgeway.occupancy.settings import OMEGA_PLACES

MODEL_PATH = "/model/ws/connect"
CLIENT_PATH = "/client/ws/connect"

# Project Omega's camera -> location mapping, as the occupancy service seeds it.
PLACES: dict[str, str] = dict(OMEGA_PLACES)
CAMERAS = tuple(PLACES)
UPDATE_KEYS = frozenset({"location_name", "timestamp", "people_detected", "occupancy_percent"})
ZONES = 6  # ROI zones (tables) per camera in the generated frames
REPLY_TIMEOUT = 120.0  # seconds the coordinator waits for any process to answer a command


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (the gateway runs on uvloop too)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


# --------------------------------------------------------------------------------------------
# Frames and the Omega transform


def frame(camera: str, variant: int, timestamp: float) -> dict[str, Any]:
    """One Omega frame result (~330 bytes); `variant` changes the counts from frame to frame."""
    occupied_count = variant % ZONES + (1 if variant % 2 else 0)
    occupied_count = min(occupied_count, ZONES)
    names = [f"table_{z + 1}" for z in range(ZONES)]
    occupied, free = names[:occupied_count], names[occupied_count:]
    people = 3 * occupied_count + variant % 3
    return {
        "event": "frame_result",
        "camera": camera,
        "timestamp": timestamp,
        "summary": {"total_people": people, "free": free, "occupied": occupied},
        "segments": [
            {
                "index": z,
                "name": name,
                "capacity": 2,
                "count": 3 if name in occupied else 0,
                "status": "occupied" if name in occupied else "free",
            }
            for z, name in enumerate(names[:2])
        ],
    }


def frame_templates() -> list[dict[str, Any]]:
    """Frames cycling over every camera, each camera's counts changing from one to the next."""
    return [frame(CAMERAS[k % len(CAMERAS)], k // len(CAMERAS), 0.0) for k in range(7 * 12)]


def omega_update(frame_result: dict[str, Any]) -> dict[str, Any]:
    """Omega's `transform_to_client_data`: what a client must receive for a frame."""
    summary = frame_result["summary"]
    free, occupied = len(summary["free"]), len(summary["occupied"])
    return {
        "location_name": PLACES[frame_result["camera"]],
        "timestamp": frame_result["timestamp"],
        "people_detected": summary["total_people"],
        "occupancy_percent": occupied / (free + occupied) * 100,
    }


def check_update(received: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Differences between a received client update and the expected one (empty: identical)."""
    problems = []
    if set(received) != set(expected):
        problems.append(f"keys {sorted(received)} instead of {sorted(expected)}")
    for key, value in expected.items():
        got = received.get(key)
        if key == "occupancy_percent" and isinstance(got, int | float):
            if abs(got - value) > 1e-9:
                problems.append(f"{key}={got!r}, expected {value!r}")
        elif got != value or type(got) is not type(value):
            problems.append(f"{key}={got!r}, expected {value!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Pipe plumbing shared by the worker processes


def _command_queue(conn: Connection) -> asyncio.Queue[tuple[Any, ...]]:
    """Commands from the coordinator, read without blocking the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def readable() -> None:
        try:
            queue.put_nowait(conn.recv())
        except EOFError:  # the coordinator is gone
            loop.remove_reader(conn.fileno())
            queue.put_nowait(("stop",))

    loop.add_reader(conn.fileno(), readable)
    # The event loop makes the descriptor non-blocking; replies (several MB of latencies) are
    # written with plain blocking sends on the same duplex pipe.
    os.set_blocking(conn.fileno(), True)
    return queue


def _process_main(body: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    # Ctrl-C reaches the whole process group: the coordinator alone handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_loop(body(*args))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - one line; the coordinator reports the exit
        name = multiprocessing.current_process().name
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# Client worker process


@dataclass
class _Collector:
    clients: int
    t0: float = float("inf")
    latencies: array[float] = field(default_factory=lambda: array("d"))
    counts: list[int] = field(default_factory=list)
    seen: list[set[float]] = field(default_factory=list)  # timestamps each client got
    duplicates: int = 0
    duplicate_samples: list[str] = field(default_factory=list)
    total: int = 0  # every message since the start, stale ones included
    stale: int = 0
    malformed: int = 0
    samples: dict[float, str] = field(default_factory=dict)  # first copy of some frames
    last_rx: float = 0.0  # receive time of the latest counted message
    connected: int = 0
    disconnected: int = 0
    sockets: list[Any] = field(default_factory=list)  # open connections, to close at the end
    errors: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.arm(self.t0)

    def arm(self, t0: float) -> None:
        self.t0 = t0
        self.latencies = array("d")
        self.counts = [0] * self.clients
        self.seen = [set() for _ in range(self.clients)]
        self.duplicates = 0
        self.duplicate_samples = []
        self.stale = 0
        self.malformed = 0
        self.samples = {}
        self.last_rx = 0.0


async def _client(url: str, index: int, col: _Collector, ready: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    loads, clock = orjson.loads, time.time
    try:
        async with connect(
            url, compression=None, ping_interval=None, max_size=None, proxy=None, open_timeout=60
        ) as ws:
            col.connected += 1
            col.sockets.append(ws)
            if col.connected + sum(col.errors.values()) >= col.clients:
                ready.set()
            async for message in ws:
                now = clock()
                col.total += 1
                try:
                    update = loads(message)
                    timestamp = update["timestamp"]
                    if timestamp >= col.t0:
                        seen = col.seen[index]
                        if timestamp in seen:
                            col.duplicates += 1
                            if len(col.duplicate_samples) < 5:
                                col.duplicate_samples.append(
                                    f"client {index} after {(now - timestamp) * 1000:.0f} ms:"
                                    f" {message!s}"
                                )
                            continue
                        seen.add(timestamp)
                        col.latencies.append(now - timestamp)
                        col.counts[index] += 1
                        col.last_rx = now
                        if len(col.samples) < 20 and timestamp not in col.samples:
                            col.samples[timestamp] = (
                                message if isinstance(message, str) else message.decode()
                            )
                        if len(update) != len(UPDATE_KEYS):
                            col.malformed += 1
                    else:
                        col.stale += 1
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    col.malformed += 1
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        col.errors[type(exc).__name__] += 1
        if col.connected + sum(col.errors.values()) >= col.clients:
            ready.set()
        return
    col.disconnected += 1


async def _client_worker(conn: Connection, url: str, clients: int) -> None:
    col = _Collector(clients)
    ready = asyncio.Event()
    commands = _command_queue(conn)
    tasks = [asyncio.create_task(_client(url, i, col, ready)) for i in range(clients)]
    await ready.wait()
    conn.send({"connected": col.connected, "errors": dict(col.errors)})
    while True:
        command = await commands.get()
        match command:
            case ("arm", t0):
                col.arm(t0)
                conn.send(True)
            case ("count",):
                conn.send(sum(col.counts))
            case ("total",):
                conn.send(col.total)
            case ("collect",):
                conn.send(
                    {
                        "latencies": col.latencies.tobytes(),
                        "counts": list(col.counts),
                        "stale": col.stale,
                        "malformed": col.malformed,
                        "duplicates": col.duplicates,
                        "duplicate_samples": col.duplicate_samples,
                        "samples": list(col.samples.values()),
                        "last_rx": col.last_rx,
                        "connected": col.connected,
                        "disconnected": col.disconnected,
                        "errors": dict(col.errors),
                    }
                )
            case ("stop",):
                break
    # A normal close (1000) for every client, then whatever is left is cancelled.
    closing = [asyncio.create_task(ws.close()) for ws in col.sockets]
    if closing:
        await asyncio.wait(closing, timeout=5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def client_worker_main(conn: Connection, url: str, clients: int) -> None:
    _process_main(_client_worker, conn, url, clients)


# --------------------------------------------------------------------------------------------
# Producer process


async def _read_replies(ws: Any, errors: Counter[str], samples: list[str]) -> None:
    """The producer's side of the socket: every error frame the server sends back."""
    async for message in ws:
        try:
            kind = orjson.loads(message)
            code = str(kind.get("code")) if kind.get("type") == "error" else "other"
        except (orjson.JSONDecodeError, AttributeError):
            code = "unparseable"
        errors[code] += 1
        if len(samples) < 5:
            samples.append(message if isinstance(message, str) else message.decode())


async def _run_schedule(
    ws: Any,
    templates: list[dict[str, Any]],
    seq: list[int],
    rate: float,
    duration: float,
    start: float,
) -> dict[str, Any]:
    """Send `rate * duration` frames, frame i due at `start + i / rate` (no drift)."""
    dumps, clock = orjson.dumps, time.time
    total = max(1, round(rate * duration))
    n_templates = len(templates)
    await asyncio.sleep(max(0.0, start - clock()))
    sent, max_lag, batches = 0, 0.0, 0
    first = last = clock()
    while sent < total:
        now = clock()
        due = min(total, int((now - start) * rate) + 1)
        if due > sent:
            batches += 1
            max_lag = max(max_lag, now - (start + sent / rate))
            while sent < due:
                template = templates[seq[0] % n_templates]
                seq[0] += 1
                last = template["timestamp"] = clock()
                if sent == 0:
                    first = last
                await ws.send(dumps(template).decode())
                sent += 1
        if sent < total:
            delay = start + sent / rate - clock()
            await asyncio.sleep(delay if delay > 0 else 0)
    span = last - start + 1 / rate
    return {
        "sent": sent,
        "planned": total,
        "first_ts": first,
        "last_ts": last,
        "achieved_rate": sent / span if span > 0 else 0.0,
        "max_lag_ms": max_lag * 1000,
        "batches": batches,
    }


async def _producer(conn: Connection, url: str) -> None:
    from websockets.asyncio.client import connect

    commands = _command_queue(conn)
    errors: Counter[str] = Counter()
    samples: list[str] = []
    templates, seq = frame_templates(), [0]
    async with connect(
        url, compression=None, ping_interval=None, max_size=None, proxy=None, open_timeout=60
    ) as ws:
        reader = asyncio.create_task(_read_replies(ws, errors, samples))
        conn.send({"connected": True, "frame_bytes": len(orjson.dumps(templates[0]))})
        while True:
            command = await commands.get()
            match command:
                case ("run", rate, duration, start):
                    conn.send(await _run_schedule(ws, templates, seq, rate, duration, start))
                case ("send", frame_result):
                    await ws.send(orjson.dumps(frame_result).decode())
                    conn.send(True)
                case ("errors",):
                    conn.send({"codes": dict(errors), "samples": list(samples)})
                case ("stop",):
                    break
        reader.cancel()


def producer_main(conn: Connection, url: str) -> None:
    _process_main(_producer, conn, url)


# --------------------------------------------------------------------------------------------
# Coordinator-side handles


class _Child:
    """A worker process and the coordinator's end of its pipe."""

    def __init__(self, target: Callable[..., None], *args: Any, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=target, args=(child_conn, *args), name=name, daemon=True
        )
        self.process.start()
        child_conn.close()

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Any:
        try:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"{self.process.name} did not answer in {timeout}s")
            return self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"{self.process.name} exited (code {self.process.exitcode}); see its stderr"
            ) from None

    def ask(self, *command: Any, timeout: float = REPLY_TIMEOUT) -> Any:
        self.conn.send(command)
        return self.reply(timeout)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop",))
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid


class ClientPool:
    """`clients` WebSocket clients spread over `workers` processes."""

    def __init__(self, url: str, *, clients: int, workers: int) -> None:
        self.url = url
        self.clients = clients
        self.workers: list[_Child] = []
        share = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
        for i, n in enumerate(share):
            self.workers.append(_Child(client_worker_main, url, n, name=f"bench-clients-{i}"))

    def wait_connected(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        connected, errors = 0, Counter[str]()
        for worker in self.workers:
            answer = worker.reply(timeout)
            connected += answer["connected"]
            errors.update(answer["errors"])
        self.connected = connected
        return {"connected": connected, "errors": dict(errors)}

    def arm(self, t0: float) -> None:
        for worker in self.workers:
            worker.conn.send(("arm", t0))
        for worker in self.workers:
            worker.reply()

    def count(self) -> int:
        """Distinct deliveries counted since the last `arm`."""
        return self._sum("count")

    def total(self) -> int:
        """Every message received since the start, whatever its timestamp."""
        return self._sum("total")

    def _sum(self, command: str) -> int:
        for worker in self.workers:
            worker.conn.send((command,))
        return sum(worker.reply() for worker in self.workers)

    def collect(self) -> dict[str, Any]:
        for worker in self.workers:
            worker.conn.send(("collect",))
        merged: dict[str, Any] = {
            "latencies": array("d"),
            "counts": [],
            "stale": 0,
            "malformed": 0,
            "duplicates": 0,
            "duplicate_samples": [],
            "samples": [],
            "last_rx": 0.0,
            "connected": 0,
            "disconnected": 0,
            "errors": Counter[str](),
        }
        for worker in self.workers:
            part = worker.reply()
            merged["latencies"].frombytes(part["latencies"])
            merged["counts"].extend(part["counts"])
            merged["duplicate_samples"] += part["duplicate_samples"]
            for key in ("stale", "malformed", "duplicates", "connected", "disconnected"):
                merged[key] += part[key]
            merged["last_rx"] = max(merged["last_rx"], part["last_rx"])
            merged["samples"] += part["samples"]
            merged["errors"].update(part["errors"])
        merged["errors"] = dict(merged["errors"])
        return merged

    @property
    def pids(self) -> list[int]:
        return [pid for worker in self.workers if (pid := worker.pid) is not None]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


class Producer:
    """One camera-model connection sending frame results on a schedule."""

    def __init__(self, url: str) -> None:
        self.child = _Child(producer_main, url, name="bench-producer")

    def wait_connected(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        answer: dict[str, Any] = self.child.reply(timeout)
        return answer

    def run(self, rate: float, duration: float, start: float) -> dict[str, Any]:
        result: dict[str, Any] = self.child.ask(
            "run", rate, duration, start, timeout=duration + REPLY_TIMEOUT
        )
        return result

    def send(self, frame_result: dict[str, Any]) -> None:
        self.child.ask("send", frame_result)

    def errors(self) -> dict[str, Any]:
        result: dict[str, Any] = self.child.ask("errors")
        return result

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def stop(self) -> None:
        self.child.stop()
