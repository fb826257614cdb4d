"""Waiting in asyncio: a signal that wakes every waiter, and backoff delays for retries."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: `initial` doubling up to `maximum` seconds."""

    initial: float = 0.5
    maximum: float = 30.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            # Jitter: a fleet that lost the gateway at the same moment does not come back at once.
            yield delay * random.uniform(0.5, 1.0)  # noqa: S311 (timing, not security)
            delay = min(self.maximum, delay * 2)


class Signal:
    """Wakes every waiter at once and re-arms itself (an Event that is never left set), so a
    waiter sees only what happens after it started waiting."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float | None = None) -> bool:
        """True when fired, False when `seconds` passed first (None: wait as long as it takes)."""
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            return False
        return True
