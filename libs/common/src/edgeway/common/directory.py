"""A lookup table held in memory with the database behind it (camera -> location, VIN -> id).

A service loads its table at start (`replace`) and answers from memory after that, which saves
a round trip per message; a key it does not hold is read from the database (`lookup`), so a row
an operator or another replica added is found on its first miss. With a `ttl`, an entry is
trusted for that many seconds and then read again, so a change made elsewhere counts within
`ttl`; without one, an entry held stays until `replace` or `forget`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Reads one key from the database, in the caller's session: None when there is no such row.
Find = Callable[[AsyncSession, K], Awaitable[V | None]]


class CachedDirectory(Generic[K, V]):
    """Key -> value from memory, a miss (or an entry past its `ttl`) read with `find`."""

    def __init__(
        self,
        find: Find[K, V],
        known: Mapping[K, V] | None = None,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._find = find
        self._ttl = ttl
        self._clock = clock
        self._known: dict[K, tuple[V, float]] = {}
        self.replace(known or {})

    def replace(self, known: Mapping[K, V]) -> None:
        """Hold exactly these entries (what was loaded at start)."""
        now = self._clock()
        self._known = {key: (value, now) for key, value in known.items()}

    def forget(self, key: K) -> None:
        """Drop an entry this process knows to be gone, so it is not trusted until its `ttl`."""
        self._known.pop(key, None)

    def known(self, key: K) -> V | None:
        """The value if it is held and still trusted (no database round trip)."""
        hit = self._known.get(key)
        if hit is None:
            return None
        if self._ttl is not None and self._clock() - hit[1] > self._ttl:
            return None
        return hit[0]

    async def lookup(self, key: K, *, session: AsyncSession) -> V | None:
        """The value from memory, else from the database (and held from then on)."""
        now = self._clock()  # before the read: an entry is never younger than what it saw
        hit = self._known.get(key)
        if hit is not None and (self._ttl is None or now - hit[1] <= self._ttl):
            return hit[0]
        found = await self._find(session, key)
        if found is None:
            self._known.pop(key, None)
        else:
            self._known[key] = (found, now)
        return found
