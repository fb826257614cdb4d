"""The gateway's side of RabbitMQ: publish what producers send, receive what clients watch,
and ask services for what they own (request/reply with a timeout)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiormq.exceptions
import orjson
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.message import RabbitMessage
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from edgeway.common.broker import (
    declare_shared,
    declare_work,
    make_broker,
    publish,
    whole_message,
)
from edgeway.common.envelope import JSON, Envelope
from edgeway.common.errors import ErrorObject
from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels, Topology
from edgeway.gateway.fanout import Hub, Message, Packet
from edgeway.gateway.metrics import Metrics
from edgeway.gateway.settings import GatewaySettings

log = get_logger("edgeway.gateway.link")

# Seconds between attempts to reach the broker at start: doubling from the first to the last.
CONNECT_RETRY_S = (0.5, 10.0)

# Headers of an H.264 packet on `video.stream.<device>` (set by the video relay).
HEADER_PACKET_TYPE = "x-packet-type"
HEADER_PACKET_SEQ = "x-packet-seq"


class ServiceUnavailableError(Exception):
    """A service did not answer a request in time (the HTTP layer turns it into 504)."""

    def response(self) -> Response:
        return ErrorObject(
            code="timeout", reason=str(self), fix="try again; the service may be restarting"
        ).response(504)


class NotConnectedError(Exception):
    """The gateway has not reached the broker yet (the HTTP layer turns it into 503)."""

    # Seconds a client is asked to wait (Retry-After): about half the longest wait between the
    # link's attempts to reach the broker (CONNECT_RETRY_S).
    RETRY_AFTER = 5

    def response(self) -> Response:
        return ErrorObject(
            code="unavailable", reason=str(self), fix=f"try again in {self.RETRY_AFTER} s"
        ).response(503, headers={"Retry-After": str(self.RETRY_AFTER)})


def _header_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _header_int(value: Any) -> int:
    try:
        return int(_header_text(value))
    except ValueError:
        return 0


class BrokerLink:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tracer_provider: TracerProvider,
        metrics: Metrics,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # Each replica reads the broadcast exchange through its own queue, named after it.
        self.gateway_id = uuid.uuid4().hex[:12]
        self.topology = Topology(settings.exchanges)
        self.broker: RabbitBroker = make_broker(
            settings, service="gateway", tracer_provider=tracer_provider, registry=registry
        )
        self._queue: RabbitQueue = self.topology.gateway_queue(self.gateway_id)
        self.hub = Hub(bind=self._bind, unbind=self._unbind, metrics=metrics)
        self.connected = asyncio.Event()  # set once the broker answered and all is declared

        # Live results are lossy by design: ack on receipt, never redeliver a stale frame.
        @self.broker.subscriber(
            self._queue,
            self.topology.broadcast,
            ack_policy=AckPolicy.ACK_FIRST,
            decoder=whole_message,
            no_reply=True,
        )
        async def on_broadcast(message: RabbitMessage) -> None:
            raw = message.raw_message
            body: Message = raw.body
            if (raw.content_type or JSON) == JSON:
                body = raw.body.decode()  # once per message, shared by every client
            elif raw.headers and HEADER_PACKET_TYPE in raw.headers:
                # An H.264 packet: its kind and sequence drive the consumers' skip policy.
                body = Packet(
                    raw.body,
                    kind=_header_text(raw.headers[HEADER_PACKET_TYPE]),
                    seq=_header_int(raw.headers.get(HEADER_PACKET_SEQ, 0)),
                )
            routing_key = raw.routing_key or ""
            kind = routing_key.split(".", 1)[0]
            if kind == "gateway":  # a service refused what a producer of ours sent
                self.metrics.rejected.labels(
                    "service", orjson.loads(raw.body).get("code", "unknown")
                ).inc()
            self.hub.deliver(routing_key, body, kind=kind)

    async def connect(self) -> None:
        """Reach the broker and declare the topology, trying again until it answers.

        The gateway serves `/healthz` meanwhile (a liveness probe must not kill a process that
        waits for RabbitMQ) and refuses traffic with 503 (`/readyz` says why) until `connected`.
        """
        delay, longest = CONNECT_RETRY_S
        while True:
            try:
                await self.start()
            except Exception as exc:  # noqa: BLE001 - any failure to reach it: try again later
                log.warning("broker unreachable; trying again", in_s=delay, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            self.connected.set()
            log.info("broker connected", gateway_id=self.gateway_id)
            return

    def check_connected(self) -> None:
        if not self.connected.is_set():
            raise NotConnectedError("the gateway is starting: it has not reached RabbitMQ yet")

    async def start(self) -> None:
        await self.broker.start()
        await declare_shared(self.broker, self.topology)
        # Producers declare the work they feed, so nothing is lost before a consumer ever ran.
        for exchange, queue in (
            (self.topology.occupancy_observations, self.topology.occupancy_observations_queue),
            (self.topology.telemetry_raw, self.topology.telemetry_raw_queue),
            (self.topology.ingest_uploads, self.topology.ingest_uploads_queue),
            (self.topology.tracking_videos, self.topology.tracking_videos_queue),
        ):
            await declare_work(self.broker, self.topology, exchange, queue)
        # Edge detections, and where the ones no live task takes go (the tracker answers).
        await self.broker.declare_exchange(self.topology.tracking_unrouted)
        await self.broker.declare_exchange(self.topology.tracking_detections)
        # The WorldSystem exchanges the phone endpoints publish to (the seed's) ...
        for name in ("video_frames", "analysis_mode", "restart"):
            await self.broker.declare_exchange(self.topology.worldsystem(name))
        # ... and the live queues the video relay reads, so a phone's stream waits for it.
        for exchange, queue in (
            (self.topology.worldsystem("video_stream"), self.topology.video_stream_queue),
            (self.topology.video_imu, self.topology.video_imu_queue),
        ):
            declared_exchange = await self.broker.declare_exchange(exchange)
            declared_queue = await self.broker.declare_queue(queue)
            await declared_queue.bind(declared_exchange, routing_key="")

    async def stop(self) -> None:
        await self.broker.stop()

    async def ready(self) -> bool:
        return self.connected.is_set() and await self.broker.ping(timeout=2.0)

    def producer_channel(self, connection_id: str) -> str:
        return Channels.producer(self.gateway_id, connection_id)

    async def _bind(self, pattern: str) -> None:
        queue = await self.broker.declare_queue(self._queue)
        exchange = await self.broker.declare_exchange(self.topology.broadcast)
        await queue.bind(exchange, routing_key=pattern)

    async def _unbind(self, pattern: str) -> None:
        queue = await self.broker.declare_queue(self._queue)
        exchange = await self.broker.declare_exchange(self.topology.broadcast)
        await queue.unbind(exchange, routing_key=pattern)

    async def publish_work(
        self, body: bytes, *, envelope: Envelope, exchange: RabbitExchange
    ) -> None:
        """Persistent, mandatory, confirmed: returns only once the broker holds the message."""
        await publish(self.broker, body, envelope=envelope, exchange=exchange, durable=True)

    async def publish_live(self, body: bytes, *, envelope: Envelope, routing_key: str) -> None:
        """A live message on the broadcast exchange, for whichever replicas' clients watch it."""
        await publish(
            self.broker,
            body,
            envelope=envelope,
            exchange=self.topology.broadcast,
            routing_key=routing_key,
            durable=False,
        )

    async def publish_stream(
        self, body: bytes, *, envelope: Envelope, exchange: RabbitExchange
    ) -> None:
        """A live message (video, IMU, commands) on a fanout exchange: transient, confirmed."""
        await publish(self.broker, body, envelope=envelope, exchange=exchange, durable=False)

    async def request(self, *, service: str, queue: RabbitQueue, body: dict[str, Any]) -> Any:
        """Ask a service for JSON; raises ServiceUnavailableError when it does not answer."""
        return orjson.loads(await self.request_raw(service=service, queue=queue, body=body))

    async def request_raw(self, *, service: str, queue: RabbitQueue, body: dict[str, Any]) -> bytes:
        """Ask a service; the reply's body as it came (a binary GOP, say)."""
        started = time.perf_counter()
        try:
            reply = await self.broker.request(
                orjson.dumps(body),
                queue=queue.name,
                content_type=JSON,
                timeout=self.settings.request_timeout,
            )
        except TimeoutError:
            self.metrics.request_seconds.labels(service, "timeout").observe(
                time.perf_counter() - started
            )
            raise ServiceUnavailableError(f"{service} did not answer in time") from None
        except aiormq.exceptions.PublishError:
            # Nobody declared the service's request queue: the service has never run here.
            self.metrics.request_seconds.labels(service, "no_route").observe(
                time.perf_counter() - started
            )
            raise ServiceUnavailableError(f"{service} is not running") from None
        self.metrics.request_seconds.labels(service, "ok").observe(time.perf_counter() - started)
        reply_body: bytes = reply.body
        return reply_body
