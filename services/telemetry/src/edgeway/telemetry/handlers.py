"""Handlers of the telemetry service: read, decode per vehicle, store, broadcast.

- `on_upload`: one upload, or a batch of them; each is read (`domain`) and handed to the group
  commit (`flows`), and the message is acked once all of them are committed. It runs once per
  message, so it is consumed apart from FastStream (`edgeway.common.amqp.Consumer`, wired in
  `app`);
- `answer_query`: the gateway's `history`, `status`, `vehicles` and `offline_sessions` queries
  and vehicle registration and retirement, over request/reply (a FastStream subscriber,
  `register`).

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

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aio_pika.abc import AbstractMessage
from faststream.rabbit import RabbitBroker
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.amqp import Delivery as AmqpDelivery
from edgeway.common.amqp import RejectDeliveryError
from edgeway.common.broker import answer_requests, encode
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.uploads import UPLOADS_TYPE, unpack
from edgeway.telemetry import domain, store
from edgeway.telemetry.flows import Delivery, Outcome
from edgeway.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from edgeway.telemetry.app import Deps

# The seed's history and status sizes (`WS /ws` sends the last 100; `/status` the last 10).
HISTORY_LIMIT = 100
STATUS_LATEST = 10
# Offline sessions one `offline_sessions` query gives back: by default, and at most.
SESSIONS_LIMIT = 20
SESSIONS_MAX = 100

log = get_logger("edgeway.telemetry")


async def on_upload(message: AmqpDelivery | AbstractMessage, deps: Deps) -> None:
    """One upload, or a batch of them (`telemetry.uploads.v1`), stored in their order.

    `message` is a delivery (`edgeway.common.amqp.Delivery`) or an aio-pika message with the
    same properties."""
    # Nothing is awaited before the group commit takes the uploads: they reach it in delivery
    # order, and the uploads of a batched message in their order in it.
    body = message.body
    if message.type == UPLOADS_TYPE:
        try:
            carried = unpack(body)
        except ValueError as exc:
            # Only a gateway of another version could send it: kept as a dead letter.
            raise RejectDeliveryError(f"unreadable upload batch: {exc}") from exc
        deliveries = [
            Delivery(envelope, upload, domain.read_upload(upload, envelope.headers))
            for upload, envelope in carried
        ]
        for outcome in await deps.group_commit.submit_all(deliveries):
            count(outcome, deps.metrics)
        return
    envelope = Envelope.from_message(message, type=domain.UPLOAD_TYPE)
    upload = domain.read_upload(body, message.headers or {})
    count(await deps.group_commit.submit(Delivery(envelope, body, upload)), deps.metrics)


def count(outcome: Outcome, metrics: Metrics) -> None:
    """An upload's records in the metrics, by outcome, and its rejection in the log."""
    metrics.records.labels("stored").inc(outcome.stored)
    metrics.records.labels("duplicate").inc(outcome.duplicates)
    if outcome.rejection is None:
        return
    rejected = outcome.rejection
    if outcome.new_rejection:
        metrics.rejected_uploads.labels(rejected.code.value).inc()
        metrics.records.labels("rejected").inc(rejected.records)
    log.warning(
        "upload rejected",
        code=rejected.code.value,
        reason=rejected.reason,
        vin=rejected.vin,
        message_id=outcome.envelope.message_id,
        duplicate=not outcome.new_rejection,
    )


# What an error answer's `code` says, so the gateway can tell a refusal from an outage.
ANSWER_INVALID = "invalid_request"  # not a query this service answers, or a bad argument
ANSWER_INVALID_VIN = "invalid_vin"
ANSWER_NOT_FOUND = "not_found"  # no active vehicle by that VIN
ANSWER_UNAVAILABLE = "unavailable"  # the database did not answer: ask again later
QUERIES = (
    "history",
    "status",
    "vehicles",
    "offline_sessions",
    "register_vehicle",
    "retire_vehicle",
)


def _refusal(code: str, reason: str) -> bytes:
    return encode({"error": reason, "code": code})


async def answer_query(
    body: bytes,
    *,
    sessions: async_sessionmaker[AsyncSession],
    vehicles: store.VehicleIdCache | None = None,
) -> bytes:
    """`history`, `status`, `vehicles` and `offline_sessions` queries, and vehicle registration
    and retirement (JSON in, JSON out).

    Any replica answers: `vehicles` is this replica's directory, told at once of a retirement
    it makes; the consuming replica's learns within its cache time
    (`store.VehicleIdCache`). An error answer is `{"error": reason, "code": ...}`; `code`
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
    limit = request.get("limit", SESSIONS_LIMIT if query == "offline_sessions" else HISTORY_LIMIT)
    if query in ("history", "offline_sessions") and (
        isinstance(limit, bool) or not isinstance(limit, int)
    ):
        return _refusal(ANSWER_INVALID, "limit must be an integer")
    span: tuple[datetime | None, datetime | None] = (None, None)
    if query == "offline_sessions":
        if not 1 <= limit <= SESSIONS_MAX:
            return _refusal(ANSWER_INVALID, f"limit must be from 1 to {SESSIONS_MAX}")
        try:
            span = _span(request.get("since"), request.get("until"))
        except ValueError as exc:
            return _refusal(ANSWER_INVALID, str(exc))
    vin = ""
    if query in ("register_vehicle", "retire_vehicle", "offline_sessions"):
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
        elif query == "offline_sessions":
            async with sessions() as session:
                found = await _offline_sessions(session, vin, limit, *span)
            if found is None:
                return _refusal(ANSWER_NOT_FOUND, f"vehicle {vin} is not registered")
            answer = {"vin": vin, "sessions": found}
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


def _instant(value: Any, name: str) -> datetime | None:
    """`since` or `until`: ISO 8601 with its offset (or `Z`), or absent."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise ValueError(f"{name} must be an ISO 8601 time with its offset, e.g. 2025-11-21T12:00Z")
    return at


def _span(since: Any, until: Any) -> tuple[datetime | None, datetime | None]:
    start, end = _instant(since, "since"), _instant(until, "until")
    if start is not None and end is not None and start > end:
        raise ValueError("since is after until")
    return start, end


async def _offline_sessions(
    session: AsyncSession,
    vin: str,
    limit: int,
    since: datetime | None,
    until: datetime | None,
) -> list[dict[str, Any]] | None:
    """The vehicle's last `limit` offline sessions, newest first; None if no vehicle, active or
    retired, has that VIN. Times are ISO 8601 in UTC: `started_at` and `ended_at` the records'
    own (the vehicle's clock), `arrived_at` when the replay reached the gateway."""
    vehicle_id = await store.vehicle_id_of(session=session, vin=vin)
    if vehicle_id is None:
        return None
    stored = await store.offline_sessions(
        session=session, vehicle_id=vehicle_id, limit=limit, since=since, until=until
    )
    return [
        {
            "id": found.id,
            "vin": vin,
            "started_at": domain.received_text(found.started_at),
            "ended_at": None if found.ended_at is None else domain.received_text(found.ended_at),
            "arrived_at": (
                None if found.arrived_at is None else domain.received_text(found.arrived_at)
            ),
            "records_buffered": found.records_buffered,
            "records_uploaded": found.records_uploaded,
            "status": found.status,
        }
        for found in stored
    ]


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


def register(broker: RabbitBroker, deps: Deps) -> None:
    """The telemetry service's FastStream subscribers, on `broker`, with `deps`: the queries.
    (Uploads are consumed apart, `edgeway.common.amqp.Consumer`, wired in `app`.)"""
    answer_requests(
        broker,
        deps.topology.telemetry_requests_queue,
        lambda body: answer_query(body, sessions=deps.sessions, vehicles=deps.vehicles),
    )
