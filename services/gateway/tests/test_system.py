"""`GET /api/v1/system/services`: each service instance's readiness as its reports say, and the
gateway's own.

The board alone (a clock the test moves): ready, not ready, not reporting after three silent
intervals, forgotten after many, bad reports dropped. Connected: a gateway process and a real
service app (`broker_service(...).app`, reporting every 0.2 s) on the session's RabbitMQ
virtual host: the route lists it ready, then with its failing check, then not reporting once
it has stopped.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from edgeway.common.schemas.system import ReadinessReport
from edgeway.common.service import broker_service
from edgeway.common.settings import CommonSettings
from edgeway.common.testing import ServiceProcess, bearer, gateway_fixture
from edgeway.gateway.system.state import FORGET_INTERVALS, SERVICES, Board

PATH = "/api/v1/system/services"
READER = bearer("system:read")
INTERVAL_S = 0.2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(instance: str = "host-a/7", **fields: Any) -> ReadinessReport:
    values: dict[str, Any] = {
        "service": "occupancy",
        "instance": instance,
        "status": "ready",
        "checked_at": time.time(),
        "interval_s": 5.0,
        "version": "0.1.0",
        **fields,
    }
    return ReadinessReport(**values)


def instances(board: Board, service: str) -> list[dict[str, Any]]:
    found = {s.service: s for s in board.services()}
    return [i.model_dump() for i in found[service].instances]


def test_every_service_is_listed_even_before_any_instance_reports() -> None:
    board = Board()
    assert [(s.service, s.instances) for s in board.services()] == [(n, []) for n in SERVICES]


def test_each_instance_shows_its_latest_report_then_not_reporting_then_nothing() -> None:
    clock = Clock()
    board = Board(clock=clock)
    board.take(report("host-b/9"))
    board.take(report("host-a/7"))
    board.take(report("host-a/7", status="not ready", failures={"database": "OSError: refused"}))
    clock.now += 2.5
    shown = instances(board, "occupancy")
    assert [(i["instance"], i["status"], i["age_s"]) for i in shown] == [
        ("host-a/7", "not ready", 2.5),
        ("host-b/9", "ready", 2.5),
    ]
    assert shown[0]["failures"] == {"database": "OSError: refused"}
    assert shown[0]["version"] == "0.1.0"
    clock.now += 15.0  # 17.5 s: more than three 5 s intervals without a report
    board.take(report("host-b/9"))
    shown = instances(board, "occupancy")
    assert [(i["instance"], i["status"]) for i in shown] == [
        ("host-a/7", "not reporting"),
        ("host-b/9", "ready"),
    ]
    assert shown[0]["failures"] == {"database": "OSError: refused"}  # the last one's, kept
    clock.now += FORGET_INTERVALS * 5.0
    board.take(report("host-b/9"))
    assert [i["instance"] for i in instances(board, "occupancy")] == ["host-b/9"]


def test_a_service_outside_the_known_list_is_listed_after_them() -> None:
    board = Board()
    board.take(report(service="sample"))
    assert [s.service for s in board.services()] == [*SERVICES, "sample"]


def test_a_report_that_does_not_validate_is_dropped() -> None:
    board = Board()
    board.take_message(b"not json")
    board.take_message(b'{"service": "occupancy", "instance": "x", "status": "fine"}')
    board.take_message(report().model_dump_json().encode())
    assert len(instances(board, "occupancy")) == 1


# --- connected: a gateway process and a real service app ------------------------------------

gateway = gateway_fixture()


class ModelCheck:
    def __init__(self) -> None:
        self.reason: str | None = None

    async def __call__(self) -> None:
        if self.reason is not None:
            raise RuntimeError(self.reason)


async def sample_instances(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    answer = await http.get(PATH)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["gateway"]["status"] == "ready"
    assert body["gateway"]["failures"] == {}
    services = {s["service"]: s["instances"] for s in body["services"]}
    assert set(SERVICES) <= set(services)
    return services.get("sample", [])


async def until(http: httpx.AsyncClient, status: str) -> dict[str, Any]:
    """The sample service's one instance, once it shows `status`."""
    async with asyncio.timeout(15.0):
        while True:
            found = await sample_instances(http)
            if found and found[0]["status"] == status:
                assert len(found) == 1, found
                instance: dict[str, Any] = found[0]
                return instance
            await asyncio.sleep(INTERVAL_S / 2)


@pytest.mark.connected
async def test_the_route_shows_a_service_ready_failing_then_not_reporting(
    gateway: ServiceProcess, amqp_url: str, tmp_path: Path
) -> None:
    model = ModelCheck()
    base = broker_service(
        CommonSettings(
            amqp_url=amqp_url, data_dir=tmp_path / "var", readiness_interval_s=INTERVAL_S
        ),
        service="sample",
        tracer_provider=TracerProvider(),
        registry=CollectorRegistry(),
    )
    app = base.app(checks={"models": model})
    async with httpx.AsyncClient(base_url=gateway.url, headers=READER) as http:
        await app.start()
        try:
            ready = await until(http, "ready")
            assert ready["failures"] == {}
            assert ready["interval_s"] == INTERVAL_S
            assert ready["age_s"] < 3 * INTERVAL_S
            model.reason = "weights not loaded"
            failing = await until(http, "not ready")
            assert failing["failures"] == {"models": "RuntimeError: weights not loaded"}
        finally:
            await app.stop()
        silent = await until(http, "not reporting")
        # Over three intervals (the route rounds the age to the millisecond).
        assert silent["age_s"] >= 3 * INTERVAL_S
        assert silent["failures"] == {"models": "RuntimeError: weights not loaded"}


@pytest.mark.connected
async def test_the_route_needs_the_system_read_scope(gateway: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        anonymous = await http.get(PATH)
        assert anonymous.status_code == 401
        assert "system:read" in anonymous.json()["reason"]
        refused = await http.get(PATH, headers=bearer("occupancy:subscribe"))
        assert refused.status_code == 403
        assert refused.json() == {
            "type": "error",
            "code": "forbidden",
            "reason": "the token lacks scope system:read",
        }
        answer = await http.get(PATH, headers=READER)
        assert answer.status_code == 200
        own = answer.json()["gateway"]
        assert own["gateway_id"]
        assert own["instance"]
