"""HTTP/1.1 spoken by hand over a plain socket, for tests that attack a server's limits.

A real client would finish, retry or time out on its own; these send exactly the bytes a test
gives (a head cut short, a body that stalls) and read exactly what comes back, failing when the
server keeps a connection open longer than the test allows.
"""

from __future__ import annotations

import socket
import time

from edgeway.common.testing.processes import ServiceProcess

# Generous: several times any timeout the tests check, so a busy machine cannot make them flake.
CLOSED_WITHIN = 10.0
_CHUNK = 64 * 1024


def connect(process: ServiceProcess, *, timeout: float = CLOSED_WITHIN) -> socket.socket:
    """A plain TCP connection to the process's HTTP port."""
    return socket.create_connection(("127.0.0.1", process.port), timeout=timeout)


def read_until_closed(sock: socket.socket, within: float = CLOSED_WITHIN) -> bytes:
    """All the server sends until it closes the connection; fails if it is open after `within`."""
    deadline = time.monotonic() + within
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the connection is still open after {within} s ({data[:80]!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(_CHUNK)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _head_and_rest(sock: socket.socket, within: float) -> tuple[bytes, bytes]:
    sock.settimeout(within)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(_CHUNK)
        assert chunk, f"closed before a response ({data!r})"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_head(sock: socket.socket, within: float = CLOSED_WITHIN) -> bytes:
    """A response's status line and headers (the connection left open)."""
    return _head_and_rest(sock, within)[0]


def read_response(sock: socket.socket, within: float = CLOSED_WITHIN) -> bytes:
    """One response with a content-length body, the connection left as it is."""
    head, body = _head_and_rest(sock, within)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(_CHUNK)
        assert chunk, f"closed mid-body ({len(body)} of {length} bytes)"
        body += chunk
    return head + b"\r\n\r\n" + body


def status(response: bytes) -> int:
    """The status code of a response read whole or in part."""
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response.split(b" ", 2)[1])
