"""The logger against real servers started here.

`FakeGateway` (uvicorn, a plain ASGI app) and `FakeControl` (a `websockets` server) stand in for
the gateway: `POST /telemetry` decodes what it gets with `wire.parse_upload`, answers 202, 503,
408, 401 or 400 (with a Retry-After, or late, as a test asks) and records what it stored; the
control server sends commands and records what the logger says. The gateway's own endpoints
are tested end to end elsewhere (services/gateway and tests/); here the point is what the
logger does with each answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.server import ServerConnection, serve

from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import Decoder, Packet, PredictorState, Sample
from edgeway.edge.control import control_url_for
from edgeway.edge.outbox import Outbox
from edgeway.edge.pacing import Backoff
from edgeway.edge.telemetry_logger import MAX_RETRY_AFTER_S, TelemetryLogger, _retry_after
from edgeway.edge.traces import city, highway

VIN = "5YJ3E1EA1KF000001"
TOKEN = "test-token-not-a-secret"
FAST = Backoff(initial=0.02, maximum=0.1)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Upload:
    headers: dict[str, str]
    status: int
    records: int
    at: float = field(default_factory=time.monotonic)  # when it was answered


@dataclass
class FakeGateway:
    """Stands in for the gateway's POST /telemetry (see the module docstring)."""

    status: int = 202  # what every upload gets, unless a refusal below applies
    refuse: set[int] = field(default_factory=set)  # 400 for an upload carrying these sequences
    stored: list[Packet] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    retry_after: str | None = None  # the Retry-After header of every answer other than 202
    stall: float = 0.0  # seconds before each answer (longer than the logger's timeout: none)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no control endpoint here
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if self.stall:
            await asyncio.sleep(self.stall)
        if scope["path"] not in ("/telemetry", "/api/telemetry") or scope["method"] != "POST":
            await self._answer(send, headers, 404, {"type": "error", "code": "not_found"}, 0)
            return
        if self.status != 202:
            reason = {"type": "error", "code": "unavailable", "reason": "broker unavailable"}
            await self._answer(send, headers, self.status, reason, 0)
            return
        try:
            packets = wire.parse_upload(
                body,
                compressed=headers.get("x-compressed") == "true",
                batch=headers.get("x-batch") == "true",
            )
        except wire.WireError as exc:
            error = {"type": "error", "code": "bad_telemetry", "reason": exc.reason}
            await self._answer(send, headers, 400, error, 0)
            return
        refused = [p.sequence for p in packets if p.sequence in self.refuse]
        if refused:
            error = {"type": "error", "code": "bad_telemetry", "reason": f"refused {refused}"}
            await self._answer(send, headers, 400, error, len(packets))
            return
        self.stored.extend(packets)
        accepted = {"status": "accepted", "records": len(packets), "message_id": "m"}
        await self._answer(send, headers, 202, accepted, len(packets))

    async def _answer(
        self, send: Send, headers: dict[str, str], status: int, body: Any, records: int
    ) -> None:
        self.uploads.append(Upload(headers=headers, status=status, records=records))
        answer_headers = [(b"content-type", b"application/json")]
        if status != 202 and self.retry_after is not None:
            answer_headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": answer_headers})
        await send({"type": "http.response.body", "body": orjson.dumps(body)})

    def sequences(self) -> list[int | None]:
        return [packet.sequence for packet in self.stored]

    def uploads_at(self) -> list[float]:
        return [upload.at for upload in self.uploads]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def http_server(app: FakeGateway, port: int | None = None) -> AsyncIterator[str]:
    port = port if port is not None else free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def eventually(condition: Callable[[], bool], within: float = 15.0) -> None:
    """Poll `condition` (state other tasks change) until it holds; fail after `within` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {within}s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(logger: TelemetryLogger) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(logger.run())
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def trace(
    count: int | None, *, kind: Callable[..., Iterator[Sample]] = highway
) -> Iterator[Sample]:
    """Seed 11's readings, 300 ms apart: `count` of them, or endless."""
    samples = kind(11, period_ms=300)
    return samples if count is None else itertools.islice(samples, count)


def make_logger(
    url: str, outbox: Path, samples: Iterator[Sample], **options: Any
) -> TelemetryLogger:
    options = {"period_s": 0.0, "control": False, "backoff": FAST, **options}
    return TelemetryLogger(VIN, url, TOKEN, samples, outbox, **options)


def assert_decodes_without_gaps(packets: list[Packet]) -> None:
    """What the telemetry service will do with the stored stream: no gap, nothing uncertain."""
    decoder = Decoder()
    for packet in packets:
        decoded = decoder.decode(packet)
        assert decoded.gap == 0
        assert not decoded.uncertain


async def test_every_packet_arrives_once_in_order_and_a_backlog_goes_in_batches(
    tmp_path: Path,
) -> None:
    gateway = FakeGateway()
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(120), batch_size=8)
        await asyncio.wait_for(logger.run(), 30)
    assert gateway.sequences() == list(range(1, 121))
    assert gateway.stored[0].is_resync
    assert_decodes_without_gaps(gateway.stored)
    expected = [s.timestamp_ms for s in trace(120)]
    assert [p.timestamp_ms for p in gateway.stored] == expected
    for upload in gateway.uploads:
        assert upload.headers["authorization"] == f"Bearer {TOKEN}"
        assert upload.headers["x-vehicle-vin"] == VIN
        assert upload.headers["x-compressed"] == "true"
        assert upload.headers["content-type"] == "application/x-protobuf"
        assert upload.records <= 8
        assert (upload.headers.get("x-batch") == "true") == (upload.records > 1)
    assert any(upload.records > 1 for upload in gateway.uploads)
    assert logger.counters.uploaded == 120
    assert logger.counters.rejected == 0
    async with await Outbox.open(tmp_path / "outbox.db", vin=VIN) as outbox:
        assert outbox.pending == 0


async def test_an_outage_is_buffered_then_replayed_in_order_without_gap_or_duplicate(
    tmp_path: Path,
) -> None:
    gateway = FakeGateway(status=503)
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(300), period_s=0.005)
        async with running(logger) as task:
            await eventually(lambda: logger.buffered >= 60 and len(gateway.uploads) >= 3)
            assert gateway.stored == []
            gateway.status = 202
            await asyncio.wait_for(task, 30)
    assert gateway.sequences() == list(range(1, 301))
    assert_decodes_without_gaps(gateway.stored)
    assert any(upload.status == 503 for upload in gateway.uploads)
    assert logger.buffered == 0


async def test_an_unreachable_gateway_is_retried_until_it_comes_up(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: connection refused
    gateway = FakeGateway()
    logger = make_logger(
        f"http://127.0.0.1:{port}", tmp_path / "outbox.db", trace(200), period_s=0.005
    )
    async with running(logger) as task:
        await eventually(lambda: logger.buffered >= 50)
        assert logger.counters.requests >= 2  # it kept trying
        async with http_server(gateway, port):
            await asyncio.wait_for(task, 30)
    assert gateway.sequences() == list(range(1, 201))
    assert_decodes_without_gaps(gateway.stored)


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_a_timeout_or_unavailable_answer_keeps_every_packet(
    tmp_path: Path, status: int
) -> None:
    """408 (the gateway gave up on a slow body) and every 5xx say "not now": nothing is moved
    aside, and everything goes once the gateway takes it."""
    gateway = FakeGateway(status=status)
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(30), batch_size=10)
        async with running(logger) as task:
            await eventually(lambda: logger.counters.recorded == 30 and len(gateway.uploads) >= 3)
            assert logger.counters.rejected == 0
            assert logger.buffered == 30
            gateway.status = 202
            await asyncio.wait_for(task, 30)
    assert gateway.sequences() == list(range(1, 31))
    async with await Outbox.open(tmp_path / "outbox.db", vin=VIN) as outbox:
        assert await outbox.rejected() == []


async def test_an_answer_that_never_comes_keeps_every_packet(tmp_path: Path) -> None:
    gateway = FakeGateway(stall=1.0)
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(20), request_timeout_s=0.2)
        async with running(logger) as task:
            await eventually(lambda: logger.counters.requests >= 2)
            assert logger.counters.uploaded == 0
            assert logger.counters.rejected == 0
            gateway.stall = 0.0
            await asyncio.wait_for(task, 30)
    # The gateway may have taken an upload whose answer the logger never saw: it comes again,
    # and the telemetry service stores each record once (tests/test_telemetry_e2e.py).
    assert set(gateway.sequences()) == set(range(1, 21))
    assert logger.counters.rejected == 0


async def test_retry_after_is_waited_before_the_next_try(tmp_path: Path) -> None:
    gateway = FakeGateway(status=503, retry_after="1")
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(5))  # backoff: 20-100 ms
        async with running(logger) as task:
            await eventually(lambda: len(gateway.uploads) >= 3)
            gateway.status = 202
            await asyncio.wait_for(task, 30)
    refused = [upload.at for upload in gateway.uploads if upload.status == 503]
    gaps = [later - earlier for earlier, later in itertools.pairwise(gateway.uploads_at())]
    assert len(refused) >= 3
    assert min(gaps[: len(refused)]) >= 0.9  # each try after a 503 waited the second it asked
    assert gateway.sequences() == list(range(1, 6))


def test_retry_after_is_read_as_seconds_or_a_date_and_capped() -> None:
    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert _retry_after(answer("7")) == 7.0
    assert _retry_after(answer("86400")) == MAX_RETRY_AFTER_S
    soon = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (_retry_after(answer(soon)) or 0) <= 30
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert _retry_after(answer(past)) == 0.0
    assert _retry_after(answer("soon")) is None
    assert _retry_after(httpx.Response(503)) is None


async def test_a_refused_packet_is_moved_aside_and_the_stream_goes_on(tmp_path: Path) -> None:
    gateway = FakeGateway(refuse={5, 37})
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(80), batch_size=10)
        await asyncio.wait_for(logger.run(), 30)
    assert gateway.sequences() == [n for n in range(1, 81) if n not in (5, 37)]
    assert logger.counters.rejected == 2
    async with await Outbox.open(tmp_path / "outbox.db", vin=VIN) as outbox:
        assert outbox.pending == 0
        rejected = await outbox.rejected()
    assert [r.entry.sequence for r in rejected] == [5, 37]
    assert all(r.status == 400 and "refused" in r.reason for r in rejected)
    # The body kept aside is the packet as it was recorded.
    [packet] = wire.parse_upload(rejected[0].entry.body, compressed=True, batch=False)
    assert packet.sequence == 5


async def test_a_refused_token_keeps_every_packet(tmp_path: Path) -> None:
    gateway = FakeGateway(status=401)
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(30))
        async with running(logger) as task:
            await eventually(lambda: logger.counters.recorded == 30 and len(gateway.uploads) >= 3)
            assert logger.counters.rejected == 0
            assert logger.buffered == 30
            gateway.status = 202
            await asyncio.wait_for(task, 30)
    assert gateway.sequences() == list(range(1, 31))


async def test_a_restarted_logger_goes_on_with_the_next_sequence(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    gateway = FakeGateway(status=503)
    async with http_server(gateway) as url:
        first = make_logger(url, path, trace(60), period_s=0.01)
        async with running(first):
            await eventually(lambda: first.counters.recorded >= 30)
        # Cut off mid-trace. What counts is what the outbox holds: a cancel that lands while a
        # record is being written can leave the in-memory counter one behind the stored state.
        async with await Outbox.open(path, vin=VIN) as outbox:
            saved = await outbox.load_state()
            assert saved is not None
            recorded = PredictorState.from_json(saved).last_sequence
        assert recorded is not None
        assert 30 <= recorded < 60
        # The same replay started again: what was recorded is skipped, the rest continues.
        gateway.status = 202
        second = make_logger(url, path, trace(60))
        await asyncio.wait_for(second.run(), 30)
    assert gateway.sequences() == list(range(1, 61))
    assert second.counters.recorded == 60 - recorded
    assert [p.is_resync for p in gateway.stored].count(True) == 1  # 18 s of driving: one resync
    assert_decodes_without_gaps(gateway.stored)


async def test_without_a_stored_state_a_restart_begins_a_new_stream(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    gateway = FakeGateway()
    async with http_server(gateway) as url:
        await asyncio.wait_for(make_logger(url, path, trace(10)).run(), 30)
        async with await Outbox.open(path, vin=VIN) as outbox:
            await outbox.clear_state()
        later = itertools.islice(highway(11, start_ms=1_800_000_000_000), 10)
        await asyncio.wait_for(make_logger(url, path, later).run(), 30)
    assert gateway.sequences() == [*range(1, 11), *range(1, 11)]
    assert gateway.stored[10].is_resync
    # The telemetry service's decoder takes it as a restarted logger, not as a duplicate.
    assert_decodes_without_gaps(gateway.stored[:10])
    decoder = Decoder()
    decoded = [decoder.decode(packet) for packet in gateway.stored]
    assert not decoded[-1].uncertain


async def test_legacy_mode_sends_plain_unnumbered_readings_one_per_request(
    tmp_path: Path,
) -> None:
    gateway = FakeGateway(status=503)
    async with http_server(gateway) as url:
        logger = make_logger(url, tmp_path / "outbox.db", trace(25, kind=city), legacy=True)
        async with running(logger) as task:
            await eventually(lambda: logger.buffered >= 10)
            gateway.status = 202
            await asyncio.wait_for(task, 30)
    assert len(gateway.stored) == 25
    assert all(p.sequence is None and p.is_resync for p in gateway.stored)
    samples = list(trace(25, kind=city))
    assert [p.timestamp_ms for p in gateway.stored] == [s.timestamp_ms for s in samples]
    assert [p.speed for p in gateway.stored] == [pytest.approx(s.speed, abs=1e-3) for s in samples]
    accepted = [u for u in gateway.uploads if u.status == 202]
    assert len(accepted) == 25
    for upload in accepted:
        assert upload.headers["x-compressed"] == "false"
        assert "x-batch" not in upload.headers


# ---- control ---------------------------------------------------------------------------------


@dataclass
class FakeControl:
    """Stands in for the gateway's WS /telemetry/control/ws (see the module docstring)."""

    connections: list[ServerConnection] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    async def handler(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        self.requests.append((connection.request.path, dict(connection.request.headers)))
        self.connections.append(connection)
        async for raw in connection:
            self.received.append(orjson.loads(raw))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.received if message["type"] == kind]

    async def command(self, name: str) -> dict[str, Any]:
        command_id = f"c{next(self._ids)}"
        message = {"type": "command", "command": name, "command_id": command_id}
        await self.connections[-1].send(orjson.dumps(message).decode())
        acks: list[dict[str, Any]] = []

        def acked() -> bool:
            acks[:] = [m for m in self.of_type("ack") if m["command_id"] == command_id]
            return bool(acks)

        await eventually(acked)
        return acks[0]


@asynccontextmanager
async def control_server(control: FakeControl) -> AsyncIterator[str]:
    async with serve(control.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/telemetry/control/ws?vin={VIN}"


async def test_the_control_connection_reports_and_obeys(tmp_path: Path) -> None:
    gateway = FakeGateway()
    control = FakeControl()
    async with http_server(gateway) as url, control_server(control) as control_url:
        logger = make_logger(
            url,
            tmp_path / "outbox.db",
            trace(None),
            period_s=0.01,
            control=True,
            control_url=control_url,
            status_interval_s=0.05,
        )
        async with running(logger):
            await eventually(lambda: bool(control.of_type("status")))
            path, headers = control.requests[0]
            assert path == f"/telemetry/control/ws?vin={VIN}"
            assert headers["authorization"] == f"Bearer {TOKEN}"
            first = control.of_type("status")[0]
            assert first["running"] is True
            assert first["offline"] is False
            await eventually(lambda: len(gateway.stored) >= 10)

            # stop: nothing recorded, nothing sent.
            ack = await control.command("stop")
            assert ack["running"] is False
            assert ack["offline"] is False
            recorded, uploads = logger.counters.recorded, len(gateway.uploads)
            await asyncio.sleep(0.3)
            assert logger.counters.recorded <= recorded + 1  # one may have been in flight
            assert len(gateway.uploads) <= uploads + 1
            assert any(s["running"] is False for s in control.of_type("status"))

            # start again.
            ack = await control.command("start")
            assert ack["running"] is True
            await eventually(lambda: logger.counters.recorded > recorded + 10)

            # A dead zone: recording goes on into the buffer, nothing is sent.
            ack = await control.command("toggle_offline")
            assert ack["offline"] is True
            uploads = len(gateway.uploads)
            await eventually(lambda: logger.buffered >= 20)
            assert len(gateway.uploads) <= uploads + 1
            await eventually(
                lambda: any(s["offline"] and s["buffered"] >= 10 for s in control.of_type("status"))
            )
            assert any(line["log_type"] == "warning" for line in control.of_type("log"))

            # Out of it: the buffer is flushed, in order.
            ack = await control.command("toggle_offline")
            assert ack["offline"] is False
            await eventually(lambda: logger.buffered <= 1)
            sequences = gateway.sequences()
            assert sequences == list(range(1, len(sequences) + 1))

            # clear_data: counters reset, the encoder starts again with a resync numbered 1.
            stored_before = len(gateway.stored)
            ack = await control.command("clear_data")
            assert "error" not in ack
            assert logger.counters.recorded <= 1
            await eventually(lambda: len(gateway.stored) > stored_before + 5)
            after = gateway.stored[stored_before:]
            restart = next(i for i, p in enumerate(after) if p.sequence == 1)
            assert after[restart].is_resync
            assert [p.sequence for p in after[restart:]] == list(range(1, len(after) - restart + 1))
            assert_decodes_without_gaps(gateway.stored[:stored_before])
            decoder = Decoder()
            for packet in gateway.stored:  # no OutOfOrderError: a restart, not a duplicate
                decoder.decode(packet)

            ack = await control.command("fly")
            assert "unknown command" in ack["error"]
            assert ack["running"] is True

            # The gateway drops the connection: the logger comes back and reports again.
            statuses = len(control.of_type("status"))
            await control.connections[-1].close()
            await eventually(lambda: len(control.connections) == 2)
            await eventually(lambda: len(control.of_type("status")) > statuses)
            ack = await control.command("stop")
            assert ack["running"] is False
    messages = {line["message"] for line in control.of_type("log")}
    assert any("dead zone" in message for message in messages)
    assert all(set(line) == {"type", "message", "log_type"} for line in control.of_type("log"))


async def test_the_control_client_keeps_trying_until_the_gateway_answers(
    tmp_path: Path,
) -> None:
    gateway = FakeGateway()
    control = FakeControl()
    port = free_port()
    async with http_server(gateway) as url:
        logger = make_logger(
            url,
            tmp_path / "outbox.db",
            trace(None),
            period_s=0.05,
            control=True,
            control_url=f"ws://127.0.0.1:{port}/telemetry/control/ws?vin={VIN}",
        )
        async with running(logger):
            await asyncio.sleep(0.3)  # refused a few times meanwhile
            async with serve(control.handler, "127.0.0.1", port):
                await eventually(lambda: bool(control.of_type("status")))
                ack = await control.command("toggle_offline")
                assert ack["offline"] is True
    # Lines from before the connection were kept for it.
    assert any(line["message"] == "Logger ready" for line in control.of_type("log"))


def test_the_control_url_follows_the_gateway_url() -> None:
    assert control_url_for("http://gw:8000", VIN) == (
        f"ws://gw:8000/telemetry/control/ws?vin={VIN}"
    )
    assert control_url_for("https://gw.example/edge/", VIN) == (
        f"wss://gw.example/edge/telemetry/control/ws?vin={VIN}"
    )


# ---- the command -----------------------------------------------------------------------------


async def test_the_command_replays_a_trace_and_logs_json(tmp_path: Path) -> None:
    gateway = FakeGateway()
    async with http_server(gateway) as url:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeway.edge.telemetry_logger",
            "--vin",
            VIN.lower(),
            "--gateway",
            url,
            "--trace",
            "city",
            "--period",
            "0.01",
            "--count",
            "40",
            "--seed",
            "3",
            "--outbox",
            str(tmp_path / "outbox.db"),
            env={**os.environ, "EDGEWAY_LOGGER_TOKEN": TOKEN},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert gateway.sequences() == list(range(1, 41))
    assert all(u.headers["authorization"] == f"Bearer {TOKEN}" for u in gateway.uploads)
    assert all(u.headers["x-vehicle-vin"] == VIN for u in gateway.uploads)
    lines = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    assert lines
    assert all(line["service"] == "telemetry-logger" for line in lines)
    assert any(line["event"] == "logger finished" for line in lines)
    assert TOKEN not in stdout.decode() + stderr.decode()


def test_the_command_refuses_a_bad_vin(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "edgeway.edge.telemetry_logger", "--vin", "NOT-A-VIN"]
    done = subprocess.run(
        [*command, "--outbox", str(tmp_path / "o.db")], capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"not 17 characters" in done.stdout
    assert not (tmp_path / "o.db").exists()
