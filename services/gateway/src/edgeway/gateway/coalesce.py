"""Callers who ask the same question at the same time share one request.

When many clients connect at once (a gateway restarted behind a load balancer, 10,000 dashboards
reconnecting), each one's snapshot is a request to a service over RabbitMQ: 10,000 round trips
through one queue, answered one after another. `Coalesced` sends one request for all the callers
that arrive while it is being prepared.

A caller joins only a request that has not been sent yet, never one already in flight: a
snapshot's client subscribes to its live channels first and asks second, so that nothing published
in between is lost, and an answer read before the caller subscribed could miss an update that the
caller's subscription did not see either. While a request is in flight, new callers gather for
the next one, which is sent as soon as the first is answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalesced(Generic[T]):
    """`await coalesced()`: the answer of a `fetch()` sent after this call began."""

    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._next: asyncio.Future[T] | None = None  # gathering callers, not sent yet
        self._in_flight: asyncio.Task[None] | None = None
        self.sent = 0  # requests sent, for tests and metrics

    async def __call__(self) -> T:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._in_flight is None:
                self._start()
        # Shielded: a caller that goes away does not cancel the others' answer.
        return await asyncio.shield(self._next)

    def _start(self) -> None:
        self._in_flight = asyncio.create_task(self._send())

    async def _send(self) -> None:
        # The task starts on a later turn of the event loop: callers of this turn join it.
        future, self._next = self._next, None
        assert future is not None
        self.sent += 1
        try:
            answer = await self._fetch()
        except asyncio.CancelledError:  # the gateway is stopping
            future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the failure
            if not future.done():
                future.set_exception(exc)
                # Retrieved here too: if every caller went away, no one else reads it.
                future.exception()
        else:
            if not future.done():
                future.set_result(answer)
        finally:
            self._in_flight = None
            if self._next is not None:  # callers gathered meanwhile: their request now
                self._start()
