"""Publishing what the relay makes: packets in order per device, JPEGs, IMU, viewer messages.

A device's packets go out from one task (`DevicePublisher`), which keeps up to
`PUBLISH_WINDOW` confirms in flight: tasks created in order reach the channel (and its lock) in
order, so the broker gets a device's packets in sequence without one round trip per packet.
Every exchange published to is declared before the first publish, so no publish declares one on
the way (a publish that waits for a declaration would let later ones overtake it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import orjson
from faststream.rabbit import RabbitBroker

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels, Topology
from edgeway.common.video.packets import PacketType
from edgeway.video_relay.decode import Jpeg
from edgeway.video_relay.stream import Relayed

SERVICE = "video-relay"
H264 = "video/h264"
# JPEGs go out as the seed's (and the gateway's `/ws/phone` frames) did.
OCTET_STREAM = "application/octet-stream"
# Message `type`s (envelope): what the relay takes and what it publishes.
CHUNK_TYPE = "video.chunk.v1"
PACKET_TYPE = "video.packet.v1"
FRAME_TYPE = "video.frame.v1"
IMU_TYPE = "video.imu.v1"
VIEWER_TYPE = "video.viewer.v1"
# Unconfirmed publishes per device: enough to hide the broker round trip at video rates.
PUBLISH_WINDOW = 64
# Keyframes that a skipping device publisher resumes at (SPS first when the phone repeats it).
RESUME_AT = (PacketType.SPS, PacketType.KEYFRAME)

log = get_logger("edgeway.video_relay")


def packet_envelope(chunk: Envelope) -> Envelope:
    """A packet's envelope: caused by the chunk that completed it (same correlation id)."""
    return dataclasses.replace(chunk.derive(type=PACKET_TYPE, producer=SERVICE), content_type=H264)


class Publisher:
    """What the relay publishes, and how (transient: everything here is live)."""

    def __init__(self, broker: RabbitBroker, topology: Topology) -> None:
        self.broker = broker
        self.topology = topology
        self.frames = topology.worldsystem("video_frames")
        self.imu_data = topology.worldsystem("imu_data")

    async def declare(self) -> None:
        """Declare every exchange published to, so no publish has to (it would reorder them)."""
        for exchange in (self.topology.broadcast, self.frames, self.imu_data):
            await self.broker.declare_exchange(exchange)

    async def _publish(
        self,
        body: bytes,
        *,
        envelope: Envelope,
        exchange: Any,
        routing_key: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        kwargs = envelope.publish_kwargs()
        if extra:
            kwargs["headers"].update(extra)
        await self.broker.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            persist=False,
            mandatory=False,
            **kwargs,
        )

    async def packet(self, device: str, item: Relayed, envelope: Envelope) -> None:
        """One packet on `video.stream.<device>`: its payload, headers as the contract says.
        Integers stay integers (AMQP long long): readers compare `x-packet-seq` numerically."""
        await self._publish(
            item.packet.payload,
            envelope=envelope,
            exchange=self.topology.broadcast,
            routing_key=Channels.video_stream(device),
            extra={
                "x-device": device,
                "x-packet-type": item.name,
                "x-packet-seq": item.seq,
                "x-timestamp-us": item.packet.timestamp_us,
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


class DevicePublisher:
    """One device's packets on their way to the broker, in order, with confirms in flight.

    When `backlog` packets wait (the broker is slower than the phone), what waits is dropped and
    the publisher resumes at the next SPS or keyframe: viewers get a gap, never a broken
    picture that lasts, and the phone's stream is never held back.
    """

    def __init__(
        self,
        send: Callable[[Relayed, Envelope], Coroutine[Any, Any, None]],
        *,
        backlog: int,
        ready: asyncio.Event,
        on_drop: Callable[[str, int], None],
        window: int = PUBLISH_WINDOW,
    ) -> None:
        self._send = send
        self.backlog = backlog
        self._ready = ready
        self._on_drop = on_drop
        self._window = asyncio.Semaphore(window)
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
                # A free place in the window first: what waits for one stays in the queue,
                # where `put` may still drop it.
                await self._window.acquire()
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                item, envelope = self._queue.popleft()
                task = asyncio.create_task(self._send(item, envelope))
                self._in_flight.add(task)
                task.add_done_callback(self._settled)
        finally:
            for task in self._in_flight:
                task.cancel()

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._window.release()
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
