"""The relay's bookkeeping without a broker: streams held within bounds, what is refused,
what the bridges and queries answer. Nothing is published: the exchanges are never declared
here, so the device publishers wait (see `DevicePublisher.run`)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from faststream.rabbit import RabbitBroker, RabbitResponse
from prometheus_client import CollectorRegistry

from edgeway.common.amqp import AmqpLink
from edgeway.common.envelope import Envelope
from edgeway.common.timesync import TimeSync
from edgeway.common.topology import Topology
from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.video_relay.handlers import answer_query, bridge_body
from edgeway.video_relay.imu import read_imu
from edgeway.video_relay.metrics import Metrics
from edgeway.video_relay.publishing import Publisher
from edgeway.video_relay.relay import VideoRelay, device_of
from edgeway.video_relay.settings import VideoRelaySettings
from edgeway.video_relay.stream import Picture

START = b"\x00\x00\x00\x01"
CHUNK = Envelope(type="video.chunk.v1", producer="gateway")
GOP = b"".join(
    packet.encode()
    for packet in (
        VideoPacket(PacketType.SPS, 0, START + b"\x67\x42"),
        VideoPacket(PacketType.PPS, 0, START + b"\x68\xce"),
        VideoPacket(PacketType.KEYFRAME, 0, START + b"\x65" + bytes(50), flags=1),
        VideoPacket(PacketType.FRAME, 33_333, START + b"\x41" + bytes(20)),
    )
)


@pytest.fixture
async def relay() -> AsyncIterator[VideoRelay]:
    registry = CollectorRegistry()
    settings = VideoRelaySettings(max_streams=2, stream_idle_s=60, decode_fps=0)
    relay = VideoRelay(
        settings,
        # Never started: nothing is published here.
        publisher=Publisher(
            RabbitBroker(),
            Topology(),
            AmqpLink("amqp://localhost", name="test", registry=registry).publisher(),
        ),
        metrics=Metrics.create(registry),
        clock=TimeSync([]),
        ready=asyncio.Event(),
    )
    yield relay
    relay.stop()


def chunk(relay: VideoRelay, device: str, data: bytes = GOP, seq: int = 1) -> None:
    headers = {"x-device": device, "x-connection": "c1", "x-chunk-seq": str(seq)}
    relay.take_chunk(data, headers, CHUNK)


async def test_past_max_streams_the_stream_idle_longest_is_forgotten(relay: VideoRelay) -> None:
    chunk(relay, "a")
    chunk(relay, "b")
    chunk(relay, "a", GOP, seq=2)  # a is active again: b is now the one idle longest
    chunk(relay, "c")
    assert list(relay.devices) == ["a", "c"]
    assert set(relay.status()["streams"]) == {"a", "c"}
    assert relay.gop("b") == bytes(8)  # forgotten with everything it held
    assert all(len(state.tasks) == 1 for state in relay.devices.values())  # the publisher only


async def test_idle_streams_are_forgotten_and_their_gauge_goes(relay: VideoRelay) -> None:
    chunk(relay, "a")
    state = relay.devices["a"]
    relay.housekeep(state.stream.last_activity + 5)
    assert relay.metrics.bandwidth.labels("a")._value.get() > 0
    relay.housekeep(state.stream.last_activity + 61)
    assert relay.devices == {}
    assert 'device="a"' not in str(list(relay.metrics.bandwidth.collect()))
    await asyncio.sleep(0)
    assert all(task.done() for task in state.tasks)


async def test_a_chunk_without_a_usable_device_is_refused(relay: VideoRelay) -> None:
    relay.take_chunk(GOP, {"x-device": "video.stream.#"}, CHUNK)
    relay.take_chunk(GOP, {"x-device": "x" * 65}, CHUNK)
    assert relay.devices == {}
    assert relay.metrics.chunks_rejected.labels("invalid_device")._value.get() == 2
    relay.take_chunk(GOP, {}, CHUNK)  # the seed's single phone
    assert list(relay.devices) == ["phone"]


async def test_the_status_reply_has_the_contract_shape(relay: VideoRelay) -> None:
    chunk(relay, "a")
    reply = answer_query(b'{"query": "status"}', relay=relay)
    status = orjson.loads(reply.body)
    assert reply.message_options["content_type"] == "application/json"
    assert set(status) == {"streams", "h264_decoder", "pyav"}
    assert status["h264_decoder"] is True
    a = status["streams"]["a"]
    assert set(a) == {
        "has_sps_pps",
        "gop_frames",
        "bandwidth_mbps",
        "packets",
        "corrupt",
        "chunks_lost",
        "last_packet_at",
    }
    assert (a["has_sps_pps"], a["gop_frames"], a["packets"]) == (True, 2, 4)


async def test_the_gop_reply_is_binary_and_a_bad_query_is_a_json_error(
    relay: VideoRelay,
) -> None:
    chunk(relay, "a")
    reply = answer_query(b'{"query": "gop", "device": "a"}', relay=relay)
    assert reply.message_options["content_type"] == "application/octet-stream"
    assert reply.body == (4).to_bytes(8, "big") + GOP
    for bad in (b"gop please", b'{"query": "gop"}', b'{"query": "frames"}', b"[]"):
        answer = answer_query(bad, relay=relay)
        assert answer.message_options["content_type"] == "application/json"
        assert "error" in orjson.loads(answer.body)


async def test_the_latest_jpeg_and_the_clock_are_answered_per_device(relay: VideoRelay) -> None:
    def ask(query: str, device: str) -> RabbitResponse:
        return answer_query(orjson.dumps({"query": query, "device": device}), relay=relay)

    # Nothing held yet: no JPEG (16 zero bytes) and no clock.
    nothing = ask("latest_jpeg", "a")
    assert nothing.message_options["content_type"] == "application/octet-stream"
    assert nothing.body == bytes(16)
    assert orjson.loads(ask("clock", "a").body) == {"device": "a", "offset_us": None}
    chunk(relay, "a")
    offset = orjson.loads(ask("clock", "a").body)["offset_us"]
    # This stream's times count from 0: anchored at the relay's clock, about now.
    assert abs(offset / 1e6 - time.time()) < 60
    relay.devices["a"].picture = Picture(7, 1_800_000_000_123, b"\xff\xd8jpeg")
    latest = ask("latest_jpeg", "a").body
    assert latest == struct.pack(">Qq", 7, 1_800_000_000_123) + b"\xff\xd8jpeg"
    for query in ("latest_jpeg", "clock"):
        assert "error" in orjson.loads(ask(query, "a.#").body)


def test_device_ids_are_the_gateways() -> None:
    assert device_of({}) == "phone"
    assert device_of({"x-device": "drone_7-b"}) == "drone_7-b"
    assert device_of({"x-device": b"bytes-ok"}) == "bytes-ok"
    for bad in ("", "a.b", "a*", "é", 7, None):
        assert device_of({"x-device": bad}) is None


def test_imu_messages_are_checked_and_pass_through_unchanged() -> None:
    good = {
        "type": "imu_data",
        "timestamp": 1_763_000_000_000_000_000,
        "accelerometer": {"x": 0.1, "y": 0, "z": 9.81},
        "gyroscope": {"x": 0.0, "y": -0.5, "z": 1},
        "magnetometer": {"x": 1},  # not the seed's: passed on as the phone sent it
    }
    assert read_imu(orjson.dumps(good)) == good
    for broken in (
        {**good, "type": "analysis_mode"},
        {**good, "timestamp": 1.5},
        {**good, "timestamp": True},
        {**good, "timestamp": -1},
        {**good, "gyroscope": {"x": 0, "y": 0}},
        {**good, "accelerometer": {"x": "0", "y": 0, "z": 0}},
        {**good, "accelerometer": {"x": False, "y": 0, "z": 0}},
    ):
        assert read_imu(orjson.dumps(broken)) is None
    assert read_imu(b"{") is None
    assert read_imu(b"[1, 2]") is None


def test_bridged_messages_take_the_seeds_viewer_shapes() -> None:
    pose = b'{"x": 1.5, "q": [0, 0, 0, 1]}'
    assert orjson.loads(bridge_body("trajectory", pose) or b"") == {
        "type": "trajectory_update",
        "pose": {"x": 1.5, "q": [0, 0, 0, 1]},
    }
    assert bridge_body("trajectory", b"not json") is None
    assert bridge_body("restart", b"anything") == b'{"type":"restart"}'
