"""HTTP limits on the real gateway process, attacked with raw sockets (and real clients).

`python -m edgeway.gateway` on a private RabbitMQ virtual host, with a 1 s head timeout, a 2 s
body deadline and one upload slot per group, so each attack is quick to stage; every check
allows 10 s or more beyond the limit it checks. The generic behaviour of each limit is tested on
a bare service server in libs/common (`test_http_limits.py`); here: that the gateway's entry
point has them too, on WebSocket upgrades as well, and its upload slots.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from edgeway.common.testing import (
    TEST_SECRET,
    ServiceProcess,
    gateway_fixture,
    make_token,
)
from edgeway.common.testing.raw_http import (
    CLOSED_WITHIN,
    connect,
    read_head,
    read_until_closed,
    status,
)
from edgeway.gateway.app import create_app
from edgeway.gateway.settings import GatewaySettings

pytestmark = pytest.mark.connected

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
RETRY_AFTER = 7
KiB = 1024
MiB = 1024 * KiB
BOUNDARY = b"limits-boundary"
PUBLISH = make_token("occupancy:publish", subject="camera")
UPLOADER = make_token("ingest:write", subject="uploader")
LOGGER = make_token("telemetry:publish", subject="logger")


gateway = gateway_fixture(
    EDGEWAY_REQUEST_TIMEOUT="0.3",
    EDGEWAY_NTP_SERVERS="[]",
    EDGEWAY_HTTP_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
    EDGEWAY_HTTP_BODY_TIMEOUT=str(BODY_TIMEOUT),
    EDGEWAY_INGEST_UPLOAD_SLOTS="1",
    EDGEWAY_TELEMETRY_UPLOAD_SLOTS="1",
    EDGEWAY_UPLOAD_RETRY_AFTER=str(RETRY_AFTER),
)


def upgrade(path: str, extra: bytes = b"") -> bytes:
    """A WebSocket upgrade request's head, whole."""
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


def post_head(path: str, token: str, content_type: bytes, length: int) -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\n\r\n" % length
    )


FORM = b"multipart/form-data; boundary=" + BOUNDARY
# The start of a form whose file part is still arriving.
FORM_START = (
    b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="camera_id"\r\n\r\ncam-1\r\n'
    b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)
PROTOBUF = b"application/x-protobuf"
# Per slot group: the path a stalled upload holds, another path of the group, and its start.
UPLOADS = {
    "ingest": ("/api/v1/ingest/upload", "/api/v1/ingest/upload", UPLOADER, FORM, FORM_START),
    "telemetry": ("/telemetry", "/api/telemetry", LOGGER, PROTOBUF, b"\x0a\x11"),
}


def test_partial_heads_are_closed_on_http_and_websocket_upgrades(gateway: ServiceProcess) -> None:
    heads = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "] * 20
    heads += [upgrade("/model/ws/connect?token=" + PUBLISH)[:-40]] * 20  # cut mid-head
    sockets = [connect(gateway) for _ in heads]
    started = time.monotonic()
    try:
        for sock, head in zip(sockets, heads, strict=True):
            sock.sendall(head)
        for sock in sockets:
            remaining = CLOSED_WITHIN - (time.monotonic() - started)
            assert status(read_until_closed(sock, remaining)) == 408
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(gateway.url + "/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("request_head", "refusal"),
    [
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * KiB) + b"\r\n\r\n",
            b"headers_too_large",
            id="http-64KiB-head",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-F%d: v\r\n" % i for i in range(110))
            + b"\r\n",
            b"too_many_headers",
            id="http-110-fields",
        ),
        pytest.param(
            # 110 fields: under the websockets library's own cap (128), over ours.
            upgrade(
                "/model/ws/connect?token=" + PUBLISH,
                b"".join(b"X-F%d: v\r\n" % i for i in range(110)),
            ),
            b"too_many_headers",
            id="websocket-110-fields",
        ),
        pytest.param(
            # 40 lines of 1 KiB: each under the websockets library's line cap (8 KiB).
            upgrade(
                "/model/ws/connect?token=" + PUBLISH,
                b"".join(b"X-F%d: %s\r\n" % (i, b"a" * KiB) for i in range(40)),
            ),
            b"headers_too_large",
            id="websocket-40KiB-head",
        ),
    ],
)
def test_heads_over_the_limits_are_431(
    gateway: ServiceProcess, request_head: bytes, refusal: bytes
) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head)
        response = read_until_closed(sock)
    assert status(response) == 431
    # Refused while incomplete (the protocol's cap) or once parsed (the ASGI check, with a reason).
    assert refusal in response or b"the request head is too large" in response


async def test_a_websocket_outlives_the_head_and_body_timeouts(gateway: ServiceProcess) -> None:
    """Guard: the timers stop at the upgrade; the connection works long after both."""
    url = gateway.url.replace("http", "ws") + "/model/ws/connect?token=" + PUBLISH
    async with websockets.connect(url) as ws:
        await asyncio.sleep(HEADER_TIMEOUT + BODY_TIMEOUT + 1)
        await ws.send("{not json")
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["code"] == "malformed_json"


def test_a_logger_that_leaves_mid_upload_is_counted_not_a_traceback(
    gateway: ServiceProcess,
) -> None:
    def counted() -> float:
        metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
        for line in metrics.splitlines():
            if line.startswith("edgeway_http_client_disconnects_total "):
                return float(line.split()[1])
        return 0.0

    before = counted()
    with connect(gateway) as sock:
        sock.sendall(post_head("/telemetry", LOGGER, PROTOBUF, 512 * KiB) + b"\x00" * (64 * KiB))
        time.sleep(0.3)  # the handler is reading
    deadline = time.monotonic() + CLOSED_WITHIN
    while counted() == before and "Exception in ASGI" not in gateway.log_text():
        assert time.monotonic() < deadline, "the gateway never noticed the client leaving"
        time.sleep(0.1)
    time.sleep(0.3)
    text = gateway.log_text()
    assert "Traceback" not in text
    assert "Exception in ASGI application" not in text
    assert counted() == before + 1


@pytest.mark.parametrize("group", sorted(UPLOADS))
def test_a_stalled_upload_holds_its_slot_until_408_and_others_get_503_meanwhile(
    gateway: ServiceProcess, group: str
) -> None:
    held_path, other_path, token, content_type, start = UPLOADS[group]
    with connect(gateway) as stalled:
        stalled.sendall(post_head(held_path, token, content_type, 512 * KiB) + start)
        stalled.sendall(b"\xff" * (128 * KiB))
        started = time.monotonic()
        time.sleep(0.3)  # the stalled upload has its slot
        with connect(gateway) as other:
            # Only the head: the 503 must come before any of the body is read.
            other.sendall(post_head(other_path, token, content_type, 256 * KiB))
            head = read_head(other)
        assert status(head) == 503
        assert f"retry-after: {RETRY_AFTER}".encode() in head.lower()
        response = read_until_closed(stalled, BODY_TIMEOUT + CLOSED_WITHIN)
    assert status(response) == 408
    assert time.monotonic() - started < BODY_TIMEOUT + CLOSED_WITHIN
    # The slot is free again: the next upload is answered on its merits (here: not accepted).
    after = httpx.post(
        gateway.url + other_path,
        content=FORM_START + b"not an image\r\n--" + BOUNDARY + b"--\r\n"
        if group == "ingest"
        else b"\xff\xff\xff",
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type.decode()},
        timeout=10,
    )
    assert after.status_code in (400, 422), after.text


def test_upload_slots_cover_the_gateway_upload_routes() -> None:
    """Guard against a renamed route silently losing its slots."""
    # Imported here, so the attack tests above still run against an entry point without it.
    from edgeway.gateway.__main__ import upload_slots

    paths = create_app(GatewaySettings(jwt_secret=TEST_SECRET)).openapi()["paths"]
    posts = {path for path, methods in paths.items() if "post" in methods}
    groups = {slots.group: slots.paths for slots in upload_slots(GatewaySettings())}
    assert groups == {
        "ingest": frozenset({"/api/v1/ingest/upload"}),
        "telemetry": frozenset({"/telemetry", "/api/telemetry"}),
    }
    assert frozenset().union(*groups.values()) <= posts
