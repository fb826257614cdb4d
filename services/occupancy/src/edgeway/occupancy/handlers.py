"""Handlers of the occupancy service: decode, apply the rules, store, publish.

- `on_observation`: a camera model's frame, or several of one connection in one message (the
  work batch of `edgeway.common.batching`), the per-message path (aio-pika and aiormq directly, see
  `edgeway.common.amqp`): each read once (`domain`), stored with the others of its commit group
  (`flows`), its update or error frame published after the commit through the shared confirm
  publisher (one message per routing key and group), then acked by the consumer once every
  frame it carried is committed and its broadcast confirmed;
- `answer_query` (FastStream, a cold path): the gateway's `{"query": "latest"}` (every
  location's latest update) and `{"query": "history"}` (each location's recent observations,
  averaged per time window).

An outage is ridden out inside the handler, however long it lasts (`forever`): a delivery given
up on would be requeued and count toward the queue's delivery limit, which is meant for messages
that can never succeed, so an outage longer than the limit's window (5 deliveries, ~40 s)
dead-lettered observations the gateway had accepted. Meanwhile the prefetch holds the consumer's
deliveries unacked, so it takes no more, and /readyz says the database is down. The waits
between tries are `settings.db_retry_delays`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from faststream.rabbit import RabbitBroker
from opentelemetry import context as otel_context
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.amqp import Delivery as AmqpDelivery
from edgeway.common.amqp import RejectDeliveryError
from edgeway.common.batching import batch_size, unpack_work
from edgeway.common.broker import answer_requests, encode
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.occupancy import OBSERVATION_TYPE
from edgeway.occupancy import domain, store
from edgeway.occupancy.flows import Delivery

if TYPE_CHECKING:
    from edgeway.occupancy.app import Deps

log = get_logger("edgeway.occupancy.handlers")


async def on_observation(message: AmqpDelivery, deps: Deps) -> None:
    """One message of observations; returns once each is committed and its result confirmed by
    the broker (the consumer acks then). Raises on what is not an outage: requeued; a batch
    whose body and headers disagree is dead-lettered at once."""
    envelope = Envelope.from_message(message, type=OBSERVATION_TYPE)
    try:
        batched = batch_size(message.headers) > 1
        items = (
            unpack_work(message.body, message.headers, envelope)
            if batched
            else [(message.body, envelope)]
        )
    except ValueError as exc:
        raise RejectDeliveryError(str(exc)) from exc
    context = otel_context.get_current() if deps.link.tracer is not None else None
    deliveries = [
        Delivery(item, body, domain.read_observation(body), context) for body, item in items
    ]
    if batched:
        results = await deps.group_commit.submit_all(deliveries)
    else:
        results = [await deps.group_commit.submit(deliveries[0])]
    published: dict[int, asyncio.Task[None]] = {}
    for delivery, (outcome, task) in zip(deliveries, results, strict=True):
        deps.metrics.observations.labels(outcome.label).inc()
        if outcome.rejection is not None:
            log.warning(
                "observation rejected",
                code=outcome.rejection.code.value,
                reason=outcome.rejection.reason,
                message_id=delivery.envelope.message_id,
                producer=delivery.envelope.producer,
                duplicate=outcome.label == "duplicate",
            )
        if task is not None:
            published[id(task)] = task
    for task in published.values():
        await task


QUERIES = '{"query": "latest"} or {"query": "history", "seconds": 3600, "bucket_s": 60}'


async def answer_query(body: bytes, *, sessions: async_sessionmaker[AsyncSession]) -> bytes:
    """`{"query": "latest"}` -> the JSON list of every location's latest client message;
    `{"query": "history", ...}` -> each location's bucketed series (`domain.history_series`)."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return encode({"error": "request is not valid JSON"})
    query = request.get("query") if isinstance(request, dict) else None
    if query == "history":
        return await _answer_history(request, sessions=sessions)
    if query != "latest":
        return encode({"error": f"unknown query; supported: {QUERIES}"})
    try:
        async with sessions() as session:
            updates = await store.latest_updates(session=session)
    except SQLAlchemyError as exc:
        log.warning("latest-state query failed", error=str(exc))
        return encode({"error": "occupancy database unavailable"})
    # The stored messages are JSON already: joined, not decoded and encoded again.
    return b"[" + b",".join(update.encode() for update in updates) + b"]"


async def _answer_history(
    request: dict[str, Any], *, sessions: async_sessionmaker[AsyncSession]
) -> bytes:
    try:
        since, bucket_s = domain.history_query(request, now=datetime.now(UTC))
    except domain.DomainError as exc:
        return encode({"error": exc.reason, "code": "invalid_query"})
    try:
        async with sessions() as session:
            rows = await store.history(session=session, since=since)
    except SQLAlchemyError as exc:
        log.warning("history query failed", error=str(exc))
        return encode({"error": "occupancy database unavailable"})
    series = domain.history_series(rows, bucket_s=bucket_s)
    return encode({"bucket_s": bucket_s, "since": since.timestamp(), "locations": series})


def register(broker: RabbitBroker, deps: Deps) -> None:
    """The occupancy service's FastStream subscribers (its cold paths), on `broker`.

    Observations are consumed apart (`edgeway.common.amqp.Consumer`, wired in `app`) by
    `on_observation`: the consumer acks after the commit and the publish, and requeues when
    `on_observation` raises (a bug, a schema that does not fit; never an outage), so the message
    is tried again and the quorum queue's delivery limit dead-letters one that can never
    succeed.
    """
    topology = deps.topology
    answer_requests(
        broker,
        topology.occupancy_requests_queue,
        lambda body: answer_query(body, sessions=deps.sessions),
    )
