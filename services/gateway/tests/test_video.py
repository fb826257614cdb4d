"""The real gateway process at the phone and video edge (WorldSystem, docs/replaced-systems.md).

Connected: a real gateway on a private RabbitMQ virtual host, and no video relay. The tests read
what the gateway publishes from the queues it declares (or from queues of their own bound to
the WorldSystem exchanges), and publish themselves what the relay would put on the broadcast
exchange. Where the gateway asks the relay (GOP, status), a small responder in the test stands
in for it on `edgeway.video.requests`; the relay's own tests cover how it builds the GOP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import websockets
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from websockets.asyncio.client import ClientConnection

from edgeway.common.testing import (
    BrokerListener,
    ServiceProcess,
    gateway_fixture,
    make_token,
)
from edgeway.common.video.packets import PacketType, VideoPacket

pytestmark = pytest.mark.connected

MAX_JPEG = 4096
MAX_VIDEO_MESSAGE = 8192
MAX_PHONE_FILE = 100_000
BROADCAST = "edgeway.broadcast"
OCTETS = "application/octet-stream"
JPEG_24X16 = (Path(__file__).parent / "data" / "24x16.jpg").read_bytes()  # see test_jpeg.py


# The phones' token names the devices these tests stream as (its `device` claim).
PHONE = make_token("video:publish", device=["cam-a", "cam-b", "cam-c", "cam-f", "p1", "p2"])
WATCHER = make_token("video:subscribe")
PILOT = make_token("video:subscribe", "video:control")
OPERATOR = make_token("video:control")


gateway = gateway_fixture(
    EDGEWAY_REQUEST_TIMEOUT="0.5",
    EDGEWAY_NTP_SERVERS="[]",  # no internet here: the clock is this host's
    EDGEWAY_MAX_JPEG_BYTES=str(MAX_JPEG),
    EDGEWAY_MAX_VIDEO_MESSAGE_BYTES=str(MAX_VIDEO_MESSAGE),
    EDGEWAY_MAX_PHONE_FILE_BYTES=str(MAX_PHONE_FILE),
    EDGEWAY_MAX_PHONE_UPLOADS="2",
    EDGEWAY_VIEWER_COMMAND_RATE="5",
    EDGEWAY_VIEWER_COMMAND_BURST="10",
)


def ws_url(gateway: ServiceProcess, path: str, token: str | None, **query: str) -> str:
    params = {**({"token": token} if token else {}), **query}
    url = gateway.url.replace("http", "ws") + path
    return url + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")


async def recv_json(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def until_quiet(ws: ClientConnection, wait: float = 1.0) -> list[Any]:
    """Every JSON message until none comes for `wait` seconds."""
    received: list[Any] = []
    while True:
        try:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), wait)))
        except TimeoutError:
            return received


async def nothing_more(ws: ClientConnection, wait: float = 0.3) -> None:
    try:
        message = await asyncio.wait_for(ws.recv(), wait)
    except TimeoutError:
        return
    pytest.fail(f"unexpected message {message!r}")


async def synced(ws: ClientConnection) -> None:
    """Once the gateway answers a message the socket has subscribed to its channels: every
    endpoint subscribes before it reads. A bad message gets an error frame."""
    await ws.send("not json")
    error = await recv_json(ws)
    assert (error["type"], error["code"]) == ("error", "malformed_json")


@asynccontextmanager
async def amqp(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection: AbstractRobustConnection = await aio_pika.connect_robust(url)
    async with connection:
        yield await connection.channel()


def frame(timestamp_ns: int, jpeg: bytes) -> bytes:
    return timestamp_ns.to_bytes(8, "big") + jpeg


# --- phones ---------------------------------------------------------------------------------


async def test_phone_frames_reach_video_frames_exchange_with_the_seed_headers(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    async with amqp(amqp_url) as channel:
        frames = await BrokerListener.bind(channel, "video_frames_exchange")
        async with websockets.connect(ws_url(gateway, "/ws/phone", PHONE, device="cam-a")) as ws:
            before_ns = time.time_ns()
            await ws.send(frame(1_763_000_000_123_456_789, JPEG_24X16))
            await ws.send(frame(1_763_000_000_200_000_000, b"\x89PNG\r\n\x1a\n not a jpeg"))
            bad = await recv_json(ws)
            assert (bad["type"], bad["code"]) == ("error", "invalid_jpeg")
            assert "SOI" in bad["reason"]
            await ws.send(frame(1, JPEG_24X16 + bytes(MAX_JPEG)))  # over the limit
            too_large = await recv_json(ws)
            assert (too_large["type"], too_large["code"]) == ("error", "too_large")
            await ws.send(b"\x00\x01")  # shorter than the timestamp
            assert (await recv_json(ws))["code"] == "invalid_jpeg"
            # The socket stayed open: the next frame goes through.
            await ws.send(frame(1_763_000_000_300_000_000, JPEG_24X16))
            first, second = await frames.get(), await frames.get()
            after_ns = time.time_ns()
            await frames.none()

        # Only the two good frames, the JPEG without its timestamp, the seed's header strings.
        assert first.body == second.body == JPEG_24X16
        headers = first.headers
        assert headers["timestamp_ns"] == "1763000000123456789"
        assert (headers["width"], headers["height"]) == ("24", "16")
        assert headers["x-device"] == "cam-a"
        assert headers["ntp_offset"] == "0.0"
        assert headers["server_received"] == headers["ntp_time"]
        assert before_ns - 10**6 <= int(str(headers["server_received"])) <= after_ns + 10**6
        assert second.headers["timestamp_ns"] == "1763000000300000000"
        assert first.content_type == "application/octet-stream"
        assert first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


async def test_imu_and_analysis_mode_are_published_and_bad_messages_answered(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    imu = {
        "type": "imu_data",
        "timestamp": 1_763_000_000_000_000_123,
        "accelerometer": {"x": 0.1, "y": -9.8, "z": 0.25},
        "gyroscope": {"x": 0, "y": 0.001, "z": -0.5},
    }
    imu_text = json.dumps(imu, indent=1)  # the body goes on exactly as the phone sent it
    async with amqp(amqp_url) as channel:
        imu_queue = await BrokerListener.drain(channel, "edgeway.video.imu")
        modes = await BrokerListener.bind(channel, "analysis_mode_exchange")
        async with websockets.connect(ws_url(gateway, "/ws/phone", PHONE, device="cam-b")) as ws:
            await ws.send(imu_text)
            await ws.send(json.dumps({"type": "analysis_mode", "data": "YOLO"}))
            await ws.send(json.dumps({**imu, "timestamp": "yesterday"}))
            assert (await recv_json(ws))["code"] == "invalid_shape"
            await ws.send(json.dumps({**imu, "gyroscope": {"x": 1, "y": 2}}))
            assert "gyroscope" in (await recv_json(ws))["reason"]
            await ws.send(json.dumps({"type": "analysis_mode", "data": "segment"}))
            assert (await recv_json(ws))["code"] == "invalid_shape"
            # A file upload without its text (uploads themselves: test_ingest_edge.py).
            await ws.send(json.dumps({"type": "file_upload", "fileName": "../../etc/passwd"}))
            assert "fileContent" in (await recv_json(ws))["reason"]
            await ws.send("{not json")
            assert (await recv_json(ws))["code"] == "malformed_json"
            await ws.send(json.dumps({"type": "analysis_mode", "data": "none"}))

            sample = await imu_queue.get()
            assert sample.body == imu_text.encode()
            assert sample.headers["x-device"] == "cam-b"
            assert sample.content_type == "application/json"
            assert [json.loads((await modes.get()).body) for _ in range(2)] == [
                {"type": "analysis_mode", "data": "yolo", "device": "cam-b"},
                {"type": "analysis_mode", "data": "none", "device": "cam-b"},
            ]
            await imu_queue.none()


async def test_phone_csv_files_go_to_ingestion_whole_or_chunked_and_bounded(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    csv_text = "t,ax,ay\n1,0.1,9.8\n2,0.2,9.7\n"
    async with amqp(amqp_url) as channel:
        files = await BrokerListener.drain(channel, "edgeway.ingest.uploads")
        async with websockets.connect(ws_url(gateway, "/ws/phone", PHONE, device="cam-f")) as ws:
            # One piece, with a path for a name: kept as a label only.
            await ws.send(
                json.dumps(
                    {"type": "file_upload", "fileName": "../../etc/passwd", "fileContent": csv_text}
                )
            )
            ack = await recv_json(ws)
            assert (ack["type"], ack["fileName"], ack["bytes"]) == (
                "file_upload_ack",
                "../../etc/passwd",
                len(csv_text),
            )
            whole = await files.get()
            assert whole.body == csv_text.encode()
            assert whole.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert whole.headers["x-file-kind"] == "csv"
            assert whole.headers["x-device"] == "cam-f"
            assert whole.headers["x-file-id"] == ack["file_id"]

            # Chunked, in order.
            await ws.send(json.dumps({"type": "file_upload_start", "fileName": "imu.csv"}))
            for index, part in enumerate(("t,x\n", "1,2\n", "3,4\n")):
                chunk = {"fileName": "imu.csv", "chunkIndex": index, "chunk": part}
                await ws.send(json.dumps({"type": "file_upload_chunk", **chunk}))
            await ws.send(json.dumps({"type": "file_upload_complete", "fileName": "imu.csv"}))
            assert (await recv_json(ws))["fileName"] == "imu.csv"
            assert (await files.get()).body == b"t,x\n1,2\n3,4\n"

            # Refusals, each with its reason, and nothing published.
            start = {"type": "file_upload_start", "fileName": "gap.csv"}
            await ws.send(json.dumps(start))
            chunk = {"type": "file_upload_chunk", "fileName": "gap.csv", "chunk": "a"}
            await ws.send(json.dumps({**chunk, "chunkIndex": 1}))
            assert "out of order" in (await recv_json(ws))["reason"]
            await ws.send(json.dumps({**chunk, "chunkIndex": 0}))  # dropped with the gap
            assert "no upload" in (await recv_json(ws))["reason"]
            binary = {"type": "file_upload", "fileName": "x.csv", "fileContent": "a,b\n\x00\x01"}
            await ws.send(json.dumps(binary))
            refused = await recv_json(ws)
            assert refused["code"] == "not_text", refused
            big = {"type": "file_upload", "fileName": "big.csv", "fileContent": "a" * 150_000}
            await ws.send(json.dumps(big))
            assert "limit" in (await recv_json(ws))["reason"]
            for name in ("a.csv", "b.csv", "c.csv"):
                await ws.send(json.dumps({"type": "file_upload_start", "fileName": name}))
            assert "at most 2" in (await recv_json(ws))["reason"]
            await files.none()
        # The phone left with two uploads open: they are gone, not leaked.
        async with websockets.connect(ws_url(gateway, "/ws/phone", PHONE, device="cam-f")) as ws:
            await ws.send(json.dumps({"type": "file_upload_complete", "fileName": "a.csv"}))
            assert "no upload" in (await recv_json(ws))["reason"]


async def test_video_chunks_reach_the_stream_queue_unchanged_and_numbered(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    chunks = [bytes([i]) * (100 + i) for i in range(1, 6)]
    async with amqp(amqp_url) as channel:
        stream = await BrokerListener.drain(channel, "edgeway.video.stream")
        url = ws_url(gateway, "/ws/video", PHONE, device="cam-c")
        async with websockets.connect(url) as ws:
            await ws.send(chunks[0])
            await ws.send(chunks[1])
            await ws.send(b"x" * (MAX_VIDEO_MESSAGE + 1))  # refused, but it takes number 3
            assert (await recv_json(ws))["code"] == "too_large"
            await ws.send(json.dumps({"type": "video_config", "width": 1920}))  # only logged
            for chunk in chunks[2:]:
                await ws.send(chunk)
            received = [await stream.get() for _ in range(5)]
            await stream.none()
            await nothing_more(ws)
        assert [m.body for m in received] == chunks
        assert [m.headers["x-chunk-seq"] for m in received] == ["1", "2", "4", "5", "6"]
        assert {m.headers["x-device"] for m in received} == {"cam-c"}
        assert len({m.headers["x-connection"] for m in received}) == 1
        assert all(m.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT for m in received)

        # A new connection is a new byte stream: a new id, numbered from 1 again. Another
        # connection for the same device replaces the older one, which is closed.
        async with websockets.connect(url) as older:
            await older.send(b"older")
            from_older = await stream.get()
            async with websockets.connect(url) as newer:
                await asyncio.wait_for(older.wait_closed(), 5)
                assert older.close_code == 1008
                await newer.send(b"newer")
                from_newer = await stream.get()
        assert from_older.headers["x-chunk-seq"] == from_newer.headers["x-chunk-seq"] == "1"
        assert from_newer.body == b"newer"
        connections = {m.headers["x-connection"] for m in (received[0], from_older, from_newer)}
        assert len(connections) == 3


async def test_a_bad_device_id_is_refused_with_a_reason(gateway: ServiceProcess) -> None:
    for path in ("/ws/phone", "/ws/video", "/ws/video/consume"):
        token = WATCHER if path.endswith("consume") else PHONE
        async with websockets.connect(ws_url(gateway, path, token, device="a.b")) as ws:
            error = await recv_json(ws)
            assert (error["code"], path) == ("invalid_shape", path)
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1008


async def test_each_endpoint_needs_its_scope(gateway: ServiceProcess) -> None:
    cases = [
        ("/ws/phone", WATCHER),
        ("/ws/video", WATCHER),
        ("/ws/video/consume", PHONE),
        ("/ws/viewer", OPERATOR),
    ]
    for path, wrong in cases:
        for token, status in ((None, 401), (wrong, 403)):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(ws_url(gateway, path, token)):
                    pass
            assert (path, refused.value.response.status_code) == (path, status)
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for path in ("/health/video", "/video/status", "/h264/test"):
            response = await http.get(path, headers={"Authorization": f"Bearer {PHONE}"})
            assert (path, response.status_code) == (path, 403)
        watcher = {"Authorization": f"Bearer {WATCHER}"}
        assert (await http.post("/api/restart", headers=watcher)).status_code == 403
        assert (await http.post("/api/restart")).status_code == 401


# --- viewers and commands -------------------------------------------------------------------


async def publish_broadcast(
    channel: aio_pika.abc.AbstractChannel,
    routing_key: str,
    body: bytes,
    *,
    content_type: str = "application/json",
    headers: dict[str, Any] | None = None,
) -> None:
    exchange = await channel.get_exchange(BROADCAST)
    await exchange.publish(
        aio_pika.Message(body, content_type=content_type, headers=headers or {}),
        routing_key=routing_key,
    )


async def test_viewer_commands_reach_only_the_addressed_phones(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    async with (
        amqp(amqp_url) as channel,
        websockets.connect(ws_url(gateway, "/ws/phone", PHONE, device="p1")) as p1,
        websockets.connect(ws_url(gateway, "/ws/phone", PHONE, device="p2")) as p2,
        websockets.connect(ws_url(gateway, "/ws/viewer", PILOT)) as pilot,
        websockets.connect(ws_url(gateway, "/ws/viewer", WATCHER)) as watcher,
    ):
        for ws in (p1, p2, pilot, watcher):
            await synced(ws)
        # Without video:control: an error frame, and nothing reaches a phone.
        await watcher.send(json.dumps({"type": "joystick", "x": 1}))
        refused = await recv_json(watcher)
        assert (refused["code"], "video:control" in refused["reason"]) == ("forbidden", True)

        to_p1 = json.dumps({"type": "joystick", "device": "p1", "x": 0.5, "y": -0.25})
        to_all = json.dumps({"type": "flightmode", "action": "hover"})
        await pilot.send(to_p1)
        await pilot.send(to_all)
        assert await asyncio.wait_for(p1.recv(), 5) == to_p1  # verbatim
        assert await asyncio.wait_for(p1.recv(), 5) == to_all
        assert await asyncio.wait_for(p2.recv(), 5) == to_all
        await pilot.send(json.dumps({"type": "dance"}))
        assert (await recv_json(pilot))["code"] == "invalid_shape"

        # Whatever publishes a command for one phone reaches that phone's socket, on any replica.
        await publish_broadcast(channel, "video.control.p2", b'{"type":"camera","action":"on"}')
        assert await asyncio.wait_for(p2.recv(), 5) == '{"type":"camera","action":"on"}'
        await nothing_more(p1)
        await nothing_more(p2, 0.1)

        # Viewers get the relay's viewer channel and every phone's IMU.
        await publish_broadcast(channel, "video.viewer", b'{"type":"restart"}')
        imu = {"type": "imu_data", "imu_data": {"timestamp": 5, "device": "p1"}}
        await publish_broadcast(channel, "video.imu.p1", json.dumps(imu).encode())
        for viewer in (pilot, watcher):
            assert await recv_json(viewer) == {"type": "restart"}
            assert await recv_json(viewer) == imu


async def test_restart_reaches_restart_exchange(gateway: ServiceProcess, amqp_url: str) -> None:
    async with amqp(amqp_url) as channel, httpx.AsyncClient(base_url=gateway.url) as http:
        restarts = await BrokerListener.bind(channel, "restart_exchange")
        response = await http.post("/api/restart", headers={"Authorization": f"Bearer {OPERATOR}"})
        assert response.status_code == 202
        message = await restarts.get()
        assert json.loads(message.body) == {"type": "restart"}
        assert message.message_id == response.json()["message_id"]


# --- video consumers ------------------------------------------------------------------------


def packet_headers(kind: str, seq: int) -> dict[str, Any]:
    return {"x-packet-type": kind, "x-packet-seq": seq, "x-timestamp-us": seq * 33_333}


def payload(kind: str, seq: int) -> bytes:
    """Annex-B NAL units, each one recognisable by its kind and sequence number."""
    nal = {"sps": b"\x67", "pps": b"\x68", "keyframe": b"\x65", "frame": b"\x41"}[kind]
    return b"\x00\x00\x00\x01" + nal + f"{kind}-{seq}".encode()


async def publish_packet(
    channel: aio_pika.abc.AbstractChannel, device: str, kind: str, seq: int
) -> None:
    await publish_broadcast(
        channel,
        f"video.stream.{device}",
        payload(kind, seq),
        content_type="video/h264",
        headers=packet_headers(kind, seq),
    )


async def recv_binary(ws: ClientConnection) -> bytes:
    message = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(message, bytes), message
    return message


async def test_a_consumer_gets_live_packets_from_a_keyframe_and_pong(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    """No relay answers here: the consumer starts at the next keyframe, after SPS and PPS."""
    url = ws_url(gateway, "/ws/video/consume", WATCHER, device="cam-d")
    async with amqp(amqp_url) as channel, websockets.connect(url) as consumer:
        # No GOP (no relay, no stream yet): the consumer is told, not left in silence.
        assert await recv_json(consumer) == {
            "type": "status",
            "code": "no_stream",
            "reason": "no stream for device cam-d yet; it starts when the phone streams",
            "device": "cam-d",
        }
        await consumer.send("ping")
        assert await asyncio.wait_for(consumer.recv(), 5) == "pong"  # subscribed by now
        for seq, kind in enumerate(["sps", "pps", "frame", "keyframe", "frame", "frame"], 1):
            await publish_packet(channel, "cam-d", kind, seq)
        got = [await recv_binary(consumer) for _ in range(5)]
        # The frame before the keyframe cannot be decoded without its own keyframe: skipped.
        assert got == [
            payload("sps", 1),
            payload("pps", 2),
            payload("keyframe", 4),
            payload("frame", 5),
            payload("frame", 6),
        ]
        await publish_packet(channel, "cam-e", "keyframe", 1)  # another device's stream
        await nothing_more(consumer)


RequestHandler = Callable[[dict[str, Any]], Awaitable[tuple[bytes, str]]]


@asynccontextmanager
async def relay_stand_in(url: str, answer: RequestHandler) -> AsyncIterator[list[dict[str, Any]]]:
    """Answers the gateway's requests on edgeway.video.requests as the relay would."""
    asked: list[dict[str, Any]] = []
    async with amqp(url) as channel:
        queue = await channel.declare_queue(
            "edgeway.video.requests", durable=False, arguments={"x-message-ttl": 10_000}
        )

        async def on_request(message: AbstractIncomingMessage) -> None:
            request = json.loads(message.body)
            asked.append(request)
            body, content_type = await answer(request)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body, content_type=content_type, correlation_id=message.correlation_id
                ),
                routing_key=message.reply_to or "",
            )

        tag = await queue.consume(on_request, no_ack=True)
        try:
            yield asked
        finally:
            await queue.cancel(tag)


RELAY_STATUS = {
    "streams": {
        "cam-f": {
            "has_sps_pps": True,
            "gop_frames": 3,
            "bandwidth_mbps": 4.5,
            "packets": 14,
            "corrupt": 0,
            "chunks_lost": 0,
            "last_packet_at": "2025-11-21T12:00:00+00:00",
        }
    },
    "h264_decoder": True,
    "pyav": "18.1.0",
}


async def test_a_late_joiner_gets_the_gop_then_only_newer_live_packets(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    gop = [
        VideoPacket(PacketType.SPS, 1, payload("sps", 1)),
        VideoPacket(PacketType.PPS, 2, payload("pps", 2)),
        VideoPacket(PacketType.KEYFRAME, 10, payload("keyframe", 10), flags=1),
        VideoPacket(PacketType.FRAME, 11, payload("frame", 11)),
        VideoPacket(PacketType.FRAME, 12, payload("frame", 12)),
    ]
    async with amqp(amqp_url) as channel:

        async def answer(request: dict[str, Any]) -> tuple[bytes, str]:
            if request["query"] == "status":
                return json.dumps(RELAY_STATUS).encode(), "application/json"
            # Packets 11 to 14 go live while the relay answers: 11 and 12 are in the GOP, so
            # the consumer must get only 13 and 14 of them, after the GOP.
            for seq in (11, 12, 13, 14):
                await publish_packet(channel, "cam-f", "frame", seq)
            await asyncio.sleep(0.1)
            body = (12).to_bytes(8, "big") + b"".join(p.encode() for p in gop)
            return body, "application/octet-stream"

        async with relay_stand_in(amqp_url, answer) as asked:
            url = ws_url(gateway, "/ws/video/consume", WATCHER, device="cam-f")
            async with websockets.connect(url) as consumer:
                got = [await recv_binary(consumer) for _ in range(7)]
                assert got == [p.payload for p in gop] + [
                    payload("frame", 13),
                    payload("frame", 14),
                ]
                await publish_packet(channel, "cam-f", "frame", 12)  # a stale duplicate
                await publish_packet(channel, "cam-f", "frame", 15)
                assert await recv_binary(consumer) == payload("frame", 15)
                await nothing_more(consumer)
                assert asked == [{"query": "gop", "device": "cam-f"}]

                async with httpx.AsyncClient(
                    base_url=gateway.url, headers={"Authorization": f"Bearer {WATCHER}"}
                ) as http:
                    health = (await http.get("/health/video")).json()
                    status = (await http.get("/video/status")).json()
                    h264 = (await http.get("/h264/test")).json()
        # A URL that plays: the device that streams, not the seed's unnamed default.
        assert health == {
            "active_consumers": 1,
            "has_sps_pps": True,
            "video_url": "/ws/video/consume?device=cam-f",
            "devices": ["cam-f"],
        }
        assert status == {**RELAY_STATUS, "consumers": {"cam-f": 1}}
        assert h264 == {"h264_decoder": True, "pyav": "18.1.0"}

        # Without the relay: the health check still answers, the status is a 504.
        async with httpx.AsyncClient(
            base_url=gateway.url, headers={"Authorization": f"Bearer {WATCHER}"}
        ) as http:
            health = (await http.get("/health/video")).json()
            status_response = await http.get("/video/status")
        assert health == {
            "active_consumers": 0,
            "has_sps_pps": False,
            "video_url": "/ws/video/consume?device=phone",
            "devices": [],
        }
        assert status_response.status_code == 504


async def recv_text(ws: ClientConnection) -> Any:
    message = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(message, str), message
    return json.loads(message)


async def test_timing_1_puts_each_packets_capture_time_before_it_and_others_get_none(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    # The relay's clock for this device: packet times (µs from the phone's boot) plus this.
    offset_us = 1_800_000_000_000_000
    gop = [
        VideoPacket(PacketType.SPS, 1_000_000, payload("sps", 1)),
        VideoPacket(PacketType.PPS, 1_000_000, payload("pps", 2)),
        VideoPacket(PacketType.KEYFRAME, 1_000_000, payload("keyframe", 3), flags=1),
    ]

    async def answer(request: dict[str, Any]) -> tuple[bytes, str]:
        if request["query"] == "clock":
            body = {"device": "cam-t", "offset_us": offset_us}
            return json.dumps(body).encode(), "application/json"
        return (3).to_bytes(8, "big") + b"".join(p.encode() for p in gop), OCTETS

    async with amqp(amqp_url) as channel, relay_stand_in(amqp_url, answer) as asked:
        timed_url = ws_url(gateway, "/ws/video/consume", WATCHER, device="cam-t", timing="1")
        plain_url = ws_url(gateway, "/ws/video/consume", WATCHER, device="cam-t")
        async with websockets.connect(timed_url) as timed, websockets.connect(plain_url) as plain:
            got: list[Any] = []
            for seq, packet in enumerate(gop, 1):
                timing = await recv_text(timed)
                assert timing == {
                    "type": "timing",
                    "seq": seq,
                    "kind": ["sps", "pps", "keyframe"][seq - 1],
                    "captured_ms": (1_000_000 + offset_us) // 1000,
                }
                assert await recv_binary(timed) == packet.payload
            assert [await recv_binary(plain) for _ in gop] == [p.payload for p in gop]
            await plain.send("ping")
            assert await asyncio.wait_for(plain.recv(), 5) == "pong"  # subscribed by now
            await timed.send("ping")
            assert await asyncio.wait_for(timed.recv(), 5) == "pong"
            captured_ms = 1_800_000_001_033
            await publish_broadcast(
                channel,
                "video.stream.cam-t",
                payload("frame", 4),
                content_type="video/h264",
                headers={**packet_headers("frame", 4), "x-captured-ms": captured_ms},
            )
            # A packet the relay could not time (no x-captured-ms): null, not a made-up time.
            await publish_packet(channel, "cam-t", "frame", 5)
            for seq, (number, expected) in enumerate(((4, captured_ms), (5, None)), 4):
                assert await recv_text(timed) == {
                    "type": "timing",
                    "seq": seq,
                    "kind": "frame",
                    "captured_ms": expected,
                }
                got.append(await recv_binary(timed))
                assert got[-1] == payload("frame", number)
            # Without timing=1 the socket is what it always was: the binary packets alone.
            assert [await recv_binary(plain) for _ in range(2)] == got
            await nothing_more(plain)
            await nothing_more(timed)
        about = [request for request in asked if request.get("device") == "cam-t"]
        assert sorted(request["query"] for request in about) == ["clock", "gop", "gop"]

        # A timing value that is neither 0 nor 1 is refused with the reason.
        bad = ws_url(gateway, "/ws/video/consume", WATCHER, device="cam-t", timing="yes")
        async with websockets.connect(bad) as refused:
            error = await recv_json(refused)
            await asyncio.wait_for(refused.wait_closed(), 5)
        assert (error["code"], refused.close_code) == ("invalid_shape", 1008)
        assert "?timing= must be 0 or 1" in error["reason"]


def picture_reply(seq: int, captured_ms: int, jpeg: bytes) -> bytes:
    return seq.to_bytes(8, "big") + captured_ms.to_bytes(8, "big", signed=True) + jpeg


async def publish_jpeg(
    channel: aio_pika.abc.AbstractChannel, device: str, seq: int, jpeg: bytes
) -> None:
    await publish_broadcast(
        channel,
        f"video.frames.{device}",
        jpeg,
        content_type="image/jpeg",
        headers={"x-packet-type": "jpeg", "x-packet-seq": seq, "x-captured-ms": 1_000 + seq},
    )


async def test_a_frames_viewer_gets_the_latest_jpeg_at_once_then_newer_live_ones(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    latest = JPEG_24X16 + b"latest"

    async def answer(request: dict[str, Any]) -> tuple[bytes, str]:
        return picture_reply(7, 1_007, latest), OCTETS

    async with amqp(amqp_url) as channel, relay_stand_in(amqp_url, answer) as asked:
        url = ws_url(gateway, "/ws/video/frames", WATCHER, device="cam-j", timing="1")
        async with websockets.connect(url) as viewer:
            # At once, though nothing was published live: the relay's last JPEG.
            assert await recv_text(viewer) == {
                "type": "timing",
                "seq": 1,
                "kind": "jpeg",
                "captured_ms": 1_007,
            }
            assert await recv_binary(viewer) == latest
            # A live copy of a JPEG it already has is dropped; newer ones come, in order.
            for seq in (7, 8, 9):
                await publish_jpeg(channel, "cam-j", seq, JPEG_24X16 + bytes([seq]))
            for number, seq in ((2, 8), (3, 9)):
                timing = await recv_text(viewer)
                assert (timing["seq"], timing["captured_ms"]) == (number, 1_000 + seq)
                assert await recv_binary(viewer) == JPEG_24X16 + bytes([seq])
            await viewer.send("ping")
            assert await asyncio.wait_for(viewer.recv(), 5) == "pong"
            await nothing_more(viewer)
        assert [r for r in asked if "device" in r] == [{"query": "latest_jpeg", "device": "cam-j"}]


async def test_a_frames_viewer_hears_of_no_stream_and_a_bad_device_is_refused(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    """No relay answers: the viewer is told, then gets live JPEGs as they come."""
    url = ws_url(gateway, "/ws/video/frames", WATCHER, device="cam-k")
    async with amqp(amqp_url) as channel, websockets.connect(url) as viewer:
        status = await recv_json(viewer)
        assert (status["type"], status["code"], status["device"]) == (
            "status",
            "no_stream",
            "cam-k",
        )
        await viewer.send("ping")
        assert await asyncio.wait_for(viewer.recv(), 5) == "pong"
        await publish_jpeg(channel, "cam-k", 1, JPEG_24X16)
        assert await recv_binary(viewer) == JPEG_24X16  # no timing asked: the JPEG alone
        await publish_jpeg(channel, "cam-other", 1, JPEG_24X16)
        await nothing_more(viewer)
    for query in ({"device": "a.#"}, {"device": "cam-k", "timing": "2"}):
        bad = ws_url(gateway, "/ws/video/frames", WATCHER, **query)
        async with websockets.connect(bad) as refused:
            error = await recv_json(refused)
            await asyncio.wait_for(refused.wait_closed(), 5)
        assert (error["type"], error["code"], refused.close_code) == (
            "error",
            "invalid_shape",
            1008,
        )
    # The scope is checked before the upgrade, as for every video socket.
    with pytest.raises(websockets.InvalidStatus) as refused_upgrade:
        async with websockets.connect(ws_url(gateway, "/ws/video/frames", OPERATOR)):
            pass
    assert refused_upgrade.value.response.status_code == 403


# --- identities: a phone's token speaks for its devices only ----------------------------------


# A gateway that lets phones in without a token, as the development profile does (the seed's
# phones cannot send one).
open_gateway = gateway_fixture(
    EDGEWAY_NTP_SERVERS="[]",
    EDGEWAY_ANONYMOUS_SCOPES='["video:publish"]',
)


async def refused_with(ws: ClientConnection) -> tuple[str, int | None]:
    error = await recv_json(ws)
    await asyncio.wait_for(ws.wait_closed(), 5)
    return error["code"], ws.close_code


@pytest.mark.parametrize("path", ["/ws/phone", "/ws/video"])
async def test_no_caller_takes_over_a_phone_it_does_not_speak_for(
    open_gateway: ServiceProcess, amqp_url: str, path: str
) -> None:
    device = "victim-" + path.rsplit("/", 1)[1]
    victim = make_token("video:publish", device=[device])
    other = make_token("video:publish", device=["someone-else"])
    async with amqp(amqp_url) as channel:
        imu = await BrokerListener.drain(channel, "edgeway.video.imu")
        stream = await BrokerListener.drain(channel, "edgeway.video.stream")
        async with websockets.connect(ws_url(open_gateway, path, victim, device=device)) as real:
            await synced(real)
            # A token bound to another device is refused outright; an anonymous caller (no
            # token, as the seed's phones) only gets a device nobody holds.
            async with websockets.connect(ws_url(open_gateway, path, other, device=device)) as ws:
                assert await refused_with(ws) == ("forbidden", 1008)
            async with websockets.connect(ws_url(open_gateway, path, None, device=device)) as ws:
                assert await refused_with(ws) == ("in_use", 1008)
            # The real phone was not displaced: what it sends still goes out, as its own.
            if path == "/ws/phone":
                axes = {"x": 0, "y": 0, "z": 1}
                sample = {"type": "imu_data", "timestamp": 7, "accelerometer": axes}
                await real.send(json.dumps({**sample, "gyroscope": axes}))
                assert (await imu.get()).headers["x-device"] == device
            else:
                await real.send(b"\x00\x00\x00\x01real")
                assert (await stream.get()).body == b"\x00\x00\x00\x01real"
            await nothing_more(real)
        # Once it has gone, an anonymous phone may take the free device.
        async with websockets.connect(ws_url(open_gateway, path, None, device=device)) as ws:
            await synced(ws)


async def test_video_text_messages_and_viewer_commands_are_limited(
    gateway: ServiceProcess,
) -> None:
    async with (
        websockets.connect(ws_url(gateway, "/ws/video", PHONE, device="cam-c")) as phone,
        websockets.connect(ws_url(gateway, "/ws/viewer", PILOT)) as pilot,
    ):
        await phone.send(json.dumps({"type": "video_config", "pad": "x" * 70_000}))
        assert (await recv_json(phone))["code"] == "too_large"
        # The viewer's budget here: 10 at once, 5 a second after that.
        command = json.dumps({"type": "joystick", "device": "nobody", "x": 0})
        for _ in range(30):
            await pilot.send(command)
        errors = [frame["code"] for frame in await until_quiet(pilot)]
        assert set(errors) == {"rate_limited"}
        assert 15 <= len(errors) <= 20
        await synced(pilot)  # still open
