"""A phone, simulated: what the WorldSystem Android app sends to the gateway.

- `synthetic_stream`: H.264 from libx264 (PyAV), cut into the app's packets
  (`edgeway.common.video.packets`), of a moving pattern that carries its frame number as a row
  of blocks, so that whoever decodes it can tell which frame it got (`frame_number`);
- `stream_to`: sends those packets over `WS /ws/video` in real time, one packet per message as
  the app does, or cut and merged differently (`Chunking`) to exercise the relay's parser;
- `jpeg_frames` for `WS /ws/phone` (8-byte big-endian ns timestamp + JPEG), and `imu_samples`
  and `send_imu` for its IMU messages;
- `Phone`, behind the command: a `VideoLoop` (a few seconds encoded once) replayed for ever to
  `WS /ws/video` in real time with fresh timestamps, IMU samples to `WS /ws/phone`, viewer
  commands logged, reconnecting with backoff:

      python -m edgeway.edge.phone --gateway http://127.0.0.1:8000 --device phone-1 \
          [--token-file F] [--width 640 --height 360 --fps 30 --gop 2 --bitrate 2000000] \
          [--loop-s 10] [--imu-hz 100]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import av
import numpy as np
import numpy.typing as npt
import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.frames import CloseCode

from edgeway.common.logging import configure_logging, get_logger
from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.edge.credentials import add_token_options, read_token
from edgeway.edge.pacing import Backoff

# The frame number is drawn as the top row of FRAME_NUMBER_BITS square blocks (most significant
# first), then CHECK_BITS blocks of a checksum, so that a frame that does not carry one is told
# apart from frame 0 instead of being misread.
FRAME_NUMBER_BITS = 20
CHECK_BITS = 4
BLOCKS = FRAME_NUMBER_BITS + CHECK_BITS
MIN_BLOCK = 8  # pixels: smaller blocks do not survive compression at low bitrates
# Luma of the blocks: video range black and white (BT.601 16..235).
DARK, LIGHT = 16, 235

# MediaCodec.BUFFER_FLAG_KEY_FRAME (android.media.MediaCodec), as the app copies into `flags`.
BUFFER_FLAG_KEY_FRAME = 1
# Annex-B start code; a four-byte one is the same with a leading zero byte.
_START_CODE = re.compile(b"\x00\x00\x01")
_NAL_SPS, _NAL_PPS = 7, 8


def _block_size(width: int) -> int:
    return width // BLOCKS


def _checksum(number: int) -> int:
    return (number ^ (number >> 4) ^ (number >> 8) ^ (number >> 12) ^ (number >> 16) ^ 0b1010) & 0xF


def draw_frame(width: int, height: int, number: int) -> npt.NDArray[np.uint8]:
    """Frame `number` of the pattern as a yuv420p array (`height * 3 // 2` rows of `width`):
    a diagonal gradient that moves 4 levels a frame, a square that crosses the picture, and
    the number's blocks along the top."""
    block = _block_size(width)
    if block < MIN_BLOCK or height < 2 * block or width % 2 or height % 2:
        raise ValueError(
            f"{width}x{height}: need even sizes, width >= {BLOCKS * MIN_BLOCK}, height >= "
            f"two blocks"
        )
    ys, xs = np.mgrid[0:height, 0:width]
    luma = ((xs + ys) // 2 + 4 * number) % 220 + 16
    side = max(block, height // 6)
    left = (number * 7) % max(1, width - side)
    top = height // 2 - side // 2
    luma[top : top + side, left : left + side] = LIGHT
    drawn = number % (1 << FRAME_NUMBER_BITS)  # wraps after 2^20 frames (9.7 h at 30 fps)
    value = drawn << CHECK_BITS | _checksum(drawn)
    luma[:block, : BLOCKS * block] = DARK
    for bit in range(BLOCKS):
        if value >> (BLOCKS - 1 - bit) & 1:
            luma[:block, bit * block : (bit + 1) * block] = LIGHT
    # Chroma: a slow colour wash, neutral behind the blocks so RGB conversions read them well.
    cys, cxs = np.mgrid[0 : height // 2, 0 : width // 2]
    u = (128 + 40 * np.sin((cxs + 2 * number) / 40.0)).astype(np.uint8)
    v = (128 + 40 * np.cos((cys + number) / 30.0)).astype(np.uint8)
    u[: (block + 1) // 2 + 1], v[: (block + 1) // 2 + 1] = 128, 128
    planes = np.empty((height * 3 // 2, width), np.uint8)
    planes[:height] = luma
    planes[height:].reshape(-1)[: u.size] = u.reshape(-1)
    planes[height:].reshape(-1)[u.size :] = v.reshape(-1)
    return planes


def frame_number(decoded: npt.NDArray[Any]) -> int:
    """The frame number drawn into a decoded frame: a gray or Y plane (2-D, yuv420p planes
    stacked included) or an RGB/BGR picture (height, width, 3). Raises ValueError when the
    blocks cannot be read (not a frame of this pattern, or damaged beyond reading)."""
    picture = np.asarray(decoded)
    luma = picture[..., :3].mean(axis=2) if picture.ndim == 3 else picture.astype(np.float64)
    block = _block_size(luma.shape[1])
    if block < MIN_BLOCK // 2 or luma.shape[0] < block:
        raise ValueError("picture too small to carry a frame number")
    inner = slice(block // 4, block - block // 4)
    value = 0
    for bit in range(BLOCKS):
        column = slice(bit * block + block // 4, (bit + 1) * block - block // 4)
        level = float(luma[inner, column].mean())
        if 80 < level < 170:
            raise ValueError(f"block {bit} is neither dark nor light ({level:.0f})")
        value = value << 1 | (level >= 128)
    number, check = value >> CHECK_BITS, value & 0xF
    if _checksum(number) != check:
        raise ValueError("frame number checksum does not match")
    return number


def _nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex-B buffer, each with its start code."""
    starts = []
    for match in _START_CODE.finditer(data):
        start = match.start()
        starts.append(start - 1 if start and data[start - 1] == 0 else start)
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


def _nal_type(unit: bytes) -> int:
    return unit[unit.index(b"\x00\x00\x01") + 3] & 0x1F


def android_packets(access_unit: bytes, timestamp_us: int, *, keyframe: bool) -> list[VideoPacket]:
    """One encoded frame as the app sends it: SPS and PPS as packets of their own (before each
    keyframe), then the rest of the access unit as a KEYFRAME or FRAME."""
    packets: list[VideoPacket] = []
    rest = b""
    for unit in _nal_units(access_unit):
        kind = _nal_type(unit)
        if kind == _NAL_SPS:
            packets.append(VideoPacket(PacketType.SPS, timestamp_us, unit))
        elif kind == _NAL_PPS:
            packets.append(VideoPacket(PacketType.PPS, timestamp_us, unit))
        else:
            rest += unit
    if keyframe:
        packets.append(
            VideoPacket(PacketType.KEYFRAME, timestamp_us, rest, flags=BUFFER_FLAG_KEY_FRAME)
        )
    else:
        packets.append(VideoPacket(PacketType.FRAME, timestamp_us, rest))
    return packets


def synthetic_stream(
    width: int,
    height: int,
    fps: float,
    seconds: float,
    *,
    gop_s: float = 1.0,
    bitrate: int = 2_000_000,
) -> Iterator[VideoPacket]:
    """`seconds` of the pattern at `fps` as app packets: a keyframe (preceded by SPS and PPS)
    every `gop_s`, baseline profile (no B-frames: decode order is display order), tuned for zero
    latency (every frame comes out of the encoder as soon as it goes in). Timestamps are the
    frames' presentation times in µs from 0."""
    count = round(fps * seconds)
    gop = max(1, round(gop_s * fps))
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height = width, height
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, 1_000_000)
    encoder.framerate = Fraction(fps).limit_denominator(1001)
    encoder.bit_rate = bitrate
    encoder.gop_size = gop
    encoder.max_b_frames = 0
    encoder.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "profile": "baseline",
        # scenecut=0: keyframes exactly every `gop` frames; repeat-headers: SPS/PPS in front of
        # every keyframe, as the app sends them.
        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1",
    }
    draw_frame(width, height, 0)  # refuse unusable sizes before opening the encoder
    for number in range(count):
        frame = av.VideoFrame.from_ndarray(draw_frame(width, height, number), format="yuv420p")
        frame.pts = round(number * 1_000_000 / fps)
        frame.time_base = encoder.time_base
        for packet in encoder.encode(frame):
            yield from _packets_of(packet)
    for packet in encoder.encode(None):
        yield from _packets_of(packet)


def _packets_of(packet: av.Packet[Any]) -> list[VideoPacket]:
    timestamp = int(packet.pts) if packet.pts is not None else 0
    return android_packets(bytes(packet), timestamp, keyframe=packet.is_keyframe)


@dataclass(frozen=True, slots=True)
class Chunking:
    """How `stream_to` cuts the byte stream into WebSocket messages (the app: one packet per
    message). `merge` packets are joined into one message (waiting for the later ones), then
    any message longer than `split_bytes` is cut into pieces of that size."""

    merge: int = 1
    split_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.merge < 1 or (self.split_bytes is not None and self.split_bytes < 1):
            raise ValueError("merge and split_bytes must be at least 1")

    def cut(self, body: bytes) -> list[bytes]:
        if self.split_bytes is None:
            return [body]
        step = self.split_bytes
        return [body[i : i + step] for i in range(0, len(body), step)]


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def stream_to(
    url: str,
    packets: Iterable[VideoPacket],
    *,
    fps: float,
    token: str | None = None,
    chunking: Chunking | None = None,
) -> int:
    """Send `packets` (their Android encodings) to `WS /ws/video` at `url`, the n-th frame
    (KEYFRAME or FRAME) `n / fps` seconds after the first, as a camera would; SPS and PPS go
    with the keyframe they precede. `fps <= 0` sends as fast as the socket takes them. Returns
    the number of messages sent. `packets` is read as it goes (a `synthetic_stream` encodes in
    this thread, a few ms a frame at small sizes)."""
    chunking = chunking or Chunking()
    sent = 0
    async with websockets.connect(
        url, additional_headers=_headers(token), compression=None, proxy=None, max_size=None
    ) as connection:
        started = time.monotonic()
        frames = 0
        body = bytearray()
        in_body = 0
        held: list[bytes] = []  # SPS/PPS waiting for their keyframe's time
        for packet in packets:
            held.append(packet.encode())
            if packet.type not in (PacketType.KEYFRAME, PacketType.FRAME):
                continue
            if fps > 0:
                delay = started + frames / fps - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            frames += 1
            for wire in held:
                body += wire
                in_body += 1
                if in_body == chunking.merge:
                    for message in chunking.cut(bytes(body)):
                        await connection.send(message)
                        sent += 1
                    body.clear()
                    in_body = 0
            held.clear()
        for wire in held:
            body += wire
        if body:
            for message in chunking.cut(bytes(body)):
                await connection.send(message)
                sent += 1
    return sent


def imu_sample(index: int, timestamp_ns: int, rate_hz: float) -> dict[str, Any]:
    """The `index`-th IMU message in the app's shape at `rate_hz`: a phone lying flat (gravity
    on z) that rocks slowly about x."""
    phase = 2 * math.pi * index / max(1.0, rate_hz)  # one rock a second
    return {
        "type": "imu_data",
        "timestamp": timestamp_ns,
        "accelerometer": {
            "x": round(0.3 * math.sin(phase), 6),
            "y": 0.0,
            "z": round(9.81 * math.cos(0.03 * math.sin(phase)), 6),
        },
        "gyroscope": {"x": round(0.2 * math.cos(phase), 6), "y": 0.0, "z": 0.0},
    }


def imu_samples(count: int, start_ns: int, rate_hz: float) -> list[dict[str, Any]]:
    """`count` IMU messages (`imu_sample`), `1/rate_hz` apart from `start_ns`."""
    period_ns = 1e9 / rate_hz
    return [imu_sample(i, start_ns + round(i * period_ns), rate_hz) for i in range(count)]


async def send_imu(
    url: str, samples: Sequence[dict[str, Any]], *, token: str | None = None
) -> None:
    """Send `samples` as text messages to `WS /ws/phone` at `url`, as fast as it takes them."""
    async with websockets.connect(
        url, additional_headers=_headers(token), compression=None, proxy=None
    ) as connection:
        for sample in samples:
            await connection.send(orjson.dumps(sample).decode())


def jpeg_frames(
    width: int,
    height: int,
    count: int,
    *,
    fps: float = 30.0,
    start_ns: int | None = None,
    quality: int = 5,
) -> Iterator[bytes]:
    """`count` `/ws/phone` frames of the pattern: 8-byte big-endian ns capture time (from
    `start_ns`, default now, `1/fps` apart) followed by a baseline JPEG (PyAV's mjpeg encoder;
    `quality` is its qscale, 2 best to 31 worst). `frame_number` reads the decoded pictures."""
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height = width, height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 1_000_000)
    # Fixed quality (FF_QP2LAMBDA = 118 per qscale step) instead of a bitrate target.
    encoder.options = {"flags": "+qscale", "global_quality": str(quality * 118)}
    draw_frame(width, height, 0)
    first = time.time_ns() if start_ns is None else start_ns
    for number in range(count):
        picture = draw_frame(width, height, number)
        # yuvj420p is full range: stretch the video-range pattern to it.
        full = np.clip((picture.astype(np.int32) - 16) * 255 // 219, 0, 255).astype(np.uint8)
        full[height:] = picture[height:]
        frame = av.VideoFrame.from_ndarray(full, format="yuvj420p")
        frame.pts = round(number * 1_000_000 / fps)
        timestamp = first + round(number * 1e9 / fps)
        for packet in encoder.encode(frame):
            yield timestamp.to_bytes(8, "big") + bytes(packet)


# ---- the command -----------------------------------------------------------------------------

SERVICE = "phone-simulator"
TOKEN_ENV = "EDGEWAY_PHONE_TOKEN"  # noqa: S105 (a variable name, not a secret)
PHONE_PATH = "/ws/phone"
VIDEO_PATH = "/ws/video"
DEVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the gateway takes as ?device=
LOOP_S = 10.0  # seconds of video encoded once, then replayed
LATE_S = 1.0  # a sender further behind real time than this skips ahead instead of catching up
STATS_INTERVAL_S = 30.0

log = get_logger("edgeway.edge.phone")  # not "__main__" when run with -m


def endpoint_url(gateway_url: str, path: str, device: str) -> str:
    """`ws(s)://<gateway><path>?device=<device>` for an `http(s)://` gateway URL."""
    parts = urlsplit(gateway_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode({"device": device}), "")
    )


@dataclass(frozen=True, slots=True)
class VideoLoop:
    """A stretch of the pattern encoded once and replayed for ever. It holds whole GOPs, so the
    first frame follows the last as any keyframe (with its SPS and PPS) follows the frame
    before it. `frames[i]` holds frame i's packets (SPS, PPS and KEYFRAME, or one FRAME); their
    timestamps are replaced as they are sent (`packets`)."""

    frames: tuple[tuple[VideoPacket, ...], ...]
    fps: float
    gop_frames: int

    @classmethod
    def encode(
        cls,
        width: int,
        height: int,
        fps: float,
        *,
        seconds: float = LOOP_S,
        gop_s: float = 1.0,
        bitrate: int = 2_000_000,
    ) -> VideoLoop:
        """`seconds` of `synthetic_stream`, rounded up to whole GOPs."""
        gop = max(1, round(gop_s * fps))
        count = max(1, math.ceil(seconds * fps / gop)) * gop
        frames: list[tuple[VideoPacket, ...]] = []
        held: list[VideoPacket] = []
        for packet in synthetic_stream(
            width, height, fps, count / fps, gop_s=gop / fps, bitrate=bitrate
        ):
            held.append(packet)
            if packet.type in (PacketType.KEYFRAME, PacketType.FRAME):
                frames.append(tuple(held))
                held = []
        if (
            len(frames) != count
            or held
            or any(frames[i][0].type is not PacketType.SPS for i in range(0, count, gop))
        ):
            raise RuntimeError(f"the encoder did not give {count} frames in GOPs of {gop}")
        return cls(tuple(frames), fps, gop)

    def packets(self, index: int, timestamp_us: int) -> list[VideoPacket]:
        """Frame `index` (modulo the loop) with the timestamp `timestamp_us`."""
        return [
            replace(packet, timestamp_us=timestamp_us)
            for packet in self.frames[index % len(self.frames)]
        ]

    def next_gop(self, index: int) -> int:
        """The first frame at or after `index` that starts a GOP, modulo the loop."""
        return -(-index // self.gop_frames) * self.gop_frames % len(self.frames)


@dataclass(slots=True)
class PhoneCounters:
    """What a `Phone` did since it started."""

    frames: int = 0
    imu_samples: int = 0
    commands: int = 0
    errors: int = 0
    connections: int = 0
    skipped_s: float = 0.0  # seconds of real time skipped by senders that fell behind


Serve = Callable[[ClientConnection], Awaitable[None]]


class Phone:
    """A phone that streams for ever: `video` (a `VideoLoop`) to `WS /ws/video`, one packet a
    message in real time, and `imu_hz` IMU samples a second to `WS /ws/phone`. What comes back
    is logged: viewer commands on `/ws/phone`, error frames on either socket.

    Each socket reconnects with backoff on its own when it drops. A reconnected video stream
    starts at the loop's next GOP (SPS, PPS, keyframe), so the relay's parser and decoder start
    afresh there. Timestamps are the phone's clock, from one start: epoch µs for video, epoch ns
    for IMU. They keep increasing across reconnects: a gap in the stream shows as a jump in
    timestamps, as from a phone that stalled, never as time going back."""

    def __init__(
        self,
        gateway_url: str,
        device: str,
        token: str | None,
        video: VideoLoop,
        *,
        imu_hz: float = 100.0,
        backoff: Backoff | None = None,
        open_timeout_s: float = 10.0,
    ) -> None:
        self.device = device
        self.video_url = endpoint_url(gateway_url, VIDEO_PATH, device)
        self.phone_url = endpoint_url(gateway_url, PHONE_PATH, device)
        self.video = video
        self.imu_hz = imu_hz
        self.counters = PhoneCounters()
        self._headers = _headers(token)
        self._backoff = backoff if backoff is not None else Backoff(initial=0.5, maximum=10.0)
        self._open_timeout_s = open_timeout_s
        self._started = time.monotonic()
        self._epoch_ns = time.time_ns()
        self._frame = 0  # the next video frame, counted from the start (its time)
        self._cursor = 0  # the next frame of the loop (its picture)
        self._imu = 0  # the next IMU sample, counted from the start

    async def run(self) -> None:
        """Stream until cancelled."""
        self._started, self._epoch_ns = time.monotonic(), time.time_ns()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep("video", self.video_url, self._stream))
            tasks.create_task(self._keep("phone", self.phone_url, self._phone))
            tasks.create_task(self._report())

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    async def _keep(self, name: str, url: str, serve: Serve) -> None:
        """Keep `url` connected and `serve` it; reconnect with backoff when it drops."""
        delays = self._backoff.delays()
        trouble: str | None = None  # said once, not at every retry
        while True:
            try:
                async with websockets.connect(
                    url,
                    additional_headers=self._headers,
                    compression=None,
                    proxy=None,
                    open_timeout=self._open_timeout_s,
                    close_timeout=2,
                ) as connection:
                    delays, trouble = self._backoff.delays(), None
                    self.counters.connections += 1
                    log.info("connected", socket=name, url=url, device=self.device)
                    try:
                        await serve(connection)
                    except asyncio.CancelledError:
                        # Stopping: say so (1001) instead of the 1011 an exception would give.
                        await connection.close(CloseCode.GOING_AWAY, "the phone is stopping")
                        raise
                    why = "closed by the gateway"
            except websockets.InvalidStatus as exc:
                why = f"refused with HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why != trouble:
                log.warning("connection lost; reconnecting", socket=name, reason=why)
                trouble = why
            else:
                log.debug("connection still failing", socket=name, reason=why)
            await asyncio.sleep(next(delays))

    async def _stream(self, connection: ClientConnection) -> None:
        await _together(self._read(connection, "video"), self._send_video(connection))

    async def _phone(self, connection: ClientConnection) -> None:
        if self.imu_hz > 0:
            await _together(self._read(connection, "phone"), self._send_imu(connection))
        else:
            await self._read(connection, "phone")

    async def _send_video(self, connection: ClientConnection) -> None:
        fps, first_us = self.video.fps, self._epoch_ns // 1_000
        self._cursor = self.video.next_gop(self._cursor)
        self._frame = max(self._frame, math.ceil(self._elapsed() * fps))
        while True:
            self._frame = await self._wait_for(self._frame, fps)
            timestamp_us = first_us + round(self._frame * 1_000_000 / fps)
            for packet in self.video.packets(self._cursor, timestamp_us):
                await connection.send(packet.encode())
            self._frame += 1
            self._cursor = (self._cursor + 1) % len(self.video.frames)
            self.counters.frames += 1

    async def _send_imu(self, connection: ClientConnection) -> None:
        hz = self.imu_hz
        self._imu = max(self._imu, math.ceil(self._elapsed() * hz))
        while True:
            self._imu = await self._wait_for(self._imu, hz)
            timestamp_ns = self._epoch_ns + round(self._imu * 1e9 / hz)
            await connection.send(orjson.dumps(imu_sample(self._imu, timestamp_ns, hz)).decode())
            self._imu += 1
            self.counters.imu_samples += 1

    async def _wait_for(self, index: int, rate: float) -> int:
        """Sleep until item `index` of a `rate`-per-second sequence is due; the index to send
        now, which is later than `index` when the sender fell more than LATE_S behind."""
        delay = index / rate - self._elapsed()
        if delay > 0:
            await asyncio.sleep(delay)
            return index
        await asyncio.sleep(0)  # catching up: let the other sockets have their turn
        if delay < -LATE_S:
            self.counters.skipped_s += -delay
            log.warning("behind real time; skipping ahead", seconds=round(-delay, 3))
            return math.ceil(self._elapsed() * rate)
        return index

    async def _read(self, connection: ClientConnection, name: str) -> None:
        async for message in connection:
            self._take(name, message)

    def _take(self, name: str, message: str | bytes) -> None:
        if isinstance(message, bytes):
            log.warning("unexpected binary message", socket=name, size=len(message))
            return
        try:
            body = orjson.loads(message)
        except orjson.JSONDecodeError:
            log.warning("unreadable message", socket=name, message=message[:200])
            return
        kind = body.get("type") if isinstance(body, dict) else None
        if kind == "error":
            self.counters.errors += 1
            log.warning(
                "the gateway refused a message",
                socket=name,
                code=body.get("code"),
                reason=body.get("reason"),
            )
        else:
            self.counters.commands += 1
            log.info("command received", socket=name, device=self.device, kind=kind, command=body)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            log.info("streaming", device=self.device, **asdict(self.counters))


async def _together(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run `coroutines` until the first one ends (a connection's reader and writer: either one
    ends when the connection does); cancel the rest, and raise what the first one raised."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgeway.edge.phone",
        description=(
            "Stream a synthetic H.264 pattern and IMU samples to an Edgeway gateway, like "
            "WorldSystem's Android app, until stopped."
        ),
    )
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--device", default="phone", help="device id (?device=)")
    add_token_options(parser, env=TOKEN_ENV, scope="video:publish")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--gop", type=float, default=2.0, help="seconds between keyframes")
    parser.add_argument("--bitrate", type=int, default=2_000_000, help="bits per second")
    parser.add_argument(
        "--loop-s", type=float, default=LOOP_S, help="seconds encoded once and replayed"
    )
    parser.add_argument("--imu-hz", type=float, default=100.0, help="IMU samples/s (0: none)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(service=SERVICE, level=args.log_level)
    if not DEVICE.fullmatch(args.device):
        log.error("--device must be 1 to 64 letters, digits, '_' or '-'", device=args.device)
        return 2
    if min(args.fps, args.gop, args.bitrate, args.loop_s) <= 0 or args.imu_hz < 0:
        log.error("--fps, --gop, --bitrate and --loop-s must be positive, --imu-hz not negative")
        return 2
    try:
        draw_frame(args.width, args.height, 0)
    except ValueError as exc:
        log.error("unusable picture size", reason=str(exc))
        return 2
    token = read_token(parser, args, env=TOKEN_ENV)
    if not token:
        log.warning("no token: the gateway will refuse the phone unless it grants anonymous scopes")
    return asyncio.run(_run_until_signalled(args, token))


async def _run_until_signalled(args: argparse.Namespace, token: str) -> int:
    """Encode the loop, then stream; SIGTERM and SIGINT stop it cleanly."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    phone: Phone | None = None
    try:
        started = time.perf_counter()
        video = await asyncio.to_thread(
            VideoLoop.encode,
            args.width,
            args.height,
            args.fps,
            seconds=args.loop_s,
            gop_s=args.gop,
            bitrate=args.bitrate,
        )
        log.info(
            "video loop encoded",
            frames=len(video.frames),
            gop_frames=video.gop_frames,
            bytes=sum(len(p.payload) for frame in video.frames for p in frame),
            took_s=round(time.perf_counter() - started, 2),
        )
        phone = Phone(args.gateway, args.device, token, video, imu_hz=args.imu_hz)
        await phone.run()
    except asyncio.CancelledError:
        counters = asdict(phone.counters) if phone is not None else {}
        log.info("phone stopped by signal", device=args.device, **counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
