"""The phone simulator: its H.264 decodes to the frames it drew, its packets are the app's, and
it sends them the way the app does (checked against a `websockets` server started here)."""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import av
import numpy as np
import orjson
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection, serve

from edgeway.common.video.packets import PacketParser, PacketType, VideoPacket
from edgeway.edge.pacing import Backoff
from edgeway.edge.phone import __main__ as phone_command
from edgeway.edge.phone.__main__ import main
from edgeway.edge.phone.media import (
    VideoLoop,
    draw_frame,
    frame_number,
    imu_samples,
    jpeg_frames,
    synthetic_stream,
)
from edgeway.edge.phone.simulator import Phone
from edgeway.edge.phone.wire import (
    BUFFER_FLAG_KEY_FRAME,
    Chunking,
    endpoint_url,
    send_imu,
    stream_to,
)

FPS = 30
GOP = 15  # frames: gop_s=0.5 at 30 fps


@pytest.fixture(scope="module")
def stream() -> list[VideoPacket]:
    return list(synthetic_stream(320, 240, FPS, 2, gop_s=0.5, bitrate=300_000))


def decode_all(data: bytes) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create("h264", "r")
    frames: list[av.VideoFrame] = []
    for packet in [*decoder.parse(data), *decoder.parse(None)]:
        frames += decoder.decode(packet)
    frames += decoder.decode(None)
    return frames


def test_packets_are_the_apps(stream: list[VideoPacket]) -> None:
    """SPS and PPS before every keyframe, one packet per frame, µs presentation times."""
    frames = [p for p in stream if p.type in (PacketType.KEYFRAME, PacketType.FRAME)]
    assert len(frames) == 2 * FPS
    expected_types: list[PacketType] = []
    for number in range(2 * FPS):
        if number % GOP == 0:
            expected_types += [PacketType.SPS, PacketType.PPS, PacketType.KEYFRAME]
        else:
            expected_types.append(PacketType.FRAME)
    assert [p.type for p in stream] == expected_types
    assert [p.timestamp_us for p in frames] == [round(n * 1e6 / FPS) for n in range(2 * FPS)]
    for i, packet in enumerate(stream):
        assert packet.payload.startswith(b"\x00\x00\x00\x01") or packet.payload.startswith(
            b"\x00\x00\x01"
        )
        if packet.type is PacketType.SPS:
            assert stream[i + 1].type is PacketType.PPS
            assert packet.timestamp_us == stream[i + 2].timestamp_us
            assert packet.payload[4] & 0x1F == 7  # an SPS NAL unit
            assert packet.payload[5] == 66  # profile_idc: baseline
        if packet.type is PacketType.PPS:
            assert packet.payload[4] & 0x1F == 8
    assert {p.flags for p in stream if p.type is PacketType.KEYFRAME} == {BUFFER_FLAG_KEY_FRAME}
    assert {p.flags for p in stream if p.type is not PacketType.KEYFRAME} == {0}


def test_the_packets_survive_the_wire(stream: list[VideoPacket]) -> None:
    assert PacketParser().feed(b"".join(p.encode() for p in stream)) == stream


def test_decoding_the_payloads_gives_every_frame_in_order(stream: list[VideoPacket]) -> None:
    frames = decode_all(b"".join(p.payload for p in stream))
    assert [frame_number(f.to_ndarray(format="gray")) for f in frames] == list(range(2 * FPS))
    assert [frame_number(f.to_ndarray(format="rgb24")) for f in frames[:5]] == list(range(5))
    assert [frame_number(f.to_ndarray(format="yuv420p")) for f in frames[-3:]] == [57, 58, 59]
    assert (frames[0].width, frames[0].height) == (320, 240)


def test_a_decoder_started_at_any_keyframe_decodes_at_once(stream: list[VideoPacket]) -> None:
    """A viewer that joins at a keyframe gets a picture from SPS+PPS+keyframe, and one picture
    per frame after it, each as soon as its packet is in (no B-frames, no decoder delay)."""
    starts = [i for i, p in enumerate(stream) if p.type is PacketType.SPS]
    assert len(starts) == 4
    for start in starts:
        decoder = av.CodecContext.create("h264", "r")
        decoder.thread_type = "SLICE"  # frame threads would hold pictures back on purpose
        first = stream[start + 2]
        group = stream[start].payload + stream[start + 1].payload + first.payload
        pictures = decoder.decode(av.Packet(group))
        keyframe_number = round(first.timestamp_us * FPS / 1e6)
        assert [frame_number(p.to_ndarray(format="gray")) for p in pictures] == [keyframe_number]
        for offset, packet in enumerate(stream[start + 3 : start + 3 + GOP - 1], start=1):
            pictures = decoder.decode(av.Packet(packet.payload))
            assert len(pictures) == 1
            assert frame_number(pictures[0].to_ndarray(format="gray")) == keyframe_number + offset


@pytest.mark.parametrize(
    ("width", "height", "bitrate"),
    [(192, 108, 40_000), (640, 360, 100_000), (1280, 720, 300_000)],
)
def test_frame_numbers_survive_heavy_compression(width: int, height: int, bitrate: int) -> None:
    packets = list(synthetic_stream(width, height, 30, 1, gop_s=1, bitrate=bitrate))
    frames = decode_all(b"".join(p.payload for p in packets))
    assert [frame_number(f.to_ndarray(format="gray")) for f in frames] == list(range(30))


def test_frame_number_refuses_pictures_without_one() -> None:
    with pytest.raises(ValueError, match="neither dark nor light"):
        frame_number(np.full((240, 320), 128, np.uint8))
    with pytest.raises(ValueError, match="checksum"):
        frame_number(np.zeros((240, 320), np.uint8))
    assert frame_number(draw_frame(320, 240, 2**20 - 1)) == 2**20 - 1
    assert frame_number(draw_frame(320, 240, 2**20 + 5)) == 5  # it wraps
    luma = draw_frame(320, 240, 1234)[:240].copy()
    assert frame_number(luma) == 1234
    block = 320 // 24
    bit = luma[:block, 10 * block : 11 * block]
    bit[:] = 251 - bit  # one bit of the number flipped: 16 <-> 235
    with pytest.raises(ValueError, match="checksum"):
        frame_number(luma)
    with pytest.raises(ValueError, match="too small"):
        frame_number(np.zeros((240, 40), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        frame_number(np.zeros((4, 320), np.uint8))


def test_unusable_sizes_are_refused() -> None:
    for width, height in ((321, 240), (320, 241), (160, 120), (320, 20)):
        with pytest.raises(ValueError, match="even sizes"):
            draw_frame(width, height, 0)
        with pytest.raises(ValueError, match="even sizes"):
            next(synthetic_stream(width, height, 30, 1))


@dataclass
class Recorder:
    """What a stand-in gateway received: every message, when, and the request headers."""

    messages: list[bytes | str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        self.headers = {k.lower(): v for k, v in connection.request.headers.raw_items()}
        async for message in connection:
            self.messages.append(message)
            self.times.append(time.monotonic())
        self.done.set()

    def binary(self) -> list[bytes]:
        assert all(isinstance(m, bytes) for m in self.messages)
        return [m for m in self.messages if isinstance(m, bytes)]


@asynccontextmanager
async def gateway() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    async with serve(recorder.handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/video?device=test", recorder


async def test_stream_to_sends_one_packet_a_message_in_real_time(
    stream: list[VideoPacket],
) -> None:
    starts = [i for i, p in enumerate(stream) if p.type is PacketType.SPS]
    one_second = stream[: starts[2]]  # two GOPs
    frames = sum(p.type in (PacketType.KEYFRAME, PacketType.FRAME) for p in one_second)
    assert frames == 2 * GOP
    async with gateway() as (url, recorder):
        started = time.monotonic()
        sent = await stream_to(url, one_second, fps=FPS, token="phone-token")
        elapsed = time.monotonic() - started
        await asyncio.wait_for(recorder.done.wait(), 5)
    assert sent == len(one_second)
    assert recorder.binary() == [p.encode() for p in one_second]
    assert recorder.headers["authorization"] == "Bearer phone-token"
    assert (frames - 1) / FPS <= elapsed < (frames - 1) / FPS + 1.0
    # The second keyframe (with its SPS and PPS) left half a second after the first.
    second_gop = recorder.times[GOP + 2] - recorder.times[0]
    assert second_gop == pytest.approx(GOP / FPS, abs=0.1)
    assert recorder.times[GOP + 4] - recorder.times[GOP + 2] < 0.02  # SPS, PPS, keyframe: together


@pytest.mark.parametrize(
    "chunking",
    [Chunking(split_bytes=97), Chunking(merge=5), Chunking(merge=4, split_bytes=1000)],
    ids=["split", "merge", "merge-and-split"],
)
async def test_stream_to_chunking_cuts_the_same_bytes_differently(
    stream: list[VideoPacket], chunking: Chunking
) -> None:
    wire = b"".join(p.encode() for p in stream)
    async with gateway() as (url, recorder):
        sent = await stream_to(url, stream, fps=0, chunking=chunking)
        await asyncio.wait_for(recorder.done.wait(), 5)
    messages = recorder.binary()
    assert sent == len(messages)
    assert b"".join(messages) == wire
    assert "authorization" not in recorder.headers
    if chunking.split_bytes is not None:
        assert max(len(m) for m in messages) == chunking.split_bytes
    if chunking.merge > 1 and chunking.split_bytes is None:
        assert len(messages) == math.ceil(len(stream) / chunking.merge)
    parser = PacketParser()
    assert [p for m in messages for p in parser.feed(m)] == stream


async def test_send_imu_sends_the_apps_json() -> None:
    samples = imu_samples(50, start_ns=1_700_000_000_000_000_000, rate_hz=200)
    async with gateway() as (url, recorder):
        await send_imu(url.replace("/ws/video", "/ws/phone"), samples, token="t")
        await asyncio.wait_for(recorder.done.wait(), 5)
    assert all(isinstance(m, str) for m in recorder.messages)
    assert [orjson.loads(m) for m in recorder.messages] == samples
    assert recorder.headers["authorization"] == "Bearer t"


def test_imu_samples_have_the_seed_shape() -> None:
    samples = imu_samples(400, start_ns=10**18, rate_hz=200)
    assert [s["timestamp"] for s in samples] == [10**18 + i * 5_000_000 for i in range(400)]
    for s in samples:
        assert s["type"] == "imu_data"
        assert set(s["accelerometer"]) == set(s["gyroscope"]) == {"x", "y", "z"}
        assert s["accelerometer"]["z"] == pytest.approx(9.81, abs=0.01)
    assert len({s["gyroscope"]["x"] for s in samples}) > 50  # it moves


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """Width and height from the SOF0 segment, as the gateway reads them."""
    assert jpeg[:2] == b"\xff\xd8"
    pos = 2
    while True:
        marker, length = struct.unpack_from(">HH", jpeg, pos)
        if marker == 0xFFC0:
            height, width = struct.unpack_from(">HH", jpeg, pos + 5)
            return width, height
        pos += 2 + length


def test_jpeg_frames_are_timestamped_jpegs_of_the_pattern() -> None:
    start = 1_731_790_000_123_456_789
    messages = list(jpeg_frames(320, 240, 10, fps=10, start_ns=start))
    assert len(messages) == 10
    decoder = av.CodecContext.create("mjpeg", "r")
    for number, message in enumerate(messages):
        assert int.from_bytes(message[:8], "big") == start + number * 100_000_000
        jpeg = message[8:]
        assert jpeg.endswith(b"\xff\xd9")
        assert jpeg_size(jpeg) == (320, 240)
        (picture,) = decoder.decode(av.Packet(jpeg))
        assert frame_number(picture.to_ndarray(format="gray")) == number
    now = time.time_ns()
    (first,) = list(jpeg_frames(192, 108, 1))
    assert abs(int.from_bytes(first[:8], "big") - now) < 5 * 10**9


# ---- the command ------------------------------------------------------------------------------


def test_a_video_loop_is_whole_gops() -> None:
    loop = VideoLoop.encode(192, 108, 30, seconds=0.3, gop_s=0.2, bitrate=100_000)
    assert (len(loop.frames), loop.gop_frames) == (12, 6)  # 9 frames rounded up to 2 GOPs
    assert [frame[0].type for frame in loop.frames] == [
        PacketType.SPS if i % 6 == 0 else PacketType.FRAME for i in range(12)
    ]
    assert [loop.next_gop(i) for i in (0, 1, 6, 7, 12, 13)] == [0, 6, 6, 0, 0, 6]
    assert {p.timestamp_us for p in loop.packets(13, 42)} == {42}
    assert loop.packets(13, 42)[0].payload == loop.frames[1][0].payload


def test_endpoint_urls() -> None:
    assert endpoint_url("http://gw:8000", "/ws/video", "phone-1") == (
        "ws://gw:8000/ws/video?device=phone-1"
    )
    assert endpoint_url("https://gw/edge/", "/ws/phone", "p") == "wss://gw/edge/ws/phone?device=p"


def test_the_command_refuses_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not the process's logging setup: it caches loggers, which capture_logs could not see.
    monkeypatch.setattr(phone_command, "configure_logging", lambda **_: None)
    assert main(["--device", "not a device"]) == 2
    assert main(["--width", "100"]) == 2
    assert main(["--fps", "0"]) == 2


@dataclass
class StandIn:
    """A stand-in gateway for a `Phone`: records each /ws/video connection's messages, closes
    the first one after `close_after` messages, and sends a command and an error frame down
    /ws/phone."""

    close_after: int
    video: list[list[bytes]] = field(default_factory=list)
    imu: list[str] = field(default_factory=list)

    async def handler(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        assert connection.request.headers["Authorization"] == "Bearer phone-token"
        if connection.request.path == "/ws/video?device=p1":
            messages: list[bytes] = []
            self.video.append(messages)
            async for message in connection:
                assert isinstance(message, bytes)
                messages.append(message)
                if len(self.video) == 1 and len(messages) == self.close_after:
                    await connection.close()
        else:
            assert connection.request.path == "/ws/phone?device=p1"
            await connection.send('{"type":"joystick","device":"p1","x":0.5}')
            await connection.send('{"type":"error","code":"rate_limited","reason":"slow down"}')
            async for message in connection:
                assert isinstance(message, str)
                self.imu.append(message)


async def test_a_phone_streams_in_real_time_and_comes_back_at_a_keyframe() -> None:
    video = VideoLoop.encode(192, 108, FPS, seconds=0.4, gop_s=0.2, bitrate=100_000)  # 12 frames
    stand_in = StandIn(close_after=10)
    async with serve(stand_in.handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        phone = Phone(
            f"http://127.0.0.1:{port}",
            "p1",
            "phone-token",
            video,
            imu_hz=50,
            backoff=Backoff(initial=0.02, maximum=0.05),
        )
        with capture_logs() as logs:
            task = asyncio.create_task(phone.run())
            await asyncio.sleep(1.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert len(stand_in.video) == 2  # the first was closed and the phone came back
    timestamps: list[int] = []
    for messages in stand_in.video:
        parser = PacketParser()
        packets = [p for m in messages for p in parser.feed(m)]
        assert len(packets) == len(messages)  # one packet a message
        assert packets[0].type is PacketType.SPS  # every connection starts with a GOP
        frames = [p for p in packets if p.type in (PacketType.KEYFRAME, PacketType.FRAME)]
        timestamps += [p.timestamp_us for p in frames]
        pictures = decode_all(b"".join(p.payload for p in packets))
        numbers = [frame_number(f.to_ndarray(format="gray")) for f in pictures]
        assert len(numbers) == len(frames)
        # The loop's frames in order, from a GOP start, round and round.
        assert numbers[0] % video.gop_frames == 0
        assert numbers == [(numbers[0] + i) % 12 for i in range(len(numbers))]
    assert timestamps == sorted(set(timestamps))  # increasing, across the reconnection too
    assert abs(timestamps[0] / 1e6 - time.time()) < 5  # the phone's clock: epoch µs
    # Real time (less what the reconnection skipped; slack for a busy machine).
    assert 0.7 * 1.5 * FPS <= phone.counters.frames <= 1.5 * FPS + 2
    samples = [orjson.loads(m) for m in stand_in.imu]
    assert 0.7 * 1.5 * 50 <= len(samples) <= 1.5 * 50 + 2
    assert [s["timestamp"] for s in samples] == sorted({s["timestamp"] for s in samples})
    assert {s["type"] for s in samples} == {"imu_data"}
    events = {entry["event"]: entry for entry in logs}
    assert events["command received"]["command"] == {"type": "joystick", "device": "p1", "x": 0.5}
    assert events["the gateway refused a message"]["code"] == "rate_limited"
    assert (phone.counters.commands, phone.counters.errors) == (1, 1)
    assert phone.counters.connections == 3  # video twice, phone once
