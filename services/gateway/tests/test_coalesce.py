"""`Coalesced`: callers of the same turn share a request; none joins one already in flight."""

from __future__ import annotations

import asyncio

import pytest

from edgeway.gateway.coalesce import Coalesced


class Service:
    """Answers each request with its number, once `release` is set."""

    def __init__(self) -> None:
        self.asked = 0
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def fetch(self) -> int:
        self.asked += 1
        number = self.asked
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return number


async def test_callers_of_one_turn_share_one_request() -> None:
    service = Service()
    shared = Coalesced(service.fetch)
    answers = await asyncio.gather(*(shared() for _ in range(500)))
    assert answers == [1] * 500
    assert service.asked == shared.sent == 1


async def test_a_caller_never_joins_a_request_already_sent() -> None:
    service = Service()
    service.release.clear()
    shared = Coalesced(service.fetch)
    first = [asyncio.create_task(shared()) for _ in range(3)]
    await asyncio.sleep(0)  # the first request is sent
    await asyncio.sleep(0)
    assert service.asked == 1
    later = [asyncio.create_task(shared()) for _ in range(3)]
    await asyncio.sleep(0)
    assert service.asked == 1  # gathered, waiting for the first answer
    service.release.set()
    assert await asyncio.gather(*first) == [1, 1, 1]
    # The later callers got a request sent after they asked, one for all three.
    assert await asyncio.gather(*later) == [2, 2, 2]
    assert service.asked == 2


async def test_a_failure_reaches_every_caller_and_the_next_request_is_fresh() -> None:
    service = Service()
    service.fail = RuntimeError("occupancy is down")
    shared = Coalesced(service.fetch)
    results = await asyncio.gather(*(shared() for _ in range(4)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "occupancy is down" for r in results)
    service.fail = None
    assert await shared() == 2


async def test_a_caller_that_leaves_does_not_cancel_the_others() -> None:
    service = Service()
    service.release.clear()
    shared = Coalesced(service.fetch)
    leaving = asyncio.create_task(shared())
    staying = asyncio.create_task(shared())
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    service.release.set()
    assert await staying == 1
