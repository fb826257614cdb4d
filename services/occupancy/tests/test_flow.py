"""The occupancy service as it runs: a real process between the real RabbitMQ and PostgreSQL.

A test plays the camera model's side (publishing frame results the way the gateway does) and
the gateway's side (listening on the broadcast exchange, asking for the latest state).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import psycopg
import pytest
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from faststream.rabbit import RabbitBroker, RabbitQueue
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from edgeway.common.batching import (
    BATCH_CORRELATION_IDS,
    BATCH_LENGTHS,
    batch_size,
    pack_work,
    split_lines,
)
from edgeway.common.broker import publish
from edgeway.common.db import make_engine
from edgeway.common.envelope import Envelope, new_message_id
from edgeway.common.schemas.occupancy import OBSERVATION_TYPE, UPDATE_TYPE
from edgeway.common.settings import async_database_url
from edgeway.common.testing import POSTGRES_ADMIN_URL, ServiceProcess, free_port
from edgeway.common.topology import Channels, Topology

pytestmark = pytest.mark.connected

TOPOLOGY = Topology()
# Long enough for a broker round trip and a commit on a loaded CI machine; a pass takes far less.
WAIT = 15.0


def frame(camera: str = "Flint_1", **overrides: Any) -> dict[str, Any]:
    """A frame result as Omega's camera model sends it."""
    body: dict[str, Any] = {
        "event": "frame_result",
        "camera": camera,
        "timestamp": 1763321200.123456,
        "summary": {"total_people": 5, "free": ["T1", "T2", "T3"], "occupied": ["T4"]},
        "segments": [{"index": 0, "name": "T1", "capacity": 2, "count": 0, "status": "free"}],
    }
    body.update(overrides)
    return body


@dataclass(frozen=True)
class Broadcast:
    """One client message the service published: a message of its own, or one line of a batch
    (`batch` > 1: how many its AMQP message carried)."""

    routing_key: str | None
    body: bytes
    type: str | None
    correlation_id: str | None
    delivery_mode: DeliveryMode | int | None
    batch: int = 1


def broadcasts(message: AbstractIncomingMessage) -> list[Broadcast]:
    """A delivery of the broadcast exchange as the gateway hands it on: each message apart."""
    count = batch_size(message.headers)
    bodies = [message.body] if count == 1 else join_split(message.body, count)
    correlation_ids = (
        [message.correlation_id]
        if count == 1
        else str(message.headers[BATCH_CORRELATION_IDS]).split(",")
    )
    return [
        Broadcast(
            message.routing_key,
            body,
            message.type,
            correlation_id,
            message.delivery_mode,
            count,
        )
        for body, correlation_id in zip(bodies, correlation_ids, strict=True)
    ]


def join_split(body: bytes, count: int) -> list[bytes]:
    return [line.encode() for line in split_lines(body.decode(), count)]


class Edge:
    """The producer and gateway side of the service, on one broker connection."""

    def __init__(self, broker: RabbitBroker, listener: AbstractQueue, reply_channel: str) -> None:
        self.broker = broker
        self.listener = listener
        self.reply_channel = reply_channel
        self.received: list[Broadcast] = []

    def envelope(self, message_id: str | None = None, **headers: str) -> Envelope:
        return Envelope(
            type=OBSERVATION_TYPE,
            producer="camera-model",
            message_id=message_id or new_message_id(),
            reply_channel=self.reply_channel,
            headers=headers,
        )

    async def send(self, body: dict[str, Any] | bytes, *, message_id: str | None = None) -> str:
        envelope = self.envelope(message_id)
        await publish(
            self.broker,
            body if isinstance(body, bytes) else orjson.dumps(body),
            envelope=envelope,
            exchange=TOPOLOGY.occupancy_observations,
            durable=True,
        )
        return envelope.message_id

    async def send_batch(
        self, bodies: list[bytes], *, message_ids: list[str] | None = None
    ) -> list[str]:
        """Several frames in one message, as the gateway sends a connection's burst."""
        items = [
            (body, self.envelope(message_id))
            for body, message_id in zip(bodies, message_ids or [None] * len(bodies), strict=True)
        ]
        body, headers = pack_work(items)
        await publish(
            self.broker,
            body,
            envelope=self.envelope(**headers),
            exchange=TOPOLOGY.occupancy_observations,
            durable=True,
        )
        return [envelope.message_id for _, envelope in items]

    async def result_of(self, message_id: str) -> Broadcast:
        """The next broadcast caused by `message_id` (its correlation id)."""
        return await self.wait_for(lambda message: message.correlation_id == message_id)

    async def wait_for(
        self, matches: Callable[[Broadcast], bool], within: float = WAIT
    ) -> Broadcast:
        deadline = time.monotonic() + within
        while True:
            for index, message in enumerate(self.received):
                if matches(message):
                    return self.received.pop(index)
            incoming = await self.listener.get(no_ack=True, fail=False)
            if incoming is not None:
                self.received.extend(broadcasts(incoming))
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching broadcast in {within}s; got {self.received}")
            await asyncio.sleep(0.02)

    async def ask(self, body: bytes) -> Any:
        reply = await self.broker.request(
            body, queue=TOPOLOGY.occupancy_requests_queue.name, timeout=WAIT
        )
        return orjson.loads(reply.body)


@pytest.fixture
def service(amqp_url: str, postgres_url: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        "edgeway.occupancy",
        env={
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_OCCUPANCY_DATABASE_URL": postgres_url,
            "EDGEWAY_DATA_DIR": str(tmp_path / "var"),
            # Quick tries while the database is away: a handler that gave up after them would
            # burn the delivery limit in seconds (the outage test below).
            "EDGEWAY_DB_RETRY_DELAYS": "[0.2]",
        },
        port=free_port(),
        log_path=tmp_path / "occupancy.log",
    )
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture
async def edge(amqp_url: str, service: ServiceProcess) -> AsyncIterator[Edge]:
    reply_channel = Channels.producer(f"test-{uuid.uuid4().hex[:8]}", "conn-1")
    async with RabbitBroker(amqp_url) as broker:
        await broker.connect()
        listener = await broker.declare_queue(
            RabbitQueue(f"test.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        )
        broadcast = await broker.declare_exchange(TOPOLOGY.broadcast)
        await listener.bind(broadcast, routing_key=Channels.OCCUPANCY_LOCATIONS)
        await listener.bind(broadcast, routing_key=reply_channel)
        yield Edge(broker, listener, reply_channel)


@pytest.fixture
async def db(postgres_url: str, service: ServiceProcess) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(async_database_url(postgres_url, service="occupancy", data_dir=Path()))
    yield engine
    await engine.dispose()


async def query(db: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with db.connect() as connection:
        return list((await connection.execute(text(sql), params)).all())


async def location_id(db: AsyncEngine, name: str) -> int:
    rows = await query(db, "SELECT id FROM locations WHERE name = :name", name=name)
    return int(rows[0][0])


def metric(service: ServiceProcess, outcome: str) -> float:
    line = f'edgeway_occupancy_observations_total{{outcome="{outcome}"}} '
    for row in httpx.get(service.url + "/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.removeprefix(line))
    raise AssertionError(f"no {line!r} in /metrics")


async def test_an_observation_is_stored_and_broadcast_in_omegas_shape(
    edge: Edge, db: AsyncEngine, service: ServiceProcess
) -> None:
    message_id = await edge.send(frame())
    update = await edge.result_of(message_id)

    assert update.routing_key == Channels.occupancy_location(await location_id(db, "Flint Loop"))
    assert update.body == (
        b'{"location_name":"Flint Loop","timestamp":1763321200.123456,'
        b'"people_detected":5,"occupancy_percent":25.0}'
    )
    assert update.type == UPDATE_TYPE
    assert update.delivery_mode == DeliveryMode.NOT_PERSISTENT
    rows = await query(
        db,
        "SELECT camera_id, total_people, free_zones, occupied_zones, occupancy_percent,"
        " timestamp_raw FROM observations WHERE message_id = :id",
        id=message_id,
    )
    assert rows == [("Flint_1", 5, 3, 1, 25.0, "1763321200.123456")]

    # A redelivery (the gateway retried, or the service crashed before acking) is broadcast again
    # but not stored twice.
    await edge.send(frame(), message_id=message_id)
    again = await edge.result_of(message_id)
    assert again.body == update.body
    assert await query(db, "SELECT count(*) FROM observations") == [(1,)]
    assert (metric(service, "stored"), metric(service, "duplicate")) == (1.0, 1.0)


async def test_a_batch_of_frames_is_stored_once_each_and_broadcast_per_location_in_order(
    edge: Edge, db: AsyncEngine, service: ServiceProcess
) -> None:
    """A connection's burst in one message: each frame is its own observation (message id,
    capture time, answer), a location's updates of the group share one broadcast in the
    frames' order, and a redelivered batch stores nothing twice."""
    bodies = [
        orjson.dumps(frame(summary=summary(people=1))),
        orjson.dumps(frame("SU_2")),
        b'{"camera": "Nowhere_9", "timestamp": 1763321200.5,\n "summary": '
        b'{"total_people": 1, "free": ["a"], "occupied": []}}',  # as the producer wrote it
        orjson.dumps(frame(summary=summary(people=3))),
        orjson.dumps(frame(summary=summary(people=2))),
    ]
    ids = await edge.send_batch(bodies)
    flint = [await edge.result_of(ids[index]) for index in (0, 3, 4)]
    assert [orjson.loads(update.body)["people_detected"] for update in flint] == [1, 3, 2]
    assert [update.batch for update in flint] == [3, 3, 3]  # one AMQP message
    assert flint[0].routing_key == Channels.occupancy_location(await location_id(db, "Flint Loop"))
    assert flint[0].type == UPDATE_TYPE
    union = await edge.result_of(ids[1])
    assert (orjson.loads(union.body)["location_name"], union.batch) == ("Student Union 2", 1)
    error = await edge.result_of(ids[2])
    assert error.routing_key == edge.reply_channel
    assert orjson.loads(error.body)["code"] == "unknown_camera"
    stored = await query(db, "SELECT message_id, total_people FROM observations")
    assert sorted((str(row[0]), row[1]) for row in stored) == sorted(
        [(ids[0], 1), (ids[1], 5), (ids[3], 3), (ids[4], 2)]
    )
    rejected = await query(db, "SELECT message_id, payload FROM rejections")
    assert [(str(row[0]), row[1].encode()) for row in rejected] == [(ids[2], bodies[2])]

    await edge.send_batch(bodies, message_ids=ids)  # redelivered: nothing stored twice
    again = [(await edge.result_of(message_id)).body for message_id in ids]
    assert again == [flint[0].body, union.body, error.body, flint[1].body, flint[2].body]
    assert await query(db, "SELECT count(*) FROM observations") == [(4,)]
    assert await query(db, "SELECT count(*) FROM rejections") == [(1,)]
    assert (metric(service, "stored"), metric(service, "duplicate")) == (4.0, 5.0)


async def test_a_batch_whose_body_and_headers_disagree_is_dead_lettered_at_once(
    edge: Edge,
) -> None:
    body, headers = pack_work([(orjson.dumps(frame()), edge.envelope())] * 2)
    envelope = edge.envelope(**{**headers, BATCH_LENGTHS: "3,3"})
    await publish(
        edge.broker,
        body,
        envelope=envelope,
        exchange=TOPOLOGY.occupancy_observations,
        durable=True,
    )
    dead = await dead_letter(edge, envelope.message_id)
    (death,) = cast(list[dict[str, Any]], dead.headers["x-death"])
    assert death["reason"] == "rejected"
    fine = await edge.send(frame())  # the service goes on
    assert orjson.loads((await edge.result_of(fine)).body)["location_name"] == "Flint Loop"


async def test_rejections_reach_the_producer_are_kept_and_do_not_stop_the_flow(
    edge: Edge, db: AsyncEngine, service: ServiceProcess
) -> None:
    unknown = await edge.send(frame("Nowhere_9"))
    empty = await edge.send(frame(summary={"total_people": 1, "free": [], "occupied": []}))
    garbled = await edge.send(b'{"camera": "Flint_1", "timestamp": ')
    wrong = await edge.send(frame(timestamp="yesterday"))

    expected = {
        unknown: "unknown_camera",
        empty: "zero_zones",
        garbled: "malformed_json",
        wrong: "invalid_shape",
    }
    for message_id, code in expected.items():
        error = await edge.result_of(message_id)
        assert error.routing_key == edge.reply_channel
        sent = orjson.loads(error.body)
        assert (sent["type"], sent["code"], sent["message_id"]) == ("error", code, message_id)
        assert sent["reason"]
    rows = await query(db, "SELECT message_id, code, payload FROM rejections")
    assert {row[0]: row[1] for row in rows} == expected
    assert {row[0]: row[2] for row in rows}[garbled] == '{"camera": "Flint_1", "timestamp": '
    assert await query(db, "SELECT count(*) FROM observations") == [(0,)]

    # The producer goes on; its next good frame is taken as if nothing happened.
    good = await edge.send(frame("SU_2", timestamp="2025-11-16T21:26:40+02:00"))
    update = orjson.loads((await edge.result_of(good)).body)
    assert update == {
        "location_name": "Student Union 2",
        "timestamp": "2025-11-16T21:26:40+02:00",
        "people_detected": 5,
        "occupancy_percent": 25.0,
    }
    assert metric(service, "rejected") == 4.0


async def test_latest_state_is_answered_over_request_reply(edge: Edge) -> None:
    assert await edge.ask(b'{"query": "latest"}') == []

    newer = await edge.send(frame("OW_1", timestamp=1763321300, summary=summary(people=2)))
    await edge.result_of(newer)
    # Captured earlier, delivered later: history, not the latest state.
    older = await edge.send(frame("OW_1", timestamp=1763321200, summary=summary(people=9)))
    await edge.result_of(older)
    tims = await edge.send(frame("Tims_1", timestamp=1763321250.5))
    await edge.result_of(tims)

    latest = await edge.ask(b'{"query": "latest"}')
    assert sorted(latest, key=lambda update: update["location_name"]) == [
        {
            "location_name": "One World",
            "timestamp": 1763321300,
            "people_detected": 2,
            "occupancy_percent": 50.0,
        },
        {
            "location_name": "Tim Hortons",
            "timestamp": 1763321250.5,
            "people_detected": 5,
            "occupancy_percent": 25.0,
        },
    ]
    assert "error" in await edge.ask(b'{"query": "everything"}')
    assert "error" in await edge.ask(b"latest please")


async def test_history_is_answered_over_request_reply(edge: Edge) -> None:
    now = time.time()
    hour = int(now) // 3600 * 3600  # this hour's window: both frames fall in it
    for second, people in ((1, 2), (2, 4)):
        sent = await edge.send(
            frame("OW_1", timestamp=hour + second, summary=summary(people=people))
        )
        await edge.result_of(sent)
    long_ago = await edge.send(frame("Tims_1", timestamp=now - 7200))
    await edge.result_of(long_ago)

    history = await edge.ask(b'{"query": "history", "seconds": 3600, "bucket_s": 3600}')
    assert history["bucket_s"] == 3600
    # One window (the two frames averaged); the frame of two hours ago is older than asked.
    [one_world] = history["locations"]
    assert one_world["location_name"] == "One World"
    assert one_world["points"] == [[hour, 50.0, 3.0]]
    refused = await edge.ask(b'{"query": "history", "bucket_s": 0}')
    assert refused["code"] == "invalid_query"
    assert "bucket_s" in refused["error"]


def summary(*, people: int) -> dict[str, Any]:
    return {"total_people": people, "free": ["T1"], "occupied": ["T2"]}


async def test_a_camera_an_operator_adds_works_without_a_restart(
    edge: Edge, db: AsyncEngine
) -> None:
    async with db.begin() as connection:
        library = (
            await connection.execute(
                text("INSERT INTO locations (name) VALUES ('Library') RETURNING id")
            )
        ).scalar_one()
        await connection.execute(
            text("INSERT INTO cameras (id, location_id) VALUES ('Lib_1', :id)"), {"id": library}
        )
    message_id = await edge.send(frame("Lib_1"))
    update = await edge.result_of(message_id)
    assert update.routing_key == Channels.occupancy_location(library)
    assert orjson.loads(update.body)["location_name"] == "Library"


def admin(statement: sql.SQL | sql.Composed, *params: Any) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(statement, params)


@pytest.mark.slow
async def test_a_database_outage_longer_than_the_delivery_limit_loses_nothing(
    edge: Edge, db: AsyncEngine, postgres_url: str, service: ServiceProcess
) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    database = sql.Identifier(name)
    admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
    admin(
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"), name
    )
    sent: list[str] = []
    try:
        # Far longer than the delivery limit's window (5 deliveries of what a handler rides
        # out, here 0.2 s): before, these were dead-lettered although they had been accepted.
        outage_ends = time.monotonic() + 20
        while time.monotonic() < outage_ends:
            sent.append(await edge.send(frame()))
            await asyncio.sleep(2)
        async with httpx.AsyncClient() as http:
            readiness = await http.get(service.url + "/readyz")
        assert readiness.status_code == 503
        assert "database" in readiness.json()["failures"]
    finally:
        admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(database))

    for message_id in sent:
        update = await edge.result_of(message_id)
        assert orjson.loads(update.body)["location_name"] == "Flint Loop"
    ids = await query(db, "SELECT message_id FROM observations")
    assert sorted(str(row[0]) for row in ids) == sorted(sent)
    # None of them was dead-lettered (read back: RabbitMQ 3.10 reports a quorum queue's
    # message count as 0 on declare, whatever it holds).
    assert await dead_lettered(edge, set(sent)) == []
    async with httpx.AsyncClient() as http:
        assert (await http.get(service.url + "/readyz")).status_code == 200


async def test_a_message_that_always_fails_is_dead_lettered_after_the_delivery_limit(
    edge: Edge, db: AsyncEngine, postgres_url: str
) -> None:
    async with db.begin() as connection:
        await connection.execute(text("ALTER TABLE observations RENAME TO observations_away"))
    try:
        doomed = await edge.send(frame())
        dead = await dead_letter(edge, doomed)
    finally:
        async with db.begin() as connection:
            await connection.execute(text("ALTER TABLE observations_away RENAME TO observations"))
    # Requeued on each failure until the quorum queue's delivery limit, not rejected at once.
    (death,) = cast(list[dict[str, Any]], dead.headers["x-death"])
    assert death["reason"] == "delivery_limit"
    assert dead.body == orjson.dumps(frame())

    # The service is still consuming.
    fine = await edge.send(frame())
    assert orjson.loads((await edge.result_of(fine)).body)["location_name"] == "Flint Loop"


async def dead_lettered(edge: Edge, message_ids: set[str]) -> list[str]:
    """Which of `message_ids` wait in the dead letters (the others there are put back)."""
    queue = await edge.broker.declare_queue(
        TOPOLOGY.dead_letter_queue(TOPOLOGY.occupancy_observations_queue.name)
    )
    found: list[str] = []
    others: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        if message.message_id in message_ids:
            found.append(message.message_id)
            await message.ack()
        else:
            others.append(message)
    for message in others:
        await message.nack(requeue=True)
    return found


async def dead_letter(edge: Edge, message_id: str) -> AbstractIncomingMessage:
    queue = await edge.broker.declare_queue(
        TOPOLOGY.dead_letter_queue(TOPOLOGY.occupancy_observations_queue.name)
    )
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
        elif message.message_id == message_id:
            return message
    raise TimeoutError(f"{message_id} was not dead-lettered in {WAIT}s")
