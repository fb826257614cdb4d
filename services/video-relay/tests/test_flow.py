"""The video relay as it runs: a real process between the real RabbitMQ and the gateway's side.

The relay is `python -m edgeway.video_relay` on a private RabbitMQ virtual host. A test plays
the gateway: it publishes phone chunks (the phone simulator's H.264, cut and merged at random,
with garbage in between) and IMU messages the way the gateway does, listens where the relay
publishes through queues of its own, decodes what comes out with PyAV, and asks the relay's
request queue.
"""

from __future__ import annotations

import asyncio
import functools
import random
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import av
import httpx
import orjson
import pytest
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractIncomingMessage
from av.video.frame import VideoFrame
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue

from edgeway.common.broker import publish
from edgeway.common.envelope import Envelope
from edgeway.common.testing import BrokerListener, ServiceProcess, free_port
from edgeway.common.topology import Channels, Topology
from edgeway.common.video.packets import PacketParser, PacketType, VideoPacket
from edgeway.edge.phone.media import frame_number, imu_samples, synthetic_stream
from edgeway.video_relay.stream import PACKET_NAMES

pytestmark = pytest.mark.connected

TOPOLOGY = Topology()
# Long enough for a broker round trip and a decode on a loaded CI machine; a pass takes less.
WAIT = 20.0
DECODE_FPS = 5


@pytest.fixture(scope="module")
def relay(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One relay for a module's tests (each test uses its own device ids)."""
    tmp = tmp_path_factory.mktemp("video-relay")
    process = ServiceProcess(
        "edgeway.video_relay",
        env={
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_DATA_DIR": str(tmp / "var"),
            "EDGEWAY_NTP_SERVERS": "[]",  # no internet here; the offset stays 0
            "EDGEWAY_DECODE_FPS": str(DECODE_FPS),
        },
        port=free_port(),
        log_path=tmp / "video-relay.log",
    )
    try:
        yield process.start()
    finally:
        process.stop()


class Gateway:
    """The gateway's side of the relay, on one broker connection."""

    def __init__(self, broker: RabbitBroker) -> None:
        self.broker = broker

    async def listen(self, exchange: RabbitExchange, *routing_keys: str) -> BrokerListener:
        queue = await self.broker.declare_queue(
            RabbitQueue(f"test.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        )
        declared = await self.broker.declare_exchange(exchange)
        for key in routing_keys or ("",):
            await queue.bind(declared, routing_key=key)
        return await BrokerListener(queue).start()

    async def chunk(
        self, body: bytes, *, device: str, connection: str, chunk_seq: int | None
    ) -> None:
        """One `/ws/video` message as the gateway publishes it (headers as strings)."""
        headers = {"x-device": device, "x-connection": connection}
        if chunk_seq is not None:
            headers["x-chunk-seq"] = str(chunk_seq)
        await publish(
            self.broker,
            body,
            envelope=Envelope(
                type="video.chunk.v1",
                producer="gateway",
                content_type="application/octet-stream",
                headers=headers,
            ),
            exchange=TOPOLOGY.worldsystem("video_stream"),
            durable=False,
        )

    async def publish(
        self, body: bytes, *, exchange: RabbitExchange, headers: dict[str, str] | None = None
    ) -> None:
        await publish(
            self.broker,
            body,
            envelope=Envelope(type="test.v1", producer="gateway", headers=headers or {}),
            exchange=exchange,
            durable=False,
        )

    async def ask(self, query: dict[str, Any]) -> AbstractIncomingMessage:
        reply = await self.broker.request(
            orjson.dumps(query), queue=TOPOLOGY.video_requests_queue.name, timeout=WAIT
        )
        raw: AbstractIncomingMessage = reply.raw_message
        return raw

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = orjson.loads((await self.ask({"query": "status"})).body)
        return status


@pytest.fixture
async def gateway(amqp_url: str, relay: ServiceProcess) -> AsyncIterator[Gateway]:
    async with RabbitBroker(amqp_url) as broker:
        await broker.connect()
        yield Gateway(broker)


def metric_lines(relay: ServiceProcess, prefix: str) -> list[str]:
    text = httpx.get(relay.url + "/metrics").text
    return [line for line in text.splitlines() if line.startswith(prefix)]


def metric(relay: ServiceProcess, line_prefix: str) -> float:
    (line,) = metric_lines(relay, line_prefix + " ")
    return float(line.rsplit(" ", 1)[1])


def device_id() -> str:
    return f"phone-{uuid.uuid4().hex[:8]}"


# --- the phone's side -------------------------------------------------------------------------


@functools.cache
def phone_stream(
    width: int = 320, height: int = 240, seconds: float = 2.0
) -> tuple[VideoPacket, ...]:
    """What the app sends: 30 fps, a keyframe after SPS and PPS every second."""
    return tuple(synthetic_stream(width, height, 30, seconds, gop_s=1.0, bitrate=500_000))


def with_garbage(packets: Sequence[VideoPacket], rng: random.Random) -> tuple[bytes, int]:
    """The packets' bytes with a run of garbage after every seventh; and how many runs."""
    data = bytearray()
    runs = 0
    for index, packet in enumerate(packets):
        data += packet.encode()
        if index % 7 == 3:
            data += b"\xff" * rng.randint(1, 40)
            runs += 1
    return bytes(data), runs


def cut(data: bytes, rng: random.Random, *, largest: int = 3_000) -> list[bytes]:
    """The byte stream cut at random points: packets split over messages and merged in one."""
    chunks = []
    position = 0
    while position < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[position : position + size])
        position += size
    return chunks


async def send_stream(
    gateway: Gateway,
    chunks: Sequence[bytes],
    *,
    device: str,
    connection: str = "conn-1",
    skip: Sequence[int] = (),
    seconds: float = 0.0,
) -> None:
    """Publish chunks in order, numbered from 1, spread over `seconds` by their sizes (0: at
    once); the numbers in `skip` are lost on the way."""
    total = sum(len(chunk) for chunk in chunks)
    started = time.monotonic()
    sent = 0
    for seq, chunk in enumerate(chunks, start=1):
        if seq not in skip:
            await gateway.chunk(chunk, device=device, connection=connection, chunk_seq=seq)
        sent += len(chunk)
        delay = started + seconds * sent / total - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def decoded_numbers(payloads: Iterable[bytes]) -> list[int]:
    """Decode an H.264 elementary stream with PyAV (its parser cuts it into access units, as
    a viewer's player does): the frame number each picture shows, in order."""
    codec = av.CodecContext.create("h264", "r")
    data = b"".join(payloads)
    numbers = []
    for packet in [*codec.parse(data), *codec.parse(None), None]:
        for frame in codec.decode(packet):
            assert isinstance(frame, VideoFrame)
            numbers.append(frame_number(frame.to_ndarray(format="gray")))
    return numbers


def parse_gop(reply: bytes) -> tuple[int, list[VideoPacket]]:
    parser = PacketParser()
    packets = parser.feed(reply[8:])
    assert parser.corrupt == 0
    assert parser.buffered == 0
    return int.from_bytes(reply[:8], "big"), packets


def header(message: AbstractIncomingMessage, name: str) -> Any:
    return (message.headers or {})[name]


def of_device(device: str) -> Callable[[AbstractIncomingMessage], bool]:
    return lambda message: (message.headers or {}).get("x-device") == device


def is_jpeg(message: AbstractIncomingMessage) -> bool:
    return (message.headers or {}).get("x-packet-type") == "jpeg"


# --- the tests --------------------------------------------------------------------------------


async def test_packets_go_out_in_order_and_decode_to_every_frame(
    gateway: Gateway, relay: ServiceProcess
) -> None:
    device = device_id()
    viewers = await gateway.listen(TOPOLOGY.broadcast, Channels.video_stream(device))
    packets = phone_stream()
    rng = random.Random(4)
    data, garbage = with_garbage(packets, rng)
    await send_stream(gateway, cut(data, rng), device=device)

    expected = [packet for packet in packets if packet.type is not PacketType.CONFIG]
    got = await viewers.wait_for(len(expected), within=WAIT)
    assert [header(m, "x-packet-seq") for m in got] == list(range(1, len(expected) + 1))
    assert [header(m, "x-packet-type") for m in got] == [PACKET_NAMES[p.type] for p in expected]
    assert [header(m, "x-timestamp-us") for m in got] == [p.timestamp_us for p in expected]
    assert [m.body for m in got] == [p.payload for p in expected]
    assert {(m.content_type, m.delivery_mode) for m in got} == {
        ("video/h264", DeliveryMode.NOT_PERSISTENT)
    }
    assert decoded_numbers(m.body for m in got) == list(range(60))

    status = (await gateway.status())["streams"][device]
    assert status["packets"] == len(expected)
    assert status["corrupt"] == garbage
    assert status["chunks_lost"] == 0
    assert status["has_sps_pps"] is True
    assert status["gop_frames"] == 30  # the keyframe at frame 30 and the 29 frames since
    last = datetime.fromisoformat(status["last_packet_at"])
    assert abs((datetime.now(UTC) - last).total_seconds()) < WAIT
    assert metric(relay, "edgeway_video_corrupt_packets_total") >= garbage
    await viewers.settle()
    assert len(viewers.received) == len(expected)


async def test_the_gop_reply_decodes_at_once_from_its_first_packet(gateway: Gateway) -> None:
    device = device_id()
    viewers = await gateway.listen(TOPOLOGY.broadcast, Channels.video_stream(device))
    packets = phone_stream(seconds=2.5)  # keyframes at frames 0, 30 and 60; 75 frames
    await send_stream(gateway, [packet.encode() for packet in packets], device=device)
    live = await viewers.wait_for(len(packets), within=WAIT)

    reply = await gateway.ask({"query": "gop", "device": device})
    assert reply.content_type == "application/octet-stream"
    last_seq, gop = parse_gop(reply.body)
    assert last_seq == header(live[-1], "x-packet-seq")
    assert [p.type for p in gop[:3]] == [PacketType.SPS, PacketType.PPS, PacketType.KEYFRAME]
    assert {p.type for p in gop[3:]} == {PacketType.FRAME}
    assert gop == [p for p in packets if p.timestamp_us >= 2_000_000]

    # A viewer joining now decodes the keyframe the moment it has it, then every frame since.
    codec = av.CodecContext.create("h264", "r")
    codec.thread_count = 1  # no frame threading: a frame comes out as soon as it is complete
    (first,) = codec.decode(av.Packet(gop[0].payload + gop[1].payload + gop[2].payload))
    assert isinstance(first, VideoFrame)
    assert frame_number(first.to_ndarray(format="gray")) == 60
    assert decoded_numbers(p.payload for p in gop) == list(range(60, 75))

    assert (await gateway.ask({"query": "gop", "device": "nobody"})).body == bytes(8)
    refused = orjson.loads((await gateway.ask({"query": "gop", "device": "a.#"})).body)
    assert "error" in refused
    assert "error" in orjson.loads((await gateway.ask({"query": "history"})).body)


async def test_jpegs_reach_the_tracker_with_the_seed_headers(gateway: Gateway) -> None:
    device = device_id()
    tracker = await gateway.listen(TOPOLOGY.worldsystem("video_frames"))
    before_ns = time.time_ns()
    packets = phone_stream()
    # In real time, as a phone sends: a burst of 2 s of video at once would overflow the
    # decoder's backlog (decode_backlog) and rightly skip to a keyframe.
    chunks = cut(b"".join(p.encode() for p in packets), random.Random(5))
    await send_stream(gateway, chunks, device=device, seconds=2.0)

    # 2 s of 30 fps video at DECODE_FPS: frames 0, 6, 12, ... 54.
    expected = list(range(0, 60, 30 // DECODE_FPS))
    frames = await tracker.wait_for(len(expected), of_device(device), within=WAIT)
    after_ns = time.time_ns()
    numbers = []
    for message in frames:
        headers = message.headers or {}
        assert (headers["width"], headers["height"]) == ("320", "240")
        assert headers["ntp_offset"] == "0.0"  # no NTP server configured
        assert headers["ntp_time"] == headers["server_received"]
        assert before_ns <= int(str(headers["server_received"])) <= after_ns
        assert message.content_type == "application/octet-stream"
        codec = av.CodecContext.create("mjpeg", "r")
        (picture,) = codec.decode(av.Packet(message.body))
        assert isinstance(picture, VideoFrame)
        assert (picture.width, picture.height) == (320, 240)
        number = frame_number(picture.to_ndarray(format="gray"))
        # timestamp_ns is the phone's own time of that frame (its presentation time, in ns).
        assert headers["timestamp_ns"] == str(round(number * 1_000_000 / 30) * 1000)
        numbers.append(number)
    assert numbers == expected
    await tracker.settle()
    assert len([m for m in tracker.received if of_device(device)(m)]) == len(expected)


async def test_jpegs_reach_viewers_numbered_with_capture_times_and_the_last_is_kept(
    gateway: Gateway,
) -> None:
    device = device_id()
    viewers = await gateway.listen(
        TOPOLOGY.broadcast, Channels.video_frames(device), Channels.video_stream(device)
    )
    before_ms = time.time_ns() // 1_000_000
    packets = phone_stream()
    chunks = cut(b"".join(p.encode() for p in packets), random.Random(6))
    await send_stream(gateway, chunks, device=device, seconds=2.0)
    expected = list(range(0, 60, 30 // DECODE_FPS))
    frames = await viewers.wait_for(len(expected), is_jpeg, within=WAIT)
    after_ms = time.time_ns() // 1_000_000
    stream = [m for m in viewers.received if not is_jpeg(m)]

    assert [header(m, "x-packet-seq") for m in frames] == list(range(1, len(expected) + 1))
    assert {(m.content_type, m.delivery_mode) for m in frames} == {
        ("image/jpeg", DeliveryMode.NOT_PERSISTENT)
    }
    numbers = []
    for message in frames:
        codec = av.CodecContext.create("mjpeg", "r")
        (picture,) = codec.decode(av.Packet(message.body))
        assert isinstance(picture, VideoFrame)
        numbers.append(frame_number(picture.to_ndarray(format="gray")))
    assert numbers == expected
    # The phone's times (from 0 here, as a boot clock) mapped to the wall clock: each capture
    # time is after the first packet left and no later than its own packet's arrival.
    captured = [header(m, "x-captured-ms") for m in frames]
    assert all(before_ms <= captured_ms <= after_ms for captured_ms in captured)
    clock = orjson.loads((await gateway.ask({"query": "clock", "device": device})).body)
    by_time = {header(m, "x-timestamp-us"): header(m, "x-captured-ms") for m in stream}
    for timestamp_us, captured_ms in by_time.items():
        assert before_ms <= captured_ms <= after_ms
        # Anchored again as faster packets came: never later than the final anchor says.
        assert captured_ms >= (timestamp_us + clock["offset_us"]) // 1000

    # A viewer that joins now gets the last of them at once.
    latest = (await gateway.ask({"query": "latest_jpeg", "device": device})).body
    seq, captured_ms = struct.unpack(">Qq", latest[:16])
    assert (seq, captured_ms) == (len(expected), captured[-1])
    assert latest[16:] == frames[-1].body
    assert (await gateway.ask({"query": "latest_jpeg", "device": device_id()})).body == bytes(16)


async def test_imu_comes_out_in_order_once_per_timestamp(
    gateway: Gateway, relay: ServiceProcess
) -> None:
    device = device_id()
    consumers = await gateway.listen(TOPOLOGY.worldsystem("imu_data"))
    viewers = await gateway.listen(TOPOLOGY.broadcast, Channels.video_imu(device))
    samples = imu_samples(300, start_ns=1_763_000_000_000_000_000, rate_hz=200)
    rng = random.Random(6)
    sent: list[dict[str, Any]] = []
    for block in range(0, len(samples), 6):  # reordered within 30 ms, inside the 50 ms window
        shuffled = samples[block : block + 6]
        rng.shuffle(shuffled)
        sent += shuffled
        sent.append(rng.choice(shuffled))  # and one of them sent twice
    duplicates_before = metric(relay, 'edgeway_video_imu_samples_total{outcome="duplicate"}')
    # Published back to back (the gateway's order), confirmed together.
    await asyncio.gather(
        *(
            gateway.publish(
                orjson.dumps(sample), exchange=TOPOLOGY.video_imu, headers={"x-device": device}
            )
            for sample in sent
        )
    )

    ordered = await consumers.wait_for(len(samples), of_device(device), within=WAIT)
    bodies = [orjson.loads(message.body) for message in ordered]
    assert bodies == [{**sample, "device": device} for sample in samples]
    for_viewers = await viewers.wait_for(len(samples), within=WAIT)
    assert [orjson.loads(message.body) for message in for_viewers] == [
        {"type": "imu_data", "imu_data": body} for body in bodies
    ]
    await consumers.settle()
    assert len([m for m in consumers.received if of_device(device)(m)]) == len(samples)
    duplicates = metric(relay, 'edgeway_video_imu_samples_total{outcome="duplicate"}')
    assert duplicates - duplicates_before == len(sent) - len(samples)

    # A sample older than what has already gone out comes too late for its place: dropped.
    late_before = metric(relay, 'edgeway_video_imu_samples_total{outcome="late"}')
    stale = {**samples[10], "timestamp": samples[10]["timestamp"] + 1}
    await gateway.publish(
        orjson.dumps(stale), exchange=TOPOLOGY.video_imu, headers={"x-device": device}
    )
    await gateway.publish(b"not json", exchange=TOPOLOGY.video_imu, headers={"x-device": device})
    await consumers.settle()
    assert len([m for m in consumers.received if of_device(device)(m)]) == len(samples)
    assert metric(relay, 'edgeway_video_imu_samples_total{outcome="late"}') == late_before + 1


async def test_trajectory_and_restart_reach_the_viewers(
    gateway: Gateway, relay: ServiceProcess
) -> None:
    viewers = await gateway.listen(TOPOLOGY.broadcast, Channels.VIDEO_VIEWER)
    pose = {"position": [1.0, 2.5, -0.25], "orientation": [0.0, 0.0, 0.0, 1.0], "frame": 42}
    await gateway.publish(orjson.dumps(pose), exchange=TOPOLOGY.worldsystem("trajectory_data"))
    await gateway.publish(b"{not json", exchange=TOPOLOGY.worldsystem("trajectory_data"))
    await gateway.publish(b'{"type":"restart"}', exchange=TOPOLOGY.worldsystem("restart"))

    got = await viewers.wait_for(2, within=WAIT)
    assert [orjson.loads(message.body) for message in got] == [
        {"type": "trajectory_update", "pose": pose},
        {"type": "restart"},
    ]
    assert {message.content_type for message in got} == {"application/json"}
    await viewers.settle()
    assert len(viewers.received) == 2
    assert metric(relay, 'edgeway_video_bridged_total{kind="invalid"}') == 1


async def test_two_devices_stay_apart(gateway: Gateway) -> None:
    first, second = device_id(), device_id()
    viewers = {
        device: await gateway.listen(TOPOLOGY.broadcast, Channels.video_stream(device))
        for device in (first, second)
    }
    streams = {first: phone_stream(), second: phone_stream(192, 144, 1.0)}
    rng = random.Random(7)
    chunks = {
        device: cut(b"".join(p.encode() for p in packets), rng, largest=1_500)
        for device, packets in streams.items()
    }
    # Interleaved, both on a connection that happens to have the same id.
    for seq in range(1, max(len(c) for c in chunks.values()) + 1):
        for device in (first, second):
            if seq <= len(chunks[device]):
                await gateway.chunk(
                    chunks[device][seq - 1], device=device, connection="c1", chunk_seq=seq
                )

    for device, packets in streams.items():
        got = await viewers[device].wait_for(len(packets), within=WAIT)
        assert [header(m, "x-packet-seq") for m in got] == list(range(1, len(packets) + 1))
        assert decoded_numbers(m.body for m in got) == list(range(round(30 * len(packets) / 32)))
        _, gop = parse_gop((await gateway.ask({"query": "gop", "device": device})).body)
        codec = av.CodecContext.create("h264", "r")
        (picture,) = codec.decode(av.Packet(b"".join(p.payload for p in gop[:3])))
        assert isinstance(picture, VideoFrame)
        size = (picture.width, picture.height)
        assert size == ((320, 240) if device == first else (192, 144))
    status = (await gateway.status())["streams"]
    assert status[first]["packets"] == len(streams[first])
    assert status[second]["packets"] == len(streams[second])
    assert status[first]["corrupt"] == status[second]["corrupt"] == 0


async def test_lost_chunks_are_counted_and_the_gop_waits_for_the_next_keyframe(
    gateway: Gateway,
) -> None:
    device = device_id()
    viewers = await gateway.listen(TOPOLOGY.broadcast, Channels.video_stream(device))
    packets = phone_stream(seconds=3.0)  # keyframes at frames 0, 30 and 60
    lost = 46  # one packet per chunk, 32 per GOP: frame 41 (the second GOP's 12th frame)
    chunks = [p.encode() for p in packets]
    third_gop = 64
    await send_stream(gateway, chunks[:third_gop], device=device, skip=[lost])
    await viewers.wait_for(third_gop - 1, within=WAIT)
    # The second GOP lacks a frame: frames after it would not decode, so a joiner now gets the
    # parameter sets only and waits for the next keyframe.
    _, gop = parse_gop((await gateway.ask({"query": "gop", "device": device})).body)
    assert [p.type for p in gop] == [PacketType.SPS, PacketType.PPS]

    for seq in range(third_gop + 1, len(chunks) + 1):
        await gateway.chunk(chunks[seq - 1], device=device, connection="conn-1", chunk_seq=seq)
    got = await viewers.wait_for(len(packets) - 1, within=WAIT)
    # The relay numbers what it relays: no hole in x-packet-seq for a chunk it never had.
    assert [header(m, "x-packet-seq") for m in got] == list(range(1, len(packets)))
    status = (await gateway.status())["streams"][device]
    assert status["chunks_lost"] == 1
    _, gop = parse_gop((await gateway.ask({"query": "gop", "device": device})).body)
    assert decoded_numbers(p.payload for p in gop) == list(range(60, 90))


@pytest.mark.slow
async def test_it_keeps_up_with_30_fps_from_several_devices(
    gateway: Gateway, relay: ServiceProcess
) -> None:
    """Four phones at 30 fps, 640x360 at 2 Mbit/s, in real time, one packet per message as
    the app sends them: every packet goes out in order, soon after it came in."""
    devices = [device_id() for _ in range(4)]
    packets = tuple(synthetic_stream(640, 360, 30, 4.0, gop_s=1.0, bitrate=2_000_000))
    viewers = await gateway.listen(
        TOPOLOGY.broadcast, *(Channels.video_stream(device) for device in devices)
    )
    tracker = await gateway.listen(TOPOLOGY.worldsystem("video_frames"))
    sent_at: dict[tuple[str, int, str], float] = {}

    async def phone(device: str) -> None:
        started = time.monotonic()
        frames = 0
        for seq, packet in enumerate(packets, start=1):
            if packet.type in (PacketType.KEYFRAME, PacketType.FRAME):
                delay = started + frames / 30 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                frames += 1
            sent_at[device, packet.timestamp_us, PACKET_NAMES[packet.type]] = time.monotonic()
            await gateway.chunk(packet.encode(), device=device, connection="c1", chunk_seq=seq)

    await asyncio.gather(*(phone(device) for device in devices))
    got = await viewers.wait_for(len(devices) * len(packets), within=60)

    latencies = []
    for device in devices:
        channel = Channels.video_stream(device)
        arrivals = zip(viewers.arrived_at, viewers.received, strict=True)
        mine = [(at, m) for at, m in arrivals if m.routing_key == channel]
        assert [header(m, "x-packet-seq") for _, m in mine] == list(range(1, len(packets) + 1))
        for at, message in mine:
            key = (device, header(message, "x-timestamp-us"), header(message, "x-packet-type"))
            latencies.append(at - sent_at[key])
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(  # a record of the run, shown with -s
        f"\n{len(devices)} devices x 30 fps, {len(got)} packets: relay latency "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    assert p99 < 0.5
    assert metric(relay, 'edgeway_video_dropped_total{reason="publish_behind"}') == 0
    # The tracker's frames: DECODE_FPS per second of each device's video (a decoder that fell
    # behind would skip to a keyframe and send fewer).
    for device in devices:
        jpegs = await tracker.wait_for(4 * DECODE_FPS, of_device(device), within=30)
        assert len(jpegs) == 4 * DECODE_FPS
    # The bandwidth gauge of each stream, after its first 5 s window.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = metric_lines(relay, "edgeway_video_bandwidth_mbps{")
        rates = {
            device: float(line.rsplit(" ", 1)[1])
            for line in lines
            for device in devices
            if f'device="{device}"' in line
        }
        if len(rates) == len(devices) and min(rates.values()) > 0.5:
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError(f"bandwidth gauges: {rates}")
