"""Every service app reports its readiness to the gateways: the same checks as its `/readyz`,
published every `readiness_interval_s` on `system.readiness.<service>`, ready or not, with the
failing checks' reasons; and nothing breaks while the broker is out of reach.

Connected: a real service app (`broker_service(...).app`) started on the session's RabbitMQ
virtual host, its reports read from a queue bound as a gateway binds it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractQueue
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from edgeway.common.readiness import Reporter, failures
from edgeway.common.schemas.system import REASON_MAX_CHARS, ReadinessReport
from edgeway.common.service import broker_service
from edgeway.common.settings import CommonSettings
from edgeway.common.topology import Channels, Topology

INTERVAL_S = 0.2


class ModelCheck:
    """A readiness check the test turns on and off (a service's "models loaded")."""

    def __init__(self) -> None:
        self.reason: str | None = None

    async def __call__(self) -> None:
        if self.reason is not None:
            raise RuntimeError(self.reason)


def settings(tmp_path: Path, amqp_url: str) -> CommonSettings:
    return CommonSettings(
        amqp_url=amqp_url, data_dir=tmp_path / "var", readiness_interval_s=INTERVAL_S
    )


@pytest.fixture
async def reports(amqp_url: str) -> AsyncIterator[AbstractQueue]:
    """What a gateway would receive of the `sample` service's reports."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    broadcast = Topology().broadcast
    exchange = await channel.declare_exchange(
        broadcast.name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key=Channels.system_readiness("sample"))
    yield queue
    await connection.close()


async def next_report(queue: AbstractQueue) -> ReadinessReport:
    async with asyncio.timeout(10.0):
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                assert message.routing_key == "system.readiness.sample"
                assert message.headers["x-producer"] == "sample"
                assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
                return ReadinessReport.model_validate(orjson.loads(message.body))
            await asyncio.sleep(INTERVAL_S / 4)


async def readyz(app: AsgiFastStream) -> tuple[int, dict[str, object]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        answer = await http.get("/readyz")
    return answer.status_code, answer.json()


@pytest.mark.connected
async def test_a_service_reports_ready_then_a_failing_check_with_its_reason(
    tmp_path: Path, amqp_url: str, reports: AbstractQueue
) -> None:
    model = ModelCheck()
    base = broker_service(
        settings(tmp_path, amqp_url),
        service="sample",
        tracer_provider=TracerProvider(),
        registry=CollectorRegistry(),
    )
    app = base.app(checks={"models": model})
    await app.start()
    try:
        report = await next_report(reports)
        assert (report.service, report.status, report.failures) == ("sample", "ready", {})
        assert report.instance == f"{socket.gethostname()}/{os.getpid()}"
        assert report.interval_s == INTERVAL_S
        assert await readyz(app) == (200, {"status": "ready"})

        model.reason = "weights not loaded: " + "x" * 1000
        while (report := await next_report(reports)).status == "ready":
            pass
        assert report.status == "not ready"
        reason = report.failures["models"]
        assert reason.startswith("RuntimeError: weights not loaded: xxx")
        assert len(reason) == REASON_MAX_CHARS
        # /readyz says the same thing: one set of checks behind both.
        status, body = await readyz(app)
        assert (status, body) == (503, {"status": "not ready", "failures": report.failures})
    finally:
        await app.stop()
    # Stopped: no more reports.
    await asyncio.sleep(INTERVAL_S * 2)
    await reports.purge()
    await asyncio.sleep(INTERVAL_S * 3)
    assert await reports.get(no_ack=True, fail=False) is None


async def test_without_a_broker_the_report_says_so_and_publishing_fails_quietly() -> None:
    broker = RabbitBroker("amqp://guest:guest@127.0.0.1:1/")
    model = ModelCheck()

    async def check() -> dict[str, str]:
        return await failures(broker, {"models": model}, broker_timeout=0.1)

    reporter = Reporter(
        broker,
        service="sample",
        exchange=Topology().broadcast,
        interval_s=0.1,
        check=check,
    )
    report = await reporter.report()
    assert (report.status, report.failures) == ("not ready", {"broker": "not connected"})
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the client raises
        await reporter.publish_once()
    await reporter.start()
    await asyncio.sleep(0.35)
    await reporter.stop()  # raises what the loop died of, if it did: it goes on through failures
