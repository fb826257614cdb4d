"""The gateway without its broker: it starts, answers liveness, refuses traffic with 503 until
RabbitMQ answers, then serves; it stops on SIGTERM while it waits; and a producer whose frames
cannot be confirmed while the broker is cut away is told, then served again once it is back.

Connected: a real gateway process reaches the machine's RabbitMQ through a fault proxy
(`edgeway.common.testing.faults`) that refuses connections until the test opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import websockets

from edgeway.common.testing import (
    TEST_SECRET,
    ServiceProcess,
    free_port,
    make_token,
)
from edgeway.common.testing.faults import FaultProxy

pytestmark = pytest.mark.connected


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[FaultProxy]:
    broker = urlsplit(amqp_url)
    with FaultProxy(upstream=(broker.hostname or "127.0.0.1", broker.port or 5672)) as running:
        yield running


def gateway_behind(proxy: FaultProxy, amqp_url: str, log_path: Path) -> ServiceProcess:
    via_proxy = urlsplit(amqp_url)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
    return ServiceProcess(
        "edgeway.gateway",
        env={"EDGEWAY_AMQP_URL": via_proxy.geturl(), "EDGEWAY_JWT_SECRET": TEST_SECRET},
        port=free_port(),
        log_path=log_path,
        ready_path="/healthz",  # liveness only: readiness waits for the broker
    )


def wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met")


async def test_the_gateway_starts_without_its_broker_and_serves_once_it_answers(
    proxy: FaultProxy, amqp_url: str, tmp_path: Path
) -> None:
    proxy.refuse()
    gateway = gateway_behind(proxy, amqp_url, tmp_path / "gateway.log").start(wait=30)
    http = httpx.AsyncClient(base_url=gateway.url)
    try:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()["failures"]) == (503, {"broker": "not reached yet"})
        token = make_token("occupancy:subscribe", subject="t")
        ws = gateway.url.replace("http", "ws") + f"/client/ws/connect?token={token}"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"]
        models = await http.get("/model/count", headers={"Authorization": f"Bearer {token}"})
        assert models.status_code == 503
        assert models.json()["code"] == "unavailable"

        proxy.restore()
        await asyncio.to_thread(
            wait_for, lambda: httpx.get(gateway.url + "/readyz").status_code == 200
        )
        async with websockets.connect(ws) as client:
            assert client.protocol.state.name == "OPEN"
    finally:
        await http.aclose()
        gateway.stop()


def test_sigterm_stops_a_gateway_that_waits_for_its_broker(
    proxy: FaultProxy, amqp_url: str, tmp_path: Path
) -> None:
    proxy.refuse()
    gateway = gateway_behind(proxy, amqp_url, tmp_path / "gateway.log").start(wait=30)
    assert gateway.process is not None
    started = time.monotonic()
    gateway.process.terminate()
    gateway.process.wait(timeout=15)
    assert time.monotonic() - started < 15
    # uvicorn shuts down on SIGTERM, then re-raises it, so the status is -15 either way: the
    # log tells a clean shutdown from a kill.
    assert "Application shutdown complete" in gateway.log_text()


async def test_a_broker_cut_is_told_to_the_camera_in_order_and_publishing_resumes(
    proxy: FaultProxy, amqp_url: str, tmp_path: Path
) -> None:
    gateway = gateway_behind(proxy, amqp_url, tmp_path / "gateway.log").start(wait=30)
    await asyncio.to_thread(wait_for, lambda: httpx.get(gateway.url + "/readyz").status_code == 200)
    token = make_token("occupancy:publish", subject="cam")
    url = gateway.url.replace("http", "ws") + f"/model/ws/connect?token={token}&ack=1"
    seq = 0
    replies: list[dict[str, Any]] = []

    async def send_until(ws: websockets.ClientConnection, wanted: str) -> None:
        """Send a frame every 50 ms until one is answered with `wanted` ("ack" or a code)."""
        nonlocal seq
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seq += 1
            await ws.send(json.dumps(camera_frame(seq)))
            with contextlib.suppress(TimeoutError):
                while True:
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 0.05))
                    replies.append(reply)
                    if wanted in (reply["type"], reply.get("code")):
                        return
        raise AssertionError(f"no {wanted} in 30 s: {replies[-3:]}")

    try:
        async with websockets.connect(url) as ws:
            await send_until(ws, "ack")
            proxy.cut()
            await send_until(ws, "unavailable")
            proxy.restore()
            await send_until(ws, "ack")
    finally:
        gateway.stop()
    refused = [reply for reply in replies if reply["type"] == "error"]
    assert {reply["code"] for reply in refused} == {"unavailable"}
    assert all(reply["message_id"] and reply["reason"] for reply in refused)
    # Answers keep the order of the frames they answer, across the cut.
    answered = [reply.get("seq") or reply["details"]["seq"] for reply in replies]
    assert answered == sorted(answered)


def camera_frame(people: int) -> dict[str, Any]:
    return {
        "event": "frame_result",
        "camera": "Flint_1",
        "timestamp": time.time(),
        "summary": {"total_people": people, "free": ["t1"], "occupied": ["t2"]},
        "segments": [{"index": 0, "name": "t1", "capacity": 2, "count": 1, "status": "free"}],
    }
