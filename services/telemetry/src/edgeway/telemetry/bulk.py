"""A group's bulk writes: its records, each vehicle's state and the day's statistics.

Records are idempotent on (vehicle, timestamp): a replayed or redelivered record is never
stored twice. On PostgreSQL a group's records go in with COPY (`record_sink`), or for small
groups one `INSERT ... SELECT FROM json_to_recordset` with the rows as one JSON text, as do the
state and statistics upserts; on SQLite multi-row `INSERT ... ON CONFLICT ... RETURNING`. Each
record write answers the same question: which of these rows are new.

Every column list and PostgreSQL type here is read from the tables (`edgeway.telemetry.tables`).
Functions take the session as a keyword and never open or commit a transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any, NamedTuple

import orjson
import psycopg
import psycopg.errors
from psycopg import AsyncCopy
from sqlalchemy import Column, Double, Table, cast, func
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from edgeway.common.db import Insert, dialect_of, per_dialect
from edgeway.telemetry.domain import StatsCounts
from edgeway.telemetry.tables import RECORD_COLUMNS, STATE, STATS, TELEMETRY, RecordRow


def pg_type(column: Column[Any]) -> str:
    """The PostgreSQL type of a column, by the name psycopg knows it (`int4`, `timestamptz`)."""
    compiled = column.type.compile(dialect=postgresql.dialect()).lower()  # type: ignore[no-untyped-call]
    return psycopg.adapters.types[compiled].name


def _names(columns: Iterable[Column[Any]]) -> str:
    return ", ".join(column.name for column in columns)


def _recordset(columns: Iterable[Column[Any]], *more_fields: str) -> str:
    """The rows of the one JSON parameter (an array of objects) as `incoming`: a field per
    column, of the column's type, then `more_fields` ("name type")."""
    fields = [*(f"{column.name} {pg_type(column)}" for column in columns), *more_fields]
    return f"json_to_recordset(%s::json) AS incoming ({', '.join(fields)})"


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


# The state columns a write sets (`updated_at` is the server's) and the statistics' (not `id`).
_STATE_COLUMNS = tuple(column for column in STATE.c if column.name != "updated_at")
_STATS_COLUMNS = tuple(column for column in STATS.c if column.name != "id")
_STATS_TOTALS = ("total_packets", "transmitted_fields", "skipped_fields")

# --- PostgreSQL: COPY and json_to_recordset -----------------------------------------------------

RECORD_NAMES = _names(RECORD_COLUMNS)
# The types of the COPY columns, RecordRow's; the temporary table puts an ordinal before them.
COPY_TYPES = tuple(pg_type(column) for column in RECORD_COLUMNS)
# The common case: every row is new, and COPY writes them straight into the table.
COPY_RECORDS = f"COPY {TELEMETRY.name} ({RECORD_NAMES}) FROM STDIN (FORMAT BINARY)"
# The COPY target when some rows may be stored: one per connection, emptied at every commit
# (and gone on rollback); `ord` keeps the order they came in.
_INCOMING = f"{TELEMETRY.name}_incoming"
_CREATE_INCOMING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_INCOMING} (ord int4, "
    + ", ".join(f"{column.name} {pg_type(column)}" for column in RECORD_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_COPY_INCOMING = f"COPY {_INCOMING} (ord, {RECORD_NAMES}) FROM STDIN (FORMAT BINARY)"


def _insert_records_from(source: str) -> str:
    """INSERT the records of `source` (RecordRow's columns and `ord`) in `ord` order, skipping
    those stored already; the keys of the rows it inserted."""
    return f"""
INSERT INTO {TELEMETRY.name} ({RECORD_NAMES})
SELECT {RECORD_NAMES} FROM {source} ORDER BY ord
ON CONFLICT (vehicle_id, timestamp_ms) DO NOTHING
RETURNING vehicle_id, timestamp_ms
"""  # noqa: S608 - built at import from the table definitions, never from input


_INSERT_INCOMING = _insert_records_from(_INCOMING)

# The `json_to_recordset` statements take the rows as one JSON array of objects: their text never
# changes with the group's size, so psycopg converts it once and the server prepares it once.
# SQLAlchemy's multi-row VALUES is new text for every group size, which psycopg parses anew each
# time (it caches no query of over 50 parameters): that was a sixth of the service's CPU. One JSON
# text built by orjson costs the service less than the array per column these statements took
# before, which psycopg dumped element by element in Python (ListDumper, 7.6 % of the service's
# CPU on single-record uploads): 102 vs 163 µs of CPU for an INSERT of one record, 190 vs 570 µs
# for 32, 95 vs 178 µs for one state (measured side by side against a local PostgreSQL).
#
# JSON null is SQL NULL; datetimes go as RFC 3339 with their offset, floats as the shortest text
# that reads back as the same float8. JSON has no NaN or infinity (orjson writes null): no value
# here can be one, as the wire refuses them and the decoder only averages finite values.
# `WITH ORDINALITY` does not combine with a column definition list, so records carry their
# place in the group as `ord`.
_PG_RECORDS = _insert_records_from(_recordset(RECORD_COLUMNS, "ord int4"))
_PG_STATE = f"""
INSERT INTO {STATE.name} AS state ({_names(_STATE_COLUMNS)})
SELECT * FROM {_recordset(_STATE_COLUMNS)}
ON CONFLICT (vehicle_id) DO UPDATE SET
    {", ".join(f"{c.name} = excluded.{c.name}" for c in _STATE_COLUMNS if not c.primary_key)},
    updated_at = now()
WHERE state.revision = excluded.revision - 1
RETURNING vehicle_id
"""  # noqa: S608 - built at import from the table definitions, never from input
_PG_STATS = f"""
INSERT INTO {STATS.name} AS stats ({_names(_STATS_COLUMNS)})
SELECT * FROM {_recordset(_STATS_COLUMNS)}
ON CONFLICT (vehicle_id, day) DO UPDATE SET
    total_packets = stats.total_packets + excluded.total_packets,
    transmitted_fields = stats.transmitted_fields + excluded.transmitted_fields,
    skipped_fields = stats.skipped_fields + excluded.skipped_fields,
    bandwidth_saved_percent = (stats.skipped_fields + excluded.skipped_fields)::float8 * 100
        / (stats.transmitted_fields + excluded.transmitted_fields
           + stats.skipped_fields + excluded.skipped_fields)
RETURNING vehicle_id, day, {", ".join(_STATS_TOTALS)}
"""  # noqa: S608 - built at import from the table definitions, never from input


async def _driver(session: AsyncSession) -> Any:
    """The psycopg connection under the session, in the session's transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


async def _pg_rows(session: AsyncSession, sql: str, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Run one of the `json_to_recordset` statements on `rows` (a JSON object each, a field per
    column); the rows it returned."""
    async with (await _driver(session)).cursor() as cursor:
        await cursor.execute(sql, (orjson.dumps(rows).decode(),))
        return list(await cursor.fetchall())


# --- SQLite: multi-row INSERT, built once --------------------------------------------------------


class _Statements:
    """The group's statements where there is no `json_to_recordset`, built once per dialect and
    run with parameters."""

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
                    for column in _STATE_COLUMNS
                    if not column.primary_key
                },
                "updated_at": func.now(),
            },
            # Compare and set: only on top of the revision this writer read.
            where=STATE.c.revision == state.excluded.revision - 1,
        ).returning(STATE.c.vehicle_id)
        stats = insert(STATS)
        totals = {name: STATS.c[name] + stats.excluded[name] for name in _STATS_TOTALS}
        fields = totals["transmitted_fields"] + totals["skipped_fields"]
        self.stats = stats.on_conflict_do_update(
            index_elements=["vehicle_id", "day"],
            set_={
                **totals,
                "bandwidth_saved_percent": cast(totals["skipped_fields"], Double) * 100 / fields,
            },
        ).returning(STATS.c.vehicle_id, STATS.c.day, *(STATS.c[name] for name in _STATS_TOTALS))


_statements = per_dialect(_Statements)


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
            async with cursor.copy(COPY_RECORDS) as copy:
                copy.set_types(COPY_TYPES)
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
            copy.set_types(("int4", *COPY_TYPES))
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
    """One INSERT ... ON CONFLICT DO NOTHING RETURNING: of JSON on PostgreSQL (`_PG_RECORDS`),
    multi-row VALUES elsewhere."""
    if not rows:
        return []
    if dialect_of(session) == "postgresql":
        returned = await _pg_rows(
            session,
            _PG_RECORDS,
            [
                dict(zip(RecordRow._fields, row, strict=True), ord=place)
                for place, row in enumerate(rows)
            ],
        )
    else:
        returned = list(
            await session.execute(_statements(session).records, [row._asdict() for row in rows])
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


# --- state ----------------------------------------------------------------------------------------


async def save_states(*, session: AsyncSession, writes: Sequence[StateWrite]) -> None:
    """Move each vehicle's state on by one revision; StaleStateError if one moved meanwhile."""
    if not writes:
        return
    rows = [
        {
            "vehicle_id": write.vehicle_id,
            "revision": write.revision + 1,
            # jsonb from the nested object on PostgreSQL; SQLAlchemy's JSON type elsewhere.
            "predictor": write.predictor,
            "offline_session_id": write.offline_session_id,
            "timestamp_ms": write.last.timestamp_ms,
            "speed": write.last.speed,
            "battery": write.last.battery,
            "power": write.last.power,
            "odometer": write.last.odometer,
            "heading": write.last.heading,
            "sequence": write.last.sequence,
            "received_at": write.last.received_at,
        }
        for write in writes
    ]
    if dialect_of(session) == "postgresql":
        returned = await _pg_rows(session, _PG_STATE, rows)
    else:
        returned = list(await session.execute(_statements(session).state, rows))
    written = {vehicle_id for (vehicle_id,) in returned}
    stale = sorted({write.vehicle_id for write in writes} - written)
    if stale:
        raise StaleStateError(f"state of vehicles {stale} changed since it was read")


# --- compression statistics -----------------------------------------------------------------------


async def add_stats(
    *, session: AsyncSession, increments: Mapping[StatsKey, StatsCounts]
) -> dict[StatsKey, StatsCounts]:
    """Add to each (vehicle, day)'s counts; returns the totals after the addition."""
    if not increments:
        return {}
    rows = [
        {
            "vehicle_id": key.vehicle_id,
            "day": key.day,
            "total_packets": counts.packets,
            "transmitted_fields": counts.transmitted,
            "skipped_fields": counts.skipped,
            "bandwidth_saved_percent": counts.saved_percent,
        }
        for key, counts in increments.items()
    ]
    if dialect_of(session) == "postgresql":
        returned = await _pg_rows(session, _PG_STATS, rows)
    else:
        returned = list(await session.execute(_statements(session).stats, rows))
    return {
        StatsKey(vehicle_id, day): StatsCounts(packets, transmitted, skipped)
        for vehicle_id, day, packets, transmitted, skipped in returned
    }
