"""FastStream subscribers of the occupancy service: decode, apply the rules, store, publish.

One observation is one short transaction; its results are published after the commit and the
delivery is acked after that, so a crash anywhere means a redelivery, which the store ignores
(idempotent on `message_id`) and which publishes its result again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.rabbit.message import RabbitMessage
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.batching import GroupCommit
from edgeway.common.broker import (
    answer_requests,
    declare_shared,
    declare_work,
    encode,
    make_broker,
    publish,
    whole_message,
)
from edgeway.common.db import is_outage, make_engine, make_sessionmaker, with_db_retry
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.occupancy import OBSERVATION_TYPE, UPDATE_TYPE
from edgeway.common.service import database_service_app
from edgeway.common.settings import async_database_url
from edgeway.common.topology import Channels, Topology
from edgeway.occupancy import domain, store
from edgeway.occupancy.settings import OccupancySettings

SERVICE = "occupancy"
# The `type` of an error frame sent back to a producer (body: edgeway.common.schemas.errors).
ERROR_TYPE = "error.v1"
OUTCOMES = ("stored", "duplicate", "rejected")

# An outage is ridden out inside the handler, however long it lasts (`forever`): a delivery
# given up on would be requeued and count toward the queue's delivery limit, which is meant for
# messages that can never succeed, so an outage longer than the limit's window (5 deliveries,
# ~40 s) dead-lettered observations the gateway had accepted. Meanwhile the prefetch holds the
# consumer's deliveries unacked, so it takes no more, and /readyz says the database is down.
# The waits between tries are `settings.db_retry_delays`.

log = get_logger("edgeway.occupancy")


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


async def answer_query(body: bytes, *, sessions: async_sessionmaker[AsyncSession]) -> bytes:
    """`{"query": "latest"}` -> the JSON list of every location's latest client message."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return encode({"error": "request is not valid JSON"})
    if not isinstance(request, dict) or request.get("query") != "latest":
        return encode({"error": 'unknown query; supported: {"query": "latest"}'})
    try:
        async with sessions() as session:
            updates = await store.latest_updates(session=session)
    except SQLAlchemyError as exc:
        log.warning("latest-state query failed", error=str(exc))
        return encode({"error": "occupancy database unavailable"})
    # The stored messages are JSON already: joined, not decoded and encoded again.
    return b"[" + b",".join(update.encode() for update in updates) + b"]"


def build_app(
    settings: OccupancySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The occupancy service: its subscribers, start-up work and operations endpoints."""
    topology = Topology(settings.exchanges)
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=tracer_provider, registry=registry
    )
    url = async_database_url(settings.database_url, service=SERVICE, data_dir=settings.data_dir)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    cameras = store.CameraDirectory()
    observations = Counter(
        "edgeway_occupancy_observations_total",
        "Observations taken from the work queue, by outcome (stored, duplicate, rejected)",
        ["outcome"],
        registry=registry,
    )
    for outcome in OUTCOMES:
        observations.labels(outcome)
    # Deliveries handled concurrently share one transaction (see edgeway.common.batching).
    group_commit: GroupCommit[Delivery, Outcome] = GroupCommit(
        lambda deliveries: with_db_retry(
            lambda: store_observations(deliveries, sessions=sessions, cameras=cameras),
            delays=settings.db_retry_delays,
            forever=True,
        ),
        max_size=settings.commit_group_size,
        # A database outage fails every item alike; anything else may be one bad observation.
        isolate=lambda exc: not is_outage(exc),
    )

    @broker.subscriber(
        topology.occupancy_observations_queue,
        topology.occupancy_observations,
        # NACK_ON_ERROR: success acks after the commit and the publish; an unexpected exception
        # (a bug, a schema that does not fit; never an outage) nacks with requeue, so the message
        # is tried again and the quorum queue's delivery limit dead-letters one that can never
        # succeed. The default, REJECT_ON_ERROR, would dead-letter it on the first failure.
        ack_policy=AckPolicy.NACK_ON_ERROR,
        # The handler decides what malformed means, not FastStream: it gets the body as it came.
        decoder=whole_message,
        no_reply=True,
    )
    async def on_observation(message: RabbitMessage) -> None:
        body: bytes = message.body
        envelope = Envelope.from_message(message, type=OBSERVATION_TYPE)
        reading = domain.read_observation(body)
        outcome = await group_commit.submit(Delivery(envelope, body, reading))
        observations.labels(outcome.label).inc()
        if outcome.rejection is not None:
            log.warning(
                "observation rejected",
                code=outcome.rejection.code.value,
                reason=outcome.rejection.reason,
                message_id=envelope.message_id,
                producer=envelope.producer,
                duplicate=outcome.label == "duplicate",
            )
        if outcome.routing_key:
            await publish(
                broker,
                outcome.body,
                envelope=envelope.derive(type=outcome.type, producer=SERVICE),
                exchange=topology.broadcast,
                routing_key=outcome.routing_key,
                durable=False,
            )

    answer_requests(
        broker,
        topology.occupancy_requests_queue,
        lambda body: answer_query(body, sessions=sessions),
    )

    async def prepare_cameras() -> None:
        async with sessions.begin() as session:
            await store.seed_cameras(session=session, cameras=settings.cameras)
            known = await store.load_cameras(session=session)
        cameras.replace(known)
        log.info("database ready", cameras=len(known))

    async def declare_topology() -> None:
        await declare_shared(broker, topology)
        await declare_work(
            broker,
            topology,
            topology.occupancy_observations,
            topology.occupancy_observations_queue,
        )

    return database_service_app(
        broker,
        engine=engine,
        url=url,
        migrations=store.MIGRATIONS,
        prepare=prepare_cameras,
        declare=declare_topology,
        registry=registry,
    )
