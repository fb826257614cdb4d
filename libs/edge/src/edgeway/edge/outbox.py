"""The logger's outbox: every encoded packet waits in SQLite until the gateway has taken it.

A packet is appended when it is recorded and removed only after the gateway answered 202 for
it, so a crash, a restart or a dead zone loses nothing, and ids (AUTOINCREMENT: never reused)
keep the recording order for the upload. A packet the gateway refuses for good (400) moves to
`rejected`, where it stays for an operator, so the stream behind it can go on.

The encoder's state is kept in the same file and written in the same transaction as the packet
it produced: after a crash the state and the stored packets always agree, so a restarted
logger continues the sequence without a gap or a repeated number.

One file belongs to one vehicle (its VIN is recorded on first use). WAL mode with
`synchronous=FULL`: a commit is on disk before `append` returns (one fsync per packet, every
300 ms, is cheap; a vehicle's "crash" is often a power cut). aiosqlite runs the blocking calls
in its own thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sequence INTEGER,
    timestamp_ms INTEGER NOT NULL,
    compressed INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    sequence INTEGER,
    timestamp_ms INTEGER NOT NULL,
    compressed INTEGER NOT NULL,
    body BLOB NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    rejected_at_ms INTEGER NOT NULL
);
"""

_COLUMNS = "id, sequence, timestamp_ms, compressed, body"


class OutboxError(RuntimeError):
    """The file cannot serve this logger (it belongs to another vehicle)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored packet: `body` is the protobuf the gateway gets (compressed or legacy)."""

    id: int
    sequence: int | None
    timestamp_ms: int
    compressed: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    entry: Entry
    status: int
    reason: str
    rejected_at_ms: int


def _entry(row: Any) -> Entry:
    return Entry(
        id=row[0], sequence=row[1], timestamp_ms=row[2], compressed=bool(row[3]), body=row[4]
    )


class Outbox:
    """Open with `await Outbox.open(path, vin=...)` (or `async with`); close when done."""

    def __init__(self, db: aiosqlite.Connection, *, path: Path, vin: str, pending: int) -> None:
        self._db = db
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._pending = pending
        self.path = path
        self.vin = vin

    @classmethod
    async def open(cls, path: str | Path, *, vin: str) -> Self:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(_SCHEMA)
            async with db.execute("SELECT value FROM meta WHERE key = 'vin'") as cursor:
                row = await cursor.fetchone()
            if row is None:
                await db.execute("INSERT INTO meta (key, value) VALUES ('vin', ?)", (vin,))
            elif row[0] != vin:
                raise OutboxError(f"outbox {path} belongs to vehicle {row[0]}, not {vin}")
            await db.commit()
            async with db.execute("SELECT count(*) FROM outbox") as cursor:
                count = await cursor.fetchone()
        except BaseException:
            await db.close()
            raise
        return cls(db, path=path, vin=vin, pending=count[0] if count else 0)

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            try:
                yield self._db
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()

    @property
    def pending(self) -> int:
        """How many packets wait for the gateway."""
        return self._pending

    async def append(
        self,
        *,
        sequence: int | None,
        timestamp_ms: int,
        body: bytes,
        compressed: bool,
        encoder_state: dict[str, Any] | None = None,
    ) -> Entry:
        """Store one packet and, in the same transaction, the encoder state that produced it."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO outbox (sequence, timestamp_ms, compressed, body) VALUES (?, ?, ?, ?)",
                (sequence, timestamp_ms, int(compressed), body),
            )
            row_id = cursor.lastrowid
            await cursor.close()
            if encoder_state is not None:
                await self._put_state(db, encoder_state)
        assert row_id is not None
        self._pending += 1
        return Entry(
            id=row_id,
            sequence=sequence,
            timestamp_ms=timestamp_ms,
            compressed=compressed,
            body=body,
        )

    async def peek(self, limit: int) -> list[Entry]:
        """The oldest `limit` packets still waiting, oldest first."""
        async with (
            self._lock,
            self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox ORDER BY id LIMIT ?",  # noqa: S608 (constant)
                (limit,),
            ) as cursor,
        ):
            return [_entry(row) for row in await cursor.fetchall()]

    async def remove(self, entries: Sequence[Entry]) -> None:
        """Forget packets the gateway has accepted."""
        async with self._transaction() as db:
            cursor = await db.executemany(
                "DELETE FROM outbox WHERE id = ?", [(entry.id,) for entry in entries]
            )
            removed = cursor.rowcount
            await cursor.close()
        self._pending -= removed

    async def reject(self, entry: Entry, *, status: int, reason: str) -> None:
        """Move a packet the gateway refused for good out of the way of the ones behind it."""
        async with self._transaction() as db:
            await db.execute(
                f"INSERT OR REPLACE INTO rejected ({_COLUMNS}, status, reason, rejected_at_ms)"  # noqa: S608
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.sequence,
                    entry.timestamp_ms,
                    int(entry.compressed),
                    entry.body,
                    status,
                    reason,
                    int(time.time() * 1_000),
                ),
            )
            cursor = await db.execute("DELETE FROM outbox WHERE id = ?", (entry.id,))
            removed = cursor.rowcount
            await cursor.close()
        self._pending -= removed

    async def rejected(self) -> list[Rejected]:
        """Every packet moved aside, in recording order."""
        async with (
            self._lock,
            self._db.execute(
                f"SELECT {_COLUMNS}, status, reason, rejected_at_ms FROM rejected ORDER BY id"  # noqa: S608
            ) as cursor,
        ):
            return [
                Rejected(entry=_entry(row), status=row[5], reason=row[6], rejected_at_ms=row[7])
                for row in await cursor.fetchall()
            ]

    async def load_state(self) -> dict[str, Any] | None:
        """The encoder state saved with the last packet, or None (never saved, or cleared)."""
        async with (
            self._lock,
            self._db.execute("SELECT value FROM meta WHERE key = 'encoder_state'") as cursor,
        ):
            row = await cursor.fetchone()
        if row is None:
            return None
        state: dict[str, Any] = json.loads(row[0])
        return state

    async def clear_state(self) -> None:
        """Forget the encoder state: the next packet starts a fresh stream (a resync)."""
        async with self._transaction() as db:
            await db.execute("DELETE FROM meta WHERE key = 'encoder_state'")

    @staticmethod
    async def _put_state(db: aiosqlite.Connection, state: dict[str, Any]) -> None:
        await db.execute(
            "INSERT INTO meta (key, value) VALUES ('encoder_state', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (json.dumps(state),),
        )
