"""FastStream subscribers of the video relay: phone chunks, IMU, bridges to viewers, queries.

Everything here is live: messages are transient, queues bounded with drop-head, and nothing is
stored. Deliveries are acked as soon as their handler returns (AckPolicy.ACK), not consumed in
auto-ack mode (ACK_FIRST): RabbitMQ ignores the prefetch of an auto-ack consumer and pushes the
whole queue into the process, so a relay that fell behind would buffer without bound instead of
letting the queue drop its oldest chunks. The chunk and IMU handlers never fail and never
await (their work is queued for per-device tasks), so acking after them costs nothing, keeps at
most the prefetch in the process, and takes deliveries in queue order.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitQueue, RabbitResponse
from faststream.rabbit.message import RabbitMessage
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry

from edgeway.common.broker import JSON, declare_shared, encode, make_broker, whole_message
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.service import service_app
from edgeway.common.timesync import TimeSync
from edgeway.common.topology import Topology
from edgeway.video_relay.imu import ImuRelay
from edgeway.video_relay.metrics import Metrics
from edgeway.video_relay.publishing import CHUNK_TYPE, SERVICE, VIEWER_TYPE, Publisher
from edgeway.video_relay.relay import VideoRelay, device_of
from edgeway.video_relay.settings import VideoRelaySettings

OCTET_STREAM = "application/octet-stream"
# Trajectory and restart messages waiting for this relay; they are for live viewers only.
BRIDGE_QUEUE_MAX_LENGTH = 1_000

log = get_logger("edgeway.video_relay")


def bridge_queue(kind: str, instance: str) -> RabbitQueue:
    """This relay's own queue on a WorldSystem exchange (the seed's `server_*` queues)."""
    return RabbitQueue(
        f"edgeway.video-relay.{instance}.{kind}",
        exclusive=True,
        auto_delete=True,
        durable=False,
        arguments={"x-max-length": BRIDGE_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
    )


def bridge_body(kind: str, body: bytes) -> bytes | None:
    """What viewers get for a trajectory or restart message (None: not JSON, dropped)."""
    if kind == "restart":
        return b'{"type":"restart"}'
    try:
        pose = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return orjson.dumps({"type": "trajectory_update", "pose": pose})


def answer_query(body: bytes, *, relay: VideoRelay) -> RabbitResponse:
    """`gop` (binary) and `status` (JSON); anything else is a JSON error."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        request = None
    query = request.get("query") if isinstance(request, dict) else None
    # Not mandatory: an asker whose reply queue is gone must not make the handler fail.
    if query == "gop" and isinstance(request, dict):
        device = device_of({"x-device": request.get("device")})
        if device is None:
            return RabbitResponse(
                encode({"error": "device must match [A-Za-z0-9_-]{1,64}"}),
                content_type=JSON,
                mandatory=False,
            )
        return RabbitResponse(relay.gop(device), content_type=OCTET_STREAM, mandatory=False)
    if query == "status":
        return RabbitResponse(encode(relay.status()), content_type=JSON, mandatory=False)
    return RabbitResponse(
        encode({"error": 'unknown query; supported: {"query": "gop", "device": d}, "status"'}),
        content_type=JSON,
        mandatory=False,
    )


def build_app(
    settings: VideoRelaySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The video relay: its subscribers, background tasks and operations endpoints."""
    topology = Topology(settings.exchanges)
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=tracer_provider, registry=registry
    )
    metrics = Metrics.create(registry)
    clock = TimeSync(settings.ntp_servers)
    publisher = Publisher(broker, topology)
    declared = asyncio.Event()
    relay = VideoRelay(settings, publisher=publisher, metrics=metrics, clock=clock, ready=declared)
    imu = ImuRelay(
        publisher=publisher,
        metrics=metrics,
        ready=declared,
        max_devices=settings.max_streams,
        idle_s=settings.stream_idle_s,
    )
    instance = uuid.uuid4().hex[:12]
    background: list[asyncio.Task[None]] = []

    @broker.subscriber(
        topology.video_stream_queue,
        topology.worldsystem("video_stream"),
        ack_policy=AckPolicy.ACK,
        decoder=whole_message,
        no_reply=True,
    )
    async def on_chunk(message: RabbitMessage) -> None:
        # Nothing is awaited: chunks are taken in delivery order.
        envelope = Envelope.from_message(message, type=CHUNK_TYPE)
        relay.take_chunk(message.body, message.headers or {}, envelope)

    @broker.subscriber(
        topology.video_imu_queue,
        topology.video_imu,
        ack_policy=AckPolicy.ACK,
        decoder=whole_message,
        no_reply=True,
    )
    async def on_imu(message: RabbitMessage) -> None:
        imu.take(message.body, message.headers or {})

    def bridge(kind: str, exchange_field: str) -> None:
        @broker.subscriber(
            bridge_queue(kind, instance),
            topology.worldsystem(exchange_field),
            ack_policy=AckPolicy.ACK,
            decoder=whole_message,
            no_reply=True,
        )
        async def on_bridged(message: RabbitMessage) -> None:
            body = bridge_body(kind, message.body)
            if body is None:
                metrics.bridged.labels("invalid").inc()
                log.warning("bridged message is not JSON; dropped", kind=kind)
                return
            source = Envelope.from_message(message, type=kind)
            await declared.wait()  # the broadcast exchange: declared once, before any publish
            await publisher.viewer(body, envelope=source.derive(type=VIEWER_TYPE, producer=SERVICE))
            metrics.bridged.labels(kind).inc()

    bridge("trajectory", "trajectory_data")
    bridge("restart", "restart")

    # A query is worthless once its asker gave up: acked whatever happens, never retried.
    @broker.subscriber(
        topology.video_requests_queue, ack_policy=AckPolicy.ACK, decoder=whole_message
    )
    async def on_request(message: RabbitMessage) -> RabbitResponse:
        return answer_query(message.body, relay=relay)

    async def declare_topology() -> None:
        await declare_shared(broker, topology)
        # Every WorldSystem exchange exists under its (overridable) name, also those that only
        # outside WorldSystem services use (processed_frames, ply_fanout from analysis and SLAM).
        for exchange in topology.worldsystem_exchanges():
            await broker.declare_exchange(exchange)
        await publisher.declare()
        declared.set()
        background.append(asyncio.create_task(relay.run_housekeeping(), name="housekeeping"))
        clock.start()
        log.info(
            "video relay ready",
            h264_decoder=relay.h264,
            decode_fps=settings.decode_fps,
            ntp_servers=settings.ntp_servers,
        )

    async def topology_declared() -> None:
        if not declared.is_set():
            raise RuntimeError("exchanges not declared yet")

    app = service_app(
        broker,
        checks={"topology": topology_declared},
        after_startup=[declare_topology],
        registry=registry,
    )

    async def stop_tasks() -> None:
        for task in background:
            task.cancel()
        relay.stop()
        imu.stop()
        await clock.stop()

    # After the broker has drained in-flight messages (on_shutdown hooks run before that).
    app.after_shutdown(stop_tasks)
    return app
