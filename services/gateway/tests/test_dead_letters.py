"""`edgeway-dead-letters`: a message the delivery limit dead-lettered goes back to its work
queue, whole, once; the command lists what waits. Connected: a private RabbitMQ virtual host."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import pytest
from opentelemetry.sdk.trace import TracerProvider

from edgeway.common.broker import declare_work, make_broker
from edgeway.common.settings import CommonSettings
from edgeway.common.testing import create_vhost, drop_vhost
from edgeway.common.topology import DEFAULT_DELIVERY_LIMIT, Topology
from edgeway.gateway.dead_letters import REQUEUED_HEADER, main

pytestmark = pytest.mark.connected

TOPOLOGY = Topology()
WORK = TOPOLOGY.occupancy_observations_queue


@pytest.fixture
def vhost_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name, url = create_vhost("edgeway-dead-letters")
    monkeypatch.setenv("EDGEWAY_AMQP_URL", url)
    yield url
    drop_vhost(name)


async def dead_letter_one(url: str, body: bytes, message_id: str) -> None:
    """Publish to the work queue and refuse it until the delivery limit dead-letters it."""
    broker = make_broker(
        CommonSettings(amqp_url=url), service="test", tracer_provider=TracerProvider()
    )
    await broker.start()
    try:
        await declare_work(broker, TOPOLOGY, TOPOLOGY.occupancy_observations, WORK)
    finally:
        await broker.stop()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=message_id, headers={"x-producer": "test"}),
            routing_key=WORK.name,
        )
        queue = await channel.get_queue(WORK.name)
        for _ in range(DEFAULT_DELIVERY_LIMIT + 1):
            # A basic.get does not wait: ask until the requeued copy is back.
            for _ in range(250):
                message = await queue.get(fail=False)
                if message is not None:
                    await message.nack(requeue=True)
                    break
                await asyncio.sleep(0.02)
        dead = TOPOLOGY.dead_letter_queue(WORK.name).name
        for _ in range(50):
            waiting = await channel.declare_queue(dead, passive=True)
            if waiting.declaration_result.message_count:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the message was not dead-lettered")


async def test_a_dead_letter_goes_back_to_its_work_queue(
    vhost_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await dead_letter_one(vhost_url, b'{"event": "frame_result"}', "m-1")
    # The command runs its own event loop, as it does from a shell.
    assert await asyncio.to_thread(main, ["list"]) == 0
    listed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert listed[WORK.name] == "1"

    assert await asyncio.to_thread(main, ["requeue", WORK.name]) == 0
    assert "moved 1" in capsys.readouterr().out
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        back = await (await channel.get_queue(WORK.name)).get(timeout=5)
        assert back is not None
        assert (back.body, back.message_id) == (b'{"event": "frame_result"}', "m-1")
        assert back.headers["x-producer"] == "test"
        assert back.headers[REQUEUED_HEADER] == f"{WORK.name}.dead"
        assert "x-death" not in back.headers
        assert back.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        await back.ack()
        dead = await channel.declare_queue(f"{WORK.name}.dead", passive=True)
        assert dead.declaration_result.message_count == 0


def test_an_unknown_queue_is_refused_with_the_list(
    vhost_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["requeue", "no.such.queue"])
    assert refused.value.code == 2
    assert WORK.name in capsys.readouterr().err
