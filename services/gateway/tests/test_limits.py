"""JSON bodies read under a cap (`edgeway.gateway.limits.read_json_body`), as the routes that use
it answer: the tracking API with the error object, the ingestion API with the seed's fields
beside it. Connected: a real gateway on a private RabbitMQ virtual host, and no service behind
it, so every answer here is the gateway's own (the body is refused before anything is asked).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from edgeway.common.testing import ServiceProcess, bearer, gateway_fixture

pytestmark = pytest.mark.connected

ERROR_KEYS = {"type", "code", "reason", "fix", "details"}
SEED_INGEST_KEYS = {"error", "message", "details", "request_id", "timestamp"}
MAX_JSON_BYTES = 64 * 1024  # what both routes here take (tracking/api.py, ingest/api.py)
TRACKING = ("/api/v1/processing-tasks/start", bearer("tracking:admin"))
INGEST = ("/api/v1/ingest/rtsp", bearer("ingest:write"))

gateway = gateway_fixture(EDGEWAY_REQUEST_TIMEOUT="0.3", EDGEWAY_NTP_SERVERS="[]")


def refusals(gateway: ServiceProcess, path: str, headers: dict[str, str]) -> list[httpx.Response]:
    """A form where JSON belongs, and a JSON body one byte over the cap."""
    url = gateway.url + path
    form = httpx.post(url, data={"environment_id": "lab"}, headers=headers, timeout=10)
    over = b'{"pad": "' + b"x" * (MAX_JSON_BYTES - 10) + b'"}'
    assert len(over) == MAX_JSON_BYTES + 1
    json_headers = {**headers, "Content-Type": "application/json"}
    large = httpx.post(url, content=over, headers=json_headers, timeout=10)
    return [form, large]


def check(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert (body["type"], body["code"]) == ("error", code), body
    return body


def test_the_tracking_api_refuses_with_the_error_object(gateway: ServiceProcess) -> None:
    form, large = refusals(gateway, *TRACKING)
    body = check(form, 415, "unsupported_media_type")
    assert set(body) <= ERROR_KEYS
    assert "'application/x-www-form-urlencoded'" in body["reason"]
    assert "application/json" in body["reason"]
    body = check(large, 413, "too_large")
    assert set(body) <= ERROR_KEYS
    assert body["reason"] == f"the body is over {MAX_JSON_BYTES} bytes"


def test_the_ingestion_api_refuses_with_the_same_object_and_the_seed_fields(
    gateway: ServiceProcess,
) -> None:
    tracking = refusals(gateway, *TRACKING)
    ingest = refusals(gateway, *INGEST)
    for answers, (status, code) in zip(
        zip(tracking, ingest, strict=True),
        ((415, "unsupported_media_type"), (413, "too_large")),
        strict=True,
    ):
        plain, seed = (check(response, status, code) for response in answers)
        assert set(seed) == {"type", "code", "reason"} | SEED_INGEST_KEYS
        assert (seed["error"], seed["message"]) == (seed["code"], seed["reason"])
        assert seed["reason"] == plain["reason"]  # one reader, one error object
