"""The telemetry database: vehicles, every reconstructed record, predictor state, daily
compression statistics, offline sessions and rejections.

Functions take the session as a keyword and never open or commit a transaction: the handler
does, so one group of uploads is one transaction. Records are idempotent on (vehicle,
timestamp): a replayed or redelivered record is never stored twice. On PostgreSQL a group's
records go in with COPY (`record_sink`), or for small groups one `INSERT ... SELECT FROM unnest`
with an array per column; on SQLite with multi-row `INSERT ... ON CONFLICT DO NOTHING
RETURNING`. Each answers the same question: which of these rows are new.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import psycopg.errors
from psycopg import AsyncCopy
from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    cast,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeway.common.db import (
    BigId,
    Insert,
    JSONDocument,
    Migrations,
    UTCDateTime,
    dialect_insert,
    dialect_of,
    per_dialect,
    table_of,
)
from edgeway.telemetry.domain import NewSession, SessionUpdate, StatsCounts

MIGRATIONS = Migrations(
    Path(__file__).with_name("migrations"), version_table="alembic_version_telemetry"
)

VIN_LENGTH = 17
MESSAGE_ID_LENGTH = 255  # what AMQP allows a message id (short string)
# A rejected upload keeps the VIN header it came with, cut to this length (it may be anything).
REJECTED_VIN_LENGTH = 64

# offline_sessions.status: replaying (records still arrive late), or a live record came after.
SESSION_SYNCING = "syncing"
SESSION_SYNCED = "synced"


class Base(DeclarativeBase):
    # Constraint names spelled out, so the migrations name them the same on every database.
    metadata = MetaData(
        naming_convention={
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s",
        }
    )


class Vehicle(Base):
    """A vehicle whose logger may upload; seeded from the settings, or registered through the
    gateway's `/api/v1/vehicles`.

    Never deleted: a retired vehicle (`retired_at` set) keeps its id, so what was accepted for
    it stays attached to it, and registering its VIN again reactivates the same row.
    """

    __tablename__ = "vehicles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vin: Mapped[str] = mapped_column(String(VIN_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TelemetryRecord(Base):
    """One reconstructed record: what the vehicle measured, as far as the decoder knows."""

    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("vehicle_id", "timestamp_ms"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # A vehicles.id, without a foreign key: checking one per row was most of what a COPY costs
    # the server (migration 0002). Only this service writes here, with ids from `vehicles`.
    vehicle_id: Mapped[int] = mapped_column(Integer)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)  # the logger's record time
    speed: Mapped[float] = mapped_column(Double)
    battery: Mapped[float] = mapped_column(Double)
    power: Mapped[float] = mapped_column(Double)
    odometer: Mapped[float] = mapped_column(Double)
    heading: Mapped[float] = mapped_column(Double)
    # Bit i set: FIELDS[i] was not sent but predicted (speed 1, battery 2, power 4, heading 8).
    reconstructed: Mapped[int] = mapped_column(SmallInteger)
    # Decoded after a sequence gap and before the next resync: the prediction may have drifted.
    uncertain: Mapped[bool] = mapped_column(Boolean)
    sequence: Mapped[int | None] = mapped_column(BigInteger)
    predictor_version: Mapped[int | None] = mapped_column(Integer)
    compressed: Mapped[bool] = mapped_column(Boolean)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)  # at the gateway


class VehicleState(Base):
    """Each vehicle's decoder state and last record, moved forward by one writer at a time.

    `revision` goes up by one with every write, and a write only lands on the revision it
    read (compare and set): a replica whose cached state is stale cannot overwrite a newer one.
    """

    __tablename__ = "vehicle_state"

    vehicle_id: Mapped[int] = mapped_column(ForeignKey("vehicles.id"), primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger)
    predictor: Mapped[Any] = mapped_column(JSONDocument)  # PredictorState.to_json()
    # The open offline session, if the vehicle is replaying its buffer.
    offline_session_id: Mapped[int | None] = mapped_column(ForeignKey("offline_sessions.id"))
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    speed: Mapped[float] = mapped_column(Double)
    battery: Mapped[float] = mapped_column(Double)
    power: Mapped[float] = mapped_column(Double)
    odometer: Mapped[float] = mapped_column(Double)
    heading: Mapped[float] = mapped_column(Double)
    sequence: Mapped[int | None] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class CompressionStats(Base):
    """Per vehicle and UTC day (of the record time): packets and fields sent and skipped."""

    __tablename__ = "compression_stats"
    __table_args__ = (UniqueConstraint("vehicle_id", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vehicle_id: Mapped[int] = mapped_column(ForeignKey("vehicles.id"))
    day: Mapped[date] = mapped_column(Date)
    total_packets: Mapped[int] = mapped_column(BigInteger)
    transmitted_fields: Mapped[int] = mapped_column(BigInteger)
    skipped_fields: Mapped[int] = mapped_column(BigInteger)
    bandwidth_saved_percent: Mapped[float] = mapped_column(Double)  # skipped / all fields * 100


class OfflineSession(Base):
    """A store-and-forward replay: a run of records that arrived late (see domain.plan_sessions)."""

    __tablename__ = "offline_sessions"
    __table_args__ = (Index("ix_offline_sessions_vehicle_started", "vehicle_id", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vehicle_id: Mapped[int] = mapped_column(ForeignKey("vehicles.id"))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)  # record time of the first late one
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # record time of the live one
    # What the logger numbered in the session (stored + missing per sequence gaps).
    records_buffered: Mapped[int] = mapped_column(BigInteger)
    records_uploaded: Mapped[int] = mapped_column(BigInteger)  # stored
    status: Mapped[str] = mapped_column(String(16))


class RejectedUpload(Base):
    """An upload that could not be taken, kept with its bytes so nothing a logger sent is lost."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_LENGTH), unique=True)
    vehicle_vin: Mapped[str | None] = mapped_column(String(REJECTED_VIN_LENGTH))
    code: Mapped[str] = mapped_column(String(50))
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


TELEMETRY = table_of(TelemetryRecord)
STATE = table_of(VehicleState)
STATS = table_of(CompressionStats)
SESSIONS = table_of(OfflineSession)
REJECTIONS = table_of(RejectedUpload)


# --- rows -----------------------------------------------------------------------------------------


class RecordRow(NamedTuple):
    """One record to store (column order of `telemetry`, without its id)."""

    vehicle_id: int
    timestamp_ms: int
    speed: float
    battery: float
    power: float
    odometer: float
    heading: float
    reconstructed: int
    uncertain: bool
    sequence: int | None
    predictor_version: int | None
    compressed: bool
    received_at: datetime


# PostgreSQL types of the COPY columns: an ordinal that keeps arrival order, then RecordRow.
_COPY_TYPES = (
    "int4",  # ord
    "int4",
    "int8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "int2",
    "bool",
    "int8",
    "int4",
    "bool",
    "timestamptz",
)
# The common case: every row is new, and COPY writes them straight into the table.
_COPY_DIRECT = """
COPY telemetry (
    vehicle_id, timestamp_ms, speed, battery, power, odometer, heading, reconstructed,
    uncertain, sequence, predictor_version, compressed, received_at
) FROM STDIN (FORMAT BINARY)
"""
# The COPY target when some rows may be stored: one per connection, emptied at every commit
# (and gone on rollback).
_CREATE_INCOMING = """
CREATE TEMPORARY TABLE IF NOT EXISTS telemetry_incoming (
    ord int4, vehicle_id int4, timestamp_ms int8, speed float8, battery float8, power float8,
    odometer float8, heading float8, reconstructed int2, uncertain bool, sequence int8,
    predictor_version int4, compressed bool, received_at timestamptz
) ON COMMIT DELETE ROWS
"""
_COPY_INCOMING = """
COPY telemetry_incoming (
    ord, vehicle_id, timestamp_ms, speed, battery, power, odometer, heading, reconstructed,
    uncertain, sequence, predictor_version, compressed, received_at
) FROM STDIN (FORMAT BINARY)
"""
_RECORD_COLUMNS = ", ".join(RecordRow._fields)


def _insert_records_from(source: str) -> str:
    """INSERT the records of `source` (RecordRow's columns and `ord`) in `ord` order, skipping
    those stored already; the keys of the rows it inserted."""
    return f"""
INSERT INTO telemetry ({_RECORD_COLUMNS})
SELECT {_RECORD_COLUMNS} FROM {source} ORDER BY ord
ON CONFLICT (vehicle_id, timestamp_ms) DO NOTHING
RETURNING vehicle_id, timestamp_ms
"""  # noqa: S608 - built at import from this module's constants, never from input


_INSERT_INCOMING = _insert_records_from("telemetry_incoming")


@dataclass(frozen=True, slots=True)
class StoredState:
    """A vehicle's state row as read: what its decoder resumes from."""

    revision: int
    predictor: dict[str, Any]
    offline_session_id: int | None
    timestamp_ms: int  # of the last record
    sequence: int | None


@dataclass(frozen=True, slots=True)
class StateWrite:
    """A vehicle's state after a group; `revision` is the one read (0: there was no row)."""

    vehicle_id: int
    revision: int
    predictor: dict[str, Any]
    offline_session_id: int | None
    last: RecordRow


class StaleStateError(RuntimeError):
    """A vehicle's state was moved on by someone else since this process read it."""


class StatsKey(NamedTuple):
    vehicle_id: int
    day: date


# --- the per-group statements, built once per dialect ---------------------------------------------


class _HotStatements:
    """Statements run for every group, built once per dialect and run with parameters.

    PostgreSQL runs the `unnest` forms below instead of `records`, `state` and `stats`."""

    def __init__(self, insert: Callable[[Table], Insert]) -> None:
        self.records = (
            insert(TELEMETRY)
            .on_conflict_do_nothing(index_elements=["vehicle_id", "timestamp_ms"])
            .returning(TELEMETRY.c.vehicle_id, TELEMETRY.c.timestamp_ms)
        )
        state = insert(STATE)
        self.state = state.on_conflict_do_update(
            index_elements=["vehicle_id"],
            set_={
                **{
                    column.name: state.excluded[column.name]
                    for column in STATE.c
                    if column.name not in ("vehicle_id", "updated_at")
                },
                "updated_at": func.now(),
            },
            # Compare and set: only on top of the revision this writer read.
            where=STATE.c.revision == state.excluded.revision - 1,
        ).returning(STATE.c.vehicle_id)
        stats = insert(STATS)
        totals = {
            name: STATS.c[name] + stats.excluded[name]
            for name in ("total_packets", "transmitted_fields", "skipped_fields")
        }
        fields = totals["transmitted_fields"] + totals["skipped_fields"]
        self.stats = stats.on_conflict_do_update(
            index_elements=["vehicle_id", "day"],
            set_={
                **totals,
                "bandwidth_saved_percent": cast(totals["skipped_fields"], Double) * 100 / fields,
            },
        ).returning(
            STATS.c.vehicle_id,
            STATS.c.day,
            STATS.c.total_packets,
            STATS.c.transmitted_fields,
            STATS.c.skipped_fields,
        )
        self.rejection = (
            insert(REJECTIONS)
            .on_conflict_do_nothing(index_elements=["message_id"])
            .returning(REJECTIONS.c.id)
        )


_hot = per_dialect(_HotStatements)


# On PostgreSQL the same three statements take one array per column (`unnest`): their text never
# changes with the group's size, so psycopg converts it once and the server prepares it once.
# SQLAlchemy's multi-row VALUES is new text for every group size, which psycopg parses anew each
# time (it caches no query of over 50 parameters): that was a sixth of the service's CPU.
_PG_RECORDS = _insert_records_from(
    "unnest(%s::int4[], %s::int8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[],"
    " %s::float8[], %s::int2[], %s::bool[], %s::int8[], %s::int4[], %s::bool[],"
    f" %s::timestamptz[]) WITH ORDINALITY AS incoming ({_RECORD_COLUMNS}, ord)"
)
_PG_STATE = """
INSERT INTO vehicle_state AS state (
    vehicle_id, revision, predictor, offline_session_id, timestamp_ms, speed, battery, power,
    odometer, heading, sequence, received_at
)
SELECT * FROM unnest(
    %s::int4[], %s::int8[], %s::jsonb[], %s::int4[], %s::int8[], %s::float8[], %s::float8[],
    %s::float8[], %s::float8[], %s::float8[], %s::int8[], %s::timestamptz[]
)
ON CONFLICT (vehicle_id) DO UPDATE SET
    revision = excluded.revision, predictor = excluded.predictor,
    offline_session_id = excluded.offline_session_id, timestamp_ms = excluded.timestamp_ms,
    speed = excluded.speed, battery = excluded.battery, power = excluded.power,
    odometer = excluded.odometer, heading = excluded.heading, sequence = excluded.sequence,
    received_at = excluded.received_at, updated_at = now()
WHERE state.revision = excluded.revision - 1
RETURNING vehicle_id
"""
_PG_STATS = """
INSERT INTO compression_stats AS stats (
    vehicle_id, day, total_packets, transmitted_fields, skipped_fields, bandwidth_saved_percent
)
SELECT * FROM unnest(%s::int4[], %s::date[], %s::int8[], %s::int8[], %s::int8[], %s::float8[])
ON CONFLICT (vehicle_id, day) DO UPDATE SET
    total_packets = stats.total_packets + excluded.total_packets,
    transmitted_fields = stats.transmitted_fields + excluded.transmitted_fields,
    skipped_fields = stats.skipped_fields + excluded.skipped_fields,
    bandwidth_saved_percent = (stats.skipped_fields + excluded.skipped_fields)::float8 * 100
        / (stats.transmitted_fields + excluded.transmitted_fields
           + stats.skipped_fields + excluded.skipped_fields)
RETURNING vehicle_id, day, total_packets, transmitted_fields, skipped_fields
"""


async def _driver(session: AsyncSession) -> Any:
    """The psycopg connection under the session, in the session's transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


async def _pg_rows(session: AsyncSession, sql: str, columns: Sequence[list[Any]]) -> list[Any]:
    """Run one of the `unnest` statements with a list per column; the rows it returned."""
    async with (await _driver(session)).cursor() as cursor:
        await cursor.execute(sql, columns)
        return list(await cursor.fetchall())


def _columns(rows: Iterable[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as one list per column."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


# --- vehicles -------------------------------------------------------------------------------------


async def seed_vehicles(*, session: AsyncSession, vins: Iterable[str]) -> None:
    """Add the given vehicles that are missing; existing ones (and their ids) stay, and a
    retired one stays retired (the setting seeds; the API decides after that)."""
    rows = [{"vin": vin} for vin in dict.fromkeys(vins)]
    if not rows:
        return
    await session.execute(
        dialect_insert(session, Vehicle).values(rows).on_conflict_do_nothing(index_elements=["vin"])
    )


async def load_vehicles(*, session: AsyncSession) -> dict[str, int]:
    """Every active (not retired) vehicle, VIN -> id."""
    rows = await session.execute(
        select(Vehicle.vin, Vehicle.id).where(Vehicle.retired_at.is_(None))
    )
    return {vin: vehicle_id for vin, vehicle_id in rows}


async def vehicle_vins(*, session: AsyncSession) -> list[str]:
    """Every active vehicle's VIN, oldest first."""
    return list(
        await session.scalars(
            select(Vehicle.vin).where(Vehicle.retired_at.is_(None)).order_by(Vehicle.id)
        )
    )


class Registration(StrEnum):
    """What registering a VIN did."""

    CREATED = "created"  # a new row
    REACTIVATED = "reactivated"  # a retired vehicle, active again with its id
    EXISTING = "existing"  # it was registered and active already: nothing changed


VEHICLES = table_of(Vehicle)


async def register_vehicle(*, session: AsyncSession, vin: str) -> tuple[int, Registration]:
    """Make `vin` an active vehicle; its id and what that took.

    Each step is one statement that only changes a row in the state it expects, so two
    registrations of the same VIN at once (two gateway replicas, two request replicas) end
    with one row, and each says what it found.
    """
    created = await session.scalar(
        dialect_insert(session, VEHICLES)
        .values(vin=vin)
        .on_conflict_do_nothing(index_elements=["vin"])
        .returning(VEHICLES.c.id)
    )
    if created is not None:
        return created, Registration.CREATED
    reactivated = await session.scalar(
        update(VEHICLES)
        .where(VEHICLES.c.vin == vin, VEHICLES.c.retired_at.is_not(None))
        .values(retired_at=None)
        .returning(VEHICLES.c.id)
    )
    if reactivated is not None:
        return reactivated, Registration.REACTIVATED
    existing = await session.scalar(select(VEHICLES.c.id).where(VEHICLES.c.vin == vin))
    assert existing is not None, "vehicles are never deleted"
    return existing, Registration.EXISTING


async def retire_vehicle(*, session: AsyncSession, vin: str, at: datetime) -> bool:
    """Retire an active vehicle (its rows and records stay); False if none is active by `vin`."""
    retired = await session.scalar(
        update(VEHICLES)
        .where(VEHICLES.c.vin == vin, VEHICLES.c.retired_at.is_(None))
        .values(retired_at=at)
        .returning(VEHICLES.c.id)
    )
    return retired is not None


class VehicleDirectory:
    """VIN -> id of the active vehicles, each entry trusted for `ttl` seconds
    (`EDGEWAY_TELEMETRY_VEHICLE_CACHE_S`, 5 by default).

    Several replicas answer the gateway's requests (registrations and retirements among them)
    while one consumes the uploads, and an operator may change `vehicles` by hand, so this
    replica's copy cannot be told of every change: an entry older than `ttl` is read again
    (one indexed SELECT per vehicle and `ttl`, in the group's transaction), so a retirement
    made anywhere stops this replica taking the vehicle's uploads within `ttl` seconds plus
    the group in hand. A miss is always looked up, so a vehicle registered anywhere is taken
    at once; a retirement answered by this replica is forgotten at once (`forget`).
    """

    def __init__(
        self,
        known: Mapping[str, int] | None = None,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._known: dict[str, tuple[int, float]] = {}
        self.replace(known or {})

    def replace(self, known: Mapping[str, int]) -> None:
        now = self._clock()
        self._known = {vin: (vehicle_id, now) for vin, vehicle_id in known.items()}

    def forget(self, vin: str) -> None:
        self._known.pop(vin, None)

    async def lookup(self, *, session: AsyncSession, vin: str) -> int | None:
        """The vehicle's id if it is active, None if it is unknown or retired."""
        now = self._clock()  # before the read: an entry is never younger than what it saw
        hit = self._known.get(vin)
        if hit is not None and now - hit[1] <= self._ttl:
            return hit[0]
        found = await session.scalar(
            select(Vehicle.id).where(Vehicle.vin == vin, Vehicle.retired_at.is_(None))
        )
        if found is None:
            self._known.pop(vin, None)
        else:
            self._known[vin] = (found, now)
        return found


# --- records --------------------------------------------------------------------------------------


class RecordSink:
    """Where one transaction's records go, as they are decoded (`record_sink`).

    On PostgreSQL the rows go out on a COPY while the caller decodes the next ones, so the
    server inserts them on its own core meanwhile; elsewhere they are inserted at the end.
    `fresh` (per row written, in order: whether it was new) is known once the sink is closed.
    """

    def __init__(self, copy: AsyncCopy | None) -> None:
        self._copy = copy
        self.rows: list[RecordRow] = []
        self._seen: set[tuple[int, int]] = set()
        self.first: list[bool] = []  # per row: whether it is the first of its key in the sink
        self.fresh: list[bool] = []

    async def write(self, rows: Sequence[RecordRow]) -> None:
        self.rows.extend(rows)
        seen, first, copy = self._seen, self.first, self._copy
        for row in rows:
            key = (row.vehicle_id, row.timestamp_ms)
            if key in seen:  # a second copy in the same group is not new
                first.append(False)
                continue
            seen.add(key)
            first.append(True)
            if copy is not None:
                await copy.write_row(row)


# Fewer rows than this go in one multi-row INSERT: a COPY in a savepoint is three more round
# trips, which only pay for themselves on larger groups.
COPY_FROM_ROWS = 64


@asynccontextmanager
async def record_sink(session: AsyncSession, *, expected: int) -> AsyncIterator[RecordSink]:
    """Store what is written to the sink, in order, in the session's transaction; once the block
    is left, `sink.fresh` says per row whether it was new (its (vehicle, timestamp) neither
    stored before nor earlier in the sink). No other statement may run on the session inside
    the block. `expected`: about how many rows will be written (it picks the way they go).

    PostgreSQL, from COPY_FROM_ROWS rows: COPY cannot skip conflicts itself, so it writes
    straight into the table inside a savepoint (the common case: nothing is stored yet). If a
    row turns out to be stored already (a redelivery, a replay of records that made it before),
    the savepoint is rolled back and the rows go through a temporary table, from which one
    INSERT ... SELECT lets the unique constraint decide. Fewer rows, and SQLite: one multi-row
    INSERT ... ON CONFLICT DO NOTHING RETURNING when the block is left.
    """
    if expected < COPY_FROM_ROWS or dialect_of(session) != "postgresql":
        sink = RecordSink(None)
        yield sink
        sink.fresh = await _insert_rows(session, sink.rows)
        return
    async with (await _driver(session)).cursor() as cursor:
        # SQL, not psycopg's transaction(): that would BEGIN and COMMIT on its own if the
        # session has sent nothing yet.
        await cursor.execute("SAVEPOINT telemetry_copy")
        try:
            async with cursor.copy(_COPY_DIRECT) as copy:
                copy.set_types(_COPY_TYPES[1:])
                sink = RecordSink(copy)
                yield sink
        except psycopg.errors.UniqueViolation:
            await cursor.execute("ROLLBACK TO SAVEPOINT telemetry_copy")
        else:
            await cursor.execute("RELEASE SAVEPOINT telemetry_copy")
            sink.fresh = sink.first
            return
        await cursor.execute(_CREATE_INCOMING)
        async with cursor.copy(_COPY_INCOMING) as copy:
            copy.set_types(_COPY_TYPES)
            for ordinal, row in enumerate(sink.rows):
                await copy.write_row((ordinal, *row))
        await cursor.execute(_INSERT_INCOMING)
        inserted: set[tuple[int, int]] = set(await cursor.fetchall())
    sink.fresh = _new_ones(sink.rows, inserted)


async def insert_records(*, session: AsyncSession, rows: Sequence[RecordRow]) -> list[bool]:
    """Store records in the given order; per row, whether it was new (`record_sink`)."""
    async with record_sink(session, expected=len(rows)) as sink:
        await sink.write(rows)
    return sink.fresh


async def _insert_rows(session: AsyncSession, rows: Sequence[RecordRow]) -> list[bool]:
    """One INSERT ... ON CONFLICT DO NOTHING RETURNING: of arrays on PostgreSQL (`_PG_RECORDS`),
    multi-row VALUES elsewhere."""
    if not rows:
        return []
    if dialect_of(session) == "postgresql":
        returned = await _pg_rows(session, _PG_RECORDS, _columns(rows, len(RecordRow._fields)))
    else:
        returned = list(
            await session.execute(_hot(session).records, [row._asdict() for row in rows])
        )
    return _new_ones(rows, {(vehicle_id, timestamp_ms) for vehicle_id, timestamp_ms in returned})


def _new_ones(rows: Sequence[RecordRow], inserted: set[tuple[int, int]]) -> list[bool]:
    """Per row, whether it is the one of `inserted` (the first of its key: a second copy in the
    same group is not new)."""
    fresh: list[bool] = []
    for row in rows:
        key = (row.vehicle_id, row.timestamp_ms)
        fresh.append(key in inserted)
        inserted.discard(key)
    return fresh


# Timestamps per IN list: well under every driver's limit on bound parameters.
_IN_CHUNK = 1000


async def stored_timestamps(
    *, session: AsyncSession, vehicle_id: int, timestamps: Iterable[int]
) -> set[int]:
    """Which of these record times of a vehicle are stored."""
    wanted = sorted(set(timestamps))
    found: set[int] = set()
    for start in range(0, len(wanted), _IN_CHUNK):
        found.update(
            await session.scalars(
                select(TelemetryRecord.timestamp_ms).where(
                    TelemetryRecord.vehicle_id == vehicle_id,
                    TelemetryRecord.timestamp_ms.in_(wanted[start : start + _IN_CHUNK]),
                )
            )
        )
    return found


# --- state ----------------------------------------------------------------------------------------


async def load_states(
    *, session: AsyncSession, vehicle_ids: Iterable[int]
) -> dict[int, StoredState]:
    ids = sorted(set(vehicle_ids))
    if not ids:
        return {}
    rows = await session.execute(
        select(
            VehicleState.vehicle_id,
            VehicleState.revision,
            VehicleState.predictor,
            VehicleState.offline_session_id,
            VehicleState.timestamp_ms,
            VehicleState.sequence,
        ).where(VehicleState.vehicle_id.in_(ids))
    )
    return {row[0]: StoredState(*row[1:]) for row in rows}


_STATE_COLUMNS = (
    "vehicle_id",
    "revision",
    "predictor",
    "offline_session_id",
    "timestamp_ms",
    "speed",
    "battery",
    "power",
    "odometer",
    "heading",
    "sequence",
    "received_at",
)


async def save_states(*, session: AsyncSession, writes: Sequence[StateWrite]) -> None:
    """Move each vehicle's state on by one revision; StaleStateError if one moved meanwhile."""
    if not writes:
        return
    postgres = dialect_of(session) == "postgresql"
    rows = [
        (
            write.vehicle_id,
            write.revision + 1,
            # jsonb[] from text on PostgreSQL; SQLAlchemy's JSON type serializes it elsewhere.
            orjson.dumps(write.predictor).decode() if postgres else write.predictor,
            write.offline_session_id,
            write.last.timestamp_ms,
            write.last.speed,
            write.last.battery,
            write.last.power,
            write.last.odometer,
            write.last.heading,
            write.last.sequence,
            write.last.received_at,
        )
        for write in writes
    ]
    if postgres:
        returned = await _pg_rows(session, _PG_STATE, _columns(rows, len(_STATE_COLUMNS)))
    else:
        returned = list(
            await session.execute(
                _hot(session).state, [dict(zip(_STATE_COLUMNS, row, strict=True)) for row in rows]
            )
        )
    written = {vehicle_id for (vehicle_id,) in returned}
    stale = sorted({write.vehicle_id for write in writes} - written)
    if stale:
        raise StaleStateError(f"state of vehicles {stale} changed since it was read")


# --- compression statistics -----------------------------------------------------------------------

_STATS_COLUMNS = (
    "vehicle_id",
    "day",
    "total_packets",
    "transmitted_fields",
    "skipped_fields",
    "bandwidth_saved_percent",
)


async def add_stats(
    *, session: AsyncSession, increments: Mapping[StatsKey, StatsCounts]
) -> dict[StatsKey, StatsCounts]:
    """Add to each (vehicle, day)'s counts; returns the totals after the addition."""
    if not increments:
        return {}
    rows = [
        (
            key.vehicle_id,
            key.day,
            counts.packets,
            counts.transmitted,
            counts.skipped,
            counts.saved_percent,
        )
        for key, counts in increments.items()
    ]
    if dialect_of(session) == "postgresql":
        returned = await _pg_rows(session, _PG_STATS, _columns(rows, len(_STATS_COLUMNS)))
    else:
        returned = list(
            await session.execute(
                _hot(session).stats, [dict(zip(_STATS_COLUMNS, row, strict=True)) for row in rows]
            )
        )
    return {
        StatsKey(vehicle_id, day): StatsCounts(packets, transmitted, skipped)
        for vehicle_id, day, packets, transmitted, skipped in returned
    }


async def fleet_stats(*, session: AsyncSession, day: date) -> StatsCounts:
    """Every vehicle's counts of one day, added up."""
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(CompressionStats.total_packets), 0),
                func.coalesce(func.sum(CompressionStats.transmitted_fields), 0),
                func.coalesce(func.sum(CompressionStats.skipped_fields), 0),
            ).where(CompressionStats.day == day)
        )
    ).one()
    return StatsCounts(int(row[0]), int(row[1]), int(row[2]))


async def total_records(*, session: AsyncSession) -> int:
    """How many records are stored.

    Read from the daily statistics, which count every stored record in the same transaction:
    a count(*) of `telemetry` reads the whole table on PostgreSQL.
    """
    total = await session.scalar(select(func.coalesce(func.sum(CompressionStats.total_packets), 0)))
    return int(total or 0)


# --- offline sessions -----------------------------------------------------------------------------


async def update_session(*, session: AsyncSession, change: SessionUpdate) -> None:
    values: dict[str, Any] = {
        "records_buffered": OfflineSession.records_buffered + change.buffered,
        "records_uploaded": OfflineSession.records_uploaded + change.uploaded,
    }
    if change.ended_at is not None:
        values |= {"ended_at": change.ended_at, "status": SESSION_SYNCED}
    await session.execute(
        update(OfflineSession).where(OfflineSession.id == change.id).values(values)
    )


async def add_session(*, session: AsyncSession, new: NewSession) -> int:
    """Store a session; returns its id."""
    session_id = await session.scalar(
        dialect_insert(session, SESSIONS)
        .values(
            vehicle_id=new.vehicle_id,
            started_at=new.started_at,
            ended_at=new.ended_at,
            records_buffered=new.buffered,
            records_uploaded=new.uploaded,
            status=SESSION_SYNCING if new.ended_at is None else SESSION_SYNCED,
        )
        .returning(SESSIONS.c.id)
    )
    assert session_id is not None
    return int(session_id)


# --- rejections -----------------------------------------------------------------------------------


async def record_rejection(
    *,
    session: AsyncSession,
    message_id: str,
    vin: str | None,
    code: str,
    reason: str,
    payload: bytes,
    received_at: datetime,
) -> bool:
    """Keep what could not be taken; False if this message was already rejected."""
    stored = await session.scalar(
        _hot(session).rejection,
        {
            "message_id": message_id,
            "vehicle_vin": None if vin is None else vin[:REJECTED_VIN_LENGTH],
            "code": code,
            "reason": reason,
            "payload": payload,
            "received_at": received_at,
        },
    )
    return stored is not None


# --- queries --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as the queries give it back, with its vehicle's VIN."""

    vin: str
    timestamp_ms: int
    speed: float
    battery: float
    power: float
    odometer: float
    heading: float
    received_at: datetime


async def last_records(*, session: AsyncSession, limit: int) -> list[StoredRecord]:
    """The last `limit` records stored, every vehicle, oldest first (in the order they came)."""
    rows = await session.execute(
        select(
            Vehicle.vin,
            TelemetryRecord.timestamp_ms,
            TelemetryRecord.speed,
            TelemetryRecord.battery,
            TelemetryRecord.power,
            TelemetryRecord.odometer,
            TelemetryRecord.heading,
            TelemetryRecord.received_at,
        )
        .join(Vehicle, Vehicle.id == TelemetryRecord.vehicle_id)
        .order_by(TelemetryRecord.id.desc())
        .limit(limit)
    )
    return [StoredRecord(*row) for row in rows][::-1]
