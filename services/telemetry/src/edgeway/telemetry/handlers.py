"""FastStream subscribers of the telemetry service: read, decode per vehicle, store, broadcast.

Uploads come off a quorum queue with a single active consumer, so one replica at a time sees
every vehicle's packets in the order the gateway published them. A message is one upload, or
several that a busy gateway sent together (`edgeway.common.telemetry.uploads`), taken in order
and acked once all of them are committed (if one fails, the message comes back, and those
already stored are duplicates then). Handlers hand uploads to a group commit without awaiting
anything first, so groups keep that order. A group is one transaction:
records (idempotent on vehicle and timestamp), each vehicle's decoder state, daily statistics,
offline sessions and rejections. Only after the commit are the deliveries acked, so a crash
anywhere before it means a redelivery, whose packets are then at or before their vehicle's
stored state: found in the table, counted as duplicates, neither decoded nor stored again.

The stored records' broadcasts are a lossy live stream: after the commit they are handed to the
process's bounded broadcast queue (`edgeway.telemetry.broadcast`) and the uploads are acked
without waiting for them; one background task publishes them in order. A crash loses what was
still queued, never a record.

Order is what the predictor needs, so nothing may overtake a failed group: a database outage is
waited out inside the group, however long, instead of requeueing it behind newer uploads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.exceptions import RejectMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.batching import GroupCommit
from edgeway.common.broker import (
    answer_requests,
    declare_shared,
    declare_work,
    encode,
    make_broker,
    whole_message,
)
from edgeway.common.db import is_outage, make_engine, make_sessionmaker, with_db_retry
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.service import database_service_app
from edgeway.common.settings import async_database_url
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.uploads import UPLOADS_TYPE, unpack
from edgeway.common.topology import Topology
from edgeway.telemetry import domain, store
from edgeway.telemetry.broadcast import AmqpSender, Broadcaster, BroadcastMetrics
from edgeway.telemetry.ingest import DecoderCache, Delivery, Outcome, Pipeline
from edgeway.telemetry.settings import TelemetrySettings

SERVICE = "telemetry"
RECORD_OUTCOMES = ("stored", "duplicate", "rejected")

# Pauses between tries while the database is unreachable, the last one repeated until it is
# back (`forever`). Unlike the occupancy service, a group is never given up on for an outage: a
# requeued upload would come back after newer ones of its vehicle, behind its predictor state.
DB_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 5.0)
# The seed's history and status sizes (`WS /ws` sends the last 100; `/status` the last 10).
HISTORY_LIMIT = 100
STATUS_LATEST = 10

log = get_logger("edgeway.telemetry")


# What an error answer's `code` says, so the gateway can tell a refusal from an outage.
ANSWER_INVALID = "invalid_request"  # not a query this service answers, or a bad argument
ANSWER_INVALID_VIN = "invalid_vin"
ANSWER_NOT_FOUND = "not_found"  # no active vehicle by that VIN
ANSWER_UNAVAILABLE = "unavailable"  # the database did not answer: ask again later
QUERIES = ("history", "status", "vehicles", "register_vehicle", "retire_vehicle")


def _refusal(code: str, reason: str) -> bytes:
    return encode({"error": reason, "code": code})


async def answer_query(
    body: bytes,
    *,
    sessions: async_sessionmaker[AsyncSession],
    vehicles: store.VehicleDirectory | None = None,
) -> bytes:
    """`history`, `status` and `vehicles` queries, and vehicle registration and retirement
    (JSON in, JSON out).

    Any replica answers: `vehicles` is this replica's directory, told at once of a retirement
    it makes; the consuming replica's learns within its cache time
    (`store.VehicleDirectory`). An error answer is `{"error": reason, "code": ...}`; `code`
    `unavailable` means the database did not answer, which is never the same as a vehicle
    being unknown.
    """
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _refusal(ANSWER_INVALID, "request is not valid JSON")
    query = request.get("query") if isinstance(request, dict) else None
    if query not in QUERIES:
        return _refusal(ANSWER_INVALID, f"unknown query; supported: {', '.join(QUERIES)}")
    assert isinstance(request, dict)
    limit = request.get("limit", HISTORY_LIMIT)
    if query == "history" and (isinstance(limit, bool) or not isinstance(limit, int)):
        return _refusal(ANSWER_INVALID, "limit must be an integer")
    vin = ""
    if query in ("register_vehicle", "retire_vehicle"):
        raw_vin = request.get("vin")
        if not isinstance(raw_vin, str):
            return _refusal(ANSWER_INVALID_VIN, "vin must be a string")
        try:
            vin = wire.check_vin(raw_vin)
        except wire.WireError as exc:
            return _refusal(ANSWER_INVALID_VIN, exc.reason)
    try:
        answer: Any
        if query == "register_vehicle":
            async with sessions.begin() as session:
                _, registration = await store.register_vehicle(session=session, vin=vin)
            log.info("vehicle registered", vin=vin, registration=registration.value)
            answer = {"vin": vin, "registration": registration.value}
        elif query == "retire_vehicle":
            async with sessions.begin() as session:
                retired = await store.retire_vehicle(session=session, vin=vin, at=datetime.now(UTC))
            if vehicles is not None:
                vehicles.forget(vin)
            if not retired:
                return _refusal(ANSWER_NOT_FOUND, f"vehicle {vin} is not registered")
            log.info("vehicle retired", vin=vin)
            answer = {"vin": vin, "retired": True}
        else:
            async with sessions() as session:
                if query == "history":
                    answer = await _history(session, min(max(limit, 0), HISTORY_LIMIT))
                elif query == "status":
                    answer = {
                        "total_records": await store.total_records(session=session),
                        "latest": await _history(session, STATUS_LATEST, with_vehicle=True),
                        "compression_stats": (
                            await store.fleet_stats(session=session, day=datetime.now(UTC).date())
                        ).client_view(),
                    }
                else:
                    answer = {"vehicles": await store.vehicle_vins(session=session)}
    except SQLAlchemyError as exc:
        log.warning("telemetry query failed", query=query, error=str(exc))
        return _refusal(ANSWER_UNAVAILABLE, "telemetry database unavailable")
    return encode(answer)


async def _history(
    session: AsyncSession, limit: int, *, with_vehicle: bool = False
) -> list[dict[str, Any]]:
    """The last `limit` records' `data` objects, oldest first. `with_vehicle` (`/status`'s
    `latest`) adds whose each is: `vin` and the seed's `vehicle_vin` tag, as the live messages
    carry them. History items stay the seed's `data`, which the gateway matches against the
    live records' `data` (edgeway.gateway.fanout.SnapshotEcho)."""
    if limit == 0:
        return []
    return [
        {
            **(
                {"vin": record.vin, "vehicle_vin": domain.vehicle_tag(record.vin)}
                if with_vehicle
                else {}
            ),
            "timestamp": record.timestamp_ms,
            "speed": record.speed,
            "battery": record.battery,
            "power": record.power,
            "odometer": record.odometer,
            "heading": record.heading,
            "received_at": domain.received_text(record.received_at),
        }
        for record in await store.last_records(session=session, limit=limit)
    ]


def build_app(
    settings: TelemetrySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The telemetry service: its subscribers, start-up work and operations endpoints."""
    topology = Topology(settings.exchanges)
    # A single active consumer (Topology.telemetry_raw_queue): one replica at a time decodes,
    # so each vehicle's packets meet its predictor state in the order they were published.
    uploads_queue = topology.telemetry_raw_queue
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=tracer_provider, registry=registry
    )
    url = async_database_url(settings.database_url, service=SERVICE, data_dir=settings.data_dir)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    vehicles = store.VehicleDirectory(ttl=settings.vehicle_cache_s)
    pipeline = Pipeline(
        sessions=sessions,
        vehicles=vehicles,
        decoders=DecoderCache(settings.predictor),
        offline_after_s=settings.offline_after_s,
    )
    records = Counter(
        "edgeway_telemetry_records_total",
        "Records taken from uploads, by outcome: stored, duplicate (stored before: a replay or "
        "a redelivery), rejected (in an upload that was refused; unreadable bodies count none)",
        ["outcome"],
        registry=registry,
    )
    for outcome in RECORD_OUTCOMES:
        records.labels(outcome)
    rejections = Counter(
        "edgeway_telemetry_rejected_uploads_total",
        "Uploads refused and kept in the rejections table, by code",
        ["code"],
        registry=registry,
    )
    for code in domain.RejectCode:
        rejections.labels(code.value)
    broadcaster = _broadcaster(settings, broker, topology, registry)

    async def flush(deliveries: Sequence[Delivery]) -> list[Outcome]:
        outcomes = await with_db_retry(
            lambda: pipeline.store(deliveries), delays=DB_RETRY_DELAYS, forever=True
        )
        # Committed: the uploads are acked now; their broadcasts follow from the queue.
        broadcaster.put(outcomes)
        return outcomes

    # Deliveries handled concurrently share one transaction (see edgeway.common.batching).
    group_commit: GroupCommit[Delivery, Outcome] = GroupCommit(
        flush,
        max_size=settings.commit_group_size,
        linger=settings.commit_linger_ms / 1000,
        # A database outage fails every item alike; anything else may be one bad upload.
        isolate=lambda exc: not is_outage(exc),
    )

    uploads = broker.subscriber(
        uploads_queue,
        topology.telemetry_raw,
        # Success acks after the commit (not after the broadcasts); an unexpected exception
        # nacks with requeue, and the quorum queue's delivery limit dead-letters what can never
        # succeed.
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=whole_message,
        no_reply=True,
    )

    def count(outcome: Outcome) -> None:
        records.labels("stored").inc(outcome.stored)
        records.labels("duplicate").inc(outcome.duplicates)
        if outcome.rejection is not None:
            rejected = outcome.rejection
            if outcome.new_rejection:
                rejections.labels(rejected.code.value).inc()
                records.labels("rejected").inc(rejected.records)
            log.warning(
                "upload rejected",
                code=rejected.code.value,
                reason=rejected.reason,
                vin=rejected.vin,
                message_id=outcome.envelope.message_id,
                duplicate=not outcome.new_rejection,
            )

    @uploads
    async def on_upload(message: RabbitMessage) -> None:
        # Nothing is awaited before the group commit takes the uploads: they reach it in
        # delivery order, and the uploads of a batched message in their order in it.
        body: bytes = message.body
        if message.raw_message.type == UPLOADS_TYPE:
            try:
                carried = unpack(body)
            except ValueError as exc:
                # Only a gateway of another version could send it: kept as a dead letter.
                log.error("unreadable upload batch", error=str(exc), message_id=message.message_id)
                raise RejectMessage from exc
            deliveries = [
                Delivery(envelope, upload, domain.read_upload(upload, envelope.headers))
                for upload, envelope in carried
            ]
            for outcome in await group_commit.submit_all(deliveries):
                count(outcome)
            return
        envelope = Envelope.from_message(message, type=domain.UPLOAD_TYPE)
        upload = domain.read_upload(body, message.headers or {})
        count(await group_commit.submit(Delivery(envelope, body, upload)))

    answer_requests(
        broker,
        topology.telemetry_requests_queue,
        lambda body: answer_query(body, sessions=sessions, vehicles=vehicles),
    )

    async def prepare_vehicles() -> None:
        async with sessions.begin() as session:
            await store.seed_vehicles(session=session, vins=settings.vehicles)
            known = await store.load_vehicles(session=session)
        vehicles.replace(known)
        log.info("database ready", vehicles=len(known))

    async def declare_topology() -> None:
        await declare_shared(broker, topology)
        await declare_work(broker, topology, topology.telemetry_raw, uploads_queue)

    app = database_service_app(
        broker,
        engine=engine,
        url=url,
        migrations=store.MIGRATIONS,
        prepare=prepare_vehicles,
        declare=declare_topology,
        registry=registry,
    )

    async def start_broadcasting() -> None:
        broadcaster.start()

    async def drain_broadcasts() -> None:
        # Within the grace period: first the uploads in hand (committed, so their records are
        # queued), then the broadcast queue, then the broker stops.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.graceful_timeout
        await uploads.stop()
        await broadcaster.drain(deadline)

    app.after_startup(start_broadcasting)
    app.on_shutdown(drain_broadcasts)
    return app


def _broadcaster(
    settings: TelemetrySettings,
    broker: RabbitBroker,
    topology: Topology,
    registry: CollectorRegistry,
) -> Broadcaster:
    published = Counter(
        "edgeway_telemetry_broadcast_published_total",
        "Record broadcasts the broker confirmed",
        registry=registry,
    )
    failures = Counter(
        "edgeway_telemetry_broadcast_failures_total",
        "Record broadcasts the broker did not take (the records are stored)",
        registry=registry,
    )
    dropped = Counter(
        "edgeway_telemetry_broadcast_dropped_total",
        "Stored records never broadcast: replayed ones over the replay broadcast rate, the "
        "oldest waiting when the broadcast queue was full (replays first), or still waiting at "
        "shutdown",
        registry=registry,
    )
    broadcaster = Broadcaster(
        AmqpSender(broker, topology.broadcast, app_id=f"edgeway-{SERVICE}", producer=SERVICE),
        capacity=settings.broadcast_backlog,
        replay_rate=settings.replay_broadcast_rate,
        metrics=BroadcastMetrics(published=published.inc, failed=failures.inc, dropped=dropped.inc),
    )
    Gauge(
        "edgeway_telemetry_broadcast_queued",
        "Stored records waiting to be broadcast or awaiting their confirm",
        registry=registry,
    ).set_function(lambda: broadcaster.waiting + broadcaster.in_flight)
    return broadcaster
