"""The occupancy service's group-commit flow: observations handled at the same time are stored
in one transaction (`edgeway.common.batching.GroupCommit`), each with what to publish about it
once committed.

One observation is one short transaction at low load; its results are published after the
commit and the delivery is acked after that, so a crash anywhere means a redelivery, which the
store ignores (idempotent on `message_id`) and which publishes its result again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

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
    """One observation as it came off the queue, decoded."""

    envelope: Envelope
    body: bytes
    reading: domain.Reading | domain.Rejection


async def store_observations(
    deliveries: Sequence[Delivery],
    *,
    sessions: async_sessionmaker[AsyncSession],
    cameras: store.CameraDirectory,
) -> list[Outcome]:
    """Store a group of observations (or why each was rejected) in one transaction.

    Outcomes come back in the order of `deliveries`.
    """
    async with sessions.begin() as session:
        records: list[tuple[int, store.ObservationRecord]] = []
        outcomes: list[Outcome | None] = []
        for delivery in deliveries:
            envelope, reading = delivery.envelope, delivery.reading
            if isinstance(reading, domain.Reading):
                camera = reading.frame.camera
                location = await cameras.lookup(session=session, camera_id=camera)
                if location is not None:
                    update = domain.client_update(reading, location_name=location.location_name)
                    record = store.ObservationRecord(
                        message_id=envelope.message_id,
                        location=location,
                        reading=reading,
                        received_at=envelope.received_datetime(),
                        timestamp_raw=encode(reading.frame.timestamp).decode(),
                        client_update=encode(update.model_dump()).decode(),
                    )
                    records.append((len(outcomes), record))
                    outcomes.append(None)  # known once the group is inserted
                    continue
                reading = domain.unknown_camera(camera)
            outcomes.append(
                await store_rejection(
                    session=session, envelope=envelope, body=delivery.body, rejection=reading
                )
            )
        fresh = await store.record_observations(
            session=session, records=[record for _, record in records]
        )
        for (index, record), new in zip(records, fresh, strict=True):
            outcomes[index] = Outcome(
                label="stored" if new else "duplicate",
                routing_key=Channels.occupancy_location(record.location.location_id),
                body=record.client_update.encode(),
                type=UPDATE_TYPE,
            )
    return [outcome for outcome in outcomes if outcome is not None]


async def store_rejection(
    *, session: AsyncSession, envelope: Envelope, body: bytes, rejection: domain.Rejection
) -> Outcome:
    """Keep why an observation was refused; its error frame goes back to the producer."""
    fresh = await store.record_rejection(
        session=session,
        message_id=envelope.message_id,
        code=rejection.code.value,
        reason=rejection.reason,
        payload=body,
        received_at=envelope.received_datetime(),
    )
    frame = rejection.error_frame(message_id=envelope.message_id)
    return Outcome(
        label="rejected" if fresh else "duplicate",
        routing_key=envelope.reply_channel,
        body=frame.encode().encode(),
        type=ERROR_TYPE,
        rejection=rejection,
    )
