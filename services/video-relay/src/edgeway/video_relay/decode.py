"""H.264 to JPEG for the tracker: one PyAV decoder per device, off the event loop.

Every packet must reach the decoder (a frame decodes only from the ones before it), but only
`decode_fps` frames per second of video are encoded as JPEG. Decoding runs in a worker thread
(`asyncio.to_thread`, one batch at a time per device); packets that arrive meanwhile wait in a
bounded list. When that list is full the decoder is behind: what waits is dropped and decoding
resumes at the next keyframe (a P-frame without its references decodes to garbage). The live
stream never waits for any of this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import av
import av.error
from av.codec.context import CodecContext
from av.video.codeccontext import VideoCodecContext
from av.video.frame import VideoFrame

from edgeway.common.logging import get_logger
from edgeway.common.video.packets import PacketType
from edgeway.video_relay.stream import Relayed

MICROSECONDS: Final = Fraction(1, 1_000_000)
# Frames whose packet times the decoder has not handed back yet (B-frame reordering delay is a
# few frames; a stream that never returns some is bounded by this).
MAX_PENDING_TIMES = 64
PARAMETER_SETS = (PacketType.SPS, PacketType.PPS)
# Timestamps are whole µs: a frame at 33 333 µs is in the second 1/30 s slot, not the first.
SLOT_TOLERANCE = 0.01

log = get_logger("edgeway.video_relay.decode")


def h264_available() -> bool:
    """Whether this PyAV build has an H.264 decoder (the seed's `/h264/test`)."""
    try:
        av.codec.Codec("h264", "r")
    except (av.error.FFmpegError, ValueError):
        return False
    return True


class Resync:
    """Marker in a decoder's input: the stream has a hole here; start again at a keyframe."""


RESYNC: Final = Resync()


@dataclass(frozen=True, slots=True)
class Jpeg:
    """One decoded frame as a JPEG, with what the tracker's headers need."""

    data: bytes
    width: int
    height: int
    timestamp_us: int  # the packet's presentation time (the phone's clock)
    received_ns: int  # when the relay received the packet (NTP-corrected wall clock)


class FrameDecoder:
    """One device's decoder and JPEG encoder. Synchronous: call it from one thread at a time."""

    def __init__(self, *, fps: float, qscale: int) -> None:
        self.interval_us = 1_000_000 / fps
        self.qscale = qscale
        self.decoded = 0  # frames out of the decoder
        self.errors = 0  # packets the decoder refused (it then waits for a keyframe)
        self._sps: bytes | None = None
        self._pps: bytes | None = None
        self._codec: VideoCodecContext | None = None  # open from a keyframe until a hole
        self._jpeg: VideoCodecContext | None = None
        self._times: dict[int, int] = {}  # pts -> received_ns, until its frame comes out
        self._last_us: int | None = None  # timestamp of the last frame made a JPEG
        self._last_slot = 0

    def decode(self, items: Sequence[Relayed | Resync]) -> list[Jpeg]:
        """Feed packets in stream order; the JPEGs due among the frames they produced."""
        out: list[Jpeg] = []
        for item in items:
            if isinstance(item, Resync):
                self._close()
                continue
            kind = item.type
            payload = item.packet.payload
            if kind is PacketType.SPS or kind is PacketType.PPS:
                if payload != (self._sps if kind is PacketType.SPS else self._pps):
                    # New parameter sets (another resolution, a restarted encoder): the open
                    # decoder's are stale; open again at the keyframe that follows.
                    self._close()
                if kind is PacketType.SPS:
                    self._sps = payload
                else:
                    self._pps = payload
                continue
            if self._codec is None:
                if kind is not PacketType.KEYFRAME or self._sps is None or self._pps is None:
                    continue  # nothing decodes before parameter sets and a keyframe
                self._codec = self._open()
                # Parameter sets first, as the decoder of a joining viewer gets them.
                payload = self._sps + self._pps + payload
            out.extend(self._feed(payload, item))
        return out

    def _open(self) -> VideoCodecContext:
        codec = CodecContext.create("h264", "r")
        assert isinstance(codec, VideoCodecContext)
        # One thread per decoder and no frame threading: frame threading holds frames back
        # (latency) and each device already has its own worker.
        codec.thread_count = 1
        self._times.clear()
        return codec

    def _close(self) -> None:
        self._codec = None
        self._times.clear()

    def _feed(self, payload: bytes, item: Relayed) -> list[Jpeg]:
        assert self._codec is not None
        packet = av.Packet(payload)
        packet.pts = item.packet.timestamp_us
        packet.time_base = MICROSECONDS
        if len(self._times) >= MAX_PENDING_TIMES:
            self._times.clear()
        self._times[item.packet.timestamp_us] = item.received_ns
        try:
            frames = self._codec.decode(packet)
        except av.error.FFmpegError as exc:
            self.errors += 1
            log.debug("undecodable packet; waiting for a keyframe", seq=item.seq, error=str(exc))
            self._close()
            return []
        out: list[Jpeg] = []
        for frame in frames:
            assert isinstance(frame, VideoFrame)
            self.decoded += 1
            pts = frame.pts if frame.pts is not None else item.packet.timestamp_us
            received_ns = self._times.pop(pts, item.received_ns)
            if self._due(pts):
                self._last_us = pts
                out.append(Jpeg(self._encode(frame), frame.width, frame.height, pts, received_ns))
        return out

    def _due(self, pts: int) -> bool:
        """At most `fps` frames per second of video: the first frame of each 1/fps slot of the
        phone's clock (slots, not distances, so rounded timestamps keep the rate exact). A
        clock that went back starts again."""
        slot = int(pts / self.interval_us + SLOT_TOLERANCE)
        last = self._last_us
        if last is not None and pts >= last and slot <= self._last_slot:
            return False
        self._last_slot = slot
        return True

    def _encode(self, frame: VideoFrame) -> bytes:
        jpeg = self._jpeg
        if jpeg is None or (jpeg.width, jpeg.height) != (frame.width, frame.height):
            jpeg = CodecContext.create("mjpeg", "w")
            assert isinstance(jpeg, VideoCodecContext)
            jpeg.width = frame.width
            jpeg.height = frame.height
            jpeg.pix_fmt = "yuvj420p"  # full-range YUV, what JPEG carries
            jpeg.time_base = MICROSECONDS
            # A fixed quantizer (qmin = qmax), FFmpeg's `-q:v`; the default is rate control
            # aimed at 200 kb/s, which is no fixed quality at all.
            jpeg.qmin = jpeg.qmax = self.qscale
            self._jpeg = jpeg
        packets = jpeg.encode(frame.reformat(format="yuvj420p"))
        return b"".join(bytes(packet) for packet in packets)


class DecodeWorker:
    """Feeds one device's `FrameDecoder` from a worker thread; bounded, drops when behind."""

    def __init__(
        self,
        decoder: FrameDecoder,
        *,
        backlog: int,
        on_jpeg: Callable[[Jpeg], Awaitable[None]],
        on_skip: Callable[[int], None],
        on_errors: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.decoder = decoder
        self.backlog = backlog
        self._on_jpeg = on_jpeg
        self._on_skip = on_skip
        self._on_errors = on_errors
        self._pending: list[Relayed | Resync] = []
        self._wake = asyncio.Event()

    def submit(self, packets: Sequence[Relayed], *, discontinuity: bool) -> None:
        """Queue packets (never blocks). Past the backlog, skip to the next keyframe."""
        if discontinuity:
            self._pending.append(RESYNC)
        if len(self._pending) + len(packets) > self.backlog:
            waiting = [item for item in self._pending if isinstance(item, Relayed)]
            # Keep the newest parameter sets: the keyframe decoding resumes at needs them.
            keep = {item.type: item for item in waiting if item.type in PARAMETER_SETS}
            self._on_skip(len(waiting) - len(keep))
            self._pending = [RESYNC, *sorted(keep.values(), key=lambda item: item.seq)]
        self._pending.extend(packets)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            errors = self.decoder.errors
            try:
                jpegs = await asyncio.to_thread(self.decoder.decode, batch)
            except Exception:  # a bug in one batch must not end decoding
                log.exception("decoding failed; waiting for a keyframe")
                self.decoder.decode([RESYNC])
                continue
            if self.decoder.errors != errors:
                self._on_errors(self.decoder.errors - errors)
            for jpeg in jpegs:
                await self._on_jpeg(jpeg)
