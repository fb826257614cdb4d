"""The outbox on a real SQLite file: order, removal, rejection, reopening, encoder state."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgeway.edge.outbox import Outbox, OutboxError

VIN = "5YJ3E1EA1KF000001"


async def fill(outbox: Outbox, sequences: range) -> None:
    for sequence in sequences:
        await outbox.append(
            sequence=sequence,
            timestamp_ms=1_000 * sequence,
            body=f"packet {sequence}".encode(),
            compressed=True,
            encoder_state={"last_sequence": sequence},
        )


async def test_packets_come_back_in_recording_order_until_removed(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "outbox.db", vin=VIN) as outbox:
        await fill(outbox, range(1, 11))
        assert outbox.pending == 10
        first = await outbox.peek(4)
        assert [entry.sequence for entry in first] == [1, 2, 3, 4]
        assert [entry.body for entry in first] == [f"packet {n}".encode() for n in (1, 2, 3, 4)]
        # Peeking takes nothing away.
        assert [entry.sequence for entry in await outbox.peek(2)] == [1, 2]
        await outbox.remove(first)
        assert outbox.pending == 6
        # Later packets keep their place behind older ones, even when sequences restart.
        await fill(outbox, range(1, 3))
        rest = await outbox.peek(100)
        assert [entry.sequence for entry in rest] == [5, 6, 7, 8, 9, 10, 1, 2]
        assert [entry.id for entry in rest] == sorted(entry.id for entry in rest)


async def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path, vin=VIN)
    await fill(outbox, range(1, 6))
    await outbox.remove(await outbox.peek(2))
    await outbox.reject((await outbox.peek(1))[0], status=400, reason="speed out of range")
    await outbox.close()

    async with await Outbox.open(path, vin=VIN) as reopened:
        assert reopened.pending == 2
        assert [entry.sequence for entry in await reopened.peek(10)] == [4, 5]
        assert await reopened.load_state() == {"last_sequence": 5}
        [rejected] = await reopened.rejected()
        assert (rejected.entry.sequence, rejected.status, rejected.reason) == (
            3,
            400,
            "speed out of range",
        )
        assert rejected.entry.body == b"packet 3"
        # New packets go behind the ones from before the restart.
        await fill(reopened, range(6, 8))
        assert [entry.sequence for entry in await reopened.peek(10)] == [4, 5, 6, 7]


async def test_a_rejected_packet_leaves_the_queue_and_the_rest_keeps_its_order(
    tmp_path: Path,
) -> None:
    async with await Outbox.open(tmp_path / "outbox.db", vin=VIN) as outbox:
        await fill(outbox, range(1, 6))
        middle = (await outbox.peek(3))[2]
        await outbox.reject(middle, status=400, reason="bad")
        assert outbox.pending == 4
        assert [entry.sequence for entry in await outbox.peek(10)] == [1, 2, 4, 5]
        assert [r.entry.sequence for r in await outbox.rejected()] == [3]


async def test_state_is_cleared_and_absent_on_a_new_file(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path / "outbox.db", vin=VIN) as outbox:
        assert await outbox.load_state() is None
        await fill(outbox, range(1, 3))
        assert await outbox.load_state() == {"last_sequence": 2}
        await outbox.clear_state()
        assert await outbox.load_state() is None
        # Clearing the state keeps the packets nobody has yet.
        assert outbox.pending == 2
        # A legacy packet carries no state and leaves the stored one alone.
        await outbox.append(sequence=None, timestamp_ms=5, body=b"legacy", compressed=False)
        assert await outbox.load_state() is None
        last = (await outbox.peek(10))[-1]
        assert (last.sequence, last.compressed, last.body) == (None, False, b"legacy")


async def test_a_file_serves_one_vehicle(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await Outbox.open(path, vin=VIN):
        pass
    with pytest.raises(OutboxError, match=VIN):
        await Outbox.open(path, vin="5YJ3E1EA1KF000002")


async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with await Outbox.open(path, vin=VIN) as outbox:
        await fill(outbox, range(1, 2))
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            # A second reader sees what was committed: append returns after the commit.
            assert other.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
