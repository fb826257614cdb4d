"""The video streams of every device: chunks in; packets, JPEGs, GOPs and status out.

Per device the relay holds a `DeviceStream` (parser, numbering, GOP), an `DevicePublisher` that
publishes its packets in order, and a `DecodeWorker` for the tracker's JPEGs. The chunk handler
is synchronous: it parses, numbers and queues before anything is awaited, so deliveries, whose
tasks FastStream starts in delivery order, are taken in that order. Each JPEG goes to the
tracker and to viewers; the last one per device is kept for a viewer that joins.

Memory is bounded: streams by `max_streams` (the one idle longest is forgotten) and
`stream_idle_s`, each stream's GOP by its caps, device publishers by `publish_backlog`,
decoder input by `decode_backlog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import av

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.tasks import spawn
from edgeway.common.timesync import TimeSync
from edgeway.video_relay.decode import DecodeWorker, FrameDecoder, Jpeg, h264_available
from edgeway.video_relay.metrics import Metrics
from edgeway.video_relay.publishing import DevicePublisher, Publisher
from edgeway.video_relay.settings import VideoRelaySettings
from edgeway.video_relay.stream import BANDWIDTH_WINDOW_S, DeviceStream, Picture

# The gateway's device ids (`?device=`); anything else would be a routing-key pattern.
DEVICE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_DEVICE = "phone"

log = get_logger("edgeway.video_relay")


def device_of(headers: Mapping[str, Any]) -> str | None:
    """The `x-device` header if it is a valid device id (absent: the seed's one phone)."""
    device = headers.get("x-device", DEFAULT_DEVICE)
    if isinstance(device, bytes):
        device = device.decode(errors="replace")
    if isinstance(device, str) and DEVICE_PATTERN.fullmatch(device):
        return device
    return None


def _int_header(headers: Mapping[str, Any], name: str) -> int | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


@dataclass(eq=False)
class Device:
    """Everything the relay holds for one device's video."""

    stream: DeviceStream
    publisher: DevicePublisher
    decoder: DecodeWorker | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    low_bandwidth: bool = False
    picture: Picture | None = None  # the last JPEG published to viewers

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


class VideoRelay:
    """The video streams of every device: chunks in, packets, JPEGs, GOPs and status out."""

    def __init__(
        self,
        settings: VideoRelaySettings,
        *,
        publisher: Publisher,
        metrics: Metrics,
        clock: TimeSync,
        ready: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.ready = ready
        self.devices: OrderedDict[str, Device] = OrderedDict()
        self.h264 = h264_available()

    def now_ns(self) -> int:
        """NTP-corrected wall clock, in nanoseconds."""
        return time.time_ns() + round(self.clock.offset_s * 1e9)

    # --- chunks in --------------------------------------------------------------------------

    def take_chunk(self, body: bytes, headers: Mapping[str, Any], envelope: Envelope) -> None:
        """One phone WebSocket message, as the gateway published it. Never awaits."""
        device = device_of(headers)
        if device is None:
            self.metrics.chunks_rejected.labels("invalid_device").inc()
            log.warning("chunk without a valid x-device dropped", device=headers.get("x-device"))
            return
        state = self._device(device)
        stream = state.stream
        corrupt, lost = stream.corrupt, stream.chunks_lost
        overflows = stream.gop.overflows
        received = stream.receive(
            body,
            connection=str(headers.get("x-connection", "")),
            chunk_seq=_int_header(headers, "x-chunk-seq"),
            received_ns=self.now_ns(),
            now=time.monotonic(),
        )
        self.metrics.corrupt.inc(stream.corrupt - corrupt)
        self.metrics.chunks_lost.inc(stream.chunks_lost - lost)
        self.metrics.gop_overflows.inc(stream.gop.overflows - overflows)
        for item in received.packets:
            self.metrics.packets.labels(item.name).inc()
        if received.packets:
            state.publisher.put(received.packets, envelope)
        if state.decoder is not None and (received.packets or received.discontinuity):
            state.decoder.submit(received.packets, discontinuity=received.discontinuity)

    def _device(self, device: str) -> Device:
        state = self.devices.get(device)
        if state is not None:
            self.devices.move_to_end(device)
            return state
        while len(self.devices) >= self.settings.max_streams:
            oldest = next(iter(self.devices))
            log.warning("too many streams; forgetting the one idle longest", device=oldest)
            self._forget(oldest)
        state = self._new_device(device)
        self.devices[device] = state
        self.metrics.streams.set(len(self.devices))
        log.info("stream started", device=device)
        return state

    def _new_device(self, device: str) -> Device:
        settings = self.settings
        stream = DeviceStream(
            device,
            gop_max_frames=settings.gop_max_frames,
            gop_max_bytes=settings.gop_max_bytes,
            now=time.monotonic(),
        )

        publisher = DevicePublisher(
            device,
            self.publisher,
            backlog=settings.publish_backlog,
            ready=self.ready,
            on_drop=self._dropped,
        )
        state = Device(stream, publisher)
        state.tasks.append(spawn(publisher.run(), name=f"publisher-{device}"))
        if settings.decode_fps > 0 and self.h264:

            async def publish_jpeg(jpeg: Jpeg) -> None:
                await self._publish_jpeg(device, state, jpeg)

            state.decoder = DecodeWorker(
                FrameDecoder(fps=settings.decode_fps, qscale=settings.jpeg_qscale),
                backlog=settings.decode_backlog,
                on_jpeg=publish_jpeg,
                on_skip=lambda count: self._dropped("decode_behind", count),
                on_errors=self.metrics.decode_errors.inc,
            )
            state.tasks.append(spawn(state.decoder.run(), name=f"decoder-{device}"))
        return state

    async def _publish_jpeg(self, device: str, state: Device, jpeg: Jpeg) -> None:
        """One decoded frame, to the tracker (the seed's headers) and to viewers (numbered, with
        its capture time), both at once. A publish that fails loses that frame, counted."""
        seq = state.picture.seq + 1 if state.picture is not None else 1
        state.picture = Picture(seq, state.stream.clock.captured_ms(jpeg.timestamp_us), jpeg.data)
        tracker, viewers = await asyncio.gather(
            self.publisher.jpeg(device, jpeg, ntp_offset=self.clock.offset_s),
            self.publisher.picture(device, state.picture),
            return_exceptions=True,
        )
        for error in (tracker, viewers):
            if isinstance(error, BaseException):
                self._dropped("publish_failed", 1)
                log.warning("publishing a frame failed", device=device, error=repr(error))
        if not isinstance(tracker, BaseException):
            self.metrics.jpegs.inc()

    def _dropped(self, reason: str, count: int) -> None:
        if count:
            self.metrics.dropped.labels(reason).inc(count)

    def _forget(self, device: str) -> None:
        state = self.devices.pop(device)
        state.stop()
        with contextlib.suppress(KeyError):
            self.metrics.bandwidth.remove(device)
        self.metrics.streams.set(len(self.devices))

    # --- answers ----------------------------------------------------------------------------

    def gop(self, device: str) -> bytes:
        """The contract's binary GOP reply (8 zero bytes for a device with no stream)."""
        state = self.devices.get(device)
        if state is None:
            return bytes(8)
        return state.stream.gop.reply()

    def latest_jpeg(self, device: str) -> bytes:
        """The contract's binary reply: the last JPEG viewers got (16 zero bytes: none yet)."""
        state = self.devices.get(device)
        if state is None or state.picture is None:
            return Picture(0, 0, b"").reply()
        return state.picture.reply()

    def clock_offset(self, device: str) -> dict[str, Any]:
        """What maps the device's packet times to Unix µs: `offset_us` (None: no stream)."""
        state = self.devices.get(device)
        offset = None if state is None else state.stream.clock.offset_us
        return {"device": device, "offset_us": offset}

    def status(self) -> dict[str, Any]:
        streams: dict[str, Any] = {}
        for device, state in self.devices.items():
            stream = state.stream
            gop = stream.gop
            streams[device] = {
                "has_sps_pps": gop.has_sps_pps,
                "gop_frames": len(gop.frames) + (gop.keyframe is not None),
                "bandwidth_mbps": round(stream.bandwidth.mbps, 3),
                "packets": stream.packets,
                "corrupt": stream.corrupt,
                "chunks_lost": stream.chunks_lost,
                "last_packet_at": _iso(stream.last_packet_at),
            }
        return {"streams": streams, "h264_decoder": self.h264, "pyav": av.__version__}

    # --- upkeep -----------------------------------------------------------------------------

    def housekeep(self, now: float) -> None:
        """Every window: bandwidth per stream, the seed's low-bandwidth warning, idle streams."""
        for device, state in list(self.devices.items()):
            stream = state.stream
            if now - stream.last_activity > self.settings.stream_idle_s:
                log.info("stream idle; forgotten", device=device)
                self._forget(device)
                continue
            mbps = stream.bandwidth.roll(now)
            self.metrics.bandwidth.labels(device).set(mbps)
            low = stream.bandwidth.low(self.settings.low_bandwidth_mbps)
            if low and not state.low_bandwidth:
                log.warning(
                    "low video bandwidth",
                    device=device,
                    average_mbps=round(sum(stream.bandwidth.history) / 10, 3),
                    threshold_mbps=self.settings.low_bandwidth_mbps,
                )
            state.low_bandwidth = low

    async def run_housekeeping(self) -> None:
        while True:
            await asyncio.sleep(BANDWIDTH_WINDOW_S)
            self.housekeep(time.monotonic())

    def stop(self) -> None:
        for device in list(self.devices):
            self._forget(device)
