"""The telemetry database's queries and small writes: vehicles, the state a decoder resumes
from, stored record times, statistics, offline sessions, rejections and the history.

Functions take the session as a keyword and never open or commit a transaction: the handler
does, so one group of uploads is one transaction. A group's bulk writes (records, states,
statistics) are `edgeway.telemetry.bulk`'s; the tables are `edgeway.telemetry.tables`'.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from edgeway.common.db import dialect_insert
from edgeway.common.directory import CachedDirectory
from edgeway.common.rejections import RejectionTable
from edgeway.telemetry.domain import NewSession, SessionUpdate, StatsCounts
from edgeway.telemetry.tables import (
    REJECTED_VIN_LENGTH,
    SESSION_SYNCED,
    SESSION_SYNCING,
    SESSIONS,
    TELEMETRY,
    VEHICLES,
    CompressionStats,
    OfflineSession,
    RejectedUpload,
    Vehicle,
    VehicleState,
)

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


# VIN -> id of the active vehicles, each entry trusted for `ttl` seconds
# (`EDGEWAY_TELEMETRY_VEHICLE_CACHE_S`, 5 by default).
#
# Several replicas answer the gateway's requests (registrations and retirements among them)
# while one consumes the uploads, and an operator may change `vehicles` by hand, so this
# replica's copy cannot be told of every change: an entry older than `ttl` is read again (one
# indexed SELECT per vehicle and `ttl`, in the group's transaction), so a retirement made
# anywhere stops this replica taking the vehicle's uploads within `ttl` seconds plus the group
# in hand. A miss is always looked up, so a vehicle registered anywhere is taken at once; a
# retirement answered by this replica is forgotten at once (`forget`).
VehicleIdCache = CachedDirectory[str, int]


async def find_vehicle(session: AsyncSession, vin: str) -> int | None:
    """The vehicle's id if it is active, None if it is unknown or retired."""
    found: int | None = await session.scalar(
        select(Vehicle.id).where(Vehicle.vin == vin, Vehicle.retired_at.is_(None))
    )
    return found


def vehicle_id_cache(
    known: Mapping[str, int] | None = None,
    *,
    ttl: float,
    clock: Callable[[], float] = time.monotonic,
) -> VehicleIdCache:
    return CachedDirectory(find_vehicle, known, ttl=ttl, clock=clock)


# --- what a decoder resumes from ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredState:
    """A vehicle's state row as read: what its decoder resumes from."""

    revision: int
    predictor: dict[str, Any]
    offline_session_id: int | None
    timestamp_ms: int  # of the last record
    sequence: int | None


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
                select(TELEMETRY.c.timestamp_ms).where(
                    TELEMETRY.c.vehicle_id == vehicle_id,
                    TELEMETRY.c.timestamp_ms.in_(wanted[start : start + _IN_CHUNK]),
                )
            )
        )
    return found


# --- compression statistics -----------------------------------------------------------------------


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
            arrived_at=new.arrived_at,
            status=SESSION_SYNCING if new.ended_at is None else SESSION_SYNCED,
        )
        .returning(SESSIONS.c.id)
    )
    assert session_id is not None
    return int(session_id)


async def vehicle_id_of(*, session: AsyncSession, vin: str) -> int | None:
    """The id of the vehicle registered as `vin`, active or retired (its sessions stay)."""
    found: int | None = await session.scalar(select(Vehicle.id).where(Vehicle.vin == vin))
    return found


@dataclass(frozen=True, slots=True)
class StoredSession:
    """An offline session as the `offline_sessions` query gives it back."""

    id: int
    started_at: datetime  # record time of its first late record
    ended_at: datetime | None  # record time of the live record that ended it; None while open
    arrived_at: datetime | None  # when its first late record reached the gateway
    records_buffered: int
    records_uploaded: int
    status: str  # SESSION_SYNCING or SESSION_SYNCED


async def offline_sessions(
    *,
    session: AsyncSession,
    vehicle_id: int,
    limit: int,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[StoredSession]:
    """A vehicle's last `limit` offline sessions, newest (by start) first; with `since` or
    `until`, only those that overlap that span of record time: started before `until`, and
    still open or ended at or after `since`. Read along `ix_offline_sessions_vehicle_started`."""
    query = select(
        SESSIONS.c.id,
        SESSIONS.c.started_at,
        SESSIONS.c.ended_at,
        SESSIONS.c.arrived_at,
        SESSIONS.c.records_buffered,
        SESSIONS.c.records_uploaded,
        SESSIONS.c.status,
    ).where(SESSIONS.c.vehicle_id == vehicle_id)
    if until is not None:
        query = query.where(SESSIONS.c.started_at < until)
    if since is not None:
        query = query.where(or_(SESSIONS.c.ended_at.is_(None), SESSIONS.c.ended_at >= since))
    rows = await session.execute(
        query.order_by(SESSIONS.c.started_at.desc(), SESSIONS.c.id.desc()).limit(limit)
    )
    return [StoredSession(*row) for row in rows]


# --- rejections -----------------------------------------------------------------------------------

_REJECTIONS = RejectionTable(RejectedUpload)


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
    return await _REJECTIONS.add(
        session=session,
        message_id=message_id,
        code=code,
        reason=reason,
        payload=payload,
        received_at=received_at,
        vehicle_vin=None if vin is None else vin[:REJECTED_VIN_LENGTH],
    )


# --- history --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """A stored record as the history and status queries give it back, with its vehicle's VIN."""

    vin: str
    timestamp_ms: int
    speed: float
    battery: float
    power: float
    odometer: float
    heading: float
    received_at: datetime


async def last_records(*, session: AsyncSession, limit: int) -> list[HistoryRecord]:
    """The last `limit` records stored, every vehicle, oldest first (in the order they came)."""
    rows = await session.execute(
        select(
            Vehicle.vin,
            TELEMETRY.c.timestamp_ms,
            TELEMETRY.c.speed,
            TELEMETRY.c.battery,
            TELEMETRY.c.power,
            TELEMETRY.c.odometer,
            TELEMETRY.c.heading,
            TELEMETRY.c.received_at,
        )
        .join(Vehicle, Vehicle.id == TELEMETRY.c.vehicle_id)
        .order_by(TELEMETRY.c.id.desc())
        .limit(limit)
    )
    return [HistoryRecord(*row) for row in rows][::-1]
