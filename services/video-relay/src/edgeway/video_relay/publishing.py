"""Publishing what the relay makes: packets in order per device, JPEGs (for the tracker and for
viewers), IMU, viewer messages.

Everything goes through the process's shared confirm publisher (`edgeway.common.amqp`: aio-pika
directly, many confirms in flight up to its window). A device's packets go out from one task
(`DevicePublisher`), which starts each publish once the window has room: publishes started in
order reach the channel in order, so the broker gets a device's packets in sequence without one
round trip per packet. Every exchange published to is declared before the first publish (the
`ready` event), so no publish waits for a declaration.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson
from faststream.rabbit import RabbitBroker, RabbitExchange

from edgeway.common.amqp import ConfirmPublisher
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels, Topology
from edgeway.common.video.packets import PacketType
from edgeway.video_relay.decode import Jpeg
from edgeway.video_relay.stream import Picture, Relayed

SERVICE = "video-relay"
H264 = "video/h264"
# JPEGs go out as the seed's (and the gateway's `/ws/phone` frames) did.
OCTET_STREAM = "application/octet-stream"
JPEG = "image/jpeg"
# Message `type`s (envelope): what the relay takes and what it publishes.
CHUNK_TYPE = "video.chunk.v1"
PACKET_TYPE = "video.packet.v1"
FRAME_TYPE = "video.frame.v1"
IMU_TYPE = "video.imu.v1"
VIEWER_TYPE = "video.viewer.v1"
# Unconfirmed publishes of the relay at once (every device and kind together): enough to hide
# the broker round trip at video rates for a few phones.
PUBLISH_WINDOW = 256
# Keyframes that a skipping device publisher resumes at (SPS first when the phone repeats it).
RESUME_AT = (PacketType.SPS, PacketType.KEYFRAME)

log = get_logger("edgeway.video_relay")


def packet_envelope(chunk: Envelope) -> Envelope:
    """A packet's envelope: caused by the chunk that completed it (same correlation id)."""
    return dataclasses.replace(chunk.derive(type=PACKET_TYPE, producer=SERVICE), content_type=H264)


class Publisher:
    """What the relay publishes, and how (transient: everything here is live). The exchanges
    are declared through the FastStream broker; messages go through `confirm`."""

    def __init__(self, broker: RabbitBroker, topology: Topology, confirm: ConfirmPublisher) -> None:
        self.broker = broker
        self.topology = topology
        self.confirm = confirm
        self.frames = topology.worldsystem("video_frames")
        self.imu_data = topology.worldsystem("imu_data")

    async def declare(self) -> None:
        """Declare every exchange published to, before the first publish."""
        for exchange in (self.topology.broadcast, self.frames, self.imu_data):
            await self.broker.declare_exchange(exchange)

    async def _publish(
        self,
        body: bytes,
        *,
        envelope: Envelope,
        exchange: RabbitExchange,
        routing_key: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        await self.confirm.publish(
            body,
            envelope=envelope,
            exchange=exchange.name,
            routing_key=routing_key,
            durable=False,
            headers=extra,
        )

    async def wait_room(self) -> None:
        """Until the confirm window has room for one more publish."""
        await self.confirm.wait_room()

    def packet(self, device: str, item: Relayed, envelope: Envelope) -> asyncio.Task[None]:
        """Start publishing one packet on `video.stream.<device>` now (in order with those
        started before): its payload, headers as the contract says. Integers stay integers
        (AMQP long long): readers compare `x-packet-seq` numerically."""
        return self.confirm.submit(
            item.packet.payload,
            envelope=envelope,
            exchange=self.topology.names.broadcast,
            routing_key=Channels.video_stream(device),
            durable=False,
            headers={
                "x-device": device,
                "x-packet-type": item.name,
                "x-packet-seq": item.seq,
                "x-timestamp-us": item.packet.timestamp_us,
                "x-captured-ms": item.captured_ms,
            },
        )

    async def jpeg(self, device: str, jpeg: Jpeg, *, ntp_offset: float) -> None:
        """A decoded frame for the tracker, with the seed's `/ws/phone` headers (strings, as the
        seed sent them): the phone's time in ns, the NTP-corrected receive time, the size."""
        received = str(jpeg.received_ns)
        envelope = Envelope(
            type=FRAME_TYPE,
            producer=SERVICE,
            received_at=jpeg.received_ns / 1e9,
            content_type=OCTET_STREAM,
            headers={
                "timestamp_ns": str(jpeg.timestamp_us * 1000),
                "server_received": received,
                "ntp_time": received,
                "ntp_offset": str(ntp_offset),
                "width": str(jpeg.width),
                "height": str(jpeg.height),
                "x-device": device,
            },
        )
        await self._publish(jpeg.data, envelope=envelope, exchange=self.frames)

    async def picture(self, device: str, picture: Picture) -> None:
        """The same frame for viewers without an H.264 decoder, on `video.frames.<device>`:
        `x-packet-type` `jpeg` (the gateway hands it on as it does packets), its number and its
        capture time (Unix ms) as AMQP integers."""
        envelope = Envelope(
            type=FRAME_TYPE,
            producer=SERVICE,
            content_type=JPEG,
            headers={"x-device": device, "x-packet-type": "jpeg"},
        )
        await self._publish(
            picture.data,
            envelope=envelope,
            exchange=self.topology.broadcast,
            routing_key=Channels.video_frames(device),
            extra={"x-packet-seq": picture.seq, "x-captured-ms": picture.captured_ms},
        )

    async def imu(self, device: str, sample: Mapping[str, Any]) -> None:
        """One ordered sample to `imu_data_exchange`: the seed's shape plus `device`."""
        envelope = Envelope(type=IMU_TYPE, producer=SERVICE, headers={"x-device": device})
        await self._publish(orjson.dumps(sample), envelope=envelope, exchange=self.imu_data)

    async def imu_viewers(self, device: str, sample: Mapping[str, Any]) -> None:
        """The same sample for viewers on `video.imu.<device>`, as the seed sent it to them."""
        envelope = Envelope(type=IMU_TYPE, producer=SERVICE, headers={"x-device": device})
        await self._publish(
            orjson.dumps({"type": "imu_data", "imu_data": sample}),
            envelope=envelope,
            exchange=self.topology.broadcast,
            routing_key=Channels.video_imu(device),
        )

    async def viewer(self, body: bytes, *, envelope: Envelope) -> None:
        await self._publish(
            body,
            envelope=envelope,
            exchange=self.topology.broadcast,
            routing_key=Channels.VIDEO_VIEWER,
        )


class PacketSink(Protocol):
    """Where a device publisher's packets go: the relay's `Publisher` (a device's packets
    through the shared confirm window)."""

    async def wait_room(self) -> None:
        """Until a publish started now fits in the window."""
        ...

    def packet(self, device: str, item: Relayed, envelope: Envelope) -> asyncio.Task[None]:
        """Start one publish now; its task ends once the broker confirmed it."""
        ...


class DevicePublisher:
    """One device's packets on their way to the broker, in order, with confirms in flight.

    When `backlog` packets wait (the broker is slower than the phone), what waits is dropped and
    the publisher resumes at the next SPS or keyframe: viewers get a gap, never a broken
    picture that lasts, and the phone's stream is never held back.
    """

    def __init__(
        self,
        device: str,
        sink: PacketSink,
        *,
        backlog: int,
        ready: asyncio.Event,
        on_drop: Callable[[str, int], None],
    ) -> None:
        self.device = device
        self._sink = sink
        self.backlog = backlog
        self._ready = ready
        self._on_drop = on_drop
        self._queue: deque[tuple[Relayed, Envelope]] = deque()
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._skipping = False
        self._failing = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, items: Sequence[Relayed], envelope: Envelope) -> None:
        if len(self._queue) + len(items) > self.backlog:
            self._on_drop("publish_behind", len(self._queue))
            self._queue.clear()
            self._skipping = True
        for item in items:
            if self._skipping:
                if item.type not in RESUME_AT:
                    self._on_drop("publish_behind", 1)
                    continue
                self._skipping = False
            self._queue.append((item, packet_envelope(envelope)))
        if self._queue:
            self._wake.set()

    async def run(self) -> None:
        await self._ready.wait()  # exchanges declared: no publish declares one (see Publisher)
        try:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                # A free place in the window first: what waits for one stays in the queue,
                # where `put` may still drop it.
                await self._sink.wait_room()
                if not self._queue:
                    continue  # dropped meanwhile
                item, envelope = self._queue.popleft()
                # Started at once, with nothing awaited since the room was found.
                task = self._sink.packet(self.device, item, envelope)
                self._in_flight.add(task)
                task.add_done_callback(self._settled)
        finally:
            for task in self._in_flight:
                task.cancel()

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._on_drop("publish_failed", 1)
            if not self._failing:
                log.warning("publishing packets failed", error=repr(error))
            self._failing = True
        elif self._failing:
            log.info("publishing packets again")
            self._failing = False
