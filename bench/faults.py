"""The reliability fault suite: the whole stack as real processes, faults injected while the
producers keep sending, and exact counts of what was accepted, stored, delivered, lost and
duplicated (issue 21, item 4).

Every service reaches RabbitMQ, and each service that owns one its PostgreSQL database, through
its own `FaultProxy`, so a scenario can cut the broker away from one service, or the database
from all of them, while everything else runs. Four paths carry traffic throughout, each
producer retrying as its real counterpart does:

- occupancy: an Omega camera model on `WS /model/ws/connect` (reconnects when the socket goes),
  a healthy Omega client on `WS /client/ws/connect` (delivered, and its latency), the
  `observations` rows (stored). A frame's identity is (camera, total_people).
- telemetry: the edge logger itself (`edgeway.edge.telemetry_logger`: SQLite outbox, retries
  408/5xx and timeouts, obeying Retry-After), one vehicle per scenario, the `telemetry` rows
  (stored). A record's identity is its timestamp.
- ingestion: an uploader that sends one JPEG per request and sends it again on 503 or no answer
  (after the Retry-After); stored means a `frames` row whose object is in the S3 store. A
  file's identity is the `meta` it was uploaded with.
- video (live and lossy by design, so counted apart): a phone on `WS /ws/video` sending the
  synthetic pattern, each frame's number drawn into its pixels, and a viewer on
  `WS /ws/video/consume` that decodes and reads the numbers back: frames sent and decoded.

Accepted means what the producer was told was taken: 202 for HTTP, and for the Omega socket an
ack (the camera speaks the acknowledged wire, `?ack=1`: Omega's own has no acknowledgement, so
a frame in flight when the gateway dies would be lost unknown to it). Lost = accepted and never
stored; duplicated = stored more than once. Told = the answers that said "not taken" (503,
error frames, a refused or dropped connection). Recovery = from the fault's end until a probe
goes end to end on every path again (a probe frame reaches the healthy client; a probe record
and a probe file are stored; the viewer decodes a frame the phone sent after the fault's end).

    .venv/bin/python -m bench.faults            # every scenario, full durations (`make faults`)
    .venv/bin/python -m bench.faults --short    # seconds per fault (what `make test` runs)
    .venv/bin/python -m bench.faults --only "kill -9 occupancy" --only "PostgreSQL cut: all"
    .venv/bin/python -m bench.faults --short --keep-logs var/faults   # the services' logs, kept

It prints one table row per scenario and writes JSON to bench/results/faults.json; it asserts
nothing (`tests/test_faults.py` runs the short scenarios and asserts the correctness goals).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import itertools
import json
import socket
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import psycopg
import websockets
from minio import Minio
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from edgeway.common.logging import configure_logging
from edgeway.common.telemetry import wire
from edgeway.common.testing import (
    AMQP_HOST,
    ServiceProcess,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    make_token,
)
from edgeway.common.testing.faults import FaultProxy
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server
from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.edge.control import LogType
from edgeway.edge.pacing import Backoff
from edgeway.edge.phone.media import frame_number, synthetic_stream
from edgeway.edge.telemetry_logger import TelemetryLogger
from edgeway.edge.traces import highway
from tests.stack import CAMERAS, Stack, frame

RESULTS = Path(__file__).resolve().parent / "results"
BUCKET = "fault-frames"
SERVICES = ("gateway", "occupancy", "telemetry", "ingestion", "video-relay")
DATABASES = {  # the services that own a database, and the setting that names it
    "occupancy": "EDGEWAY_OCCUPANCY_DATABASE_URL",
    "telemetry": "EDGEWAY_TELEMETRY_DATABASE_URL",
    "ingestion": "EDGEWAY_INGESTION_DATABASE_URL",
}
VIN_PREFIX = "5YJ3E1EA1KF"  # + six digits: one vehicle per scenario
PROBE_VIN = VIN_PREFIX + "999999"
PEOPLE_PER_SCENARIO = 6_000  # per camera; a scenario's frames use its own range of counts
PROBE_PEOPLE = 99_000  # and probes the range above every scenario's (the schema allows 100 000)
OCCUPANCY_RATE = 35.0  # frames/s over the seven cameras
TELEMETRY_PERIOD_S = 0.02  # one record every 20 ms
UPLOAD_RATE = 2.0  # files/s
RECONNECT_S = 0.5  # the camera and the clients; Omega's camera waits 5 s, which only adds idle
# The logger's own backoff, shortened from 0.5-30 s so a 30 s outage does not leave it asleep
# for another 30; the uploader waits what Retry-After asks, at most this long.
LOGGER_BACKOFF = Backoff(initial=0.25, maximum=2.0)
MAX_RETRY_AFTER_S = 5.0
PROBE_EVERY_S = 0.25
VIDEO_DEVICE = "fault-phone-{}"  # one per scenario: the relay keeps a device's last GOP
VIDEO_SIZE = (320, 192)  # the end-to-end video tests' size
VIDEO_FPS = 10.0
VIDEO_GOP_S = 1.0
VIDEO_MAX_S = 600.0  # longer than any scenario; encoded as it is sent
CLIENT_QUEUE_SIZE = 64


@dataclass(frozen=True)
class Durations:
    kill_down_s: float  # how long a killed service stays down before its restart
    broker_cut_s: float
    database_cut_s: float
    clients_s: float  # the slow and stuck clients' stay
    warmup_s: float  # traffic before the fault
    settle_s: float  # traffic after recovery
    recovery_limit_s: float  # give up on the probes after this long
    drain_limit_s: float  # and on everything accepted being stored


FULL = Durations(
    kill_down_s=5,
    broker_cut_s=30,
    database_cut_s=90,  # longer than a delivery-limit window
    clients_s=30,
    warmup_s=3,
    settle_s=3,
    recovery_limit_s=120,
    drain_limit_s=120,
)
SHORT = Durations(
    kill_down_s=1,
    broker_cut_s=3,
    database_cut_s=3,
    clients_s=4,
    warmup_s=1.5,
    settle_s=1,
    recovery_limit_s=60,
    drain_limit_s=60,
)


# --- the stack behind its proxies ------------------------------------------------------------


@dataclass
class Links:
    """One service's own ways to RabbitMQ and to its database."""

    broker: FaultProxy
    database: FaultProxy | None


class FaultStack:
    """The gateway, occupancy, telemetry, ingestion and the video relay on a private virtual
    host and fresh databases, each connection through a `FaultProxy`, with a real S3 server
    (moto). A start that fails stops what it had started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.vhost = ""
        self.databases: dict[str, str] = {}
        self.links: dict[str, Links] = {}
        self.s3 = S3Server(workdir / "moto.log")
        self.stack: Stack | None = None

    def start(self) -> FaultStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        host, port = AMQP_HOST.rsplit(":", 1)
        self.vhost, amqp_url = create_vhost("edgeway-faults")
        for service in DATABASES:
            self.databases[service] = create_postgres_database(f"edgeway_faults_{service}")
        self.s3.start()
        service_env: dict[str, dict[str, str]] = {}
        for service in SERVICES:
            broker = FaultProxy(upstream=(host, int(port))).start()
            env = {"EDGEWAY_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{broker.port}/{self.vhost}"}
            database = None
            if service in DATABASES:
                url = self.databases[service]
                address, name = url.rsplit("/", 1)
                db_host, db_port = address.rsplit("@", 1)[1].rsplit(":", 1)
                database = FaultProxy(upstream=(db_host, int(db_port))).start()
                proxied = f"{address.rsplit(':', 1)[0]}:{database.port}/{name}"
                env[DATABASES[service]] = proxied
            self.links[service] = Links(broker, database)
            service_env[service] = env
        # A client 64 messages behind starts losing its oldest (1024 by default, half a minute
        # of this suite's traffic): the slow and stuck clients are felt within seconds.
        service_env["gateway"]["EDGEWAY_CLIENT_QUEUE_SIZE"] = str(CLIENT_QUEUE_SIZE)
        vehicles = [vin(index) for index in range(100)] + [PROBE_VIN]
        self.stack = Stack(
            amqp_url,
            self.databases["occupancy"],
            self.workdir,
            extra_env={
                "EDGEWAY_LOG_LEVEL": "WARNING",
                "EDGEWAY_TELEMETRY_VEHICLES": json.dumps(vehicles),
            },
            telemetry_database_url=self.databases["telemetry"],
            ingestion_env={**self.s3.env, "EDGEWAY_STORAGE_BUCKET": BUCKET},
            video_relay=True,
            service_env=service_env,
        )
        self.stack.start()

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        for links in self.links.values():
            links.broker.stop()
            if links.database is not None:
                links.database.stop()
        self.s3.stop()
        for url in self.databases.values():
            drop_postgres_database(url)
        if self.vhost:
            drop_vhost(self.vhost)

    def process(self, service: str) -> ServiceProcess:
        stack = self.running
        processes = {
            "gateway": stack.gateway,
            "occupancy": stack.occupancy,
            "telemetry": stack.telemetry,
            "ingestion": stack.ingestion,
            "video-relay": stack.relay,
        }
        process = processes[service]
        if process is None:
            raise ValueError(f"{service} is not part of the fault stack")
        return process

    @property
    def running(self) -> Stack:
        if self.stack is None:
            raise RuntimeError("the fault stack is not started")
        return self.stack

    def query(self, service: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Straight to the database, never through the proxy: the suite's own reads."""
        with psycopg.connect(self.databases[service]) as connection:
            return connection.execute(sql, params).fetchall()

    def objects(self) -> set[str]:
        client = Minio(self.s3.endpoint, ACCESS_KEY, SECRET_KEY, secure=False)
        if not client.bucket_exists(BUCKET):
            return set()
        found = client.list_objects(BUCKET, prefix="frames/", recursive=True)
        return {item.object_name for item in found if item.object_name}


def vin(index: int) -> str:
    return f"{VIN_PREFIX}{index:06d}"


# --- occupancy: the camera model and the clients ---------------------------------------------


class OmegaCamera:
    """Frames for the seven cameras at `rate`, reconnecting when the socket goes, as Omega's
    camera does, on the acknowledged wire (`?ack=1`): each frame is answered with an ack once
    the broker confirmed it, or an error frame naming it, and what a dropped connection left
    unanswered is sent again, unchanged, on the next one (the gateway gives it the same message
    id, so it is stored once). Frame n is (CAMERAS[n % 7], base + n // 7)."""

    def __init__(self, url: str, *, base: int, rate: float = OCCUPANCY_RATE) -> None:
        self.url = url + ("&" if "?" in url else "?") + "ack=1"
        self.base = base
        self.rate = rate
        self.sent: list[tuple[str, int]] = []  # each frame once, however often it was sent
        self.acked: set[tuple[str, int]] = set()
        self.errors: Counter[str] = Counter()  # error frames by code
        self.refused: set[tuple[str, int]] = set()
        self.resent = 0
        self.dropped = 0  # connections refused or broken under it
        # Sent on the connection that is open, by seq, until answered.
        self._waiting: dict[int, tuple[tuple[str, int], str]] = {}
        self._answered = asyncio.Event()  # nothing waits for an answer

    def identity(self, index: int) -> tuple[str, int]:
        return CAMERAS_LIST[index % len(CAMERAS_LIST)], self.base + index // len(CAMERAS_LIST)

    @property
    def told(self) -> int:
        return sum(self.errors.values()) + self.dropped

    @property
    def accepted(self) -> int:
        return len(self.acked)

    async def run(self, stop: asyncio.Event) -> None:
        index = 0
        # Sent on a connection that went before answering: sent again, in order, on the next.
        unanswered: list[tuple[tuple[str, int], str]] = []
        while not stop.is_set():
            self._waiting = {}
            seq = 0
            try:
                async with websockets.connect(self.url, open_timeout=3, compression=None) as ws:
                    reader = asyncio.create_task(self._read(ws))
                    while unanswered:
                        seq += 1
                        self._waiting[seq] = unanswered.pop(0)
                        await ws.send(self._waiting[seq][1])
                        self.resent += 1
                    while not stop.is_set():
                        key = self.identity(index)
                        if key[1] >= self.base + PEOPLE_PER_SCENARIO:
                            raise RuntimeError("the scenario outran its range of frame ids")
                        raw = json.dumps(frame(key[0], people=key[1]))
                        seq += 1
                        self._waiting[seq] = (key, raw)
                        self.sent.append(key)
                        index += 1
                        await ws.send(raw)
                        await asyncio.sleep(1 / self.rate)
                    if self._waiting:  # answers for the last frames sent
                        self._answered.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._answered.wait(), 5.0)
                    reader.cancel()
            except (OSError, TimeoutError, websockets.WebSocketException):
                self.dropped += 1
                await asyncio.sleep(RECONNECT_S)
            # A connection that never opened leaves `unanswered` as it was.
            unanswered = [self._waiting[seq] for seq in sorted(self._waiting)] + unanswered

    async def _read(self, ws: websockets.ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for reply in ws:
                answer = json.loads(reply)
                if answer.get("type") == "ack":
                    key, _ = self._waiting.pop(answer["seq"])
                    self.acked.add(key)
                else:
                    self.errors[answer.get("code", "?")] += 1
                    seq = (answer.get("details") or {}).get("seq")
                    if seq in self._waiting:  # refused at the gateway (else by the service)
                        key, _ = self._waiting.pop(seq)
                        self.refused.add(key)
                if not self._waiting:
                    self._answered.set()


CAMERAS_LIST = list(CAMERAS)
LOCATIONS = {location: camera for camera, location in CAMERAS.items()}


class OmegaClient:
    """A client on `/client/ws/connect`, reconnecting when the socket goes. `pause`: seconds it
    waits after each message (a slow client)."""

    def __init__(self, url: str, *, pause: float = 0.0) -> None:
        self.url = url
        self.pause = pause
        self.delivered: Counter[tuple[str, int]] = Counter()
        # The first copy's (the frame's own timestamp, seconds from it to here).
        self.latency_s: dict[tuple[str, int], tuple[float, float]] = {}
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self._connect() as ws:
                    self.connected.set()
                    await self._read(ws, stop)
            except (OSError, TimeoutError, websockets.WebSocketException):
                await asyncio.sleep(RECONNECT_S)

    def _connect(self) -> websockets.connect:
        if not self.pause:
            return websockets.connect(self.url, open_timeout=3, compression=None)
        # A slow client's small buffers: the gateway feels it within seconds, not after the
        # kernel has taken a minute of this traffic.
        return websockets.connect(
            self.url, sock=small_socket(self.url), open_timeout=3, compression=None, max_queue=1
        )

    async def _read(self, ws: websockets.ClientConnection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            now = time.time()
            update = json.loads(raw)
            key = (LOCATIONS.get(update["location_name"], "?"), update["people_detected"])
            self.delivered[key] += 1
            timestamp = update.get("timestamp")
            if isinstance(timestamp, int | float):
                self.latency_s.setdefault(key, (timestamp, now - timestamp))
            if self.pause:
                await asyncio.sleep(self.pause)


def small_socket(url: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


async def stuck_client(url: str, stop: asyncio.Event) -> None:
    """A client that completes the WebSocket handshake, then never reads a byte again (a
    websockets client would go on reading into its own buffers)."""
    target = "/" + url.split("//", 1)[1].split("/", 1)[1]
    host = url.split("//", 1)[1].split("/", 1)[0]
    key = base64.b64encode(uuid.uuid4().bytes).decode()
    reader, writer = await asyncio.open_connection(sock=small_socket(url))
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"the stuck client was refused: {head[:80]!r}")
    try:
        await stop.wait()
    finally:
        writer.transport.abort()


# --- video: a phone and a viewer ------------------------------------------------------------


class Phone:
    """A phone on `WS /ws/video`: the synthetic pattern (each frame's number drawn into its
    pixels) at VIDEO_FPS, one message per frame. When its socket goes it reconnects and starts
    again at the next keyframe, as the app's encoder does."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[int] = []  # frame numbers, as sent
        self.dropped = 0
        self._frames = self._numbered(
            synthetic_stream(*VIDEO_SIZE, VIDEO_FPS, VIDEO_MAX_S, gop_s=VIDEO_GOP_S)
        )

    @staticmethod
    def _numbered(packets: Iterator[VideoPacket]) -> Iterator[tuple[int, bool, bytes]]:
        """(frame number, starts a GOP, the frame's message) for each frame."""
        held: list[VideoPacket] = []
        for number in itertools.count():
            for packet in packets:
                held.append(packet)
                if packet.type in (PacketType.KEYFRAME, PacketType.FRAME):
                    break
            else:
                return
            keyframe = held[0].type is PacketType.SPS
            yield number, keyframe, b"".join(packet.encode() for packet in held)
            held = []

    async def run(self, stop: asyncio.Event) -> None:
        need_keyframe = False
        while not stop.is_set():
            try:
                async with websockets.connect(self.url, open_timeout=3, compression=None) as ws:
                    for number, keyframe, message in self._frames:
                        if stop.is_set():
                            return
                        if need_keyframe and not keyframe:
                            continue
                        need_keyframe = False
                        await ws.send(message)
                        self.sent.append(number)
                        await asyncio.sleep(1 / VIDEO_FPS)
                    return  # the pattern ran out (VIDEO_MAX_S)
            except (OSError, TimeoutError, websockets.WebSocketException):
                self.dropped += 1
                need_keyframe = True
                await asyncio.sleep(RECONNECT_S)


class Viewer:
    """A viewer on `WS /ws/video/consume`: decodes what it gets and reads each frame's number
    back from its pixels. Reconnects (with a fresh decoder) when its socket goes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.decoded: Counter[int] = Counter()
        self.latest = -1
        self.advanced = asyncio.Event()  # set by each newer frame

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            decoder = av.CodecContext.create("h264", "r")
            try:
                async with websockets.connect(
                    self.url, open_timeout=3, compression=None, max_size=None
                ) as ws:
                    while not stop.is_set():
                        try:
                            message = await asyncio.wait_for(ws.recv(), 0.5)
                        except TimeoutError:
                            continue
                        if isinstance(message, bytes):
                            self._decode(decoder, message)
            except (OSError, TimeoutError, websockets.WebSocketException):
                await asyncio.sleep(RECONNECT_S)

    def _decode(self, decoder: Any, payload: bytes) -> None:
        try:
            for packet in decoder.parse(payload):
                for picture in decoder.decode(packet):
                    number = frame_number(picture.to_ndarray(format="yuv420p"))
                    self.decoded[number] += 1
                    if number > self.latest:
                        self.latest = number
                        self.advanced.set()
        except (av.error.FFmpegError, ValueError):
            pass  # a frame whose references were lost (a live stream's gap): the next GOP decodes


# --- telemetry: the edge logger ---------------------------------------------------------------


class CountingLogger(TelemetryLogger):
    """The edge logger as it is, counting each answer that said "not now" (503, 408, 429,
    no connection, no answer in time): the logger keeps those packets and sends them again."""

    told = 0

    def _link_down(self, why: str, log_type: LogType = "warning") -> Any:
        self.told += 1
        return super()._link_down(why, log_type)


class Vehicle:
    """One vehicle's logger for one scenario: records until stopped, then drains its outbox."""

    def __init__(self, gateway_url: str, vin: str, outbox: Path) -> None:
        self.vin = vin
        self.samples: list[int] = []  # timestamps recorded, in order
        self._stop = asyncio.Event()
        start_ms = int(time.time() * 1000)
        trace = highway(seed=7, period_ms=int(TELEMETRY_PERIOD_S * 1000), start_ms=start_ms)
        self.logger = CountingLogger(
            vin,
            gateway_url,
            make_token("telemetry:publish", vin=[vin]),
            self._until_stopped(trace),
            outbox,
            period_s=TELEMETRY_PERIOD_S,
            control=False,
            backoff=LOGGER_BACKOFF,
        )

    def _until_stopped(self, trace: Iterable[Any]) -> Iterator[Any]:
        for sample in trace:
            if self._stop.is_set():
                return
            self.samples.append(sample.timestamp_ms)
            yield sample

    async def run(self, stop: asyncio.Event) -> None:
        running = asyncio.create_task(self.logger.run())
        await stop.wait()
        self._stop.set()
        await running  # the trace is over: it returns once the gateway has everything

    @property
    def accepted(self) -> list[int]:
        """What got a 202: the outbox sends in recording order, so the first `uploaded`."""
        return self.samples[: self.logger.counters.uploaded]


# --- ingestion: the uploader ------------------------------------------------------------------


def small_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (160, 120), (30, 120, 200)).save(out, "JPEG")
    return out.getvalue()


JPEG = small_jpeg()
WRITER = {"Authorization": f"Bearer {make_token('ingest:write', 'ingest:read')}"}


def retry_after(response: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class Uploader:
    """One JPEG per request, at `rate`; a file is sent again (same meta) until it gets 202:
    after a 503, 408 or 429 it waits the Retry-After, after no answer a second."""

    def __init__(self, gateway_url: str, *, scenario: str, rate: float = UPLOAD_RATE) -> None:
        self.url = gateway_url + "/api/v1/ingest/upload"
        self.scenario = scenario
        self.rate = rate
        self.accepted: dict[int, str] = {}  # file -> its request id
        self.told = 0
        self.refused: Counter[int] = Counter()  # other answers: a fault of the suite's

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            for item in itertools.count():
                if stop.is_set():
                    return
                await self._send(http, item, stop)
                await asyncio.sleep(1 / self.rate)

    async def _send(self, http: httpx.AsyncClient, item: int, stop: asyncio.Event) -> None:
        meta = {"fault_scenario": self.scenario, "fault_item": item}
        while not stop.is_set():
            try:
                response = await http.post(
                    self.url,
                    data={"camera_id": "fault-cam", "meta": json.dumps(meta)},
                    files=[("files", (f"{item}.jpg", JPEG, "image/jpeg"))],
                    headers=WRITER,
                )
            except httpx.TransportError:
                self.told += 1
                await asyncio.sleep(1.0)
                continue
            if response.status_code == 202:
                self.accepted[item] = response.json()["request_id"]
                return
            if response.status_code in (408, 429) or response.status_code >= 500:
                self.told += 1
                await asyncio.sleep(retry_after(response))
                continue
            self.refused[response.status_code] += 1
            return


# --- probes: is everything back? -------------------------------------------------------------


class Probes:
    """After a fault: send probes on every path until each goes end to end."""

    def __init__(self, suite: FaultStack, traffic: Traffic) -> None:
        self.suite = suite
        self.client = traffic.client
        self.phone = traffic.phone
        self.viewer = traffic.viewer
        self.people = itertools.count(PROBE_PEOPLE)

    async def recovery(self, limit: float) -> dict[str, float | None]:
        start = time.monotonic()
        paths = {
            "occupancy": self._occupancy(),
            "telemetry": self._telemetry(),
            "ingestion": self._ingestion(),
            "video": self._video(),
        }
        results = await asyncio.gather(
            *(asyncio.wait_for(probe, limit) for probe in paths.values()), return_exceptions=True
        )
        return {
            path: None if isinstance(done, BaseException) else round(done - start, 2)
            for path, done in zip(paths, results, strict=True)
        }

    async def _video(self) -> float:
        """The phone is live: the first frame it sends from now on reaching the viewer."""
        after = self.phone.sent[-1] if self.phone.sent else -1
        while self.viewer.latest <= after:
            self.viewer.advanced.clear()
            await self.viewer.advanced.wait()
        return time.monotonic()

    async def _occupancy(self) -> float:
        camera = CAMERAS_LIST[0]
        sent: list[tuple[str, int]] = []
        url = self.suite.running.model_url
        while True:
            with contextlib.suppress(OSError, TimeoutError, websockets.WebSocketException):
                async with websockets.connect(url, open_timeout=1, compression=None) as ws:
                    while True:
                        people = next(self.people)
                        if people > 100_000:
                            raise RuntimeError("out of probe ids")
                        sent.append((camera, people))
                        await ws.send(json.dumps(frame(camera, people=people)))
                        for _ in range(4):
                            await asyncio.sleep(PROBE_EVERY_S)
                            if any(key in self.client.delivered for key in sent):
                                return time.monotonic()
            await asyncio.sleep(PROBE_EVERY_S)

    async def _telemetry(self) -> float:
        url = self.suite.running.gateway.url + "/telemetry"
        headers = {
            "Authorization": f"Bearer {make_token('telemetry:publish', vin=[PROBE_VIN])}",
            "Content-Type": "application/x-protobuf",
            "X-Compressed": "false",
            "X-Vehicle-VIN": PROBE_VIN,
        }
        sent: list[int] = []
        sample = next(iter(highway(seed=3)))
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                stamp = int(time.time() * 1000)
                body = wire.encode_sample(dataclasses.replace(sample, timestamp_ms=stamp))
                with contextlib.suppress(httpx.TransportError):
                    response = await http.post(url, content=body, headers=headers)
                    if response.status_code == 202:
                        sent.append(stamp)
                found = bool(sent) and await asyncio.to_thread(self._stored_record, sent)
                if found:
                    return time.monotonic()
                await asyncio.sleep(PROBE_EVERY_S)

    def _stored_record(self, stamps: list[int]) -> bool:
        rows = self.suite.query(
            "telemetry",
            "SELECT 1 FROM telemetry t JOIN vehicles v ON v.id = t.vehicle_id"
            " WHERE v.vin = %s AND t.timestamp_ms = ANY(%s) LIMIT 1",
            PROBE_VIN,
            stamps,
        )
        return bool(rows)

    async def _ingestion(self) -> float:
        url = self.suite.running.gateway.url + "/api/v1/ingest/upload"
        probe = uuid.uuid4().hex
        accepted = False
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if not accepted:
                    with contextlib.suppress(httpx.TransportError):
                        response = await http.post(
                            url,
                            data={"camera_id": "probe", "meta": json.dumps({"fault_probe": probe})},
                            files=[("files", ("probe.jpg", JPEG, "image/jpeg"))],
                            headers=WRITER,
                        )
                        accepted = response.status_code == 202
                if accepted and await asyncio.to_thread(self._stored_file, probe):
                    return time.monotonic()
                await asyncio.sleep(PROBE_EVERY_S)

    def _stored_file(self, probe: str) -> bool:
        rows = self.suite.query(
            "ingestion", "SELECT 1 FROM frames WHERE meta_info->>'fault_probe' = %s", probe
        )
        return bool(rows)


# --- scenarios --------------------------------------------------------------------------------

Fault = Callable[[FaultStack, Durations, "Traffic"], Awaitable[None]]


def kill(service: str) -> Fault:
    async def fault(suite: FaultStack, durations: Durations, traffic: Traffic) -> None:
        process = suite.process(service)
        await asyncio.to_thread(process.kill)  # SIGKILL: no cleanup at all
        await asyncio.sleep(durations.kill_down_s)
        await asyncio.to_thread(process.start, wait=0)  # the fault ends: it is starting again

    return fault


def broker_cut(*services: str) -> Fault:
    async def fault(suite: FaultStack, durations: Durations, traffic: Traffic) -> None:
        for service in services:
            suite.links[service].broker.cut()
        await asyncio.sleep(durations.broker_cut_s)
        for service in services:
            suite.links[service].broker.restore()

    return fault


async def database_cut(suite: FaultStack, durations: Durations, traffic: Traffic) -> None:
    proxies = [links.database for links in suite.links.values() if links.database is not None]
    for proxy in proxies:
        proxy.cut()
    await asyncio.sleep(durations.database_cut_s)
    for proxy in proxies:
        proxy.restore()


async def slow_clients(suite: FaultStack, durations: Durations, traffic: Traffic) -> None:
    """Beside the healthy client, two slow readers (200 ms a message, a seventh of the rate) and two
    that never read, for the whole stay."""
    url = suite.running.client_url
    leave = asyncio.Event()
    tasks = [asyncio.create_task(OmegaClient(url, pause=0.2).run(leave)) for _ in range(2)]
    tasks += [asyncio.create_task(stuck_client(url, leave)) for _ in range(2)]
    await asyncio.sleep(durations.clients_s)
    leave.set()
    await asyncio.wait(tasks, timeout=5)
    for task in tasks:
        task.cancel()


async def no_fault(suite: FaultStack, durations: Durations, traffic: Traffic) -> None:
    await asyncio.sleep(durations.clients_s)


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault
    occupancy_rate: float = OCCUPANCY_RATE  # frames/s, before the fault as during it


# Five times the usual traffic, before and during the slow clients' stay, so that a client that
# stops reading has filled its socket buffers (tens of KiB) within seconds, not minutes.
SLOW_CLIENTS_RATE = 5 * OCCUPANCY_RATE


SCENARIOS = [
    Scenario("no fault", no_fault),
    *(Scenario(f"kill -9 {service}", kill(service)) for service in SERVICES),
    Scenario("broker cut: gateway", broker_cut("gateway")),
    Scenario("broker cut: occupancy", broker_cut("occupancy")),
    Scenario("broker cut: all", broker_cut(*SERVICES)),
    Scenario("PostgreSQL cut: all", database_cut),
    Scenario("slow and stuck clients", slow_clients, occupancy_rate=SLOW_CLIENTS_RATE),
]
# The short run (`make test`): a kill -9, a broker cut and a database cut, seconds each.
SHORT_SCENARIOS = ["kill -9 occupancy", "broker cut: all", "PostgreSQL cut: all"]


# --- one scenario: traffic, fault, recovery, the counts -------------------------------------


@dataclass
class Traffic:
    camera: OmegaCamera
    client: OmegaClient
    vehicle: Vehicle
    uploader: Uploader
    phone: Phone
    viewer: Viewer


@dataclass
class PathResult:
    accepted: int
    stored: int
    delivered: int | None
    lost: int
    duplicated: int
    told: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    scenario: str
    accepted: int
    stored: int
    delivered: int | None
    lost: int
    duplicated: int
    recovery_s: float | None
    told: int
    # The healthy client's latency (frame timestamp to its arrival), p99, for the frames sent
    # before the fault and during it (an outage's held frames count in "during").
    p99_before_ms: float | None
    p99_during_ms: float | None
    p50_during_ms: float | None
    fault_s: float
    recovery_by_path: dict[str, float | None]
    paths: dict[str, PathResult]
    # Live and lossy by design (no store, bounded queues): frames sent, decoded by the viewer.
    video: dict[str, int]


async def run_scenario(
    suite: FaultStack, scenario: Scenario, index: int, durations: Durations, workdir: Path
) -> Row:
    stack = suite.running
    device = VIDEO_DEVICE.format(index)
    traffic = Traffic(
        camera=OmegaCamera(
            stack.model_url, base=index * PEOPLE_PER_SCENARIO, rate=scenario.occupancy_rate
        ),
        client=OmegaClient(stack.client_url),
        vehicle=Vehicle(stack.gateway.url, vin(index), workdir / f"outbox-{index}.sqlite"),
        uploader=Uploader(stack.gateway.url, scenario=scenario.name),
        phone=Phone(stack.ws("/ws/video", "video:publish", device=device)),
        viewer=Viewer(stack.ws("/ws/video/consume", "video:subscribe") + f"&device={device}"),
    )
    listening, producing = asyncio.Event(), asyncio.Event()
    clients = [
        asyncio.create_task(traffic.client.run(listening)),
        asyncio.create_task(traffic.viewer.run(listening)),
    ]
    try:
        await asyncio.wait_for(traffic.client.connected.wait(), 30)
        producers = [
            asyncio.create_task(traffic.phone.run(producing)),
            asyncio.create_task(traffic.camera.run(producing)),
            asyncio.create_task(traffic.vehicle.run(producing)),
            asyncio.create_task(traffic.uploader.run(producing)),
        ]
        try:
            await asyncio.sleep(durations.warmup_s)
            drops_before = await gateway_drops(stack.gateway.url)
            began = time.time()
            await scenario.fault(suite, durations, traffic)
            ended = time.time()
            recovery = await Probes(suite, traffic).recovery(durations.recovery_limit_s)
            await asyncio.sleep(durations.settle_s)
        finally:
            producing.set()
            done, pending = await asyncio.wait(producers, timeout=durations.drain_limit_s)
            for task in pending:
                task.cancel()
        for task in done:
            task.result()  # a producer that failed fails the scenario
        paths = await asyncio.to_thread(settled, suite, traffic, index, durations.drain_limit_s)
        await asyncio.sleep(1.0)  # the last broadcasts on their way to the client
    finally:
        listening.set()
        await asyncio.wait(clients, timeout=5)
        for task in clients:
            task.cancel()
    paths["occupancy"] = await asyncio.to_thread(occupancy_result, suite, traffic, index)
    drops = await gateway_drops(stack.gateway.url) - drops_before
    seen = traffic.client.latency_s
    latencies = [seen[key] for key in traffic.camera.sent if key in seen]
    before = [latency for sent, latency in latencies if sent < began]
    during = [latency for sent, latency in latencies if began <= sent < ended]
    paths["occupancy"].detail["gateway_drops"] = drops
    known = [value for value in recovery.values() if value is not None]
    phone, viewer = traffic.phone, traffic.viewer
    video = {
        "sent": len(phone.sent),
        "decoded": len(set(phone.sent) & set(viewer.decoded)),
        "decoded_twice": sum(count - 1 for count in viewer.decoded.values()),
        "connections_dropped": phone.dropped,
    }
    return Row(
        scenario=scenario.name,
        accepted=sum(path.accepted for path in paths.values()),
        stored=sum(path.stored for path in paths.values()),
        delivered=paths["occupancy"].delivered,
        lost=sum(path.lost for path in paths.values()),
        duplicated=sum(path.duplicated for path in paths.values()),
        recovery_s=max(known) if len(known) == len(recovery) else None,
        told=sum(path.told for path in paths.values()),
        p99_before_ms=percentile_ms(before, 99),
        p99_during_ms=percentile_ms(during, 99),
        p50_during_ms=percentile_ms(during, 50),
        fault_s=round(ended - began, 1),
        recovery_by_path=recovery,
        paths=paths,
        video=video,
    )


def settled(suite: FaultStack, traffic: Traffic, index: int, limit: float) -> dict[str, PathResult]:
    """Wait until everything accepted is stored (or `limit`), then count every path."""
    deadline = time.monotonic() + limit
    while True:
        results = {
            "occupancy": occupancy_result(suite, traffic, index),
            "telemetry": telemetry_result(suite, traffic, index),
            "ingestion": ingestion_result(suite, traffic),
        }
        if all(path.lost == 0 for path in results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(0.5)


def occupancy_result(suite: FaultStack, traffic: Traffic, index: int) -> PathResult:
    camera = traffic.camera
    low = index * PEOPLE_PER_SCENARIO
    rows = suite.query(
        "occupancy",
        "SELECT camera_id, total_people, count(*) FROM observations"
        " WHERE total_people >= %s AND total_people < %s GROUP BY camera_id, total_people",
        low,
        low + PEOPLE_PER_SCENARIO,
    )
    stored = Counter({(camera_id, people): count for camera_id, people, count in rows})
    sent = set(camera.sent)
    acked = camera.acked
    delivered = {key for key in traffic.client.delivered if key in sent}
    return PathResult(
        accepted=len(acked),
        stored=len(set(stored) & acked),
        delivered=len(delivered),
        # Exact: each frame was acked (the broker confirmed it) or not.
        lost=len(acked - set(stored)),
        duplicated=sum(count - 1 for count in stored.values()),
        told=camera.told,
        detail={
            "sent": len(camera.sent),
            "resent": camera.resent,
            "unanswered": len(sent - acked - camera.refused),
            "error_frames": dict(camera.errors),
            "connections_dropped": camera.dropped,
            "missing": sorted(acked - set(stored))[:20],
            "not_delivered": len(sent & set(stored)) - len(delivered),
            "delivered_twice": sum(
                count - 1 for key, count in traffic.client.delivered.items() if key in sent
            ),
        },
    )


def telemetry_result(suite: FaultStack, traffic: Traffic, index: int) -> PathResult:
    vehicle = traffic.vehicle
    rows = suite.query(
        "telemetry",
        "SELECT t.timestamp_ms, count(*) FROM telemetry t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE v.vin = %s GROUP BY t.timestamp_ms",
        vin(index),
    )
    stored = Counter(dict(rows))
    accepted = set(vehicle.accepted)
    counters = vehicle.logger.counters
    return PathResult(
        accepted=len(accepted),
        stored=len(set(stored) & accepted),
        delivered=None,
        lost=len(accepted - set(stored)),
        duplicated=sum(count - 1 for count in stored.values()),
        told=vehicle.logger.told,
        detail={
            "recorded": counters.recorded,
            "requests": counters.requests,
            "rejected": counters.rejected,
            "still_buffered": vehicle.logger.buffered,
            "missing": sorted(accepted - set(stored))[:20],
        },
    )


def ingestion_result(suite: FaultStack, traffic: Traffic) -> PathResult:
    uploader = traffic.uploader
    rows = suite.query(
        "ingestion",
        "SELECT (meta_info->>'fault_item')::int, storage_path FROM frames"
        " WHERE meta_info->>'fault_scenario' = %s",
        uploader.scenario,
    )
    objects = suite.objects()
    rows_per_item = Counter(item for item, _ in rows)
    with_object = {item for item, path in rows if path in objects}
    accepted = set(uploader.accepted)
    return PathResult(
        accepted=len(accepted),
        stored=len(with_object & accepted),
        delivered=None,
        lost=len(accepted - with_object),
        duplicated=sum(count - 1 for count in rows_per_item.values()),
        told=uploader.told,
        detail={
            "refused": dict(uploader.refused),
            "rows_without_object": len({item for item, _ in rows} - with_object),
            "stored_not_accepted": len(set(rows_per_item) - accepted),
            "missing": sorted(accepted - with_object)[:20],
        },
    )


async def gateway_drops(url: str) -> float:
    """What the gateway dropped for clients that fell behind (`edgeway_gateway_dropped_total`),
    or 0 when it cannot say (a gateway that is down, or that restarted and counts afresh)."""
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            text = (await http.get(url + "/metrics")).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "edgeway_gateway_dropped"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def percentile_ms(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


# --- the run ---------------------------------------------------------------------------------


async def run_suite(
    workdir: Path, durations: Durations, names: list[str] | None = None
) -> list[Row]:
    chosen = [s for s in SCENARIOS if names is None or s.name in names]
    unknown = set(names or ()) - {s.name for s in SCENARIOS}
    if unknown:
        raise ValueError(
            f"no such scenario: {sorted(unknown)}; known: {[s.name for s in SCENARIOS]}"
        )
    suite = await asyncio.to_thread(FaultStack(workdir).start)
    rows: list[Row] = []
    try:
        for scenario in chosen:
            index = SCENARIOS.index(scenario)
            rows.append(await run_scenario(suite, scenario, index, durations, workdir))
            print(render_row(rows[-1]), flush=True)
    finally:
        await asyncio.to_thread(suite.stop)
    return rows


COLUMNS = (
    ("scenario", 24),
    ("accepted", 9),
    ("stored", 8),
    ("delivered", 9),
    ("lost", 5),
    ("dup", 4),
    ("recovery s", 10),
    ("told", 6),
    ("p99 before", 10),
    ("p99 during", 10),
    ("video", 11),
)


def header() -> str:
    return "  ".join(
        f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(COLUMNS)
    )


def render_row(row: Row) -> str:
    def text(value: Any) -> str:
        return "-" if value is None else str(value)

    values = (
        row.scenario,
        row.accepted,
        row.stored,
        row.delivered,
        row.lost,
        row.duplicated,
        row.recovery_s if row.recovery_s is not None else "never",
        row.told,
        row.p99_before_ms,
        row.p99_during_ms,
        f"{row.video['decoded']}/{row.video['sent']}",
    )
    return "  ".join(
        f"{text(v):>{w}}" if i else f"{text(v):<{w}}"
        for i, (v, (_, w)) in enumerate(zip(values, COLUMNS, strict=True))
    )


def render(rows: list[Row]) -> str:
    lines = [
        header(),
        *(render_row(row) for row in rows),
        "",
        "per path (accepted/stored/lost/dup/told; recovery s), video (decoded/sent; recovery s):",
    ]
    for row in rows:
        parts = [
            f"{path} {r.accepted}/{r.stored}/{r.lost}/{r.duplicated}/{r.told}; "
            f"{row.recovery_by_path.get(path)}"
            for path, r in row.paths.items()
        ]
        video = row.video
        parts.append(
            f"video {video['decoded']}/{video['sent']} decoded; {row.recovery_by_path.get('video')}"
        )
        lines.append(f"  {row.scenario:<24} " + " | ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Edgeway's reliability fault suite")
    parser.add_argument("--short", action="store_true", help="seconds per fault, a subset")
    parser.add_argument("--only", action="append", help="a scenario by name (repeatable)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="a folder for the services' logs, kept"
    )
    args = parser.parse_args(argv)
    durations = SHORT if args.short else FULL
    names = args.only or (SHORT_SCENARIOS if args.short else None)
    # The logger's lines (one per upload at debug) would bury the table; its warnings stay.
    configure_logging(service="faults", level="WARNING", fmt="console")
    output = args.output or RESULTS / ("faults-short.json" if args.short else "faults.json")
    print(header(), flush=True)
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(run_suite(args.keep_logs, durations, names))
    else:
        with tempfile.TemporaryDirectory(prefix="edgeway-faults-") as workdir:
            rows = asyncio.run(run_suite(Path(workdir), durations, names))
    print()
    print(render(rows))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {"durations": asdict(durations), "rows": [asdict(row) for row in rows]},
            indent=2,
            default=str,
        )
    )
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
