"""Live broadcasts of stored records: a bounded queue per process, drained by one publisher.

An upload is acked as soon as its group is committed. Its stored records are handed to
`Broadcaster.put`, which never blocks and never awaits, and one background task publishes them
in the order they were stored, with up to `window` confirms in flight. Live results are
transient (docs/architecture.md; dashboards get history over request/reply): when `capacity`
records are waiting, the oldest waiting ones are dropped and counted, records of a
store-and-forward replay before live ones, so neither the broker nor dashboards ever hold back
ingestion.

A record's broadcast is made cheap where it can be: the client message is built and encoded
with orjson once, by the publisher (a dropped record is never encoded), from what its upload's
records share (routing key, vehicle tag, `received_at` text, envelope and its marshalled AMQP
properties), worked out once per upload; each record's properties differ only in their own
message id, which is written into the marshalled bytes. The publish skips FastStream (its
publish path costs ~125 µs of CPU per message, `bench.broker_overhead`): it goes through the
process's `edgeway.common.amqp.ConfirmPublisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
from pamqp.commands import Basic

from edgeway.common.amqp import ConfirmPublisher, properties
from edgeway.common.envelope import Envelope, new_message_id
from edgeway.common.logging import get_logger
from edgeway.common.tasks import spawn
from edgeway.common.topology import Channels
from edgeway.telemetry import domain
from edgeway.telemetry.flows import BroadcastRecord, Broadcasts, Outcome

# Broadcasts awaiting their confirm at once: enough to hide the round trip to the broker.
PUBLISH_WINDOW = 256

log = get_logger("edgeway.telemetry")


@dataclass(frozen=True, slots=True)
class RecordOrigin:
    """The upload a group of stored records came from: what their broadcasts share."""

    envelope: Envelope  # the upload's: each broadcast's envelope is derived from it
    vin: str


# A waiting broadcast: (its place in the order of puts, its origin, the record).
Entry = tuple[int, RecordOrigin, BroadcastRecord]


class BroadcastQueue:
    """Records waiting to be broadcast, in the order they were put, at most `capacity`.

    Live records and replayed ones wait apart, each in order, and are taken back in the order
    they were put. When more than `capacity` wait, the oldest replayed records go first (a
    replay is history that reaches dashboards late anyway), then the oldest live ones.

    Replayed records are also let in at no more than `replay_rate` per second (a token bucket
    holding one second's worth; None or infinity: no limit), the newest of each put first: a
    logger back from a long dead zone uploads its buffer in batches of thousands, and
    publishing all of it would cost the process more than storing it. The rest are dropped,
    counted, when they are put.
    """

    def __init__(
        self,
        capacity: int,
        *,
        replay_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if replay_rate is not None and not replay_rate >= 0:
            raise ValueError("replay_rate must be a number of at least 0")
        if replay_rate == math.inf:
            replay_rate = None
        self.capacity = capacity
        self._live: deque[Entry] = deque()
        self._replay: deque[Entry] = deque()
        self._next = 0
        self._replay_rate = replay_rate
        self._clock = clock
        self._tokens = replay_rate if replay_rate is not None else 0.0
        self._filled_at = clock()

    def __len__(self) -> int:
        return len(self._live) + len(self._replay)

    def put(self, origin: RecordOrigin, records: Broadcasts) -> int:
        """Queue `records` of `origin`, in order; returns how many records were dropped (of
        these, replayed ones over the replay rate, the oldest first; or waiting ones, over the
        capacity). A record's `BroadcastRecord` is made only if it is queued."""
        live, replay = self._live, self._replay
        place = self._next
        late = records.late.count(True)
        admitted = late
        if self._replay_rate is not None:
            admitted = min(late, math.floor(self._refill()))
            self._tokens -= admitted
        refused = skip = late - admitted  # the oldest of them: dashboards want the newest
        for index, is_late in enumerate(records.late):
            if not is_late:
                live.append((place, origin, records.record(index)))
            elif skip:
                skip -= 1
                continue
            else:
                replay.append((place, origin, records.record(index)))
            place += 1
        self._next = place
        excess = len(live) + len(replay) - self.capacity
        if excess <= 0:
            return refused
        from_replay = min(excess, len(replay))
        for _ in range(from_replay):
            replay.popleft()
        for _ in range(excess - from_replay):
            live.popleft()
        return refused + excess

    def _refill(self) -> float:
        """The replay records that may be queued now (the bucket topped up for the time since
        the last put); only with a replay rate."""
        rate = self._replay_rate
        assert rate is not None
        now = self._clock()
        self._tokens = min(rate, self._tokens + (now - self._filled_at) * rate)
        self._filled_at = now
        return self._tokens

    def pop(self) -> Entry | None:
        """The waiting record that was put first, or None."""
        live, replay = self._live, self._replay
        if live and (not replay or live[0][0] < replay[0][0]):
            return live.popleft()
        if replay:
            return replay.popleft()
        return None

    def clear(self) -> int:
        """Drop every waiting record; returns how many."""
        dropped = len(self)
        self._live.clear()
        self._replay.clear()
        return dropped


class Sender(Protocol):
    """Where the broadcasts go (`AmqpSender`; tests use their own)."""

    @property
    def connected(self) -> bool:
        """Whether `send` can be called now."""
        ...

    async def connect(self) -> None:
        """Wait until `send` can be called (a channel is open)."""
        ...

    def send(self, origin: RecordOrigin, record: BroadcastRecord) -> Awaitable[object]:
        """One record's broadcast, started in order: everything is ready when this returns;
        awaiting the result waits for its confirm (a failure: refused, or no answer in time)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BroadcastMetrics:
    """Counts of what became of the records handed to the broadcaster."""

    published: Callable[[], None]
    failed: Callable[[int], None]
    dropped: Callable[[int], None]


class Broadcaster:
    """The per-process broadcast queue and the one task that drains it (`run`).

    Order: one task takes the records in order and starts their publishes in that order; each
    publish queues its frames on the channel before it first waits, so the broker receives
    them in order with up to `window` awaiting their confirms.
    """

    def __init__(
        self,
        sender: Sender,
        *,
        capacity: int,
        metrics: BroadcastMetrics,
        window: int = PUBLISH_WINDOW,
        replay_rate: float | None = None,
    ) -> None:
        self.queue = BroadcastQueue(capacity, replay_rate=replay_rate)
        self._sender = sender
        self._metrics = metrics
        self._window = asyncio.Semaphore(window)
        self._wake = asyncio.Event()  # something was queued
        self._idle = asyncio.Event()  # nothing queued, nothing awaiting its confirm
        self._idle.set()
        self._in_flight: set[asyncio.Future[object]] = set()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def waiting(self) -> int:
        """Records queued, not yet being published."""
        return len(self.queue)

    @property
    def in_flight(self) -> int:
        """Records being published, awaiting their confirm."""
        return len(self._in_flight)

    def put(self, outcomes: Sequence[Outcome]) -> None:
        """Queue the stored records of a committed group, in order. Never blocks: when the
        queue is full the oldest waiting records are dropped (replays first) and counted."""
        dropped = 0
        for outcome in outcomes:
            if outcome.broadcasts:
                origin = RecordOrigin(outcome.envelope, outcome.vin)
                dropped += self.queue.put(origin, outcome.broadcasts)
        if dropped:
            self._metrics.dropped(dropped)
        if self.queue:
            self._idle.clear()
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = spawn(self.run(), name="telemetry-broadcaster")

    async def run(self) -> None:
        """Publish what is queued, in order, for ever (until cancelled)."""
        try:
            while True:
                # A free place in the window first: what waits for one stays in the queue,
                # where `put` may still drop it.
                await self._window.acquire()
                try:
                    origin, record = await self._next()
                except BaseException:
                    self._window.release()
                    raise
                try:
                    publishing = self._sender.send(origin, record)
                except Exception as exc:  # noqa: BLE001 - this record's, counted; the rest go on
                    self._window.release()
                    self._failed(exc)
                    if not self._in_flight and not self.queue:
                        self._idle.set()
                    continue
                task: asyncio.Future[object] = asyncio.ensure_future(publishing)
                self._in_flight.add(task)
                task.add_done_callback(self._settled)
        finally:
            for task in self._in_flight:
                task.cancel()

    async def _next(self) -> tuple[RecordOrigin, BroadcastRecord]:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._sender.connected:
                await self._sender.connect()  # meanwhile `put` goes on dropping the oldest
                continue
            entry = self.queue.pop()
            assert entry is not None
            return entry[1], entry[2]

    def _settled(self, task: asyncio.Future[object]) -> None:
        self._in_flight.discard(task)
        self._window.release()
        if not self._in_flight and not self.queue:
            self._idle.set()
        if task.cancelled():
            self._metrics.failed(1)
            return
        error = task.exception()
        if error is not None:
            self._failed(error)
            return
        self._metrics.published()
        if self._failing:
            log.info("broadcasting again")
            self._failing = False

    def _failed(self, error: BaseException) -> None:
        self._metrics.failed(1)
        if not self._failing:  # once per run of failures, not once per record
            log.warning("broadcast failed", error=repr(error))
            self._failing = True

    async def drain(self, deadline: float) -> None:
        """Until every queued record is published (or failed), or the loop's clock reaches
        `deadline`; then stop: what still waits is dropped, unconfirmed publishes cancelled."""
        loop = asyncio.get_running_loop()
        waited = len(self.queue) + len(self._in_flight)
        started = loop.time()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(deadline - started, 0.0))
        left, unconfirmed = len(self.queue), len(self._in_flight)
        await self.stop()
        if waited or left or unconfirmed:
            log.info(
                "broadcast queue drained" if not (left or unconfirmed) else "broadcast queue cut",
                records=waited,
                dropped=left,
                unconfirmed=unconfirmed,
                seconds=round(loop.time() - started, 3),
            )

    async def stop(self) -> None:
        """Stop publishing: queued records are dropped, unconfirmed ones cancelled (counted)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        dropped = self.queue.clear()
        if dropped:
            self._metrics.dropped(dropped)
        self._idle.set()
        await self._sender.close()


class RecordProperties(Basic.Properties):
    """A record's AMQP properties, marshalled from its upload's bytes (`PropertiesTemplate`)."""

    def __init__(self, marshalled: bytes, **fields: Any) -> None:
        super().__init__(**fields)
        self._marshalled = marshalled

    def marshal(self) -> bytes:
        return self._marshalled


class PropertiesTemplate:
    """The AMQP properties of one upload's broadcasts, built and marshalled once.

    They are what `edgeway.common.amqp.properties` gives the envelope derived from the upload's
    (transient); each record's own message id is written into the marshalled bytes. AMQP
    marshals properties in a fixed order, so the bytes before the message id and after it are
    the same for every record. Marshalling them per record was ~7 µs of the publish.
    """

    def __init__(self, envelope: Envelope) -> None:
        sample_id = new_message_id()
        whole = properties(replace(envelope, message_id=sample_id), durable=False)
        self.fields: dict[str, Any] = {
            "content_type": whole.content_type,
            "headers": whole.headers,
            "delivery_mode": whole.delivery_mode,
            "correlation_id": whole.correlation_id,
            "message_type": whole.message_type,
        }
        marshalled = whole.marshal()
        # Only a value equal to this fresh id could hold these bytes, and none after it does
        # (`message_type` follows, a schema name).
        marked = _short_string(sample_id)
        at = marshalled.rfind(marked)
        if at < 0:  # pragma: no cover - pamqp marshals short strings otherwise
            raise RuntimeError("message id not found in the marshalled AMQP properties")
        self._head = marshalled[:at]
        self._tail = marshalled[at + len(marked) :]

    def properties(self, message_id: str) -> Basic.Properties:
        return RecordProperties(
            self._head + _short_string(message_id) + self._tail,
            message_id=message_id,
            **self.fields,
        )


def _short_string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError("an AMQP short string has at most 255 bytes")
    return bytes((len(raw),)) + raw


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One upload's broadcasts, worked out once for all its records."""

    origin: RecordOrigin
    envelope: Envelope  # derived from the upload's; each record's differs in its message id
    template: PropertiesTemplate
    routing_key: str
    vehicle: str
    received: str


class AmqpSender:
    """Publishes record broadcasts through the process's confirm-window publisher
    (`edgeway.common.amqp.ConfirmPublisher`, on its own link: a broadcast that breaks its channel
    leaves the upload consumer alone).

    Each record's message is the client message as JSON, transient, not mandatory, on `exchange`
    with routing key `telemetry.vehicle.<VIN>`, type `telemetry.record.v1`, correlation id = the
    upload's message id, the upload's envelope headers, a message id of its own.
    """

    def __init__(self, publisher: ConfirmPublisher, exchange: str, *, producer: str) -> None:
        self._publisher = publisher
        self._exchange = exchange
        self._producer = producer
        self._prepared: _Prepared | None = None

    @property
    def connected(self) -> bool:
        return self._publisher.link.ready

    async def connect(self) -> None:
        # Waits while the link starts or the robust connection reopens its channel.
        await self._publisher.link.publish_channel()

    def send(self, origin: RecordOrigin, record: BroadcastRecord) -> Awaitable[object]:
        prepared = self._prepared
        if prepared is None or prepared.origin is not origin:
            prepared = self._prepared = self._prepare(origin)
        row = record.row
        body = orjson.dumps(
            domain.record_message(
                (row.timestamp_ms, row.speed, row.battery, row.power, row.odometer, row.heading),
                row.reconstructed,
                row.uncertain,
                vin=prepared.origin.vin,
                vehicle=prepared.vehicle,
                received=prepared.received,
                stats=record.stats,
            )
        )
        message_id = new_message_id()
        if self._publisher.link.tracer is not None:  # the span's context goes into the headers
            return self._publisher.submit(
                body,
                envelope=replace(prepared.envelope, message_id=message_id),
                exchange=self._exchange,
                routing_key=prepared.routing_key,
                durable=False,
            )
        return self._publisher.submit(
            body,
            envelope=prepared.envelope,
            exchange=self._exchange,
            routing_key=prepared.routing_key,
            durable=False,
            prepared=prepared.template.properties(message_id),
        )

    def _prepare(self, origin: RecordOrigin) -> _Prepared:
        envelope = origin.envelope.derive(type=domain.RECORD_TYPE, producer=self._producer)
        return _Prepared(
            origin,
            envelope=envelope,
            template=PropertiesTemplate(envelope),
            routing_key=Channels.telemetry_vehicle(origin.vin),
            vehicle=domain.vehicle_tag(origin.vin),
            received=domain.received_text(origin.envelope.received_datetime()),
        )

    async def close(self) -> None:
        self._prepared = None  # the link is the app's: it closes it
