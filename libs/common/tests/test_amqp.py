"""The per-message AMQP paths on the machine's RabbitMQ: the confirm-window publisher and the
consumer that acks after its handler (edgeway.common.amqp)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from prometheus_client import CollectorRegistry

from edgeway.common.amqp import (
    ACK_DELAY_S,
    AmqpLink,
    ConfirmPublisher,
    Consumer,
    Delivery,
    LinkDownError,
    PublishRefusedError,
    RejectDeliveryError,
)
from edgeway.common.envelope import Envelope
from edgeway.common.testing import create_vhost, drop_vhost
from edgeway.common.testing.faults import FaultProxy

pytestmark = pytest.mark.connected

WAIT = 15.0


@pytest.fixture
async def link(amqp_url: str) -> AsyncIterator[AmqpLink]:
    link = AmqpLink(amqp_url, name="test", registry=CollectorRegistry())
    await link.start()
    yield link
    await link.close()


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """The test's own side: declares, binds and reads."""
    connection = await aio_pika.connect(amqp_url)
    yield await connection.channel()
    await connection.close()


async def bound_queue(
    channel: aio_pika.abc.AbstractChannel, exchange: str, key: str = "#"
) -> AbstractQueue:
    target = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(target, key)
    return queue


async def drain(queue: AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
    got: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.01)
        else:
            got.append(message)
    return got


@contextlib.asynccontextmanager
async def cuttable_link(amqp_url: str) -> AsyncIterator[tuple[FaultProxy, AmqpLink]]:
    """A started link to the broker through a fault proxy (which can cut it), quick to
    reconnect; closed, and the proxy stopped, on the way out."""
    parts = urlsplit(amqp_url)
    with FaultProxy(upstream=(parts.hostname or "127.0.0.1", parts.port or 5672)) as proxy:
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
        link = AmqpLink(
            urlunsplit(parts._replace(netloc=netloc)),
            name="test",
            registry=CollectorRegistry(),
            reconnect_interval=0.2,
        )
        await link.start()
        try:
            yield proxy, link
        finally:
            await link.close()


def envelope() -> Envelope:
    return Envelope(type="test.v1", producer="test", captured_at=1763321200.25)


async def test_publishes_are_confirmed_in_order_with_a_bounded_window(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    queue = await bound_queue(channel, exchange)
    publisher = link.publisher(window=8)
    most = 0

    async def one(n: int) -> None:
        nonlocal most
        await publisher.publish(
            str(n).encode(),
            envelope=envelope(),
            exchange=exchange,
            routing_key=f"k.{n}",
            durable=False,
            headers={"x-n": n},
        )
        most = max(most, publisher.in_flight)

    sends = [asyncio.create_task(one(n)) for n in range(200)]
    await asyncio.sleep(0)
    # Many at once, never more than the window.
    assert 1 < publisher.in_flight <= 8
    await asyncio.gather(*sends)
    assert publisher.in_flight == 0
    got = await drain(queue, 200)
    assert [int(message.body) for message in got] == list(range(200))
    first = got[0]
    assert first.headers["x-n"] == 0
    assert first.headers["x-captured-at"] == "1763321200.250000"
    assert first.headers["x-producer"] == "test"
    assert first.type == "test.v1"
    assert first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


async def test_submitted_publishes_start_at_once_in_order(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    queue = await bound_queue(channel, exchange)
    publisher = link.publisher(window=4)
    tasks = []
    for n in range(20):
        await publisher.wait_room()
        tasks.append(
            publisher.submit(str(n).encode(), envelope=envelope(), exchange=exchange, durable=True)
        )
        assert publisher.in_flight <= 4
    await asyncio.gather(*tasks)
    got = await drain(queue, 20)
    assert [int(message.body) for message in got] == list(range(20))
    assert got[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_durable_work_that_no_queue_takes_is_refused(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
    publisher = link.publisher()
    with pytest.raises(PublishRefusedError):
        await publisher.publish(b"{}", envelope=envelope(), exchange=exchange, durable=True)
    # A live result may find nobody listening.
    await publisher.publish(b"{}", envelope=envelope(), exchange=exchange, durable=False)
    # The channel is still good.
    queue = await bound_queue(channel, exchange)
    await publisher.publish(b"later", envelope=envelope(), exchange=exchange, durable=True)
    assert [m.body for m in await drain(queue, 1)] == [b"later"]


async def test_publishing_goes_on_after_the_connection_is_cut(
    amqp_url: str, channel: aio_pika.abc.AbstractChannel
) -> None:
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    queue = await bound_queue(channel, exchange)
    async with cuttable_link(amqp_url) as (proxy, link):
        publisher = link.publisher()
        await publisher.publish(b"1", envelope=envelope(), exchange=exchange, durable=True)
        proxy.cut()
        await asyncio.sleep(0.3)
        proxy.restore()
        # Waits for the connection to come back, then goes out.
        await publisher.publish(b"2", envelope=envelope(), exchange=exchange, durable=True)
    assert [m.body for m in await drain(queue, 2)] == [b"1", b"2"]


async def test_a_publisher_that_does_not_hold_refuses_at_once_while_the_link_is_down(
    amqp_url: str, channel: aio_pika.abc.AbstractChannel
) -> None:
    """The gateway's publishers (`hold=False`): from the cut's first instant, before the robust
    connection has noticed it, every publish fails at once instead of waiting out the outage,
    so its producer is told; once the link is back they go out again."""
    exchange = f"test.{uuid.uuid4().hex[:8]}"
    queue = await bound_queue(channel, exchange)
    async with cuttable_link(amqp_url) as (proxy, link):
        publisher = link.publisher(hold=False)
        publisher.timeout = 60.0  # a publish that waited would outlast the cut
        await publisher.publish(b"1", envelope=envelope(), exchange=exchange, durable=True)
        proxy.cut()
        failures: list[type[BaseException]] = []
        for _ in range(20):
            with pytest.raises(Exception) as caught:  # noqa: PT011 - checked just below
                await asyncio.wait_for(
                    publisher.publish(b"-", envelope=envelope(), exchange=exchange, durable=True),
                    5.0,
                )
            assert not isinstance(caught.value, TimeoutError), "the publish waited"
            failures.append(type(caught.value))
            await asyncio.sleep(0.05)
        # Once the reset was read (it is within a second), the link says it is down.
        assert failures[-1] is LinkDownError, failures
        assert not link.ready
        proxy.restore()
        async with asyncio.timeout(WAIT):
            await link.publish_channel()  # waits for the reconnection
        assert link.ready
        await publisher.publish(b"2", envelope=envelope(), exchange=exchange, durable=True)
    assert [m.body for m in await drain(queue, 2)] == [b"1", b"2"]


async def test_the_publishing_channel_is_given_only_while_the_link_is_ready(
    amqp_url: str,
) -> None:
    """`publish_channel` returns only while `ready` is true, through cuts: a loop such as the
    telemetry broadcaster's (`while not ready: await publish_channel()`) would otherwise spin
    without yielding in the instant between a reset and aiormq closing the channels, and
    freeze its whole process."""
    async with cuttable_link(amqp_url) as (proxy, link):
        stop = asyncio.Event()
        waits: list[bool] = []  # after each wait for the channel: was the link ready?

        async def prober() -> None:
            while not stop.is_set():
                if link.ready:
                    await asyncio.sleep(0)  # look again at the next turn of the loop
                    continue
                await link.publish_channel()
                waits.append(link.ready)
                if not link.ready:  # the fault under test: do not spin on it, report it
                    await asyncio.sleep(0.05)

        probing = asyncio.create_task(prober())
        try:
            for _ in range(5):
                proxy.cut()
                await asyncio.sleep(0.3)
                proxy.restore()
                async with asyncio.timeout(WAIT):
                    await link.publish_channel()
        finally:
            stop.set()
            await asyncio.wait_for(probing, WAIT)
    assert len(waits) >= 5, "the prober never saw the link down"
    assert all(waits), waits


async def test_the_consumer_acks_after_its_handler_and_requeues_what_fails(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await channel.declare_queue(f"test.{uuid.uuid4().hex[:8]}")
    handled: list[bytes] = []
    failed_once: set[bytes] = set()
    bodies = [str(n).encode() for n in range(50)] + [b"bad"]
    all_handled = asyncio.Event()

    async def handler(message: Delivery) -> None:
        if message.body == b"bad" and message.body not in failed_once:
            failed_once.add(message.body)
            raise ValueError("not this time")
        await asyncio.sleep(0.001)
        handled.append(message.body)
        if len(handled) == len(bodies):
            all_handled.set()

    consumer = Consumer(link, queue.name, handler, prefetch=16, grace=5)
    publisher: ConfirmPublisher = link.publisher()
    await consumer.start()
    await asyncio.gather(
        *(
            publisher.publish(
                body, envelope=envelope(), exchange="", routing_key=queue.name, durable=True
            )
            for body in bodies
        )
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_handled.wait(), WAIT)
    await consumer.stop()
    # Every message once, the failed one again after its requeue.
    assert sorted(handled) == sorted(bodies)
    assert failed_once == {b"bad"}
    acked = link.metrics.consumed.labels(queue.name, "acked")._value.get()
    requeued = link.metrics.consumed.labels(queue.name, "requeued")._value.get()
    assert (acked, requeued) == (len(bodies), 1)
    # All acked: nothing left to redeliver once the consumer's channel is gone.
    await link.close()
    assert await queue.get(no_ack=True, fail=False) is None
    await queue.delete()


async def test_a_delivery_the_handler_rejects_is_dead_lettered_at_once(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    name = f"test.{uuid.uuid4().hex[:8]}"
    dead = await channel.declare_queue(f"{name}.dead", exclusive=True)
    queue = await channel.declare_queue(  # not exclusive: the link's connection consumes it
        name,
        auto_delete=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead.name},
    )
    handled: list[bytes] = []
    both = asyncio.Event()

    async def handler(message: Delivery) -> None:
        handled.append(message.body)
        if len(handled) == 2:
            both.set()
        if message.body == b"never":
            raise RejectDeliveryError("not a message this handler can ever take")

    consumer = Consumer(link, queue.name, handler, prefetch=4, grace=5)
    await consumer.start()
    publisher = link.publisher()
    for body in (b"never", b"fine"):
        await publisher.publish(
            body, envelope=envelope(), exchange="", routing_key=queue.name, durable=True
        )
    await asyncio.wait_for(both.wait(), WAIT)
    (rejected,) = await drain(dead, 1)
    await consumer.stop()
    assert rejected.body == b"never"
    assert handled == [b"never", b"fine"]  # tried once, never requeued
    counts = {
        outcome: link.metrics.consumed.labels(queue.name, outcome)._value.get()
        for outcome in ("acked", "requeued", "rejected")
    }
    assert counts == {"acked": 1, "requeued": 0, "rejected": 1}


async def test_acks_under_load_never_close_the_channel(
    amqp_url: str, channel: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handlers that publish their result on the same connection, then are acked together:
    the acks must reach the broker in order (an ack that overtook a `multiple` one would name
    an unknown tag, the broker would close the channel and redeliver everything unacked)."""
    # aiormq's write queue holds 10 frames; at 1, tasks waiting to put one swap often.
    monkeypatch.setattr(aiormq.Connection, "FRAME_BUFFER_SIZE", 1)
    link = AmqpLink(amqp_url, name="test", registry=CollectorRegistry())
    await link.start()
    queue = await channel.declare_queue(f"test.{uuid.uuid4().hex[:8]}")
    publisher = link.publisher()
    total = 1500
    handled: list[bytes] = []
    redelivered = 0
    all_handled = asyncio.Event()

    async def handler(message: Delivery) -> None:
        nonlocal redelivered
        redelivered += bool(message.redelivered)
        await asyncio.sleep(random.random() / 500)  # groups finish at different times
        await publisher.publish(
            message.body, envelope=envelope(), exchange="amq.topic", durable=False
        )
        handled.append(message.body)
        if len(handled) >= total:
            all_handled.set()

    consumer = Consumer(link, queue.name, handler, prefetch=128, grace=5)
    await consumer.start()
    sender = link.publisher()
    await asyncio.gather(
        *(
            sender.publish(
                str(n).encode(),
                envelope=envelope(),
                exchange="",
                routing_key=queue.name,
                durable=True,
            )
            for n in range(total)
        )
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_handled.wait(), WAIT * 2)
    await consumer.stop()
    assert (len(handled), len(set(handled)), redelivered) == (total, total, 0)
    await link.close()
    assert await queue.get(no_ack=True, fail=False) is None
    await queue.delete()


async def test_a_consumer_and_its_link_stop_while_the_broker_is_gone() -> None:
    """A robust channel waits for its reconnection; a shutdown must not wait with it (a
    service whose broker vanished would otherwise outlive its SIGTERM)."""
    vhost, url = create_vhost()
    link = AmqpLink(url, name="test", registry=CollectorRegistry())
    await link.start()

    async def handler(message: Delivery) -> None:
        pass

    connection = await aio_pika.connect(url)
    queue = await (await connection.channel()).declare_queue("test.gone")
    consumer = Consumer(link, queue.name, handler, prefetch=4, grace=1)
    await consumer.start()
    await connection.close()
    drop_vhost(vhost)  # the broker closes every connection of the virtual host
    for _ in range(int(WAIT / 0.05)):
        if not link.ready:
            break
        await asyncio.sleep(0.05)
    assert not link.ready
    await asyncio.wait_for(consumer.stop(), WAIT)
    await asyncio.wait_for(link.close(), WAIT)


async def test_the_consumer_consumes_again_after_the_connection_is_cut(
    amqp_url: str, channel: aio_pika.abc.AbstractChannel
) -> None:
    """It consumes on aiormq's channel under the robust one: the robust channel's reopen must
    start it again, with its prefetch, on the new channel."""
    # Not auto-delete: the cut takes its only consumer away for a while.
    queue = await channel.declare_queue(f"test.{uuid.uuid4().hex[:8]}")
    got: list[Delivery] = []
    arrived = {b"1": asyncio.Event(), b"2": asyncio.Event()}

    async def handler(message: Delivery) -> None:
        got.append(message)
        arrived[message.body].set()

    async with cuttable_link(amqp_url) as (proxy, link):
        consumer = Consumer(link, queue.name, handler, prefetch=4, grace=5)
        try:
            await consumer.start()
            publish = channel.default_exchange.publish
            await publish(
                aio_pika.Message(
                    b"1", headers={"x-test": "first"}, message_id="m-1", type="test.v1"
                ),
                routing_key=queue.name,
            )
            await asyncio.wait_for(arrived[b"1"].wait(), WAIT)
            proxy.cut()
            await asyncio.sleep(0.3)
            proxy.restore()
            await publish(aio_pika.Message(b"2"), routing_key=queue.name)
            await asyncio.wait_for(arrived[b"2"].wait(), WAIT)
        finally:
            await consumer.stop()
            await queue.delete(if_unused=False, if_empty=False)
    # "1" may come twice: an ack the cut took is redelivered (at least once, as ever).
    assert [m.body for m in got if not m.redelivered] == [b"1", b"2"]
    first = got[0]
    assert (first.message_id, first.type, first.headers, first.routing_key) == (
        "m-1",
        "test.v1",
        {"x-test": "first"},
        queue.name,
    )
    assert not first.redelivered


async def test_the_consumer_consumes_again_after_the_broker_cancels_it(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    """Its queue deleted and declared again (the broker cancels its consumers then): it takes
    what the new queue gets."""
    name = f"test.{uuid.uuid4().hex[:8]}"
    queue = await channel.declare_queue(name)
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def handler(message: Delivery) -> None:
        got.append(message.body)
        arrived.set()

    consumer = Consumer(link, name, handler, prefetch=4, grace=5)
    await consumer.start()
    try:
        await queue.delete(if_unused=False, if_empty=False)
        queue = await channel.declare_queue(name)
        await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key=name)
        await asyncio.wait_for(arrived.wait(), WAIT)
    finally:
        await consumer.stop()
        await queue.delete(if_unused=False, if_empty=False)
    assert got == [b"after"]


async def test_a_lone_delivery_is_acked_after_the_ack_delay_without_a_stop(
    link: AmqpLink, channel: aio_pika.abc.AbstractChannel
) -> None:
    """Acks wait for others to share their frame, but not for ever: one delivery alone, far
    under the batch, is acked once the delay has passed, while the consumer runs on."""
    queue = await channel.declare_queue(f"test.{uuid.uuid4().hex[:8]}", auto_delete=True)
    handled = asyncio.Event()

    async def handler(message: Delivery) -> None:
        handled.set()

    consumer = Consumer(link, queue.name, handler, prefetch=128, grace=5)
    await consumer.start()
    try:
        await channel.default_exchange.publish(aio_pika.Message(b"alone"), routing_key=queue.name)
        await asyncio.wait_for(handled.wait(), WAIT)
        await asyncio.sleep(ACK_DELAY_S * 25)  # the delay, with room for a loaded machine
        assert link.metrics.consumed.labels(queue.name, "acked")._value.get() == 1
    finally:
        await consumer.stop()
