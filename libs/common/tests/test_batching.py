"""Group commit: concurrent submitters share flushes, in order, and a bad item fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from edgeway.common.batching import GroupCommit


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
