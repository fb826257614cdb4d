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

from typing import TYPE_CHECKING

import orjson
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitQueue, RabbitResponse
from faststream.rabbit.message import RabbitMessage

from edgeway.common.broker import JSON, encode, whole_message
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.video_relay.publishing import CHUNK_TYPE, SERVICE, VIEWER_TYPE
from edgeway.video_relay.relay import VideoRelay, device_of

if TYPE_CHECKING:
    from edgeway.video_relay.app import Deps

OCTET_STREAM = "application/octet-stream"
# Trajectory and restart messages waiting for this relay; they are for live viewers only.
BRIDGE_QUEUE_MAX_LENGTH = 1_000

log = get_logger("edgeway.video_relay.handlers")


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


# Queries about one device: `{"query": q, "device": d}`.
DEVICE_QUERIES = ("gop", "latest_jpeg", "clock")


def answer_query(body: bytes, *, relay: VideoRelay) -> RabbitResponse:
    """`gop` and `latest_jpeg` (binary), `clock` and `status` (JSON); anything else is a JSON
    error."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        request = None
    query = request.get("query") if isinstance(request, dict) else None
    # Not mandatory: an asker whose reply queue is gone must not make the handler fail.
    if query in DEVICE_QUERIES and isinstance(request, dict):
        device = device_of({"x-device": request.get("device")})
        if device is None:
            return RabbitResponse(
                encode({"error": "device must match [A-Za-z0-9_-]{1,64}"}),
                content_type=JSON,
                mandatory=False,
            )
        if query == "gop":
            return RabbitResponse(relay.gop(device), content_type=OCTET_STREAM, mandatory=False)
        if query == "latest_jpeg":
            reply = relay.latest_jpeg(device)
            return RabbitResponse(reply, content_type=OCTET_STREAM, mandatory=False)
        return RabbitResponse(
            encode(relay.clock_offset(device)), content_type=JSON, mandatory=False
        )
    if query == "status":
        return RabbitResponse(encode(relay.status()), content_type=JSON, mandatory=False)
    supported = ", ".join(f'{{"query": "{name}", "device": d}}' for name in DEVICE_QUERIES)
    return RabbitResponse(
        encode({"error": f'unknown query; supported: {supported}, {{"query": "status"}}'}),
        content_type=JSON,
        mandatory=False,
    )


async def on_chunk(message: RabbitMessage, deps: Deps) -> None:
    # Nothing is awaited: chunks are taken in delivery order.
    envelope = Envelope.from_message(message, type=CHUNK_TYPE)
    deps.relay.take_chunk(message.body, message.headers or {}, envelope)


async def on_imu(message: RabbitMessage, deps: Deps) -> None:
    deps.imu.take(message.body, message.headers or {})


async def on_bridged(kind: str, message: RabbitMessage, deps: Deps) -> None:
    """A trajectory or restart message from WorldSystem's services, for the viewers."""
    body = bridge_body(kind, message.body)
    if body is None:
        deps.metrics.bridged.labels("invalid").inc()
        log.warning("bridged message is not JSON; dropped", kind=kind)
        return
    source = Envelope.from_message(message, type=kind)
    await deps.declared.wait()  # the broadcast exchange: declared once, before any publish
    await deps.publisher.viewer(body, envelope=source.derive(type=VIEWER_TYPE, producer=SERVICE))
    deps.metrics.bridged.labels(kind).inc()


async def on_request(message: RabbitMessage, deps: Deps) -> RabbitResponse:
    return answer_query(message.body, relay=deps.relay)


def register(broker: RabbitBroker, deps: Deps) -> None:
    """Every subscriber of the video relay, on `broker`, with `deps`."""
    topology = deps.topology

    @broker.subscriber(
        topology.video_stream_queue,
        topology.worldsystem("video_stream"),
        ack_policy=AckPolicy.ACK,
        decoder=whole_message,
        no_reply=True,
    )
    async def chunk(message: RabbitMessage) -> None:
        await on_chunk(message, deps)

    @broker.subscriber(
        topology.video_imu_queue,
        topology.video_imu,
        ack_policy=AckPolicy.ACK,
        decoder=whole_message,
        no_reply=True,
    )
    async def imu(message: RabbitMessage) -> None:
        await on_imu(message, deps)

    def bridge(kind: str, exchange_field: str) -> None:
        @broker.subscriber(
            bridge_queue(kind, deps.instance),
            topology.worldsystem(exchange_field),
            ack_policy=AckPolicy.ACK,
            decoder=whole_message,
            no_reply=True,
        )
        async def bridged(message: RabbitMessage) -> None:
            await on_bridged(kind, message, deps)

    bridge("trajectory", "trajectory_data")
    bridge("restart", "restart")

    # A query is worthless once its asker gave up: acked whatever happens, never retried.
    @broker.subscriber(
        topology.video_requests_queue, ack_policy=AckPolicy.ACK, decoder=whole_message
    )
    async def request(message: RabbitMessage) -> RabbitResponse:
        return await on_request(message, deps)
