"""The broadcast queue and its publisher, without a broker: a sender whose confirms the test
holds back and releases, so what is acked, dropped and published when is exact."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client import CollectorRegistry

from edgeway.common.amqp import AmqpLink, properties
from edgeway.common.envelope import HEADER_PRODUCER, Envelope, new_message_id
from edgeway.common.topology import Channels, Topology
from edgeway.telemetry import domain
from edgeway.telemetry.broadcast import (
    AmqpSender,
    Broadcaster,
    BroadcastMetrics,
    BroadcastQueue,
    PropertiesTemplate,
    RecordOrigin,
)
from edgeway.telemetry.flows import BroadcastRecord, Broadcasts, Outcome
from edgeway.telemetry.settings import DEMO_VINS, SEED_VIN
from edgeway.telemetry.tables import RecordRow

T0 = 1_763_726_400_000
RECEIVED = datetime(2025, 11, 21, 12, 0, 1, tzinfo=UTC)


def record(timestamp_ms: int, *, late: bool = False) -> BroadcastRecord:
    row = RecordRow(
        1, timestamp_ms, 40.0, 80.0, 12.5, 12_000.0, 90.0, 0, False, None, None, True, RECEIVED
    )
    return BroadcastRecord(row, domain.StatsCounts(1, 4, 0), late)


def broadcasts(records: Sequence[BroadcastRecord]) -> Broadcasts:
    """An upload's stored records as the flow hands them over."""
    return Broadcasts(
        [record.row for record in records],
        [record.late for record in records],
        [
            (record.stats.packets, record.stats.transmitted, record.stats.skipped)
            for record in records
        ],
    )


def outcome(vin: str, timestamps: Sequence[int], *, late: bool = False) -> Outcome:
    result = Outcome(Envelope(type=domain.UPLOAD_TYPE, producer="gateway"), vin=vin)
    result.broadcasts = broadcasts([record(t, late=late) for t in timestamps])
    result.stored = len(timestamps)
    return result


def times(entries: Sequence[tuple[RecordOrigin, BroadcastRecord]]) -> list[int]:
    return [entry[1].row.timestamp_ms for entry in entries]


# --- the queue ------------------------------------------------------------------------------------


def drained(queue: BroadcastQueue) -> list[int]:
    taken = []
    while (entry := queue.pop()) is not None:
        taken.append(entry[2].row.timestamp_ms)
    return taken


def test_the_queue_gives_records_back_in_the_order_they_were_put() -> None:
    queue = BroadcastQueue(100)
    origin = RecordOrigin(Envelope(type=domain.UPLOAD_TYPE, producer="gateway"), SEED_VIN)
    assert queue.put(origin, broadcasts([record(1), record(2, late=True), record(3)])) == 0
    assert queue.put(origin, broadcasts([record(4, late=True), record(5)])) == 0
    assert len(queue) == 5
    assert drained(queue) == [1, 2, 3, 4, 5]


def test_a_full_queue_drops_the_oldest_replayed_records_first_then_the_oldest_live_ones() -> None:
    queue = BroadcastQueue(4)
    origin = RecordOrigin(Envelope(type=domain.UPLOAD_TYPE, producer="gateway"), SEED_VIN)
    assert queue.put(origin, broadcasts([record(1), record(2)])) == 0  # live
    # A replay of six: two of it would fit; the four oldest of it go, the live records stay.
    assert queue.put(origin, broadcasts([record(10 + i, late=True) for i in range(6)])) == 4
    assert len(queue) == 4
    # Then live records: the rest of the replay goes first, then the oldest live record.
    assert queue.put(origin, broadcasts([record(20), record(21), record(22)])) == 3
    assert drained(queue) == [2, 20, 21, 22]
    # One put larger than the bound keeps its newest.
    assert queue.put(origin, broadcasts([record(30 + i) for i in range(10)])) == 6
    assert drained(queue) == [36, 37, 38, 39]
    assert queue.clear() == 0


def test_replayed_records_are_let_in_at_the_replay_rate_newest_first() -> None:
    now = [0.0]
    queue = BroadcastQueue(1000, replay_rate=3, clock=lambda: now[0])
    origin = RecordOrigin(Envelope(type=domain.UPLOAD_TYPE, producer="gateway"), SEED_VIN)
    # A second's worth of replay at once; the rest of the put, the oldest of it, is dropped.
    # Live records are never held back.
    assert (
        queue.put(origin, broadcasts([*(record(i, late=True) for i in range(5)), record(100)])) == 2
    )
    assert (
        queue.put(origin, broadcasts([record(10, late=True), record(101)])) == 1
    )  # the bucket is empty
    now[0] = 0.5  # half a second: one and a half records' worth
    assert queue.put(origin, broadcasts([record(20 + i, late=True) for i in range(4)])) == 3
    now[0] = 10.0  # a long pause fills the bucket up to one second's worth, no more
    assert queue.put(origin, broadcasts([record(30 + i, late=True) for i in range(5)])) == 2
    assert drained(queue) == [2, 3, 4, 100, 101, 23, 32, 33, 34]
    unlimited = BroadcastQueue(1000, replay_rate=math.inf)
    assert unlimited.put(origin, broadcasts([record(i, late=True) for i in range(50)])) == 0
    with pytest.raises(ValueError, match="replay_rate"):
        BroadcastQueue(10, replay_rate=-1)


# --- the publisher --------------------------------------------------------------------------------


class HeldSender:
    """Takes each record's broadcast at once; its confirm comes when the test releases it."""

    def __init__(self) -> None:
        self.sent: list[tuple[RecordOrigin, BroadcastRecord]] = []
        self.confirms: list[asyncio.Future[None]] = []
        self.connected = True
        self.closed = False

    async def connect(self) -> None:
        self.connected = True

    def send(self, origin: RecordOrigin, record: BroadcastRecord) -> Coroutine[Any, Any, object]:
        self.sent.append((origin, record))
        confirm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.confirms.append(confirm)

        async def confirmed() -> None:
            await confirm

        return confirmed()

    def release(self, count: int | None = None, *, error: Exception | None = None) -> None:
        pending = [confirm for confirm in self.confirms if not confirm.done()]
        for confirm in pending[:count]:
            if error is None:
                confirm.set_result(None)
            else:
                confirm.set_exception(error)

    async def close(self) -> None:
        self.closed = True


class Counts:
    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.dropped = 0

    def metrics(self) -> BroadcastMetrics:
        def published() -> None:
            self.published += 1

        def failed(count: int) -> None:
            self.failed += count

        def dropped(count: int) -> None:
            self.dropped += count

        return BroadcastMetrics(published=published, failed=failed, dropped=dropped)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_put_never_waits_for_the_broker_and_a_full_queue_drops_the_oldest() -> None:
    sender, counts = HeldSender(), Counts()
    broadcaster = Broadcaster(sender, capacity=10, metrics=counts.metrics(), window=4)
    broadcaster.start()
    broadcaster.put([outcome(SEED_VIN, range(0, 6))])
    await settle()
    # Four in flight (the window), two waiting; no confirm has come.
    assert times(sender.sent) == [0, 1, 2, 3]
    assert (broadcaster.in_flight, broadcaster.waiting) == (4, 2)

    # The broker confirms nothing more, and groups keep coming: each put returns at once,
    # the three oldest waiting (4, 5, 6) make room.
    broadcaster.put([outcome(SEED_VIN, range(6, 12)), outcome(DEMO_VINS[0], range(100, 105))])
    assert broadcaster.waiting == 10  # the bound
    assert (counts.dropped, counts.published) == (3, 0)

    for _ in range(3):
        sender.release()
        await settle()
    assert times(sender.sent) == [0, 1, 2, 3, *range(7, 12), *range(100, 105)]
    assert [origin.vin for origin, _ in sender.sent[-5:]] == [DEMO_VINS[0]] * 5
    assert counts.published == 12
    await broadcaster.drain(asyncio.get_running_loop().time() + 1)


async def test_broadcasts_go_out_in_order_within_the_window_and_failures_are_counted() -> None:
    sender, counts = HeldSender(), Counts()
    broadcaster = Broadcaster(sender, capacity=1000, metrics=counts.metrics(), window=3)
    broadcaster.start()
    broadcaster.put([outcome(SEED_VIN, range(10)), outcome(DEMO_VINS[1], range(50, 55))])
    sent = 0
    while len(sender.sent) < 15:
        await settle()
        assert broadcaster.in_flight <= 3
        if len(sender.sent) == sent and broadcaster.in_flight:
            sender.release(1, error=RuntimeError("nack") if sent == 4 else None)
        sent = len(sender.sent)
    sender.release()
    await settle()
    assert times(sender.sent) == [*range(10), *range(50, 55)]
    assert [origin.vin for origin, _ in sender.sent] == [SEED_VIN] * 10 + [DEMO_VINS[1]] * 5
    assert (counts.published, counts.failed, counts.dropped) == (14, 1, 0)
    await broadcaster.drain(asyncio.get_running_loop().time() + 1)
    assert sender.closed


async def test_drain_publishes_what_waits_within_the_deadline_then_stops() -> None:
    sender, counts = HeldSender(), Counts()
    broadcaster = Broadcaster(sender, capacity=1000, metrics=counts.metrics(), window=8)
    broadcaster.start()
    broadcaster.put([outcome(SEED_VIN, range(20))])

    async def confirm_all() -> None:
        while len(sender.sent) < 20 or not all(c.done() for c in sender.confirms):
            sender.release()
            await asyncio.sleep(0.01)

    loop = asyncio.get_running_loop()
    confirming = asyncio.create_task(confirm_all())
    await broadcaster.drain(loop.time() + 5)
    await confirming
    assert (counts.published, counts.failed, counts.dropped) == (20, 0, 0)
    assert sender.closed

    # A broker that never confirms: drain gives up at the deadline; nothing waits for ever.
    stuck, counts = HeldSender(), Counts()
    broadcaster = Broadcaster(stuck, capacity=1000, metrics=counts.metrics(), window=8)
    broadcaster.start()
    broadcaster.put([outcome(SEED_VIN, range(20))])
    started = loop.time()
    await broadcaster.drain(started + 0.2)
    assert 0.15 < loop.time() - started < 2
    # Eight were sent and never confirmed; twelve never left the queue.
    assert (counts.published, counts.failed, counts.dropped) == (0, 8, 12)


async def test_while_the_channel_is_down_records_wait_and_the_oldest_are_dropped() -> None:
    sender, counts = HeldSender(), Counts()
    sender.connected = False
    reconnect = asyncio.Event()

    async def connect() -> None:
        await reconnect.wait()
        sender.connected = True

    sender.connect = connect  # type: ignore[method-assign]
    broadcaster = Broadcaster(sender, capacity=5, metrics=counts.metrics(), window=8)
    broadcaster.start()
    broadcaster.put([outcome(SEED_VIN, range(4))])
    broadcaster.put([outcome(SEED_VIN, range(4, 8))])
    await settle()
    assert sender.sent == []
    assert counts.dropped == 3
    reconnect.set()
    await settle()
    assert times(sender.sent) == [3, 4, 5, 6, 7]
    sender.release()
    await broadcaster.drain(asyncio.get_running_loop().time() + 1)
    assert counts.published == 5


# --- the AMQP side -------------------------------------------------------------------------------


@pytest.mark.connected
async def test_records_are_published_with_their_upload_s_correlation_and_ids_of_their_own(
    amqp_url: str,
) -> None:
    """Through the process's confirm-window publisher, on the real broker: what the gateway's
    fan-out reads (routing key per vehicle, type, correlation, headers, the client message)."""
    topology = Topology()
    connection = await aio_pika.connect(amqp_url)
    link = AmqpLink(amqp_url, name="test-broadcasts", registry=CollectorRegistry())
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            topology.broadcast.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        listener = await channel.declare_queue(exclusive=True)
        await listener.bind(exchange, routing_key=Channels.TELEMETRY_VEHICLES)
        await link.start()
        counts = Counts()
        broadcaster = Broadcaster(
            AmqpSender(link.publisher(), topology.broadcast.name, producer="telemetry"),
            capacity=100,
            metrics=counts.metrics(),
        )
        broadcaster.start()
        sent = outcome(SEED_VIN, [T0, T0 + 300, T0 + 600])
        upload = sent.envelope
        broadcaster.put([sent])
        await broadcaster.drain(asyncio.get_running_loop().time() + 5)
        got = []
        while len(got) < 3 and (message := await listener.get(no_ack=True, fail=False)):
            got.append(message)
    finally:
        await link.close()
        await connection.close()
    assert counts.published == 3
    assert [m.routing_key for m in got] == [Channels.telemetry_vehicle(SEED_VIN)] * 3
    assert [orjson.loads(m.body)["data"]["timestamp"] for m in got] == [T0, T0 + 300, T0 + 600]
    assert {m.type for m in got} == {domain.RECORD_TYPE}
    assert {m.correlation_id for m in got} == {upload.message_id}
    assert len({m.message_id for m in got}) == 3
    assert upload.message_id not in {m.message_id for m in got}
    assert got[0].delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert (got[0].headers or {})[HEADER_PRODUCER] == "telemetry"


@pytest.mark.parametrize(
    "traceparent", [None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
)
def test_record_properties_are_marshalled_as_the_shared_publisher_marshals_them(
    traceparent: str | None,
) -> None:
    """What `edgeway.common.amqp.properties` gives a record's envelope, byte for byte, with each
    record's own message id written into the upload's template."""
    upload = Envelope(
        type=domain.UPLOAD_TYPE,
        producer="gateway",
        captured_at=1_763_726_400.25 if traceparent else None,
        traceparent=traceparent,
        headers={"x-vehicle-vin": SEED_VIN},
    )
    envelope = upload.derive(type=domain.RECORD_TYPE, producer="telemetry")
    template = PropertiesTemplate(envelope)
    for message_id in (new_message_id(), new_message_id(), "x", "a-much-longer-id-" * 10):
        expected = properties(replace(envelope, message_id=message_id), durable=False)
        made = template.properties(message_id)
        assert made.marshal() == expected.marshal()
        assert made.message_id == message_id
        assert made.correlation_id == upload.message_id
        assert made.message_type == domain.RECORD_TYPE


async def test_a_record_that_cannot_be_sent_is_counted_and_the_rest_go_on() -> None:
    sender, counts = HeldSender(), Counts()
    send = sender.send

    def refusing(origin: RecordOrigin, record: BroadcastRecord) -> Coroutine[Any, Any, object]:
        if record.row.timestamp_ms == 2:
            raise ValueError("cannot encode")
        return send(origin, record)

    sender.send = refusing  # type: ignore[method-assign]
    broadcaster = Broadcaster(sender, capacity=100, metrics=counts.metrics(), window=2)
    broadcaster.start()
    broadcaster.put([outcome(SEED_VIN, range(5))])
    while len(sender.sent) < 4:
        sender.release()
        await settle()
    sender.release()
    await broadcaster.drain(asyncio.get_running_loop().time() + 1)
    assert times(sender.sent) == [0, 1, 3, 4]
    assert (counts.published, counts.failed, counts.dropped) == (4, 1, 0)
