"""The phone's media: a moving test pattern that carries its frame number, as H.264 in the
WorldSystem app's packets (`synthetic_stream`, `VideoLoop`), as `/ws/phone` JPEG frames
(`jpeg_frames`), and the app's IMU messages (`imu_sample`). Whoever decodes a frame can tell
which one it got (`frame_number`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.edge.phone.wire import android_packets

# The frame number is drawn as the top row of FRAME_NUMBER_BITS square blocks (most significant
# first), then CHECK_BITS blocks of a checksum, so that a frame that does not carry one is told
# apart from frame 0 instead of being misread.
FRAME_NUMBER_BITS = 20
CHECK_BITS = 4
BLOCKS = FRAME_NUMBER_BITS + CHECK_BITS
MIN_BLOCK = 8  # pixels: smaller blocks do not survive compression at low bitrates
# Luma of the blocks: video range black and white (BT.601 16..235).
DARK, LIGHT = 16, 235
LOOP_S = 10.0  # seconds of video a VideoLoop encodes once, then replays


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
