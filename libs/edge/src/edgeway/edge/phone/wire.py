"""The WorldSystem app's wire: its H.264 packets (`android_packets`), the gateway's phone
endpoints (`endpoint_url`), and senders for tests and benchmarks: `stream_to` (`WS /ws/video` in
real time, cut as the app does or otherwise, `Chunking`) and `send_imu` (`WS /ws/phone`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
import websockets

from edgeway.common.video.packets import PacketType, VideoPacket

# MediaCodec.BUFFER_FLAG_KEY_FRAME (android.media.MediaCodec), as the app copies into `flags`.
BUFFER_FLAG_KEY_FRAME = 1
# Annex-B start code; a four-byte one is the same with a leading zero byte.
_START_CODE = re.compile(b"\x00\x00\x01")
_NAL_SPS, _NAL_PPS = 7, 8
PHONE_PATH = "/ws/phone"
VIDEO_PATH = "/ws/video"


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


def auth_headers(token: str | None) -> dict[str, str]:
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
        url, additional_headers=auth_headers(token), compression=None, proxy=None, max_size=None
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


async def send_imu(
    url: str, samples: Sequence[dict[str, Any]], *, token: str | None = None
) -> None:
    """Send `samples` as text messages to `WS /ws/phone` at `url`, as fast as it takes them."""
    async with websockets.connect(
        url, additional_headers=auth_headers(token), compression=None, proxy=None
    ) as connection:
        for sample in samples:
            await connection.send(orjson.dumps(sample).decode())


def endpoint_url(gateway_url: str, path: str, device: str) -> str:
    """`ws(s)://<gateway><path>?device=<device>` for an `http(s)://` gateway URL."""
    parts = urlsplit(gateway_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode({"device": device}), "")
    )
