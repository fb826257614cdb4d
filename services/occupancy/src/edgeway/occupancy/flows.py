"""The occupancy service's group-commit flow: observations handled at the same time are stored
in one transaction (`edgeway.common.batching.GroupCommit`) by the store's `Writer`, each with
what to publish about it once committed. Each body is parsed once, by the handler.

One observation is one short transaction at low load; its results are published after the
commit and the delivery is acked after that, so a crash anywhere means a redelivery, which the
store ignores (idempotent on `message_id`) and which publishes its result again.

A group's results go out as one broadcast per routing key (`broadcast`): a location's updates,
or a producer connection's error frames, committed together share one AMQP message (the batch
form of `edgeway.common.batching`); one alone goes as the plain message it always was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from opentelemetry.context import Context
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.amqp import ConfirmPublisher
from edgeway.common.batching import BATCH_CORRELATION_IDS, BATCH_HEADER, join_lines
from edgeway.common.broker import encode
from edgeway.common.envelope import Envelope
from edgeway.common.schemas.occupancy import UPDATE_TYPE
from edgeway.common.topology import Channels
from edgeway.occupancy import domain, store

SERVICE = "occupancy"
# The `type` of an error frame sent back to a producer (body: edgeway.common.schemas.errors).
ERROR_TYPE = "error.v1"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one observation came to, and what to publish about it once committed."""

    label: str  # the metric's outcome: stored, duplicate or rejected
    routing_key: str | None  # broadcast channel; None: nobody to tell
    body: bytes
    type: str
    rejection: domain.Rejection | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One observation as it came off the queue, decoded; `trace`: its handler's context where
    spans are exported (its broadcast's span goes under it)."""

    envelope: Envelope
    body: bytes
    reading: domain.Reading | domain.Rejection
    trace: Context | None = None


class Result(NamedTuple):
    """An observation's outcome once committed, and the publish that carries its message (None:
    nothing to tell); it is acked once that publish is confirmed."""

    outcome: Outcome
    published: asyncio.Task[None] | None


def broadcast(
    deliveries: Sequence[Delivery],
    outcomes: Sequence[Outcome],
    *,
    publisher: ConfirmPublisher,
    exchange: str,
) -> list[Result]:
    """Start publishing a committed group's messages: one per routing key, in the group's order
    (several of a key as one batch); each delivery's publish comes back with its outcome."""
    keys: dict[str, list[int]] = {}
    for index, outcome in enumerate(outcomes):
        if outcome.routing_key:
            keys.setdefault(outcome.routing_key, []).append(index)
    published: list[asyncio.Task[None] | None] = [None] * len(outcomes)
    for routing_key, indices in keys.items():
        first = outcomes[indices[0]]
        envelope = deliveries[indices[0]].envelope.derive(type=first.type, producer=SERVICE)
        if len(indices) == 1:
            body, headers = first.body, None
        else:
            body = join_lines([outcomes[index].body for index in indices])
            headers = {
                BATCH_HEADER: str(len(indices)),
                BATCH_CORRELATION_IDS: ",".join(
                    deliveries[index].envelope.correlation_id
                    or deliveries[index].envelope.message_id
                    for index in indices
                ),
            }
        task = publisher.submit(
            body,
            envelope=envelope,
            exchange=exchange,
            routing_key=routing_key,
            durable=False,
            headers=headers,
            # A batch's publish continues the trace of its newest observation: the update
            # its clients end on.
            context=deliveries[indices[-1]].trace,
        )
        for index in indices:
            published[index] = task
    return [Result(outcome, task) for outcome, task in zip(outcomes, published, strict=True)]


async def store_observations(
    deliveries: Sequence[Delivery],
    *,
    writer: store.Writer,
    cameras: store.CameraDirectory,
    sessions: async_sessionmaker[AsyncSession],
) -> list[Outcome]:
    """Store a group of observations (or why each was rejected) in one transaction.

    Outcomes come back in the order of `deliveries`.
    """
    records: list[store.ObservationRecord] = []
    rejections: list[tuple[Delivery, domain.Rejection]] = []
    placed: list[tuple[bool, int]] = []  # per delivery: (is an observation, index in its list)
    for delivery in deliveries:
        reading = delivery.reading
        if isinstance(reading, domain.Reading):
            camera = reading.frame.camera
            location = cameras.known(camera) or await _find_camera(cameras, sessions, camera)
            if location is not None:
                update = domain.client_update(reading, location_name=location.location_name)
                placed.append((True, len(records)))
                records.append(
                    store.ObservationRecord(
                        message_id=delivery.envelope.message_id,
                        location=location,
                        reading=reading,
                        received_at=delivery.envelope.received_datetime(),
                        timestamp_raw=encode(reading.frame.timestamp).decode(),
                        client_update=encode(update.model_dump()).decode(),
                    )
                )
                continue
            reading = domain.unknown_camera(camera)
        placed.append((False, len(rejections)))
        rejections.append((delivery, reading))
    stored, rejected = await writer.write(
        records,
        [
            store.RejectionRecord(
                message_id=delivery.envelope.message_id,
                code=rejection.code.value,
                reason=rejection.reason,
                payload=delivery.body,
                received_at=delivery.envelope.received_datetime(),
            )
            for delivery, rejection in rejections
        ],
    )
    outcomes = []
    for observation, index in placed:
        if observation:
            record = records[index]
            outcomes.append(
                Outcome(
                    label="stored" if stored[index] else "duplicate",
                    routing_key=Channels.occupancy_location(record.location.location_id),
                    body=record.client_update.encode(),
                    type=UPDATE_TYPE,
                )
            )
        else:
            delivery, rejection = rejections[index]
            outcomes.append(rejection_outcome(delivery, rejection, fresh=rejected[index]))
    return outcomes


async def _find_camera(
    cameras: store.CameraDirectory, sessions: async_sessionmaker[AsyncSession], camera: str
) -> store.CameraLocation | None:
    """A camera not held in memory: maybe an operator added it to the table since the start."""
    async with sessions() as session:
        return await cameras.lookup(camera, session=session)


def rejection_outcome(delivery: Delivery, rejection: domain.Rejection, *, fresh: bool) -> Outcome:
    """A refused observation's error frame, for the producer that sent it."""
    frame = rejection.error_frame(message_id=delivery.envelope.message_id)
    return Outcome(
        label="rejected" if fresh else "duplicate",
        routing_key=delivery.envelope.reply_channel,
        body=frame.encode().encode(),
        type=ERROR_TYPE,
        rejection=rejection,
    )
