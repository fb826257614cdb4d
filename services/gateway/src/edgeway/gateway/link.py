"""The gateway's side of RabbitMQ: publish what producers send, receive what clients watch,
and ask services for what they own (request/reply with a timeout)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiormq.exceptions
import orjson
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.message import RabbitMessage
from opentelemetry.sdk.trace import TracerProvider

from edgeway.common.broker import (
    declare_shared,
    declare_work,
    make_broker,
    publish,
    whole_message,
)
from edgeway.common.envelope import JSON, Envelope
from edgeway.common.topology import Channels, Topology
from edgeway.gateway.fanout import Hub
from edgeway.gateway.metrics import REJECTED, REQUEST_SECONDS
from edgeway.gateway.settings import GatewaySettings


class ServiceUnavailableError(Exception):
    """A service did not answer a request in time (the HTTP layer turns it into 504)."""


class BrokerLink:
    def __init__(self, settings: GatewaySettings, *, tracer_provider: TracerProvider) -> None:
        self.settings = settings
        # Each replica reads the broadcast exchange through its own queue, named after it.
        self.gateway_id = uuid.uuid4().hex[:12]
        self.topology = Topology(settings.exchanges)
        self.broker: RabbitBroker = make_broker(
            settings, service="gateway", tracer_provider=tracer_provider
        )
        self._queue: RabbitQueue = self.topology.gateway_queue(self.gateway_id)
        self.hub = Hub(bind=self._bind, unbind=self._unbind)

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
            body: str | bytes = raw.body
            if (raw.content_type or JSON) == JSON:
                body = raw.body.decode()  # once per message, shared by every client
            routing_key = raw.routing_key or ""
            kind = routing_key.split(".", 1)[0]
            if kind == "gateway":  # a service refused what a producer of ours sent
                REJECTED.labels("service", orjson.loads(raw.body).get("code", "unknown")).inc()
            self.hub.deliver(routing_key, body, kind=kind)

    async def start(self) -> None:
        await self.broker.start()
        await declare_shared(self.broker, self.topology)
        # Producers declare the work they feed, so nothing is lost before a consumer ever ran.
        for exchange, queue in (
            (self.topology.occupancy_observations, self.topology.occupancy_observations_queue),
            (self.topology.telemetry_raw, self.topology.telemetry_raw_queue),
        ):
            await declare_work(self.broker, self.topology, exchange, queue)

    async def stop(self) -> None:
        await self.broker.stop()

    async def ready(self) -> bool:
        return await self.broker.ping(timeout=2.0)

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

    async def request(self, *, service: str, queue: RabbitQueue, body: dict[str, Any]) -> Any:
        """Ask a service; raises ServiceUnavailableError when it does not answer in time."""
        started = time.perf_counter()
        try:
            reply = await self.broker.request(
                orjson.dumps(body),
                queue=queue.name,
                content_type=JSON,
                timeout=self.settings.request_timeout,
            )
        except TimeoutError:
            REQUEST_SECONDS.labels(service, "timeout").observe(time.perf_counter() - started)
            raise ServiceUnavailableError(f"{service} did not answer in time") from None
        except aiormq.exceptions.PublishError:
            # Nobody declared the service's request queue: the service has never run here.
            REQUEST_SECONDS.labels(service, "no_route").observe(time.perf_counter() - started)
            raise ServiceUnavailableError(f"{service} is not running") from None
        REQUEST_SECONDS.labels(service, "ok").observe(time.perf_counter() - started)
        return orjson.loads(reply.body)
