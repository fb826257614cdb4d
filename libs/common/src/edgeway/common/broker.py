"""The RabbitMQ broker every Edgeway process uses, built the same way everywhere.

Handlers are plain: FastDepends is off (`apply_types=False`) and the `whole_message` decoder
hands each handler the received message itself (body as it came, headers, properties). Measured
by `python -m bench.broker_overhead`: injecting `message: RabbitMessage` through FastDepends
runs a synchronous resolver in a worker thread for every delivery, ~80 µs of CPU per message;
FastStream's OpenTelemetry middleware costs ~60 µs per consume and ~75 µs per publish even when
no span is exported, so it is installed only when an exporter is configured. Without it the W3C
trace context still travels: the envelope passes `traceparent` on unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import orjson
from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.prometheus import ConsumeAttrs, PrometheusMiddleware
from faststream.rabbit import Channel, RabbitBroker, RabbitExchange, RabbitQueue, RabbitResponse
from faststream.rabbit.message import RabbitMessage
from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from faststream.rabbit.prometheus.provider import RabbitMetricsSettingsProvider
from faststream.rabbit.response import RabbitPublishCommand
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry

from edgeway.common.envelope import JSON, Envelope
from edgeway.common.logging import get_logger
from edgeway.common.settings import CommonSettings
from edgeway.common.topology import Topology

# Unacked deliveries per consumer channel: enough to keep a consumer busy across a round trip
# to the broker without letting one replica hoard the queue (RabbitMQ docs suggest 100-300).
DEFAULT_PREFETCH = 128


def metrics_destination(exchange: str, routing_key: str) -> str:
    """The `handler` label of a message's metrics: its exchange and what kind of routing key.

    FastStream labels with the whole routing key, and ours name vehicles, cameras, requests and
    connections (`telemetry.vehicle.<vin>`, `ingest.request.<id>`, reply-to queues): a new label
    set for each, kept by the registry for as long as the process lives. The first segment of
    the key (`telemetry`, `ingest`) is kept; on the default exchange the key is a queue name,
    kept whole, except replies' `amq.rabbitmq.reply-to.<id>`.
    """
    if not exchange or exchange == "default":
        kind = "amq.rabbitmq.reply-to" if routing_key.startswith("amq.") else routing_key
        return f"default.{kind}"
    return f"{exchange}.{routing_key.split('.', 1)[0]}"


class _BoundedMetricsSettings(RabbitMetricsSettingsProvider):
    """FastStream's Rabbit metrics with `metrics_destination` for the handler label."""

    def get_consume_attrs_from_message(
        self, msg: StreamMessage[aio_pika.IncomingMessage]
    ) -> ConsumeAttrs:
        attrs = super().get_consume_attrs_from_message(msg)
        raw = msg.raw_message
        attrs["destination_name"] = metrics_destination(raw.exchange or "", raw.routing_key or "")
        return attrs

    def get_publish_destination_name_from_cmd(self, cmd: RabbitPublishCommand) -> str:
        return metrics_destination(cmd.exchange.name, cmd.destination)


def make_broker(
    settings: CommonSettings,
    *,
    service: str,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
    prefetch: int = DEFAULT_PREFETCH,
) -> RabbitBroker:
    """A broker with publisher confirms, metrics, JSON logging and tracing when it is exported."""
    tracing = (
        (RabbitTelemetryMiddleware(tracer_provider=tracer_provider),)
        if settings.otel_exporter != "none"
        else ()
    )
    metrics = PrometheusMiddleware[aio_pika.IncomingMessage, RabbitPublishCommand](
        settings_provider_factory=lambda _: _BoundedMetricsSettings(),
        registry=registry,
        app_name=service,
        metrics_prefix="edgeway",
    )
    return RabbitBroker(
        settings.amqp_url,
        # A durable-work message that no queue takes must fail its publish, not vanish.
        default_channel=Channel(
            prefetch_count=prefetch, publisher_confirms=True, on_return_raises=True
        ),
        app_id=f"edgeway-{service}",
        graceful_timeout=settings.graceful_timeout,
        middlewares=(*tracing, metrics),
        apply_types=False,
        logger=get_logger(f"edgeway.{service}.broker"),
        # FastStream logs "Received" and "Processed" for every message at this level: debug, not
        # info (two log lines per message cost ~0.65 ms of CPU, measured in the occupancy service).
        log_level=logging.DEBUG,
        # The connection is retried by the robust connection; start-up waits for it (readyz).
        fail_fast=False,
        reconnect_interval=2.0,
    )


async def declare_shared(broker: RabbitBroker, topology: Topology) -> None:
    """Declare what every process relies on, whoever starts first."""
    await broker.declare_exchange(topology.broadcast)
    await broker.declare_exchange(topology.dead_letter)


async def declare_work(
    broker: RabbitBroker, topology: Topology, exchange: RabbitExchange, queue: RabbitQueue
) -> None:
    """Declare a work exchange, its quorum queue and the queue's dead letters.

    Producers declare this too, so nothing they publish is lost when the consumer has never run.
    """
    work_exchange = await broker.declare_exchange(exchange)
    work_queue = await broker.declare_queue(queue)
    await work_queue.bind(work_exchange, routing_key=queue.routing())
    dlx = await broker.declare_exchange(topology.dead_letter)
    dead = await broker.declare_queue(topology.dead_letter_queue(queue.name))
    await dead.bind(dlx, routing_key=queue.name)


async def whole_message(message: StreamMessage[Any]) -> StreamMessage[Any]:
    """Decoder for `subscriber(decoder=...)`: the handler gets the message, undecoded."""
    return message


def answer_requests(
    broker: RabbitBroker, queue: RabbitQueue, answer: Callable[[bytes], Awaitable[bytes]]
) -> None:
    """Reply to each request on `queue` (request/reply to its `reply_to`) with `answer(body)`.

    A query is worthless once its asker gave up: acked whatever happens, never retried.
    """

    @broker.subscriber(queue, ack_policy=AckPolicy.ACK, decoder=whole_message)
    async def on_request(message: RabbitMessage) -> RabbitResponse:
        reply = await answer(message.body)
        # Not mandatory: an asker whose reply queue is gone must not make this handler fail.
        return RabbitResponse(reply, content_type=JSON, mandatory=False)


def encode(body: Any) -> bytes:
    """JSON bodies are encoded with orjson, once."""
    return orjson.dumps(body)


async def publish(
    broker: RabbitBroker,
    body: bytes,
    *,
    envelope: Envelope,
    exchange: RabbitExchange,
    routing_key: str = "",
    durable: bool,
) -> None:
    """Publish one message carrying `envelope`; returns once the broker confirmed it.

    Durable work is persistent and mandatory (an unroutable message raises); live results are
    transient and may find no listener.
    """
    await broker.publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        persist=durable,
        mandatory=durable,
        **envelope.publish_kwargs(),
    )


__all__ = [
    "JSON",
    "answer_requests",
    "declare_shared",
    "declare_work",
    "encode",
    "make_broker",
    "publish",
    "whole_message",
]
