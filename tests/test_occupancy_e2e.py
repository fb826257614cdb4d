"""The Omega occupancy flow end to end, through the real gateway and occupancy processes.

A producer on `/model/ws/connect`, clients on `/client/ws/connect`, RabbitMQ and PostgreSQL in
between, all real (the machine's servers, a private vhost and a fresh database).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.stack import CAMERAS, Stack, frame

pytestmark = pytest.mark.connected

CLIENT_KEYS = {"location_name", "timestamp", "people_detected", "occupancy_percent"}


@pytest.fixture(scope="module")
def stack(
    amqp_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    running = Stack(
        amqp_url,
        database_url,
        tmp_path_factory.mktemp("e2e"),
        extra_env={"EDGEWAY_OTEL_EXPORTER": "jsonl"},
    ).start()
    yield running
    running.stop()


async def receive_until(
    ws: ClientConnection, predicate: Any, *, within: float = 10.0
) -> list[dict[str, Any]]:
    """Collect messages until one satisfies `predicate`; fail if none does in time."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no matching message within {within}s; got {seen[-5:]}"
        message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        seen.append(message)
        if predicate(message):
            return seen


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as connection:
        return connection.execute(query, params).fetchall()  # type: ignore[arg-type]


async def test_every_client_gets_each_update_in_omega_shape(
    stack: Stack, database_url: str
) -> None:
    clients = [await websockets.connect(stack.client_url) for _ in range(3)]
    sent = [
        frame("Flint_1", people=11, free=3, occupied=1),
        frame("SU_2", people=12, free=0, occupied=2),
        {
            **frame("Tims_1", people=13, free=1, occupied=2),
            "timestamp": "2026-11-21T10:00:00+00:00",
        },
    ]
    async with websockets.connect(stack.model_url) as model:
        for message in sent:
            await model.send(json.dumps(message))
        for client in clients:
            live: dict[int, dict[str, Any]] = {}

            def all_three(update: dict[str, Any], live: dict[int, dict[str, Any]] = live) -> bool:
                # Locations are independent streams: their updates may interleave in any order.
                if update["people_detected"] in (11, 12, 13):
                    live[update["people_detected"]] = update
                return len(live) == 3

            await receive_until(client, all_three)
            for update in live.values():
                assert set(update) == CLIENT_KEYS  # exactly Omega's keys, nothing else
            assert live[11] == {
                "location_name": "Flint Loop",
                "timestamp": sent[0]["timestamp"],  # forwarded exactly as sent
                "people_detected": 11,
                "occupancy_percent": 25.0,
            }
            assert live[12]["location_name"] == "Student Union 2"
            assert live[12]["occupancy_percent"] == 100.0
            assert live[13]["timestamp"] == "2026-11-21T10:00:00+00:00"
            assert live[13]["occupancy_percent"] == pytest.approx(200 / 3)
    for client in clients:
        await client.close()

    stored = rows(
        database_url,
        "SELECT camera_id, total_people, free_zones, occupied_zones, occupancy_percent "
        "FROM observations WHERE total_people IN (11, 12, 13) ORDER BY total_people",
    )
    assert stored == [
        ("Flint_1", 11, 3, 1, 25.0),
        ("SU_2", 12, 0, 2, 100.0),
        ("Tims_1", 13, 1, 2, pytest.approx(200 / 3)),
    ]


async def test_a_new_client_gets_the_latest_state_at_once(stack: Stack) -> None:
    async with websockets.connect(stack.model_url) as model:
        for camera in CAMERAS:
            await model.send(json.dumps(frame(camera, people=21)))
        await model.send(json.dumps(frame("OW_1", people=22)))
        # Wait until the last one went all the way through.
        async with websockets.connect(stack.client_url) as watcher:
            await receive_until(watcher, lambda m: m["people_detected"] == 22)
    started = time.monotonic()
    async with websockets.connect(stack.client_url) as late:
        snapshot = [json.loads(await asyncio.wait_for(late.recv(), 2)) for _ in CAMERAS]
    assert time.monotonic() - started < 2  # not after the next frame: there is none
    latest = {s["location_name"]: s["people_detected"] for s in snapshot}
    assert set(latest) == set(CAMERAS.values())
    assert latest.pop("One World") == 22
    assert set(latest.values()) == {21}
    for update in snapshot:
        assert set(update) == CLIENT_KEYS


async def test_clients_joining_mid_stream_get_each_update_once(stack: Stack) -> None:
    """An update published while a new client's snapshot is fetched is queued for it live and
    is in the snapshot too: it must still arrive once."""
    streaming = asyncio.Event()
    done = asyncio.Event()

    async def produce() -> None:
        cameras = list(CAMERAS)
        async with websockets.connect(stack.model_url) as model:
            count = 0
            while not done.is_set():
                camera = cameras[count % len(cameras)]
                await model.send(json.dumps(frame(camera, people=1000 + count)))
                count += 1
                if count == 50:
                    streaming.set()
                await asyncio.sleep(0.02)  # 50 frames/s: a load the suite keeps up with

    async def join(delay: float) -> list[tuple[str, float]]:
        await asyncio.sleep(delay)
        got: list[tuple[str, float]] = []
        async with websockets.connect(stack.client_url) as client:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    while True:
                        update = json.loads(await client.recv())
                        got.append((update["location_name"], update["timestamp"]))
        return got

    producing = asyncio.create_task(produce())
    await asyncio.wait_for(streaming.wait(), 10)
    joined = await asyncio.gather(*(join(0.05 * i) for i in range(12)))
    done.set()
    await producing
    for got in joined:
        assert len(got) > len(CAMERAS)  # the snapshot, then live updates
        twice = [key for key, count in collections.Counter(got).items() if count > 1]
        where = [index for index, key in enumerate(got) if key in twice]  # 0-6: the snapshot
        assert not twice, f"received twice: {twice} at {where}"


async def test_bad_input_is_answered_while_the_stream_continues(
    stack: Stack, database_url: str
) -> None:
    async with (
        websockets.connect(stack.client_url) as client,
        websockets.connect(stack.model_url) as model,
    ):
        await model.send(json.dumps(frame("Flint_1", people=31)))
        await model.send("{broken")
        assert json.loads(await model.recv())["code"] == "malformed_json"
        await model.send(json.dumps(frame("Flint_1", people=32, free=0, occupied=0)))
        assert json.loads(await model.recv())["code"] == "zero_zones"
        await model.send(json.dumps(frame("Nowhere_9", people=33)))
        unknown = json.loads(await asyncio.wait_for(model.recv(), 5))  # from the service
        assert unknown["code"] == "unknown_camera"
        assert "Nowhere_9" in unknown["reason"]
        assert unknown["message_id"]
        await model.send(json.dumps(frame("Flint_1", people=34)))
        updates = await receive_until(client, lambda m: m["people_detected"] == 34)
        people = [u["people_detected"] for u in updates]
        assert 31 in people
        assert 33 not in people
    # Nothing accepted is lost: the unknown camera's message is kept, with its reason.
    rejected = rows(
        database_url, "SELECT code, payload FROM rejections WHERE code = 'unknown_camera'"
    )
    assert any("Nowhere_9" in payload for _, payload in rejected)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(stack.gateway.url + "/metrics")).text
    assert 'code="malformed_json"' in metrics
    assert 'code="unknown_camera"' in metrics


async def test_one_trace_follows_a_message_from_producer_to_client(stack: Stack) -> None:
    async with (
        websockets.connect(stack.client_url) as client,
        websockets.connect(stack.model_url) as model,
    ):
        await model.send(json.dumps(frame("SU_1", people=40)))
        await model.send(json.dumps(frame("SU_1", people=41)))
        await receive_until(client, lambda m: m["people_detected"] == 41)
    await asyncio.sleep(0.5)

    def spans(name: str) -> list[dict[str, Any]]:
        path = Path(stack.workdir) / f"{name}.spans.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    gateway_spans, occupancy_spans = spans("gateway"), spans("occupancy")
    receives = [s for s in gateway_spans if s["name"] == "receive /model/ws/connect"]
    # Each frame is a trace of its own, linked to its connection's.
    assert len({s["context"]["trace_id"] for s in receives}) == len(receives) >= 2
    assert all(s["parent_id"] is None and s["links"] for s in receives)
    trace_id = receives[-1]["context"]["trace_id"]
    in_occupancy = [s for s in occupancy_spans if s["context"]["trace_id"] == trace_id]
    in_gateway = [s for s in gateway_spans if s["context"]["trace_id"] == trace_id]
    # gateway publish -> occupancy consume and publish -> gateway consume (fan-out)
    assert {s["kind"] for s in in_occupancy} >= {"SpanKind.CONSUMER", "SpanKind.PRODUCER"}
    assert sum(s["kind"] == "SpanKind.CONSUMER" for s in in_gateway) >= 1
    assert sum(s["kind"] == "SpanKind.PRODUCER" for s in in_gateway) >= 1
