"""Group commit: many concurrent handlers, one database transaction.

FastStream on aio-pika handles each delivery in its own task (up to the prefetch). Committing
each message alone makes the database's WAL flush the limit (measured here: ~8 ms per commit,
so ~120 messages/s whatever the CPU). A `GroupCommit` lets those handlers hand their work to
one flusher, which takes everything waiting (up to `max_size`) into one transaction while the
previous one commits. Every handler still learns its own outcome only after its commit, so it
acks only what is durable. Items are flushed in the order they were submitted.

At a steady, moderate rate each flush finds only the item or two that came during the last one,
and every commit costs its fixed statements again. `linger` makes the flusher wait that long
before it takes a group that is not full yet: fewer, larger commits for that much more latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int = 128,
        isolate: Callable[[Exception], bool] = lambda _: True,
        linger: float = 0.0,
    ) -> None:
        """`isolate(exc)`: whether a failed group is retried item by item to find the bad one
        (false for outages, where every item would fail again). `linger`: seconds to wait for
        more items before flushing a group smaller than `max_size`."""
        self._flush = flush
        self._max_size = max_size
        self._linger = linger
        self._isolate = isolate
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Wait until `item` is committed (with whatever else was waiting) and return its result."""
        (future,) = self._enqueue([item])
        return await future

    async def submit_all(self, items: Sequence[T]) -> list[R]:
        """`submit` for several items, queued together in this order; their results in order.

        Every item is settled before this returns; if any failed, the first failure is raised.
        """
        settled = await asyncio.gather(*self._enqueue(items), return_exceptions=True)
        for outcome in settled:
            if isinstance(outcome, BaseException):
                raise outcome
        return settled  # type: ignore[return-value]

    def _enqueue(self, items: Sequence[T]) -> list[asyncio.Future[R]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())
        return futures

    async def _run(self) -> None:
        while self._pending:
            if self._linger and len(self._pending) < self._max_size:
                await asyncio.sleep(self._linger)
            group = self._pending[: self._max_size]
            del self._pending[: self._max_size]
            await self._commit(group)

    async def _commit(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in group])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting handlers
            if len(group) == 1 or not self._isolate(exc):
                for _, future in group:
                    _settle(future, exc=exc)
                return
            # One bad item must not fail its neighbours: try each alone, so only it fails.
            for entry in group:
                await self._commit([entry])
            return
        for (_, future), result in zip(group, results, strict=True):
            _settle(future, result=result)


def _settle(
    future: asyncio.Future[R], *, result: R | None = None, exc: Exception | None = None
) -> None:
    if future.done():  # the handler was cancelled (shutdown): nothing to tell
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
