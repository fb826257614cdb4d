"""The outbox relay on the real RabbitMQ: committed events reach their exchange with a stable
message id, and leave the table only once the broker has confirmed them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.broker import make_broker
from edgeway.common.db import make_engine, make_sessionmaker
from edgeway.common.envelope import HEADER_PRODUCER, JSON
from edgeway.common.schemas.ingest import FRAME_STORED_TYPE, PROGRESS_TYPE
from edgeway.common.settings import CommonSettings, ExchangeNames, async_database_url
from edgeway.common.topology import Channels, Topology
from edgeway.ingestion import events, store
from edgeway.ingestion.outbox import OutboxRelay

pytestmark = pytest.mark.connected

PRODUCER = "edgeway-ingestion"
# Long enough for a broker round trip on a loaded CI machine; a pass takes far less.
WAIT = 10.0
# How long to listen for a message that must not come.
QUIET = 0.5
NOW = datetime(2025, 11, 21, 12, 0, 0, tzinfo=UTC)


@dataclass
class Relay:
    relay: OutboxRelay
    sessions: async_sessionmaker[AsyncSession]
    probe: AbstractQueue
    topology: Topology
    published: list[int]


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    url = async_database_url(None, service="ingestion", data_dir=tmp_path)
    await store.MIGRATIONS.upgrade_async(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[RabbitBroker]:
    """The broker as the service builds it: publisher confirms, returns raised."""
    broker = make_broker(
        CommonSettings(amqp_url=amqp_url),
        service="ingestion",
        tracer_provider=TracerProvider(),
        registry=CollectorRegistry(),
    )
    async with broker:
        yield broker


@pytest.fixture
async def topology(broker: RabbitBroker) -> Topology:
    """This test's own exchanges, declared as the service declares them."""
    suffix = uuid.uuid4().hex[:10]
    topology = Topology(
        ExchangeNames(broadcast=f"test.broadcast.{suffix}", ingest_frames=f"test.frames.{suffix}")
    )
    await broker.declare_exchange(topology.broadcast)
    await broker.declare_exchange(topology.ingest_frames)
    return topology


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()


def make_relay(
    sessions: async_sessionmaker[AsyncSession],
    broker: RabbitBroker,
    topology: Topology,
    published: list[int],
    on_published: Callable[[], None] = lambda: None,
) -> OutboxRelay:
    def counted(count: int) -> None:
        published.append(count)
        on_published()

    return OutboxRelay(
        sessions=sessions,
        broker=broker,
        exchanges={
            events.TO_BROADCAST: topology.broadcast,
            events.TO_FRAMES: topology.ingest_frames,
        },
        producer=PRODUCER,
        on_published=counted,
    )


async def probe_queue(
    channel: aio_pika.abc.AbstractChannel, topology: Topology, *broadcast_keys: str
) -> AbstractQueue:
    """A queue on the frames exchange and on `broadcast_keys` of the broadcast exchange."""
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.names.ingest_frames, routing_key="")
    for key in broadcast_keys:
        await queue.bind(topology.names.broadcast, routing_key=key)
    return queue


async def receive(
    queue: AbstractQueue, count: int, *, wait: float = WAIT
) -> list[AbstractIncomingMessage]:
    """Up to `count` messages, waiting at most `wait` seconds for them."""
    received: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + wait
    while len(received) < count and time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.02)
        else:
            received.append(message)
    return received


async def add_events(
    sessions: async_sessionmaker[AsyncSession], *added: tuple[str, str, str, Any]
) -> list[int]:
    """Commit (target, routing key, type, body) events as a change would; their ids in order."""
    async with sessions.begin() as session:
        for target, routing_key, type_, body in added:
            store.add_event(
                session=session, event=events.Event(target, routing_key, type_, body), now=NOW
            )
    async with sessions() as session:
        rows = await session.execute(select(store.OutboxEvent.id).order_by(store.OutboxEvent.id))
        return list(rows.scalars())


async def waiting(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(store.OutboxEvent)) or 0)


async def test_events_reach_their_exchange_with_stable_ids_and_leave_the_table(
    sessions: async_sessionmaker[AsyncSession],
    broker: RabbitBroker,
    topology: Topology,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    request_id = str(uuid.uuid4())
    channel_key = Channels.ingest_request(request_id)
    probe = await probe_queue(channel, topology, channel_key)
    published: list[int] = []
    relay = make_relay(sessions, broker, topology, published)

    frame_body = {"frame_id": str(uuid.uuid4()), "request_id": request_id, "width": 640}
    progress_body = {"type": "ingest_progress", "request_id": request_id, "status": "completed"}
    ids = await add_events(
        sessions,
        (events.TO_FRAMES, "", FRAME_STORED_TYPE, frame_body),
        (events.TO_BROADCAST, channel_key, PROGRESS_TYPE, progress_body),
    )

    assert await relay.publish_pending() == 2
    assert published == [2]
    assert await waiting(sessions) == 0

    frame, progress = await receive(probe, 2)
    assert frame.exchange == topology.names.ingest_frames
    assert frame.message_id == f"ingestion-outbox-{ids[0]}"
    assert frame.type == FRAME_STORED_TYPE
    assert orjson.loads(frame.body) == frame_body
    # The tracker's work survives a broker restart; a live progress update need not.
    assert frame.delivery_mode == DeliveryMode.PERSISTENT

    assert progress.exchange == topology.names.broadcast
    assert progress.routing_key == channel_key
    assert progress.message_id == f"ingestion-outbox-{ids[1]}"
    assert progress.type == PROGRESS_TYPE
    assert orjson.loads(progress.body) == progress_body
    assert progress.delivery_mode != DeliveryMode.PERSISTENT

    for message in (frame, progress):
        assert message.content_type == JSON
        assert message.headers[HEADER_PRODUCER] == PRODUCER
        assert message.timestamp is not None
        assert message.timestamp.replace(tzinfo=UTC) == NOW

    # Published once: the next round finds nothing.
    assert await relay.publish_pending() == 0
    assert await receive(probe, 1, wait=QUIET) == []
    assert published == [2]


async def test_a_progress_event_nobody_listens_to_is_still_taken_off_the_outbox(
    sessions: async_sessionmaker[AsyncSession],
    broker: RabbitBroker,
    topology: Topology,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    """No client watches most requests: an unroutable update must not block the events behind."""
    watched = Channels.ingest_request(str(uuid.uuid4()))
    probe = await probe_queue(channel, topology, watched)
    relay = make_relay(sessions, broker, topology, [])
    ids = await add_events(
        sessions,
        (events.TO_BROADCAST, Channels.ingest_request(str(uuid.uuid4())), PROGRESS_TYPE, {"n": 1}),
        (events.TO_BROADCAST, watched, PROGRESS_TYPE, {"n": 2}),
    )
    assert await relay.publish_pending() == 2
    assert await waiting(sessions) == 0
    (message,) = await receive(probe, 1)
    assert message.message_id == f"ingestion-outbox-{ids[1]}"
    assert orjson.loads(message.body) == {"n": 2}


async def test_events_stay_in_the_outbox_when_the_broker_refuses_them(
    sessions: async_sessionmaker[AsyncSession],
    broker: RabbitBroker,
    topology: Topology,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    missing = Topology(ExchangeNames(ingest_frames=f"test.absent.{uuid.uuid4().hex[:10]}"))
    published: list[int] = []
    refused = make_relay(sessions, broker, missing, published)
    await add_events(sessions, (events.TO_FRAMES, "", FRAME_STORED_TYPE, {"frame_id": "f1"}))

    with pytest.raises(ChannelNotFoundEntity, match="NOT_FOUND - no exchange"):
        await refused.publish_pending()
    assert await waiting(sessions) == 1
    assert published == []

    # Once the exchange is there, the same event goes out under the same id.
    probe = await probe_queue(channel, topology)
    assert await make_relay(sessions, broker, topology, published).publish_pending() == 1
    (message,) = await receive(probe, 1)
    assert orjson.loads(message.body) == {"frame_id": "f1"}
    assert await waiting(sessions) == 0


async def test_the_running_relay_publishes_what_is_committed(
    sessions: async_sessionmaker[AsyncSession],
    broker: RabbitBroker,
    topology: Topology,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    probe = await probe_queue(channel, topology)
    published: list[int] = []
    all_published = asyncio.Event()

    def check() -> None:
        if sum(published) == 3:
            all_published.set()

    relay = make_relay(sessions, broker, topology, published, check)
    relay.start()
    try:
        for n in range(3):
            await add_events(sessions, (events.TO_FRAMES, "", FRAME_STORED_TYPE, {"n": n}))
            relay.nudge()
        messages = await receive(probe, 3)
        # The broker has them before the relay's commit takes them off the table.
        await asyncio.wait_for(all_published.wait(), WAIT)
    finally:
        await relay.stop()
    assert [orjson.loads(message.body)["n"] for message in messages] == [0, 1, 2]
    assert sum(published) == 3
    assert await waiting(sessions) == 0
