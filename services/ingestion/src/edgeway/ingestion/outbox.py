"""The outbox relay: publishes events committed with their changes, then deletes them.

A frame's row and its announcement are one transaction, so neither exists without the other.
The relay publishes in id order with confirms and deletes what the broker confirmed; a crash in
between publishes those events again (at least once: their message id is stable, so consumers
can tell). Replicas share the table: `FOR UPDATE SKIP LOCKED` gives each event to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from faststream.rabbit import RabbitBroker, RabbitExchange
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.envelope import HEADER_PRODUCER, JSON
from edgeway.common.logging import get_logger
from edgeway.ingestion import events, store

BATCH = 200
# Events wait at most this long when nobody nudged the relay (another replica's, or a missed
# nudge): the relay also polls.
POLL_S = 1.0
RETRY_S = 2.0

log = get_logger("edgeway.ingestion.outbox")


class OutboxRelay:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        broker: RabbitBroker,
        exchanges: dict[str, RabbitExchange],
        producer: str,
        on_published: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._sessions = sessions
        self._broker = broker
        self._exchanges = exchanges
        self._producer = producer
        self._on_published = on_published
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def nudge(self) -> None:
        """Something was committed: publish it now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingestion-outbox")

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11, `wait_for` can swallow a cancellation
        # that lands as its timeout fires, and the loop would go on.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            try:
                while await self.publish_pending() == BATCH:
                    pass
            except Exception as exc:  # noqa: BLE001 - broker or database down: keep the events, retry
                log.warning("outbox relay failed, retrying", error=repr(exc))
                await asyncio.sleep(RETRY_S)

    async def publish_pending(self) -> int:
        """Publish one batch of waiting events; how many there were."""
        async with self._sessions.begin() as session:
            pending = await store.pending_events(session=session, limit=BATCH)
            if not pending:
                return 0
            await asyncio.gather(
                *(
                    self._broker.publish(
                        event.body.encode(),
                        exchange=self._exchanges[event.target],
                        routing_key=event.routing_key,
                        # Frames are durable facts for the tracker; progress is a live result.
                        persist=event.target == events.TO_FRAMES,
                        mandatory=False,
                        message_id=f"ingestion-outbox-{event.id}",
                        message_type=event.type,
                        content_type=JSON,
                        headers={HEADER_PRODUCER: self._producer},
                        timestamp=event.created_at,
                    )
                    for event in pending
                )
            )
            await store.delete_events(session=session, ids=[event.id for event in pending])
        self._on_published(len(pending))
        return len(pending)
