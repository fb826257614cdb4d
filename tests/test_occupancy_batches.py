"""A camera's burst end to end: frames that share AMQP messages on the way stay frames.

The real gateway and occupancy processes (untraced: a traced camera connection publishes each
frame alone), RabbitMQ and PostgreSQL. The frames a camera sends while its earlier ones await
their confirms go to the occupancy service together, and the updates one commit group makes for
a location go to the gateway together; neither may show to the camera, the database or the
clients: each frame is answered, stored and broadcast as if it had come alone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from tests.stack import Stack, frame

pytestmark = pytest.mark.connected

BURST = 60
CAMERAS = ("Flint_1", "SU_2", "Tims_1")


@pytest.fixture(scope="module")
def stack(
    amqp_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    running = Stack(amqp_url, database_url, tmp_path_factory.mktemp("batches")).start()
    yield running
    running.stop()


async def answers(model: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(model.recv(), 15)) for _ in range(count)]


async def updates(client: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(client.recv(), 15)) for _ in range(count)]


def metric(stack: Stack, name: str, **labels: str) -> float:
    """A counter of the occupancy service's /metrics (the sample whose labels include these)."""
    text = httpx.get(stack.occupancy.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"no {name} {labels} in /metrics")


def stored(database_url: str) -> list[tuple[str, int]]:
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT message_id::text, total_people FROM observations ORDER BY total_people"
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


async def test_a_burst_is_acked_stored_and_broadcast_frame_by_frame_in_order(
    stack: Stack, database_url: str
) -> None:
    clients = [await websockets.connect(stack.client_url) for _ in range(3)]
    await asyncio.sleep(0.5)  # their (empty) snapshots and bindings are in place
    burst = [frame(CAMERAS[i % len(CAMERAS)], people=100 + i) for i in range(BURST)]
    async with websockets.connect(stack.model_url + "&ack=1") as model:
        for message in burst:  # all at once: most go while the first awaits its confirm
            await model.send(json.dumps(message))
        acks = await answers(model, BURST)
    assert [(ack["type"], ack["seq"]) for ack in acks] == [("ack", i + 1) for i in range(BURST)]

    for client in clients:
        got = await updates(client, BURST)
        assert sorted(update["people_detected"] for update in got) == [
            100 + i for i in range(BURST)
        ]
        for camera_index, location in enumerate(("Flint Loop", "Student Union 2", "Tim Hortons")):
            people = [u["people_detected"] for u in got if u["location_name"] == location]
            # Each location's updates in the order its camera's frames were sent.
            assert people == list(range(100 + camera_index, 100 + BURST, len(CAMERAS)))
        assert all(
            set(update) == {"location_name", "timestamp", "people_detected", "occupancy_percent"}
            for update in got
        )
    assert stored(database_url) == [(ack["message_id"], 100 + i) for i, ack in enumerate(acks)]

    # The camera heard of none of it (say it reconnected) and sends the burst again: the same
    # message ids, acked again, stored once.
    async with websockets.connect(stack.model_url + "&ack=1") as model:
        for message in burst:
            await model.send(json.dumps(message))
        again = await answers(model, BURST)
    assert [ack["message_id"] for ack in again] == [ack["message_id"] for ack in acks]
    for client in clients:
        assert len(await updates(client, BURST)) == BURST  # broadcast again, as a redelivery is
        await client.close()
    assert len(stored(database_url)) == BURST
    # Fewer AMQP messages than frames, both ways: they did share messages.
    queue = "edgeway.occupancy.observations"
    assert metric(stack, "edgeway_amqp_consumed_total", queue=queue, outcome="acked") < 2 * BURST
    confirmed = metric(
        stack, "edgeway_amqp_published_total", publisher="occupancy", outcome="confirmed"
    )
    assert confirmed < 2 * BURST
