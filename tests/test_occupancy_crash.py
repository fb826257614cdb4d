"""`kill -9` of the occupancy service mid-stream loses nothing the gateway accepted and
duplicates nothing: accepted means confirmed by the broker into a quorum queue, and the service
acks only after its commit and stores idempotently on the message id."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import websockets

from edgeway.common.testing import create_postgres_database, drop_postgres_database
from tests.stack import CAMERAS, Stack, frame

pytestmark = [pytest.mark.connected, pytest.mark.slow]

TOTAL = 1500
RATE = 150  # frames/s: the stream lasts 10 s; the kill lands after about 3 s


@pytest.fixture
def database_url() -> Iterator[str]:
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


def stored(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as connection:
        return connection.execute(
            "SELECT total_people, count(*) FROM observations GROUP BY total_people"
        ).fetchall()


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    amqp_url: str, database_url: str, tmp_path: Any
) -> None:
    stack = Stack(amqp_url, database_url, tmp_path).start()
    errors: list[dict[str, Any]] = []
    at_kill: list[int] = []
    try:
        cameras = list(CAMERAS)

        async def produce(model: websockets.ClientConnection) -> None:
            for i in range(TOTAL):
                await model.send(json.dumps(frame(cameras[i % len(cameras)], people=i)))
                await asyncio.sleep(1 / RATE)

        async def collect_errors(model: websockets.ClientConnection) -> None:
            async for reply in model:
                errors.append(json.loads(reply))

        async def crash_and_restart() -> None:
            await asyncio.sleep(3)
            stack.occupancy.kill(signal.SIGKILL)
            at_kill.append(len(await asyncio.to_thread(stored, database_url)))
            await asyncio.sleep(1.5)  # frames keep arriving and wait in the quorum queue
            await asyncio.to_thread(stack.occupancy.start)

        async with websockets.connect(stack.model_url) as model:
            reader = asyncio.create_task(collect_errors(model))
            await asyncio.gather(produce(model), crash_and_restart())
            await asyncio.sleep(0.5)
            reader.cancel()

        assert errors == []  # every frame was accepted (confirmed by the broker)
        for _ in range(150):
            counts = stored(database_url)
            if len(counts) == TOTAL:
                break
            await asyncio.sleep(0.2)
        assert sorted(people for people, _ in counts) == list(range(TOTAL))  # none lost
        assert all(n == 1 for _, n in counts)  # none twice
        assert 0 < at_kill[0] < TOTAL  # the kill really landed mid-stream
    finally:
        stack.stop()
