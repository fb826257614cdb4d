"""The telemetry database's tables: vehicles, every reconstructed record, predictor state, daily
compression statistics, offline sessions and rejections (ORM models, and Core tables for the
statements built once).

A record's columns are written out once, in `RecordRow`: the `telemetry` table, the COPY and
`json_to_recordset` statements (`edgeway.telemetry.bulk`) and the benchmarks are built from it.
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, NamedTuple, get_args, get_type_hints

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
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
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from edgeway.common.db import BigId, JSONDocument, Migrations, UTCDateTime, table_of
from edgeway.common.rejections import RejectionColumns

MIGRATIONS = Migrations(
    Path(__file__).with_name("migrations"), version_table="alembic_version_telemetry"
)

VIN_LENGTH = 17
# A rejected upload keeps the VIN header it came with, cut to this length (it may be anything).
REJECTED_VIN_LENGTH = 64

# offline_sessions.status: replaying (records still arrive late), or a live record came after.
SESSION_SYNCING = "syncing"
SESSION_SYNCED = "synced"


class RecordRow(NamedTuple):
    """One reconstructed record to store: what the vehicle measured, as far as the decoder knows.

    The `telemetry` table's columns after its id, in order, each with its SQL type: the one
    list of them (`RECORD_COLUMNS`).
    """

    # A vehicles.id, without a foreign key: checking one per row was most of what a COPY costs
    # the server (migration 0002). Only this service writes here, with ids from `vehicles`.
    vehicle_id: Annotated[int, Integer]
    timestamp_ms: Annotated[int, BigInteger]  # the logger's record time
    speed: Annotated[float, Double]
    battery: Annotated[float, Double]
    power: Annotated[float, Double]
    odometer: Annotated[float, Double]
    heading: Annotated[float, Double]
    # Bit i set: FIELDS[i] was not sent but predicted (speed 1, battery 2, power 4, heading 8).
    reconstructed: Annotated[int, SmallInteger]
    # Decoded after a sequence gap and before the next resync: the prediction may have drifted.
    uncertain: Annotated[bool, Boolean]
    sequence: Annotated[int | None, BigInteger]
    predictor_version: Annotated[int | None, Integer]
    compressed: Annotated[bool, Boolean]
    received_at: Annotated[datetime, UTCDateTime]  # at the gateway


def _record_columns() -> tuple[Column[Any], ...]:
    """`RecordRow`'s fields as table columns: the SQL type each names, NULL where it may be None."""
    hints = get_type_hints(RecordRow, include_extras=True)
    columns = []
    for name in RecordRow._fields:
        python_type, sql_type = get_args(hints[name])
        type_ = sql_type if isinstance(sql_type, TypeEngine) else sql_type()
        columns.append(Column(name, type_, nullable=type(None) in get_args(python_type)))
    return tuple(columns)


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
    """One reconstructed record (`RecordRow`), with the id that keeps the order they came in."""

    __table__ = Table(
        "telemetry",
        Base.metadata,
        Column("id", BigId, primary_key=True),
        *_record_columns(),
        UniqueConstraint("vehicle_id", "timestamp_ms"),
    )


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
    # When the first late record reached the gateway: the logger was back and replaying. Null
    # only for a session from before migration 0004 whose first record could not be found.
    arrived_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # What the logger numbered in the session (stored + missing per sequence gaps).
    records_buffered: Mapped[int] = mapped_column(BigInteger)
    records_uploaded: Mapped[int] = mapped_column(BigInteger)  # stored
    status: Mapped[str] = mapped_column(String(16))


class RejectedUpload(RejectionColumns, Base):
    """An upload that could not be taken, kept with its bytes so nothing a logger sent is lost."""

    __tablename__ = "rejections"

    vehicle_vin: Mapped[str | None] = mapped_column(String(REJECTED_VIN_LENGTH))
    payload: Mapped[bytes] = mapped_column(LargeBinary)


VEHICLES = table_of(Vehicle)
TELEMETRY = table_of(TelemetryRecord)
STATE = table_of(VehicleState)
STATS = table_of(CompressionStats)
SESSIONS = table_of(OfflineSession)
# `telemetry`'s columns after its id: RecordRow's fields, in its order.
RECORD_COLUMNS: tuple[Column[Any], ...] = tuple(TELEMETRY.c[name] for name in RecordRow._fields)
