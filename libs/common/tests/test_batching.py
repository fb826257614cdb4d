"""Group commit: concurrent submitters share flushes, in order, and a bad item fails alone.
Batch messages: what is packed comes back item for item, and a malformed one is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
import pytest

from edgeway.common.batching import (
    BATCH_HEADER,
    BATCH_LENGTHS,
    BATCH_MESSAGE_IDS,
    GroupCommit,
    batch_size,
    join_lines,
    pack_work,
    split_lines,
    unpack_work,
)
from edgeway.common.envelope import Envelope


class Flusher:
    def __init__(self, *, poison: set[int] | None = None, outage: bool = False) -> None:
        self.groups: list[list[int]] = []
        self.poison = poison or set()
        self.outage = outage

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.groups.append(list(items))
        await asyncio.sleep(0.01)  # a commit takes time; more submitters pile up meanwhile
        if self.outage:
            raise ConnectionError("database down")
        if self.poison & set(items):
            raise ValueError("bad item")
        return [item * 10 for item in items]


async def test_concurrent_submissions_share_commits_in_order() -> None:
    flusher = Flusher()
    batcher: GroupCommit[int, int] = GroupCommit(flusher, max_size=50)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(120)))
    assert results == [i * 10 for i in range(120)]
    assert [i for group in flusher.groups for i in group] == list(range(120))
    assert len(flusher.groups) < 10  # grouped, not one commit per item
    assert max(len(group) for group in flusher.groups) <= 50


async def test_a_bad_item_fails_alone() -> None:
    batcher: GroupCommit[int, int] = GroupCommit(Flusher(poison={7}))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)), return_exceptions=True)
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [i * 10 for i in range(10) if i != 7]


async def test_an_outage_fails_the_group_without_retrying_each_item() -> None:
    flusher = Flusher(outage=True)
    batcher: GroupCommit[int, int] = GroupCommit(
        flusher, isolate=lambda exc: not isinstance(exc, ConnectionError)
    )
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert len(flusher.groups) <= 2
    with pytest.raises(ConnectionError):
        await batcher.submit(99)


async def test_items_submitted_together_stay_together_in_order() -> None:
    flusher = Flusher(poison={12})
    batcher: GroupCommit[int, int] = GroupCommit(flusher)
    first = asyncio.create_task(batcher.submit_all([0, 1, 2]))
    single = asyncio.create_task(batcher.submit(3))
    assert await first == [0, 10, 20]
    assert await single == 30
    assert [i for group in flusher.groups for i in group] == [0, 1, 2, 3]
    # One bad item: the others are still committed, then its failure is raised.
    with pytest.raises(ValueError, match="bad item"):
        await batcher.submit_all([11, 12, 13])
    assert [11] in flusher.groups
    assert [13] in flusher.groups


async def trickle(batcher: GroupCommit[int, int], count: int) -> list[int]:
    """`count` submissions, one every 2 ms."""

    async def one(item: int) -> int:
        await asyncio.sleep(item * 0.002)
        return await batcher.submit(item)

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_a_lingering_flusher_gathers_items_that_trickle_in() -> None:
    lingering = Flusher()
    results = await trickle(GroupCommit(lingering, max_size=50, linger=0.05), 20)
    assert results == [i * 10 for i in range(20)]
    assert lingering.groups == [list(range(20))]
    eager = Flusher()
    await trickle(GroupCommit(eager, max_size=50), 20)
    assert len(eager.groups) > 1  # without linger: a commit per item or two


def test_a_broadcast_batch_splits_into_its_messages_in_order() -> None:
    bodies = [b'{"n":1}', b'{"text":"two\\nlines"}', b"[3]"]
    joined = join_lines(bodies)
    assert split_lines(joined.decode(), 3) == [body.decode() for body in bodies]
    with pytest.raises(ValueError, match="says 2 messages and holds 3"):
        split_lines(joined.decode(), 2)
    with pytest.raises(ValueError, match="raw newline"):
        join_lines([b'{\n"pretty": true}'])


@pytest.mark.parametrize(
    ("headers", "count"),
    [(None, 1), ({}, 1), ({BATCH_HEADER: 5}, 5), ({BATCH_HEADER: b"2"}, 2)],
)
def test_batch_size_reads_the_header(headers: dict[str, object] | None, count: int) -> None:
    assert batch_size(headers) == count


@pytest.mark.parametrize("value", [0, -1, "many", [1, 2]])
def test_batch_size_refuses_what_is_not_a_count(value: object) -> None:
    with pytest.raises(ValueError, match=BATCH_HEADER):
        batch_size({BATCH_HEADER: value})


def work_items() -> list[tuple[bytes, Envelope]]:
    return [
        (b'{"camera": "A",\n "timestamp": 1}', Envelope(type="t", producer="p", captured_at=1.0)),
        (b'{"camera":"B","n":[1,2]}', Envelope(type="t", producer="p", received_at=5.25)),
        (b' {"camera":"C"} ', Envelope(type="t", producer="p", captured_at=3.5)),
    ]


def test_a_work_batch_keeps_each_body_byte_for_byte_and_its_own_envelope() -> None:
    items = work_items()
    body, headers = pack_work(items)
    assert orjson.loads(body) == [
        {"camera": "A", "timestamp": 1},
        {"camera": "B", "n": [1, 2]},
        {"camera": "C"},
    ]
    shared = Envelope(type="t", producer="gw", reply_channel="gateway.g.c", traceparent="00-x")
    unpacked = unpack_work(body, headers, shared)
    assert [item for item, _ in unpacked] == [item for item, _ in items]
    for (_, envelope), (_, sent) in zip(unpacked, items, strict=True):
        assert (envelope.message_id, envelope.captured_at, envelope.received_at) == (
            sent.message_id,
            sent.captured_at,
            pytest.approx(sent.received_at, abs=1e-6),
        )
        assert (envelope.producer, envelope.reply_channel, envelope.traceparent) == (
            "gw",
            "gateway.g.c",
            "00-x",
        )


@pytest.mark.parametrize(
    "damage",
    [
        lambda body, headers: (body[:-1], headers),  # cut short
        lambda body, headers: (body + b" ", headers),  # trailing bytes
        lambda body, headers: (body, {**headers, BATCH_HEADER: 2}),  # lists of 3, count 2
        lambda body, headers: (body, {**headers, BATCH_LENGTHS: "1,2,3"}),  # wrong lengths
        lambda body, headers: (body, {**headers, BATCH_MESSAGE_IDS: ",,"}),  # no ids
        lambda body, headers: (body, {k: v for k, v in headers.items() if k != BATCH_LENGTHS}),
    ],
)
def test_a_malformed_work_batch_is_refused(damage: object) -> None:
    body, headers = pack_work(work_items())
    body, headers = damage(body, headers)  # type: ignore[operator]
    with pytest.raises(ValueError, match="batch"):
        unpack_work(body, headers, Envelope(type="t", producer="gw"))
