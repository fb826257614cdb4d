"""The handlers called in the test's own process: no service process and no broker (an upload
is handed to the handler as an AMQP message), and a real database on both dialects.

Routing, acks, redeliveries and broadcasts on a real broker are `test_flow.py`'s.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.amqp import RejectDeliveryError
from edgeway.common.broker import make_broker
from edgeway.common.envelope import Envelope
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import Encoder, Sample
from edgeway.common.telemetry.uploads import UPLOADS_TYPE
from edgeway.common.testing import DIALECTS, migrated_database
from edgeway.telemetry import store
from edgeway.telemetry.app import SERVICE, Deps, build_deps
from edgeway.telemetry.domain import UPLOAD_TYPE
from edgeway.telemetry.handlers import answer_query, on_upload
from edgeway.telemetry.settings import SEED_VIN, TelemetrySettings
from edgeway.telemetry.tables import MIGRATIONS, RejectedUpload, TelemetryRecord

T0 = 1_763_726_400_000
UNKNOWN_VIN = "1HGCM82633A004352"


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return migrated_database(request, tmp_path, service="telemetry", migrations=MIGRATIONS)


@pytest.fixture
async def deps(sessions: async_sessionmaker[AsyncSession], tmp_path: Path) -> Deps:
    settings = TelemetrySettings(data_dir=tmp_path, commit_linger_ms=0)
    registry = CollectorRegistry()
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=TracerProvider(), registry=registry
    )
    built = build_deps(settings, broker=broker, sessions=sessions, registry=registry)
    async with sessions.begin() as session:
        await store.seed_vehicles(session=session, vins=[SEED_VIN])
        built.vehicles.replace(await store.load_vehicles(session=session))
    return built


async def upload(deps: Deps, body: bytes, *, vin: str) -> None:
    """An upload as the gateway publishes it, handed to the handler."""
    envelope = Envelope(type=UPLOAD_TYPE, producer="gateway")
    kwargs = envelope.publish_kwargs()
    kwargs["headers"] |= {"x-vehicle-vin": vin, "x-compressed": "true", "x-batch": "false"}
    message = aio_pika.Message(
        body,
        headers=kwargs["headers"],
        content_type=kwargs["content_type"],
        correlation_id=kwargs["correlation_id"],
        message_id=kwargs["message_id"],
        type=kwargs["message_type"],
    )
    await on_upload(message, deps)


def packets(count: int) -> list[bytes]:
    encoder = Encoder()
    return [
        wire.encode_packet(encoder.encode(Sample(T0 + i * 300, 40.0 + i, 80.0, 12.5, 1e4, 90.0)))
        for i in range(count)
    ]


def counted(deps: Deps, outcome: str) -> float:
    """`edgeway_telemetry_records_total{outcome=...}`."""
    return next(
        sample.value
        for metric in deps.metrics.records.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels == {"outcome": outcome}
    )


async def test_an_upload_is_stored_counted_and_queued_for_its_broadcast(
    deps: Deps, sessions: async_sessionmaker[AsyncSession]
) -> None:
    for body in packets(3):
        await upload(deps, body, vin=SEED_VIN)
    await upload(deps, packets(1)[0], vin=SEED_VIN)  # the first one again

    async with sessions() as session:
        stored = list(await session.scalars(select(TelemetryRecord.__table__.c.timestamp_ms)))
    assert sorted(stored) == [T0, T0 + 300, T0 + 600]
    assert (counted(deps, "stored"), counted(deps, "duplicate")) == (3, 1)
    assert deps.broadcaster.waiting == 3  # not started: the broadcasts wait in the queue


async def test_an_upload_of_an_unknown_vehicle_is_kept_as_a_rejection(
    deps: Deps, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await upload(deps, packets(1)[0], vin=UNKNOWN_VIN)

    async with sessions() as session:
        rejected = (await session.scalars(select(RejectedUpload))).one()
    assert (rejected.code, rejected.vehicle_vin) == ("unknown_vehicle", UNKNOWN_VIN)
    assert counted(deps, "rejected") == 1
    assert deps.broadcaster.waiting == 0


async def test_an_unreadable_batch_is_rejected_to_the_dead_letters(deps: Deps) -> None:
    """Only a gateway of another version sends one: never requeued, nothing stored."""
    message = aio_pika.Message(b"\xff\xff\xff", type=UPLOADS_TYPE)
    with pytest.raises(RejectDeliveryError, match="unreadable upload batch"):
        await on_upload(message, deps)
    assert counted(deps, "stored") == 0


async def test_queries_are_answered_and_refused_with_a_code(
    deps: Deps, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async def ask(query: object) -> Any:
        body = query if isinstance(query, bytes) else orjson.dumps(query)
        return orjson.loads(await answer_query(body, sessions=sessions, vehicles=deps.vehicles))

    assert await ask(b"{") == {"error": "request is not valid JSON", "code": "invalid_request"}
    assert (await ask({"query": "drop"}))["code"] == "invalid_request"
    assert (await ask({"query": "history", "limit": "10"}))["code"] == "invalid_request"
    assert (await ask({"query": "register_vehicle", "vin": "short"}))["code"] == "invalid_vin"
    assert await ask({"query": "register_vehicle", "vin": UNKNOWN_VIN}) == {
        "vin": UNKNOWN_VIN,
        "registration": "created",
    }
    assert await ask({"query": "vehicles"}) == {"vehicles": [SEED_VIN, UNKNOWN_VIN]}
    assert await ask({"query": "retire_vehicle", "vin": UNKNOWN_VIN}) == {
        "vin": UNKNOWN_VIN,
        "retired": True,
    }
    assert (await ask({"query": "retire_vehicle", "vin": UNKNOWN_VIN}))["code"] == "not_found"
    assert await ask({"query": "history"}) == []


async def test_offline_sessions_are_asked_for_one_vehicle_and_bad_arguments_refused(
    deps: Deps, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async def ask(**query: object) -> Any:
        body = orjson.dumps({"query": "offline_sessions", **query})
        return orjson.loads(await answer_query(body, sessions=sessions, vehicles=deps.vehicles))

    encoder = Encoder()
    now = int(time.time() * 1000)
    # Three records of 2025 arriving now: a logger replaying its buffer; then a live one.
    replay = [Sample(T0 + i * 300, 40.0 + i, 80.0, 12.5, 1e4, 90.0) for i in range(3)]
    for sample in [*replay, Sample(now, 50.0, 79.0, 12.5, 1e4 + 1, 90.0)]:
        await upload(deps, wire.encode_packet(encoder.encode(sample)), vin=SEED_VIN)

    answer = await ask(vin=SEED_VIN)
    assert answer["vin"] == SEED_VIN
    [found] = answer["sessions"]
    arrived = datetime.fromisoformat(found.pop("arrived_at"))
    assert abs(arrived.timestamp() * 1000 - now) < 60_000
    assert found == {
        "id": found["id"],
        "vin": SEED_VIN,
        "started_at": "2025-11-21T12:00:00.000000+00:00",
        "ended_at": datetime.fromtimestamp(now / 1000, UTC).isoformat(timespec="microseconds"),
        "records_buffered": 3,
        "records_uploaded": 3,
        "status": "synced",
    }
    assert (await ask(vin=SEED_VIN, until="2025-11-21T12:00:00Z"))["sessions"] == []
    assert len((await ask(vin=SEED_VIN, since="2025-11-21T12:00:00+00:00"))["sessions"]) == 1
    assert await ask(vin=UNKNOWN_VIN) == {
        "error": f"vehicle {UNKNOWN_VIN} is not registered",
        "code": "not_found",
    }
    assert (await ask(vin="short"))["code"] == "invalid_vin"
    assert (await ask())["code"] == "invalid_vin"
    for refused in (
        {"limit": 0},
        {"limit": 101},
        {"limit": "5"},
        {"limit": True},
        {"since": "yesterday"},
        {"since": "2025-11-21T12:00:00"},  # no offset: whose noon?
        {"since": 1763726400},
        {"since": "2025-11-21T13:00Z", "until": "2025-11-21T12:00Z"},
    ):
        assert (await ask(vin=SEED_VIN, **refused))["code"] == "invalid_request", refused
