"""The envelope survives a real trip through RabbitMQ with its identity and times intact."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime

import aio_pika
import pytest

from edgeway.common.envelope import Envelope

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_derived_messages_keep_the_correlation_and_get_a_new_id() -> None:
    first = Envelope(type="a.v1", producer="gateway", captured_at=1.5)
    second = first.derive(type="b.v1", producer="occupancy")
    assert second.message_id != first.message_id
    assert second.correlation_id == first.message_id
    assert second.captured_at == first.captured_at
    assert first.message_id < Envelope(type="a.v1", producer="x").message_id  # UUIDv7 sorts by time


def test_received_time_is_an_aware_utc_datetime_or_now_when_unusable() -> None:
    received = Envelope(type="a.v1", producer="gateway", received_at=1763726400.25)
    assert received.received_datetime() == datetime(2025, 11, 21, 12, 0, 0, 250000, tzinfo=UTC)
    for unusable in (math.nan, 1e300):
        before = datetime.now(UTC)
        when = Envelope(type="a.v1", producer="x", received_at=unusable).received_datetime()
        assert before <= when <= datetime.now(UTC)


@pytest.mark.connected
async def test_times_and_ids_survive_the_broker(amqp_url: str) -> None:
    sent = Envelope(
        type="test.v1",
        producer="tester",
        captured_at=time.time() - 3.25,
        reply_channel="gateway.g.c",
        traceparent=TRACEPARENT,
    )
    kwargs = sent.publish_kwargs()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"{}",
                message_id=kwargs["message_id"],
                correlation_id=kwargs["correlation_id"],
                content_type=kwargs["content_type"],
                type=kwargs["message_type"],
                headers=kwargs["headers"],
            ),
            routing_key=queue.name,
        )
        message = None
        for _ in range(50):
            message = await queue.get(fail=False)
            if message is not None:
                break
            await asyncio.sleep(0.05)
        assert message is not None
        received = Envelope.from_message(message, type="test.v1")  # type: ignore[arg-type]
    assert received.message_id == sent.message_id
    assert received.producer == "tester"
    assert received.reply_channel == "gateway.g.c"
    # Passed on unchanged where no tracing middleware writes its own.
    assert received.derive(type="next.v1", producer="occupancy").traceparent == TRACEPARENT
    assert sent.captured_at is not None
    assert received.captured_at is not None
    assert abs(received.captured_at - sent.captured_at) < 1e-5
    assert abs(received.received_at - sent.received_at) < 1e-5
