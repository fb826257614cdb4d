"""The gateway's side of RabbitMQ: publish what producers send, receive what clients watch,
and ask services for what they own (request/reply with a timeout).

What runs once per message goes through the gateway's own AMQP link (`edgeway.common.amqp`:
aio-pika and aiormq directly): producers' publishes through its confirm publishers, and the
broadcast queue's deliveries straight to the hub. FastStream (`broker`) declares the topology
and asks the services (request/reply)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiormq.exceptions
import orjson
from aio_pika.abc import AbstractRobustQueue
from aiormq.abc import DeliveredMessage
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from edgeway.common.amqp import AmqpLink, ConfirmPublisher, Delivery, LinkDownError, Subscription
from edgeway.common.batching import batch_size, split_lines
from edgeway.common.broker import declare_shared, declare_work, make_broker
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

_PROPAGATOR = TraceContextTextMapPropagator()

# Headers of an H.264 packet on `video.stream.<device>` (set by the video relay).
HEADER_PACKET_TYPE = "x-packet-type"
HEADER_PACKET_SEQ = "x-packet-seq"
HEADER_CAPTURED_MS = "x-captured-ms"


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
        # The per-message paths' own connection (spans only where they are exported, as
        # FastStream's middleware does it: make_broker).
        self.amqp = AmqpLink(
            settings.amqp_url,
            name="gateway",
            registry=registry,
            tracer_provider=tracer_provider if settings.otel_exporter != "none" else None,
        )
        # Durable work (persistent, mandatory) and live messages (transient), each with a
        # window of unconfirmed publishes of its own, so video never holds up a camera's frame.
        # Neither holds a publish while the link is down: its producer is told at once
        # (LinkDownError: an error frame, a 503) and sends it again.
        self.work: ConfirmPublisher = self.amqp.publisher(name="gateway-work", hold=False)
        self.live: ConfirmPublisher = self.amqp.publisher(name="gateway-live", hold=False)
        # The broadcast queue as the link declared it (exclusive: only its connection may
        # consume, bind and unbind it); restored with its bindings after a reconnection.
        self._broadcast: AbstractRobustQueue | None = None
        self._amqp_started = False
        self._received = metrics.received
        self._fanout_seconds = metrics.fanout_seconds

    def _on_broadcast(self, message: Delivery) -> None:
        """One delivery of the broadcast queue: decoded once, handed to every watcher.

        Live results are lossy by design: consumed without acks, never redelivered stale.
        A batch (`edgeway.common.batching`: JSON lines) is split and delivered in order, each
        message counted as if it had come alone.
        """
        raw = message.body
        body: Message = raw
        headers = message.headers
        count = batch_size(headers)
        if count > 1:
            self._on_batch(message.routing_key or "", split_lines(raw.decode(), count))
            return
        if (message.content_type or JSON) == JSON:
            body = raw.decode()  # once per message, shared by every client
        elif headers and HEADER_PACKET_TYPE in headers:
            # An H.264 packet (or a JPEG): its kind and sequence drive the consumers' skip
            # policy, its capture time their opt-in timing messages.
            body = Packet(
                raw,
                kind=_header_text(headers[HEADER_PACKET_TYPE]),
                seq=_header_int(headers.get(HEADER_PACKET_SEQ, 0)),
                captured_ms=_header_int(headers.get(HEADER_CAPTURED_MS, 0)),
            )
        routing_key = message.routing_key or ""
        kind = routing_key.split(".", 1)[0]
        self._received.labels(kind).inc()
        if kind == "gateway":  # a service refused what a producer of ours sent
            self._count_refusal(raw)
        self.hub.deliver(routing_key, body, kind=kind)

    def _on_batch(self, routing_key: str, messages: list[str]) -> None:
        kind = routing_key.split(".", 1)[0]
        self._received.labels(kind).inc(len(messages))
        if kind == "gateway":
            for text in messages:
                self._count_refusal(text)
        self.hub.deliver_many(routing_key, messages, kind=kind)

    def _count_refusal(self, frame: bytes | str) -> None:
        self.metrics.rejected.labels("service", orjson.loads(frame).get("code", "unknown")).inc()

    async def _consume_broadcast(self, delivered: DeliveredMessage) -> None:
        started = time.perf_counter()
        try:
            message = Delivery(delivered)
            tracer = self.amqp.tracer
            if tracer is None:
                self._on_broadcast(message)
            else:
                # Traced where spans are exported: the fan-out continues the message's trace.
                carrier = {k: v for k, v in message.headers.items() if isinstance(v, str)}
                with tracer.start_as_current_span(
                    f"{self._queue.name} process",
                    context=_PROPAGATOR.extract(carrier),
                    kind=trace.SpanKind.CONSUMER,
                    attributes={"messaging.message.id": message.message_id or ""},
                ):
                    self._on_broadcast(message)
        except Exception:  # a message that does not fit: logged, the next one goes on
            log.exception("broadcast message not delivered", routing_key=delivered.routing_key)
        self._fanout_seconds.observe(time.perf_counter() - started)

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
        if not self._amqp_started:
            await self.amqp.start()  # connected already: FastStream's connection just was
            self._amqp_started = True
        if self._broadcast is None:
            channel = await self.amqp.channel()
            queue = self._queue
            broadcast = await channel.declare_queue(
                queue.name,
                durable=queue.durable,
                exclusive=queue.exclusive,
                auto_delete=queue.auto_delete,
                arguments=queue.arguments,
            )
            # Consumed on aiormq's channel (`Subscription`): no aio-pika message object and one
            # task per delivery; restored with the queue after a reconnection.
            await Subscription(channel, queue.name, self._consume_broadcast, no_ack=True).start()
            self._broadcast = broadcast

    async def stop(self) -> None:
        await self.amqp.close()
        self._amqp_started = False
        self._broadcast = None
        await self.broker.stop()

    async def ready(self) -> bool:
        return self.connected.is_set() and self.amqp.ready and await self.broker.ping(timeout=2.0)

    def producer_channel(self, connection_id: str) -> str:
        return Channels.producer(self.gateway_id, connection_id)

    def _broadcast_queue(self) -> AbstractRobustQueue:
        if self._broadcast is None:
            raise NotConnectedError("the gateway is starting: it has not reached RabbitMQ yet")
        return self._broadcast

    async def _bind(self, pattern: str) -> None:
        await self._broadcast_queue().bind(self.topology.broadcast.name, routing_key=pattern)

    async def _unbind(self, pattern: str) -> None:
        await self._broadcast_queue().unbind(self.topology.broadcast.name, routing_key=pattern)

    def _up(self, publisher: ConfirmPublisher) -> ConfirmPublisher:
        """`publisher`, if the link is up now; a publish made while it reconnects is refused at
        once (`LinkDownError`) rather than held until it is back (the producer is told, as with
        an outage). Checked here too so that `submit_work` raises before it makes a task."""
        if not self.amqp.ready:
            raise LinkDownError("the gateway's connection to RabbitMQ is down")
        return publisher

    async def publish_work(
        self, body: bytes, *, envelope: Envelope, exchange: RabbitExchange
    ) -> None:
        """Persistent, mandatory, confirmed: returns only once the broker holds the message."""
        await self._up(self.work).publish(
            body, envelope=envelope, exchange=exchange.name, durable=True
        )

    async def work_room(self) -> None:
        """Until `submit_work` would not exceed the work publisher's window."""
        await self.work.wait_room()

    def submit_work(
        self, body: bytes, *, envelope: Envelope, exchange: RabbitExchange
    ) -> asyncio.Task[None]:
        """`publish_work` started now, in order with the ones submitted before: its task ends
        once the broker confirmed it. Raises `LinkDownError` at once while the link is down."""
        return self._up(self.work).submit(
            body, envelope=envelope, exchange=exchange.name, durable=True
        )

    async def publish_live(self, body: bytes, *, envelope: Envelope, routing_key: str) -> None:
        """A live message on the broadcast exchange, for whichever replicas' clients watch it."""
        await self._up(self.live).publish(
            body,
            envelope=envelope,
            exchange=self.topology.broadcast.name,
            routing_key=routing_key,
            durable=False,
        )

    async def publish_stream(
        self, body: bytes, *, envelope: Envelope, exchange: RabbitExchange, routing_key: str = ""
    ) -> None:
        """A live message (video, IMU, commands, edge detections) on its exchange: transient,
        confirmed."""
        await self._up(self.live).publish(
            body, envelope=envelope, exchange=exchange.name, routing_key=routing_key, durable=False
        )

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
