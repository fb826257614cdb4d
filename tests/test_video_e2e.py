"""Video end to end: a simulated phone → gateway → RabbitMQ → video relay → RabbitMQ → gateway →
consumers that decode every frame with PyAV. All real processes.

What a WorldSystem viewer would notice: every frame arrives and decodes, in order, however the
phone's WebSocket messages were cut; a viewer that joins mid-stream decodes its first frame at
once instead of waiting for the next keyframe; a viewer that stalls does not hold the others back
and gets a decodable stream when it resumes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import av
import httpx
import pytest
import websockets

from edgeway.common.testing import bearer
from edgeway.common.topology import Topology
from edgeway.edge.phone.media import frame_number, imu_samples, synthetic_stream
from edgeway.edge.phone.wire import Chunking, stream_to
from tests.stack import Stack

pytestmark = [pytest.mark.connected, pytest.mark.slow]

DEVICE = "phone-1"
WIDTH, HEIGHT, FPS = 320, 192, 30


@pytest.fixture
async def stack(amqp_url: str, postgres_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(
        amqp_url,
        postgres_url,
        tmp_path,
        video_relay=True,
        # A consumer this many packets behind skips to the next keyframe (~1 s of this stream).
        extra_env={"EDGEWAY_VIDEO_QUEUE_SIZE": "32"},
    ).start()
    yield running
    running.stop()


class Viewer:
    """A `/ws/video/consume` client that decodes what it gets, frame by frame."""

    def __init__(self) -> None:
        self.decoder = av.CodecContext.create("h264", "r")
        self.frames: list[int] = []  # frame numbers read back from the decoded pictures
        self.packets = 0

    def take(self, payload: bytes) -> None:
        self.packets += 1
        for packet in self.decoder.parse(payload):
            for frame in self.decoder.decode(packet):
                self.frames.append(frame_number(frame.to_ndarray(format="yuv420p")))

    def flush(self) -> None:
        """The parser holds the last access unit until it sees the next: end of stream."""
        for packet in [*self.decoder.parse(None), None]:
            for frame in self.decoder.decode(packet):
                self.frames.append(frame_number(frame.to_ndarray(format="yuv420p")))


async def watch(
    url: str, viewer: Viewer, *, until: int, stall: float = 0.0, after: int = 0
) -> None:
    """Read binary messages into `viewer` until frame `until` decodes or the stream goes quiet;
    optionally stop reading for `stall` seconds once `after` frames were decoded."""
    sock = None
    if stall:
        # A small receive buffer, so that a viewer that stops reading is soon felt upstream.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        host, port = url.split("/")[2].split(":")
        sock.connect((host, int(port)))
    async with websockets.connect(url, sock=sock, compression=None, max_queue=4) as ws:
        stalled = False
        while not viewer.frames or viewer.frames[-1] < until:
            try:
                message = await asyncio.wait_for(ws.recv(), 5)
            except TimeoutError:
                break  # the stream went quiet
            if isinstance(message, bytes):
                viewer.take(message)
            if stall and not stalled and len(viewer.frames) >= after:
                stalled = True
                await asyncio.sleep(stall)
    viewer.flush()


def consume_url(stack: Stack, device: str = DEVICE) -> str:
    return stack.ws("/ws/video/consume", "video:subscribe") + f"&device={device}"


def phone_url(stack: Stack, device: str = DEVICE) -> str:
    return stack.ws("/ws/video", "video:publish", device=device)


async def wait_for_consumers(stack: Stack, count: int) -> None:

    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        for _ in range(100):
            health = (
                await http.get(
                    "/health/video",
                    headers=bearer("video:subscribe"),
                )
            ).json()
            if health["active_consumers"] >= count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{count} consumers never connected: {health}")


async def test_every_frame_reaches_every_viewer_however_the_phone_cuts_its_messages(
    stack: Stack,
) -> None:
    seconds = 3
    total = FPS * seconds
    viewers = [Viewer(), Viewer()]
    watching = [
        asyncio.create_task(watch(consume_url(stack), viewer, until=total - 1))
        for viewer in viewers
    ]
    await wait_for_consumers(stack, 2)
    packets = synthetic_stream(WIDTH, HEIGHT, FPS, seconds, gop_s=1.0, bitrate=500_000)
    # Three packets to a message, then cut into 700-byte pieces: nothing lines up with packets.
    await stream_to(phone_url(stack), packets, fps=FPS, chunking=Chunking(merge=3, split_bytes=700))
    await asyncio.gather(*watching)
    for viewer in viewers:
        assert viewer.frames == list(range(total))


async def test_a_late_joiner_decodes_its_first_frame_at_once(stack: Stack) -> None:
    gop_s, seconds = 2.0, 4
    # A device of its own: the relay may still hold another test's GOP of its device, which a
    # joiner would get if this stream had not started yet on a loaded machine.
    device = "phone-late"
    first = Viewer()
    watching = asyncio.create_task(
        watch(consume_url(stack, device), first, until=FPS * seconds - 1)
    )
    await wait_for_consumers(stack, 1)
    phone = asyncio.create_task(
        stream_to(
            phone_url(stack, device),
            synthetic_stream(WIDTH, HEIGHT, FPS, seconds, gop_s=gop_s, bitrate=500_000),
            fps=FPS,
        )
    )
    await asyncio.sleep(1.3)  # mid-GOP: the next keyframe is 0.7 s away
    late = Viewer()
    async with websockets.connect(consume_url(stack, device), compression=None) as ws:
        # What arrives at once, before any new keyframe could: the GOP so far.
        while not late.frames:
            message = await asyncio.wait_for(ws.recv(), 2)
            assert isinstance(message, bytes)
            late.take(message)
        await ws.send("ping")
        replies = []
        while "pong" not in replies and len(replies) < 500:  # after what is already queued
            replies.append(await asyncio.wait_for(ws.recv(), 2))
    assert late.frames[0] == 0  # the GOP's keyframe, decoded from the first packets received
    assert late.frames == list(range(late.frames[0], late.frames[-1] + 1))
    assert "pong" in replies
    await phone
    await watching
    assert first.frames == list(range(FPS * seconds))


async def test_a_stalled_viewer_holds_nobody_back_and_resumes_on_a_keyframe(
    stack: Stack,
) -> None:
    seconds, width, height = 8, 1280, 720
    total = FPS * seconds
    # Encoded beforehand: encoding 720p while two viewers decode it would hold this process
    # back, and a steady viewer that falls a queue behind skips frames too.
    packets = await asyncio.to_thread(
        list, synthetic_stream(width, height, FPS, seconds, gop_s=1.0, bitrate=8_000_000)
    )
    steady, stalled = Viewer(), Viewer()
    watching = [
        asyncio.create_task(watch(consume_url(stack), steady, until=total - 1)),
        asyncio.create_task(
            watch(consume_url(stack), stalled, until=total - 1, stall=5.0, after=10)
        ),
    ]
    await wait_for_consumers(stack, 2)
    # ~8 Mbit/s: a 5 s stall is ~5 MB, more than the sockets between them hold (the kernel
    # grows a loopback send buffer up to 4 MB here), so the gateway's queue overflows.
    await stream_to(phone_url(stack), packets, fps=FPS)
    await asyncio.gather(*watching)
    assert steady.frames == list(range(total))
    # The stalled viewer lost a stretch, but everything it got decoded: it resumed on a keyframe
    # (one a second here) and ran in order to the end.
    assert stalled.frames[-1] == total - 1
    jumps = [(a, b) for a, b in zip(stalled.frames, stalled.frames[1:], strict=False) if b != a + 1]
    assert jumps, ("the stall never made the viewer skip", len(stalled.frames), stalled.packets)
    assert all(b > a and b % FPS == 0 for a, b in jumps), jumps


async def read_timed(ws: websockets.ClientConnection) -> list[tuple[dict[str, Any], bytes, int]]:
    """`?timing=1` messages until the stream goes quiet: (timing, binary, arrival in Unix ms)
    for each binary message."""
    received = []
    while True:
        try:
            text = await asyncio.wait_for(ws.recv(), 3)
        except TimeoutError:
            return received
        assert isinstance(text, str), "a binary message without its timing message"
        binary = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(binary, bytes), binary
        received.append((json.loads(text), binary, time.time_ns() // 1_000_000))


def jpeg_number(data: bytes) -> int:
    (picture,) = av.CodecContext.create("mjpeg", "r").decode(av.Packet(data))
    assert (picture.width, picture.height) == (WIDTH, HEIGHT)
    return frame_number(picture.to_ndarray(format="yuv420p"))


async def test_viewers_get_jpegs_and_capture_times_and_a_late_joiner_a_picture_at_once(
    stack: Stack,
) -> None:
    seconds = 2
    # A device of its own: the relay still holds the other tests' last picture of theirs, which
    # a viewer would get first instead of the `no_stream` line.
    device = "phone-jpeg"
    frames_url = stack.ws("/ws/video/frames", "video:subscribe") + f"&device={device}"
    started_ms = time.time_ns() // 1_000_000
    async with (
        websockets.connect(frames_url + "&timing=1") as frames,
        websockets.connect(consume_url(stack, device) + "&timing=1", compression=None) as consumer,
    ):
        # Each socket's catch-up has been answered (nothing yet) before the phone starts: a
        # socket still asking once the stream runs would start from the relay's latest instead.
        for socket in (frames, consumer):
            status = json.loads(await asyncio.wait_for(socket.recv(), 5))
            assert status["code"] == "no_stream", status
        reading = asyncio.gather(read_timed(frames), read_timed(consumer))
        await stream_to(
            phone_url(stack, device),
            synthetic_stream(WIDTH, HEIGHT, FPS, seconds, gop_s=1.0, bitrate=500_000),
            fps=FPS,
        )
        jpegs, packets = await reading
    # The relay decodes 5 frames a second of video: frames 0, 6, ... 54, each a JPEG.
    assert [jpeg_number(data) for _, data, _ in jpegs] == list(range(0, FPS * seconds, 6))
    viewer = Viewer()
    for _, data, _ in packets:
        viewer.take(data)
    viewer.flush()
    assert viewer.frames == list(range(FPS * seconds))
    # Each binary message came right after its timing message, numbered from 1 on its socket,
    # with a capture time after the phone started and before the viewer had it, and not long
    # before (the relay maps the phone's clock, which counts from 0 here, to the wall clock).
    for received in (jpegs, packets):
        assert [timing["seq"] for timing, _, _ in received] == list(range(1, len(received) + 1))
        for timing, _, arrived_ms in received:
            assert started_ms <= timing["captured_ms"] <= arrived_ms
            assert arrived_ms - timing["captured_ms"] < 2_000, timing
    assert {timing["kind"] for timing, _, _ in jpegs} == {"jpeg"}
    assert {timing["kind"] for timing, _, _ in packets} == {"sps", "pps", "keyframe", "frame"}

    # The phone has stopped: a viewer joining now still gets the last picture, at once.
    async with websockets.connect(frames_url) as late:
        latest = await asyncio.wait_for(late.recv(), 1)
    assert isinstance(latest, bytes)
    assert jpeg_number(latest) == jpeg_number(jpegs[-1][1])


async def until_watching(
    phone: websockets.ClientConnection,
    viewer: websockets.ClientConnection,
    probes: list[dict[str, Any]],
) -> None:
    """Send `probes` one by one until the viewer receives IMU (it subscribes after connecting)."""
    for probe in probes:
        await phone.send(json.dumps(probe))
        try:
            while True:
                message = json.loads(await asyncio.wait_for(viewer.recv(), 0.2))
                if message["type"] == "imu_data":
                    return
        except TimeoutError:
            continue
    raise AssertionError("the viewer never received an IMU sample")


async def test_imu_reaches_viewers_in_order_and_controls_reach_the_phone(stack: Stack) -> None:

    start_ns = 1_800_000_000_000_000_000
    samples = imu_samples(60, start_ns=start_ns, rate_hz=200)
    # Out of order (each pair swapped) and with duplicates (the first ten again at the end). The
    # relay reorders within its 50 ms window, of timestamps and of arrival time: disorder wider
    # than that is dropped as late by design, so how much of it got through would depend on how
    # fast this machine moved the messages.
    swapped = [sample for pair in zip(samples[1::2], samples[::2], strict=True) for sample in pair]
    shuffled = swapped + samples[:10]
    # Earlier samples, one at a time until the viewer gets one: then it surely watches.
    probes = imu_samples(100, start_ns=start_ns - 1_000_000_000, rate_hz=200)
    phone_ws = stack.ws("/ws/phone", "video:publish", device=DEVICE)
    viewer_ws = stack.ws("/ws/viewer", "video:subscribe", "video:control")
    async with (
        websockets.connect(phone_ws) as phone,
        websockets.connect(viewer_ws) as viewer,
    ):
        await until_watching(phone, viewer, probes)
        for sample in shuffled:
            await phone.send(json.dumps(sample))
        received: list[dict[str, Any]] = []
        while len(received) < len(samples):
            message = json.loads(await asyncio.wait_for(viewer.recv(), 5))
            if message["type"] == "imu_data" and message["imu_data"]["timestamp"] >= start_ns:
                received.append(message["imu_data"])
        command = {"type": "joystick", "x": 0.5, "y": -0.25, "device": DEVICE}
        await viewer.send(json.dumps(command))
        got = json.loads(await asyncio.wait_for(phone.recv(), 5))
    assert [s["timestamp"] for s in received] == [s["timestamp"] for s in samples]
    assert got["type"] == "joystick"
    assert (got["x"], got["y"]) == (0.5, -0.25)


async def test_every_worldsystem_exchange_exists_under_its_name(
    stack: Stack, amqp_url: str
) -> None:
    topology = Topology()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for exchange in topology.worldsystem_exchanges():
            channel = await connection.channel()
            # Passive: fails (channel error) unless the running services declared it.
            declared = await channel.declare_exchange(exchange.name, passive=True)
            assert declared.name == exchange.name
    assert {e.name for e in topology.worldsystem_exchanges()} == {
        "video_frames_exchange",
        "video_stream_exchange",
        "imu_data_exchange",
        "processed_frames_exchange",
        "analysis_mode_exchange",
        "trajectory_data_exchange",
        "restart_exchange",
        "ply_fanout_exchange",
    }
