"""`direct_upload`, the upload route without FastAPI's stack, answers every upload as the route
does: the same status, headers and body, the same refusals counted, the same message published.

Both are driven over ASGI with a real HTTP client, without the lifespan; the broker link is a
recording stand-in (its vehicle list and confirmed publishes). The process tests
(`test_telemetry.py`, `tests/test_telemetry_e2e.py`) serve real loggers through the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeway.common.envelope import Envelope
from edgeway.common.settings import Environment
from edgeway.common.telemetry import telemetry_pb2, wire
from edgeway.common.telemetry.predictor import Encoder, Sample
from edgeway.common.testing import TEST_SECRET, make_token
from edgeway.gateway.app import create_app
from edgeway.gateway.settings import GatewaySettings
from edgeway.gateway.state import Gateway
from edgeway.gateway.telemetry.uploads import UPLOAD_PATHS, direct_upload

VIN = "5YJ3E1EA1KF000042"
OTHER_VIN = "5YJ3E1EA1KF000043"  # registered, but not this logger's
UNREGISTERED_VIN = "5YJ3E1EA1KF000044"  # this logger's, but not registered
LIMIT = 4096
LOGGER = make_token("telemetry:publish", vin=[VIN, UNREGISTERED_VIN])
PROTOBUF = "application/x-protobuf"


def record() -> bytes:
    sample = Sample(
        timestamp_ms=1_763_000_000_000,
        speed=60.0,
        battery=80.0,
        power=20.0,
        odometer=1000.0,
        heading=90.0,
    )
    return wire.encode_packet(Encoder().encode(sample))


def out_of_range() -> bytes:
    message = telemetry_pb2.CompressedVehicleData(
        timestamp=1_763_000_000_000, battery_level=140.0, is_resync=True
    )
    return bytes(message.SerializeToString())


class Broker:
    """The broker link as the upload path uses it: reached or not, the telemetry service's
    vehicle list, and publishes that are confirmed (recorded) or fail."""

    def __init__(self, gateway: Gateway, *, connected: bool, fail: bool) -> None:
        self.published: list[tuple[bytes, Envelope]] = []
        self.fail = fail
        if connected:
            gateway.link.connected.set()
        gateway.link.request = self.request  # type: ignore[method-assign]
        gateway.link.publish_work = self.publish_work  # type: ignore[method-assign]

    async def request(self, **_: Any) -> Any:
        return {"vehicles": [VIN, OTHER_VIN]}

    async def publish_work(self, body: bytes, *, envelope: Envelope, **_: Any) -> None:
        if self.fail:
            raise ConnectionError("the broker went away")
        self.published.append((body, envelope))


def build(*, connected: bool = True, fail: bool = False) -> tuple[FastAPI, Broker]:
    app = create_app(
        GatewaySettings(
            jwt_secret=TEST_SECRET,
            environment=Environment.DEVELOPMENT,
            metrics_port=None,
            max_upload_bytes=LIMIT,
        )
    )
    return app, Broker(app.state.gateway, connected=connected, fail=fail)


def direct(app: FastAPI) -> ASGIApp:
    """`direct_upload` served as the server serves it, with nothing of the app around it."""
    gateway: Gateway = app.state.gateway

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        response = await direct_upload(Request(scope, receive, send), gateway)
        await response(scope, receive, send)

    return serve


async def post(app: ASGIApp, path: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        return await http.post(path, content=body, headers=headers)


def counted(app: FastAPI, name: str) -> dict[tuple[str, ...], float]:
    """One of the gateway's counters (`Metrics`): its values by labels."""
    counter = getattr(app.state.gateway.metrics, name)
    return {
        tuple(sample.labels.values()): sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def logger(**headers: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {LOGGER}",
        "Content-Type": PROTOBUF,
        "X-Compressed": "true",
        "X-Vehicle-VIN": VIN,
        **headers,
    }


Case = tuple[dict[str, str], Callable[[], bytes], int, str]
REFUSALS: dict[str, Case] = {
    "no token": ({**logger(), "Authorization": ""}, record, 401, "unauthorized"),
    "not a bearer token": (logger(Authorization="Basic dXNlcjpwdw=="), record, 401, "unauthorized"),
    "not a JWT": (logger(Authorization="Bearer garbage"), record, 401, "unauthorized"),
    "another scope": (
        logger(Authorization=f"Bearer {make_token('telemetry:subscribe')}"),
        record,
        403,
        "forbidden",
    ),
    "another logger's vehicle": (logger(**{"X-Vehicle-VIN": OTHER_VIN}), record, 403, ""),
    "JSON": (logger(**{"Content-Type": "application/json"}), record, 415, ""),
    "too large": (logger(), lambda: b"\x08" * (LIMIT + 1), 413, "too_large"),
    "not protobuf": (logger(), lambda: b"\xff\xff\xff not protobuf", 400, "invalid_telemetry"),
    "out of range": (logger(), out_of_range, 400, "invalid_telemetry"),
    "bad VIN": (logger(**{"X-Vehicle-VIN": "not-a-vin"}), record, 400, "invalid_telemetry"),
    "bad flag": (logger(**{"X-Compressed": "maybe"}), record, 400, "invalid_telemetry"),
    "unregistered": (
        logger(**{"X-Vehicle-VIN": UNREGISTERED_VIN}),
        record,
        422,
        "unknown_vehicle",
    ),
}


@pytest.mark.parametrize("path", UPLOAD_PATHS)
@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refusal_is_the_routes_own(path: str, case: str) -> None:
    headers, body, status, code = REFUSALS[case]
    answers, counts = [], []
    for serve in (lambda app: app, direct):
        app, broker = build()
        answers.append(await post(serve(app), path, headers, body()))
        counts.append((counted(app, "rejected"), counted(app, "auth_refused")))
        assert broker.published == []
    route, direct_answer = answers
    assert route.status_code == status, route.text
    assert (direct_answer.status_code, direct_answer.headers, direct_answer.content) == (
        route.status_code,
        route.headers,
        route.content,
    )
    assert route.json()["type"] == "error"
    if code:
        assert route.json()["code"] == code
    assert counts[0] == counts[1]
    assert any(counts[0][0].values()) or any(counts[0][1].values())  # counted either way


@pytest.mark.parametrize(
    ("broker", "status", "retry_after"),
    [
        ({"connected": False}, 503, None),  # the gateway has not reached RabbitMQ yet
        ({"fail": True}, 503, None),  # the broker did not confirm the publish
    ],
)
async def test_the_broker_out_of_reach_is_503_either_way(
    broker: dict[str, bool], status: int, retry_after: str | None
) -> None:
    answers = []
    for serve in (lambda app: app, direct):
        app, _ = build(**broker)
        answers.append(await post(serve(app), UPLOAD_PATHS[0], logger(), record()))
    route, direct_answer = answers
    assert route.status_code == status
    assert route.json()["code"] == "unavailable"
    assert (direct_answer.status_code, direct_answer.headers, direct_answer.content) == (
        route.status_code,
        route.headers,
        route.content,
    )


@pytest.mark.parametrize("path", UPLOAD_PATHS)
async def test_an_accepted_upload_is_published_alike(path: str) -> None:
    answers, published = [], []
    for serve in (lambda app: app, direct):
        app, broker = build()
        answers.append(await post(serve(app), path, logger(), record()))
        published.append(broker.published)
        assert counted(app, "published") == {("/telemetry",): 1.0}
        assert counted(app, "upload_messages") == {("single",): 1.0, ("batched",): 0.0}
    route, direct_answer = answers
    assert (route.status_code, direct_answer.status_code) == (202, 202)
    assert direct_answer.headers == route.headers
    body, envelope = published[1][0]
    assert direct_answer.json() == {
        "status": "accepted",
        "records": 1,
        "message_id": envelope.message_id,
    }
    assert route.json()["records"] == 1
    ((route_body, route_envelope),) = published[0]
    assert body == route_body == record()
    # The same AMQP properties, but for what is new with each message (its id, its arrival).
    same = {"message_id", "correlation_id"}
    route_kwargs, direct_kwargs = route_envelope.publish_kwargs(), envelope.publish_kwargs()
    for kwargs in (route_kwargs, direct_kwargs):
        kwargs["headers"].pop("x-received-at")
    assert {k: v for k, v in direct_kwargs.items() if k not in same} == {
        k: v for k, v in route_kwargs.items() if k not in same
    }
    assert direct_kwargs["headers"]["x-vehicle-vin"] == VIN
