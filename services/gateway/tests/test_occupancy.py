"""The real gateway process at the edge: auth, origin, shape and size checks, model count.

Connected: a real gateway on a private RabbitMQ virtual host. No occupancy service runs here,
so accepted observations wait in their quorum queue, where the test reads them back.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import websockets
from aio_pika.abc import AbstractIncomingMessage
from websockets.asyncio.client import ClientConnection

from edgeway.common.batching import batch_size, unpack_work
from edgeway.common.envelope import Envelope
from edgeway.common.testing import (
    TEST_SECRET,
    ServiceProcess,
    free_port,
    gateway_fixture,
    make_token,
    start_gateway,
)
from edgeway.common.topology import Channels, Topology

pytestmark = pytest.mark.connected

QUEUE = "edgeway.occupancy.observations"


PUBLISH = make_token("occupancy:publish")
SUBSCRIBE = make_token("occupancy:subscribe")


def frame(camera: str = "Flint_1", **summary: Any) -> dict[str, Any]:
    return {
        "event": "frame_result",
        "camera": camera,
        "timestamp": time.time(),
        "summary": {"total_people": 2, "free": ["t1"], "occupied": ["t2"], **summary},
        "segments": [{"index": 0, "name": "t1", "capacity": 2, "count": 1, "status": "free"}],
    }


gateway = gateway_fixture(
    EDGEWAY_ALLOWED_ORIGINS='["https://dash.example"]',
    EDGEWAY_PRODUCER_RATE="20",
    EDGEWAY_PRODUCER_BURST="40",
    EDGEWAY_REQUEST_TIMEOUT="0.3",
    EDGEWAY_WS_MAX_SIZE=str(1024 * 1024),  # the protocol limit tested below
)


def ws_url(gateway: ServiceProcess, path: str, token: str | None = None) -> str:
    url = gateway.url.replace("http", "ws") + path
    return f"{url}?token={token}" if token else url


async def expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["type"] == "error"
    assert reply["code"] == code, reply
    assert reply["reason"]
    return dict(reply)


@dataclass(frozen=True)
class Published:
    """One frame in the work queue as the occupancy service reads it: a message of its own, or
    one of a batch (`batch`: how many frames its AMQP message carried)."""

    body: bytes
    message_id: str
    type: str | None
    delivery_mode: Any
    headers: Any
    batch: int


def frames_of(message: AbstractIncomingMessage) -> list[Published]:
    count = batch_size(message.headers)
    if count == 1:
        items = [(message.body, Envelope.from_message(message, type=""))]
    else:
        shared = Envelope.from_message(message, type="")
        items = unpack_work(message.body, message.headers, shared)
    return [
        Published(
            body, envelope.message_id, message.type, message.delivery_mode, message.headers, count
        )
        for body, envelope in items
    ]


async def drain_queue(amqp_url: str, expected: int, wait: float = 10) -> list[Published]:
    """Read what the gateway published into the (otherwise unconsumed) work queue, frame by
    frame."""
    connection = await aio_pika.connect(amqp_url)
    messages: list[Published] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(QUEUE, ensure=True)
        deadline = time.monotonic() + wait
        while len(messages) < expected and time.monotonic() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            messages.extend(frames_of(message))
    return messages


async def test_websockets_refuse_missing_and_wrong_tokens_with_http_status(
    gateway: ServiceProcess,
) -> None:
    cases = [
        (ws_url(gateway, "/model/ws/connect"), None, 401),
        (ws_url(gateway, "/model/ws/connect", SUBSCRIBE), None, 403),
        (ws_url(gateway, "/client/ws/connect", PUBLISH), None, 403),
        (ws_url(gateway, "/client/ws/connect", "garbage"), None, 401),
        (ws_url(gateway, "/client/ws/connect", SUBSCRIBE), "https://evil.example", 403),
    ]
    for url, origin, status in cases:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, origin=origin)  # type: ignore[arg-type]
        assert refused.value.response.status_code == status, url
        body = json.loads(refused.value.response.body or b"{}")
        assert body["type"] == "error"
        assert body["reason"]
    # An allowlisted browser page and a bearer header both get in.
    async with websockets.connect(
        ws_url(gateway, "/client/ws/connect", SUBSCRIBE),
        origin="https://dash.example",  # type: ignore[arg-type]
    ):
        pass
    async with websockets.connect(
        ws_url(gateway, "/model/ws/connect"),
        additional_headers={"Authorization": f"Bearer {PUBLISH}"},
    ):
        pass


async def test_http_endpoints_need_their_scope(gateway: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/model/count")).status_code == 401
        assert (await http.get(f"/model/count?token={PUBLISH}")).status_code == 403
        ok = await http.get("/model/count", headers={"Authorization": f"Bearer {SUBSCRIBE}"})
        assert ok.status_code == 200
        assert set(ok.json()) == {"count"}
        health = await http.get("/discover/health")
        assert health.json() == {"status": "ok", "message": "Server is running!"}


async def test_bad_input_gets_an_error_frame_and_the_stream_continues(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    await drain_queue(amqp_url, expected=10_000, wait=0.5)  # start from an empty queue
    good = [frame("Flint_1", total_people=n) for n in range(3)]
    async with websockets.connect(ws_url(gateway, "/model/ws/connect", PUBLISH)) as ws:
        await ws.send(json.dumps(good[0]))
        await ws.send("{not json")
        await expect_error(ws, "malformed_json")
        await ws.send(json.dumps({"camera": "Flint_1"}))
        shape = await expect_error(ws, "invalid_shape")
        assert "summary" in shape["reason"]
        await ws.send(json.dumps(frame(free=[], occupied=[])))
        await expect_error(ws, "zero_zones")
        await ws.send(json.dumps({**frame(), "timestamp": "yesterday"}))
        await expect_error(ws, "invalid_shape")
        await ws.send(json.dumps({**frame(), "camera": "../../etc/passwd"}))
        await expect_error(ws, "invalid_shape")
        await ws.send(json.dumps(good[1]).encode())  # binary frames carry JSON too
        await ws.send(json.dumps({**frame(), "padding": "x" * 70_000}))
        await expect_error(ws, "too_large")
        await ws.send(json.dumps(good[2]))
        await asyncio.sleep(0.2)
    published = await drain_queue(amqp_url, expected=3)
    assert [json.loads(m.body) for m in published] == good  # exactly what the producer sent
    for message in published:
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.message_id
        assert message.type == "occupancy.observation.v1"
        assert message.headers["x-reply-channel"].startswith("gateway.")
    assert len({m.message_id for m in published}) == 3

    async with httpx.AsyncClient() as http:
        metrics = (await http.get(gateway.url + "/metrics")).text
    for code in ("malformed_json", "invalid_shape", "zero_zones", "too_large"):
        assert (
            f'edgeway_gateway_rejected_total{{code="{code}",endpoint="/model/ws/connect"}}'
            in metrics
        )


async def test_an_acknowledged_producer_hears_of_every_message_and_a_resend_keeps_its_id(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    """`?ack=1`: an ack once the broker confirmed it, or an error frame naming the message by
    its place on the connection; the same frame sent again (after a reconnect) has the same
    message id, so the occupancy service stores it once."""
    await drain_queue(amqp_url, expected=10_000, wait=0.5)  # start from an empty queue
    good = frame("Flint_1", total_people=7)
    url = ws_url(gateway, "/model/ws/connect", PUBLISH) + "&ack=1"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(good))
        await ws.send("{not json")
        await ws.send(json.dumps(frame("Flint_2")))
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    by_seq = {reply.get("seq") or reply["details"]["seq"]: reply for reply in replies}
    assert sorted(by_seq) == [1, 2, 3]
    assert by_seq[1]["type"] == "ack"
    assert (by_seq[2]["type"], by_seq[2]["code"]) == ("error", "malformed_json")
    assert by_seq[3]["type"] == "ack"
    assert by_seq[1]["message_id"] != by_seq[3]["message_id"]
    async with websockets.connect(url) as again:  # a reconnect sends what was not acked
        await again.send(json.dumps(good))
        resent = json.loads(await asyncio.wait_for(again.recv(), 5))
    assert (resent["type"], resent["seq"]) == ("ack", 1)
    assert resent["message_id"] == by_seq[1]["message_id"]
    published = await drain_queue(amqp_url, expected=3)
    assert [m.message_id for m in published].count(by_seq[1]["message_id"]) == 2

    async with websockets.connect(ws_url(gateway, "/model/ws/connect", PUBLISH)) as plain:
        await plain.send(json.dumps(good))  # Omega's own wire: no answer to a good frame
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(plain.recv(), 0.5)
    (legacy,) = await drain_queue(amqp_url, expected=1)
    assert legacy.message_id != by_seq[1]["message_id"]


async def test_frames_in_flight_together_are_answered_in_the_order_they_were_sent(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    """Several frames of a connection are published at once (a window of confirms), yet every
    answer, an ack or an error frame decided at the edge, comes in the order of its message,
    and the work queue holds the frames in the order they were sent."""
    await drain_queue(amqp_url, expected=10_000, wait=0.5)  # start from an empty queue
    sent: list[dict[str, Any] | None] = [
        None if seq % 7 == 0 else frame("Flint_1", total_people=seq) for seq in range(1, 36)
    ]  # within the fixture's burst of 40
    url = ws_url(gateway, "/model/ws/connect", PUBLISH) + "&ack=1"
    async with websockets.connect(url) as ws:
        for message in sent:  # all at once: nothing waits for an answer
            await ws.send("{not json" if message is None else json.dumps(message))
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in sent]
    seqs = [reply.get("seq") or reply["details"]["seq"] for reply in replies]
    assert seqs == list(range(1, len(sent) + 1))
    assert [reply["type"] for reply in replies] == [
        "error" if message is None else "ack" for message in sent
    ]
    good = [message for message in sent if message is not None]
    published = await drain_queue(amqp_url, expected=len(good))
    assert [json.loads(m.body) for m in published] == good
    acked = [reply["message_id"] for reply in replies if reply["type"] == "ack"]
    assert [m.message_id for m in published] == acked
    # The first went alone; those that came while it awaited its confirm went together.
    assert published[0].batch == 1
    assert max(m.batch for m in published) > 1


async def test_a_client_whose_snapshot_fails_still_gets_live_updates(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    """The occupancy service answers the latest-state query with its error object (its database
    is down): the client gets no snapshot, and its live updates all the same."""
    topology = Topology()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        spec = topology.occupancy_requests_queue
        requests = await channel.declare_queue(
            spec.name, durable=False, arguments=spec.arguments, auto_delete=True
        )
        asked = asyncio.Event()

        async def answer(request: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with request.process():
                assert request.reply_to is not None
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"error": "occupancy database unavailable"}',
                        correlation_id=request.correlation_id,
                        content_type="application/json",
                    ),
                    routing_key=request.reply_to,
                )
                asked.set()

        await requests.consume(answer)
        broadcast = await channel.declare_exchange(
            topology.names.broadcast, aio_pika.ExchangeType.TOPIC, durable=True
        )
        update = {"location_name": "Flint Loop", "timestamp": 1.0, "people_detected": 3}
        async with websockets.connect(ws_url(gateway, "/client/ws/connect", SUBSCRIBE)) as ws:
            await asyncio.wait_for(asked.wait(), 5)
            deadline = time.monotonic() + 5
            while True:  # until the gateway watches the channel (it binds as the client joins)
                await broadcast.publish(
                    aio_pika.Message(json.dumps(update).encode(), content_type="application/json"),
                    routing_key=Channels.occupancy_location(2),
                )
                try:
                    received = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "no live update reached the client"
            assert received == update
    finally:
        await connection.close()


async def test_a_frame_beyond_the_protocol_limit_closes_with_1009(gateway: ServiceProcess) -> None:
    async with websockets.connect(
        ws_url(gateway, "/model/ws/connect", PUBLISH), max_size=None
    ) as ws:

        async def send_huge_then_read() -> None:
            await ws.send("x" * (2 * 1024 * 1024))
            await asyncio.wait_for(ws.recv(), 5)

        with pytest.raises(websockets.ConnectionClosed) as closed:
            await send_huge_then_read()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_a_producer_over_its_rate_is_told_and_kept(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    await drain_queue(amqp_url, expected=10_000, wait=0.5)
    async with websockets.connect(ws_url(gateway, "/model/ws/connect", PUBLISH)) as ws:
        for _ in range(60):  # burst is 40
            await ws.send(json.dumps(frame()))
        await expect_error(ws, "rate_limited")
        await asyncio.sleep(1.0)  # 20/s refills
        await ws.send(json.dumps(frame(total_people=99)))
        await asyncio.sleep(0.3)
    published = await drain_queue(amqp_url, expected=41)
    assert 40 <= len(published) <= 45
    assert json.loads(published[-1].body)["summary"]["total_people"] == 99


async def test_model_count_drops_connections_that_die(gateway: ServiceProcess) -> None:
    async def count() -> int:
        async with httpx.AsyncClient() as http:
            reply = await http.get(gateway.url + f"/model/count?token={SUBSCRIBE}")
            return int(reply.json()["count"])

    base = await count()
    models = [
        await websockets.connect(ws_url(gateway, "/model/ws/connect", PUBLISH)) for _ in range(3)
    ]
    assert await count() == base + 3
    await models[0].close()
    models[1].transport.abort()  # dies without a closing handshake
    for _ in range(50):
        if await count() == base + 1:
            break
        await asyncio.sleep(0.1)
    assert await count() == base + 1
    await models[2].close()


async def test_tokens_never_reach_the_logs(gateway: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        await http.get(f"/model/count?token={SUBSCRIBE}")
        await http.get("/model/count", headers={"Authorization": f"Bearer {PUBLISH}"})
    async with websockets.connect(ws_url(gateway, "/model/ws/connect", PUBLISH)):
        pass
    await asyncio.sleep(0.2)
    log = gateway.log_text()
    assert "/model/count" in log  # the requests were logged...
    assert SUBSCRIBE not in log  # ...without their tokens
    assert PUBLISH not in log
    assert TEST_SECRET not in log


def test_readiness_and_liveness(gateway: ServiceProcess) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/readyz").json() == {"status": "ready"}


def test_log_lines_are_json(gateway: ServiceProcess) -> None:
    lines = [line for line in Path(gateway.log_path).read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert record["service"] == "gateway"
        assert "level" in record


def test_production_keeps_docs_and_metrics_off_the_public_port(
    amqp_url: str, tmp_path: Path
) -> None:
    metrics_port = free_port()
    production = start_gateway(
        amqp_url,
        tmp_path,
        EDGEWAY_ENVIRONMENT="production",
        EDGEWAY_METRICS_PORT=str(metrics_port),
        EDGEWAY_METRICS_HOST="127.0.0.1",
    )
    try:
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics"):
            assert (path, httpx.get(production.url + path).status_code) == (path, 404)
        internal = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert internal.status_code == 200
        assert "edgeway_gateway_connections" in internal.text
    finally:
        production.stop()


def test_development_serves_docs_and_metrics_on_its_port(gateway: ServiceProcess) -> None:
    for path in ("/docs", "/openapi.json", "/metrics"):
        assert (path, httpx.get(gateway.url + path).status_code) == (path, 200)


async def test_a_refused_upgrade_is_logged_at_info_not_error(gateway: ServiceProcess) -> None:
    for token in (None, SUBSCRIBE, "not.a.token"):
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(ws_url(gateway, "/model/ws/connect", token)):
                pass
    await asyncio.sleep(0.2)
    records = [json.loads(line) for line in gateway.log_text().splitlines() if line.strip()]
    refused = [r for r in records if r["event"] == "websocket refused"]
    assert len(refused) >= 3
    assert {r["level"] for r in refused} == {"info"}
    assert [r for r in records if r["level"] in ("error", "critical")] == []


async def test_a_flood_of_refused_upgrades_is_counted_but_not_all_logged(
    gateway: ServiceProcess,
) -> None:
    def refused_lines() -> int:
        return gateway.log_text().count('"websocket refused"')

    def counted() -> float:
        metrics = httpx.get(gateway.url + "/metrics").text
        line = 'edgeway_gateway_auth_refused_total{endpoint="/client/ws/connect",status="401"}'
        values = [float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line)]
        return values[0] if values else 0.0

    async def refused() -> None:
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(ws_url(gateway, "/client/ws/connect", "not.a.token")):
                pass

    lines_before, counted_before = refused_lines(), counted()
    started = time.monotonic()
    await asyncio.gather(*(refused() for _ in range(120)))
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.3)
    assert counted() - counted_before == 120
    # At most the burst (20, less what this module's earlier refusals used) and 5 a second
    # for however long the flood took (a second or two here): far fewer than 120.
    assert 1 <= refused_lines() - lines_before <= 20 + 5 * elapsed + 2
