"""HTTP limits on a service's internal server, attacked with raw sockets.

The server is a real process, started the way every service starts its HTTP server
(`edgeway.common.service.run`, settings from the environment; `http_limits_app.py`). Timeouts
are 1 s (head) and 2 s (body) here; every check allows 10 s or more, so a busy machine cannot
make them flake.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeway.common.testing import ServiceProcess, free_port
from edgeway.common.testing.raw_http import (
    CLOSED_WITHIN,
    connect,
    read_response,
    read_until_closed,
    status,
)

HERE = Path(__file__).resolve().parent
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    process = ServiceProcess(
        "http_limits_app",
        env={
            "PYTHONPATH": path,
            "EDGEWAY_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
            "EDGEWAY_HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT),
        },
        port=free_port(),
        log_path=tmp_path_factory.mktemp("http-limits") / "server.log",
        ready_path="/healthz",
    ).start(wait=60)
    yield process
    process.stop()


def log_events(server: ServiceProcess) -> list[dict[str, object]]:
    events = []
    for line in server.log_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line})
    return events


def test_connections_that_never_finish_their_head_are_closed(server: ServiceProcess) -> None:
    """Slowloris: many connections each hold a partial request head (and one sends nothing)."""
    partial = [connect(server) for _ in range(50)]
    for sock in partial:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    silent = connect(server)
    started = time.monotonic()
    try:
        for sock in partial:
            remaining = CLOSED_WITHIN - (time.monotonic() - started)
            assert status(read_until_closed(sock, remaining)) == 408
        # Nothing was asked, so nothing is answered: the connection is just closed.
        assert read_until_closed(silent, CLOSED_WITHIN) == b""
    finally:
        for sock in [*partial, silent]:
            sock.close()
    # The server still serves everyone else.
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_a_head_over_the_size_limit_is_431(server: ServiceProcess) -> None:
    """A whole 64 KiB head, sent at once. Read whole, the check on the parsed head refuses it;
    read in pieces, the cap on an unfinished head does: 431 either way."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * KiB) + b"\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head)
        assert status(read_until_closed(sock)) == 431


def test_an_unfinished_16_mib_header_is_cut_off_at_the_limit(server: ServiceProcess) -> None:
    """The server refuses a head that outgrows the limit and closes: the client cannot send
    16 MiB of it (without the limit the server took all of it and kept it)."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            for _ in range(16):
                sock.sendall(b"a" * MiB)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 16, "the server took a 16 MiB header"


def test_too_many_header_fields_is_431(server: ServiceProcess) -> None:
    fields = b"".join(b"X-Field-%d: v\r\n" % i for i in range(150))
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        response = read_until_closed(sock)
    assert status(response) == 431
    assert b"too_many_headers" in response


def test_a_body_that_stalls_is_408_and_closed(server: ServiceProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MiB)
        sock.sendall(b"x" * (100 * KiB))
        response = read_until_closed(sock, BODY_TIMEOUT + CLOSED_WITHIN)
    assert status(response) == 408
    # The application saw a disconnect and let go of what it had; no traceback anywhere.
    time.sleep(0.5)
    text = server.log_text()
    assert "Traceback" not in text
    assert "request body not complete in time" in text


def test_a_body_that_nobody_reads_is_not_drained_forever(server: ServiceProcess) -> None:
    """The application answers without reading the body; the client keeps trickling it."""
    with connect(server) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MiB)
        assert status(read_response(sock)) == 200
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < BODY_TIMEOUT + CLOSED_WITHIN:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
        assert closed, "a trickled body kept the connection open"


def test_a_client_that_leaves_mid_body_is_logged_without_a_traceback(
    server: ServiceProcess,
) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MiB)
        sock.sendall(b"x" * (64 * KiB))
        time.sleep(0.3)  # let the application start reading
    handled = ("client left before its body was complete", "Exception in ASGI application")
    deadline = time.monotonic() + CLOSED_WITHIN
    while not any(event in server.log_text() for event in handled):
        assert time.monotonic() < deadline, "the server never noticed the client leaving"
        time.sleep(0.1)
    time.sleep(0.3)  # whatever else the server logs about it
    text = server.log_text()
    assert "Traceback" not in text
    assert "Exception in ASGI application" not in text
    left = [e for e in log_events(server) if e.get("event") == handled[0]]
    assert [e["level"] for e in left] == ["info"]


def test_ordinary_requests_and_keep_alive_are_untouched(server: ServiceProcess) -> None:
    """Guard: a head and a body that arrive in time, then an idle gap longer than the head
    timeout on a kept-alive connection (idle time is uvicorn's keep-alive, 5 s), then more."""
    with connect(server) as sock:
        body = b"y" * (256 * KiB)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body)
        response = read_response(sock)
        assert status(response) == 200
        assert b'"received":262144' in response
        time.sleep(HEADER_TIMEOUT * 2)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(read_response(sock)) == 200
