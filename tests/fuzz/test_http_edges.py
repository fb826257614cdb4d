"""What schemathesis does not send: clients that hang up mid-body, and fuzzed bearer tokens.

- Every endpoint that reads a request body, sent a head and part of its body (a Content-Length
  body or a chunked one) by a client that then leaves: the gateway must end that request
  without an unhandled exception and keep serving.
- Tokens with any header, any claims, signed or forged (tests/fuzz/strategies.py), in the
  Authorization header or `?token=`: 401 or 403 with the error frame, 200 only for a token that
  the test secret signed, never 5xx.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeway.common.telemetry.uploads import PROTOBUF
from edgeway.common.testing import TEST_SECRET
from tests.fuzz.conftest import FuzzStack
from tests.fuzz.harness import fuzz_settings, tally
from tests.fuzz.strategies import FuzzToken, jwt_tokens

pytestmark = [pytest.mark.fuzz, pytest.mark.connected]

BODY_ENDPOINTS = {
    "/telemetry": PROTOBUF,
    "/api/telemetry": "application/octet-stream",
    "/api/v1/ingest/upload": "multipart/form-data; boundary=fuzz",
    "/api/v1/ingest/rtsp": "application/json",
}
FORM_START = b'--fuzz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'


@dataclass(frozen=True)
class Hangup:
    path: str
    declared: int  # the Content-Length it announces (chunked: none)
    sent: bytes  # the part of the body it sends before it leaves
    chunked: bool
    pause: float  # seconds between the last byte and the hang-up


@st.composite
def hangups(draw: st.DrawFn) -> Hangup:
    path = draw(st.sampled_from(sorted(BODY_ENDPOINTS)))
    declared = draw(st.integers(1, 200_000))
    start = FORM_START if path.endswith("upload") and draw(st.booleans()) else b""
    sent = (start + draw(st.binary(max_size=2000)))[: declared - 1]
    return Hangup(path, declared, sent, draw(st.booleans()), draw(st.sampled_from([0, 0, 0.05])))


def hang_up(stack: FuzzStack, case: Hangup) -> None:
    head = [
        f"POST {case.path} HTTP/1.1",
        f"Host: 127.0.0.1:{stack.gateway.port}",
        f"Authorization: Bearer {stack.all_scopes}",
        f"Content-Type: {BODY_ENDPOINTS[case.path]}",
        "X-Vehicle-VIN: 5YJ3E1EA1KF0FUZZ1",
    ]
    if case.chunked:
        head.append("Transfer-Encoding: chunked")
        body = f"{len(case.sent):x}\r\n".encode() + case.sent + b"\r\n" if case.sent else b""
    else:
        head.append(f"Content-Length: {case.declared}")
        body = case.sent
    with socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10) as client:
        client.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        if case.pause:
            time.sleep(case.pause)


def test_clients_that_leave_mid_body_leave_no_unhandled_exception(fuzz_stack: FuzzStack) -> None:
    record = tally("http hang-up mid-body")
    watch = fuzz_stack.watch
    watch.new_crashes()

    @fuzz_settings(record.target)
    @given(hangups())
    def run(case: Hangup) -> None:
        with record.case(case):
            hang_up(fuzz_stack, case)
            crashes = watch.crashes_after_requests(1)
            assert not crashes, f"{case.path}: {crashes[0]}"
            assert watch.is_alive(), "the gateway exited"

    record.run(run)


def test_fuzzed_tokens_get_401_or_403_never_5xx(fuzz_stack: FuzzStack) -> None:
    record = tally("http fuzzed tokens", weight=2.0)
    watch = fuzz_stack.watch
    watch.new_crashes()

    @fuzz_settings(record.target, 2.0)
    @given(jwt_tokens(secret=TEST_SECRET), st.booleans())
    def run(token: FuzzToken, in_header: bool) -> None:
        with record.case(token):
            header = in_header and token.text.isascii() and token.text.isprintable()
            response = httpx.get(
                fuzz_stack.url + "/model/count",
                headers={"Authorization": f"Bearer {token.text}"} if header else {},
                params={} if header else {"token": token.text},
                timeout=10,
            )
            status = response.status_code
            assert status in (200, 401, 403), f"/model/count answered {status}"
            if status == 200:
                assert token.signed, "a forged token was accepted"
            else:
                body = json.loads(response.content)
                assert body["type"] == "error", body
                assert isinstance(body["reason"], str), body
            crashes = watch.new_crashes()
            assert not crashes, crashes[0]

    record.run(run)
