"""Schemathesis against the real gateway's OpenAPI document, every HTTP operation in it.

Twice: with a token holding every scope, and with no token at all. Checked for every case:
- no 5xx, except 503 and 504 with the documented error body (the gateway's error frame, or the
  ingestion API's ErrorResponse on /api/v1/ingest/...): the ingestion service is not running
  here (see conftest.py), and a service that does not answer in time is a 504 by design;
- every error is a JSON object (never a traceback or an HTML page);
- without a token, nothing but the public /discover/health answers 2xx, and a refusal is the
  documented 401 error frame;
- the gateway logged no unhandled exception while answering, and is still running.

The operations are collected from the gateway app's document, built in this process at import
(schemathesis parametrizes at import, before any process runs; its fixture-based loader does not
work with pytest 9.2), and the first case checks that the real process serves exactly those
operations at /openapi.json. The document
leaves out the bodies that handlers read themselves (protobuf uploads, the multipart ingest form,
the RTSP request's JSON); `with_bodies` adds them so they are fuzzed too.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.schemas import APIOperation

from edgeway.common.schemas.ingest import RtspIngestionRequest
from edgeway.common.settings import Environment
from edgeway.common.telemetry.uploads import PROTOBUF
from edgeway.common.testing import TEST_SECRET
from edgeway.gateway.app import create_app
from edgeway.gateway.settings import GatewaySettings
from tests.fuzz.conftest import FuzzStack
from tests.fuzz.harness import Tally, examples, tally

pytestmark = [pytest.mark.fuzz, pytest.mark.connected]

PUBLIC = frozenset({"/discover/health"})
INGEST_PREFIX = "/api/v1/ingest/"
UNAVAILABLE = frozenset({503, 504})
INGEST_ERROR_KEYS = frozenset({"error", "message", "details", "request_id", "timestamp"})
REQUEST_TIMEOUT = 15.0
# Examples per operation and mode: ~19 operations x 2 modes, each case a real request.
WEIGHT = 0.5

BINARY = {"type": "string", "format": "binary"}
Case = schemathesis.Case[APIOperation[Any, Any, Any, Any]]


def with_bodies(document: dict[str, Any]) -> dict[str, Any]:
    """The gateway's document, with the request bodies its raw-body handlers read."""
    paths = document["paths"]
    protobuf = {
        "required": False,
        "content": {PROTOBUF: {"schema": BINARY}, "application/octet-stream": {"schema": BINARY}},
    }
    for path in ("/telemetry", "/api/telemetry"):
        paths[path]["post"]["requestBody"] = protobuf
    form = {
        "type": "object",
        "properties": {
            "camera_id": {"type": "string"},
            "meta": {"type": "string"},
            "files": {"type": "array", "items": BINARY},
        },
        "required": ["files"],
    }
    paths["/api/v1/ingest/upload"]["post"]["requestBody"] = {
        "required": True,
        "content": {"multipart/form-data": {"schema": form}},
    }
    rtsp = RtspIngestionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(rtsp.pop("$defs", {}))
    schemas["RtspIngestionRequest"] = rtsp
    paths["/api/v1/ingest/rtsp"]["post"]["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/RtspIngestionRequest"}}
        },
    }
    # Request ids are UUIDs (anything else is a 404 before the service is asked): said so, the
    # positive cases reach the ingestion path; the negative ones still send anything.
    for item in paths.values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "request_id":
                    parameter["schema"] = {**parameter["schema"], "format": "uuid"}
    return document


def app_document() -> dict[str, Any]:
    """The OpenAPI document of the gateway app as `python -m edgeway.gateway` builds it, in
    development (as the fuzz stack runs it), built in this process without serving it."""
    settings = GatewaySettings(jwt_secret=TEST_SECRET, environment=Environment.DEVELOPMENT)
    return create_app(settings).openapi()


def operations(document: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }


# Protobuf uploads are bytes on the wire, as schemathesis sends application/octet-stream.
schemathesis.serializer.alias(PROTOBUF, "application/octet-stream")
DOCUMENT = app_document()
SCHEMA = schemathesis.openapi.from_dict(with_bodies(copy.deepcopy(DOCUMENT)))
SCHEMA.config.update(request_timeout=REQUEST_TIMEOUT)


@pytest.fixture(scope="session")
def served_document(fuzz_stack: FuzzStack) -> dict[str, Any]:
    """The real process's /openapi.json; the fuzz covers exactly its operations."""
    served: dict[str, Any] = httpx.get(fuzz_stack.url + "/openapi.json", timeout=10).json()
    assert served["paths"] == DOCUMENT["paths"], (
        "the real gateway serves other operations than its app describes: "
        f"{sorted(operations(served) ^ operations(DOCUMENT))}"
    )
    return served


@pytest.fixture(scope="module")
def all_scopes_tally() -> Iterator[Tally]:
    record = tally("http all scopes (schemathesis)", engine="schemathesis", weight=WEIGHT)
    yield record
    record.finish()


@pytest.fixture(scope="module")
def no_token_tally() -> Iterator[Tally]:
    record = tally("http no token (schemathesis)", engine="schemathesis", weight=WEIGHT)
    yield record
    record.finish()


def _json_object(response: Any) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def documented_error(path: str, body: dict[str, Any] | None) -> bool:
    """An error body as documented: the ingestion API's ErrorResponse on its paths, the
    gateway's error frame `{"type": "error", "code", "reason"}` everywhere."""
    if body is None:
        return False
    if path.startswith(INGEST_PREFIX) and set(body) == INGEST_ERROR_KEYS:
        return isinstance(body["error"], str) and bool(body["error"])
    return (
        body.get("type") == "error"
        and isinstance(body.get("code"), str)
        and bool(body["code"])
        and isinstance(body.get("reason"), str)
    )


def check(case: Case, response: Any, record: Tally, *, token: bool) -> None:
    path, status = case.operation.path, response.status_code
    body = _json_object(response)
    label = f"{case.operation.method.upper()} {path}"
    record.note(f"{label} {status}")
    if status >= 500:
        assert status in UNAVAILABLE, f"{label}: {status}"
        assert documented_error(path, body), f"{label}: {status} without the error body"
    if status >= 400:
        assert body is not None, f"{label}: a {status} whose body is not a JSON object"
    if not token and path not in PUBLIC:
        assert not 200 <= status < 300, f"{label}: {status} without a token"
        if status == 401:
            assert body is not None
            assert body.get("type") == "error", f"{label}: 401 without the error frame"
            assert body.get("code") == "unauthorized"


def call(case: Case, stack: FuzzStack, record: Tally, *, token: bool) -> None:
    headers = {"Authorization": f"Bearer {stack.all_scopes}"} if token else {}
    with record.case(case):
        response = case.call(base_url=stack.url, headers=headers, timeout=REQUEST_TIMEOUT)
        # A 5xx: wait for this request's own log lines, so a traceback is told with it.
        if response.status_code >= 500:
            crashes = stack.watch.crashes_after_requests(1)
        else:
            crashes = stack.watch.new_crashes()
        assert not crashes, f"the gateway logged: {crashes[0]}"
        check(case, response, record, token=token)
        assert stack.watch.is_alive(), "the gateway exited"


HTTP_SETTINGS = settings(
    max_examples=examples(WEIGHT),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@SCHEMA.parametrize()
@HTTP_SETTINGS
def test_every_http_operation_with_every_scope(
    case: Case,
    fuzz_stack: FuzzStack,
    served_document: dict[str, Any],
    all_scopes_tally: Tally,
) -> None:
    call(case, fuzz_stack, all_scopes_tally, token=True)


@SCHEMA.parametrize()
@HTTP_SETTINGS
def test_every_http_operation_without_a_token(
    case: Case,
    fuzz_stack: FuzzStack,
    served_document: dict[str, Any],
    no_token_tally: Tally,
) -> None:
    call(case, fuzz_stack, no_token_tally, token=False)


def test_the_gateway_logged_no_late_exception(fuzz_stack: FuzzStack) -> None:
    """Anything the gateway logged after the last case was answered."""
    time.sleep(0.5)
    fuzz_stack.watch.assert_no_crash()
