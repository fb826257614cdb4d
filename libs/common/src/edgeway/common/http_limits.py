"""HTTP limits for every Edgeway server: the gateway and each service's internal HTTP server.

uvicorn faces clients directly in `make run` and in compose, so these limits live in the one
function that builds uvicorn's configuration (`uvicorn_config`), not only in an ingress in front.
Without them a client could hold a connection forever by never finishing its request head
(1,000 such connections stayed open), send a 16 MB header and get 200, grow the process by
15 MB per unfinished header, or send part of a large body and stall, holding what it sent.

- **HTTP implementation: httptools, deliberately.** uvicorn's h11 has a buffer limit
  (`h11_max_incomplete_event_size`) but is pure Python: serving a 1 KiB POST took the server
  ~3x the CPU of httptools (~150 against ~50 us, a bare ASGI app on the development machine),
  and the gateway serves telemetry uploads by the hundred a second. httptools buffers a
  request head of any size and uvicorn has no head timer, so `LimitedHttpToolsProtocol` adds
  both: an unfinished head over `max_header_bytes` is answered 431 and closed, and a connection
  that does not finish its head within `header_timeout` is closed (408 if it had sent part of
  one). The timer stops once the head is parsed, so it never touches an upgraded WebSocket.
  All the limits together cost ~15-30 us of CPU per request on that bare app.
- **Head size and count** of a parsed head (one that arrived whole) are checked on the ASGI
  scope: 431, also for WebSocket upgrades (a denial response).
- **Body deadline** (`HttpLimitsMiddleware`, a wrapper of ASGI `receive`): a body not complete
  `body_timeout` after its head is answered 408 and the connection closed; the application sees
  a disconnect, so it drops what it had read. A body nobody reads (the application answered
  first) is drained for at most as long, then the connection is closed.
- **Upload slots**: on configured paths at most `capacity` requests at once; one more is answered
  503 with Retry-After before any of its body is read.
- **Clients that leave mid-body** are logged at info and counted, never a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from edgeway.common.errors import ErrorObject
from edgeway.common.logging import get_logger
from edgeway.common.settings import CommonSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# uvicorn.run's exit status when the server did not start (uvicorn.main.STARTUP_FAILURE).
STARTUP_FAILURE = 3
# The request line's fixed parts beyond the target: method, spaces, "HTTP/1.1", CRLF.
REQUEST_LINE_OVERHEAD = 24
# Bytes a header line adds beyond its name and value: ": " and CRLF.
HEADER_LINE_OVERHEAD = 4

REFUSED = Counter(
    "edgeway_http_refused_total",
    "HTTP requests and connections cut short by a limit, by reason",
    ["reason"],
)
DISCONNECTS = Counter(
    "edgeway_http_client_disconnects_total",
    "HTTP clients that left before their request body was complete",
)
SLOTS_IN_USE = Gauge(
    "edgeway_http_upload_slots_in_use", "Upload requests being served, by slot group", ["group"]
)

log = get_logger("edgeway.http")


@dataclass(frozen=True)
class HttpLimits:
    """Limits on one HTTP server; `CommonSettings` documents where each default comes from."""

    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    body_timeout: float = 120.0

    def __post_init__(self) -> None:
        # A zero limit is a configuration mistake: refuse it at start, not on every request.
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("HTTP timeouts must be positive")
        if self.max_header_bytes < 1024 or self.max_header_count < 8:
            raise ValueError("HTTP header limits below 1 KiB or 8 fields refuse ordinary clients")

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> HttpLimits:
        return cls(
            header_timeout=settings.http_header_timeout,
            max_header_bytes=settings.http_max_header_bytes,
            max_header_count=settings.http_max_header_count,
            body_timeout=settings.http_body_timeout,
        )


@dataclass(frozen=True)
class UploadSlots:
    """At most `capacity` POSTs to `paths` served at once; more get 503 + Retry-After."""

    group: str  # the metric label: a fixed name, never a path with ids in it
    paths: frozenset[str]
    capacity: int
    retry_after: int  # seconds

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.retry_after < 1:
            raise ValueError(f"upload slots {self.group!r}: capacity and Retry-After must be >= 1")


def _error_body(code: str, reason: str) -> bytes:
    return orjson.dumps(ErrorObject(code=code, reason=reason).body())


def _raw_response(status: int, phrase: str, code: str, reason: str) -> bytes:
    """A whole response written straight to the transport, outside any ASGI cycle."""
    body = _error_body(code, reason)
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


HEAD_TIMEOUT_RESPONSE = _raw_response(
    408, "Request Timeout", "request_timeout", "the request head did not arrive in time"
)
HEAD_TOO_LARGE_RESPONSE = _raw_response(
    431, "Request Header Fields Too Large", "headers_too_large", "the request head is too large"
)


class LimitedConfig(uvicorn.Config):
    """uvicorn's configuration plus the limits `LimitedHttpToolsProtocol` reads."""

    def __init__(self, app: ASGIApp, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a cap on an unfinished request head (431), a request-head
    timer, and a cap on draining a body nobody reads.

    httptools itself buffers a head of any size (the header being parsed, the URL); this class
    counts the bytes that arrive while a head is incomplete and refuses the request once they
    pass `max_header_bytes`, so a connection holds at most that plus one read (256 KiB).
    Two timers at most per connection, each armed only while it can fire:
    - head: from the connection's start, or from the first byte of a later request (httptools'
      `on_message_begin`), until that head is parsed. An idle kept-alive connection stays on
      uvicorn's own `timeout_keep_alive`.
    - drain: once a response is complete while the client is still sending a body the
      application did not read (an early 401, 413 or 503), until that body ends. uvicorn
      discards such bytes, so this bounds the connection, not memory.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits if isinstance(config, LimitedConfig) else HttpLimits()
        self._head_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        # Waiting for (the rest of) a request head: at the start and after each request's end.
        self._awaiting_head = True
        self._in_head = False  # a head has begun and is not complete
        self._message_complete = True  # the last request's body has all arrived
        # Bytes received while a head was incomplete. A read that completes the head may also
        # carry body bytes; it only counts while the head stays incomplete.
        self._head_bytes = 0
        # Once upgraded, the transport belongs to the WebSocket protocol: no timer of ours may
        # ever close it.
        self._upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._awaiting_head
            and self._head_bytes > self.limits.max_header_bytes
            and not self._upgraded
            and not self.transport.is_closing()
        ):
            REFUSED.labels("headers_too_large").inc()
            log.debug("request head over the limit", client=self.client, received=self._head_bytes)
            self._cancel_timers()
            self.transport.write(HEAD_TOO_LARGE_RESPONSE)
            self.transport.close()

    # httptools' callbacks, around uvicorn's own.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._message_complete = False
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head = True
        self._message_complete = True
        self._head_bytes = 0
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._message_complete or self._upgraded:
            return
        if self._drain_timer is None:
            self._drain_timer = self.loop.call_later(
                self.limits.body_timeout, self._drain_timed_out
            )

    def handle_websocket_upgrade(self) -> None:
        # This protocol object is left behind once the transport is handed over.
        self._upgraded = True
        self._cancel_timers()
        super().handle_websocket_upgrade()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self._upgraded:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head:
            return
        if not self._in_head and self.cycle is not None:
            return  # idle between requests: uvicorn's keep-alive timer has that
        REFUSED.labels("header_timeout").inc()
        log.debug(
            "request head not complete in time", client=self.client, received=self._head_bytes
        )
        if self._in_head:
            # A client that sent nothing gets no response (as nginx does): a browser's
            # pre-opened connection must not read a 408 as the answer to its next request.
            self.transport.write(HEAD_TIMEOUT_RESPONSE)
        self.transport.close()

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        if self.transport.is_closing() or self._message_complete:
            return
        REFUSED.labels("body_timeout").inc()
        log.debug("unread request body not complete in time", client=self.client)
        self.transport.close()


def head_size(scope: Scope) -> int:
    """The request head's size in bytes, as sent (to a few bytes: the parser keeps no raw copy)."""
    size = REQUEST_LINE_OVERHEAD + len(scope.get("raw_path") or b"")
    query: bytes = scope.get("query_string", b"")
    if query:
        size += len(query) + 1
    for name, value in scope["headers"]:
        size += len(name) + len(value) + HEADER_LINE_OVERHEAD
    return size


def is_disconnect(exc: BaseException) -> bool:
    """Whether `exc` is an application noticing that its client left: Starlette's
    ClientDisconnect (matched by name: libs/common does not depend on Starlette), a socket error,
    or a group of only those."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_disconnect(inner) for inner in exc.exceptions)
    if isinstance(exc, ConnectionError):
        return True
    return any(cls.__name__ == "ClientDisconnect" for cls in type(exc).__mro__)


async def _respond(
    send: Send,
    status: int,
    code: str,
    reason: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    close: bool,
) -> None:
    body = _error_body(code, reason)
    response_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        *headers,
    ]
    if close:
        # The request's body is not read: closing is the only way to be done with it.
        response_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


class _SlotGroup:
    """A non-blocking counting semaphore: a request takes a slot at once or not at all (one
    event loop, no await between test and take, so a plain counter is enough)."""

    def __init__(self, slots: UploadSlots) -> None:
        self.slots = slots
        self.in_use = 0
        self._gauge = SLOTS_IN_USE.labels(slots.group)

    def try_acquire(self) -> bool:
        if self.in_use >= self.slots.capacity:
            return False
        self.in_use += 1
        self._gauge.inc()
        return True

    def release(self) -> None:
        self.in_use -= 1
        self._gauge.dec()


class _Body:
    """One HTTP request's `receive` and `send` under the body deadline."""

    __slots__ = (
        "_receive",
        "_send",
        "answered",
        "client_gone",
        "complete",
        "deadline",
        "path",
        "received",
        "response_started",
        "timed_out",
    )

    def __init__(self, receive: Receive, send: Send, *, deadline: float, path: str) -> None:
        self._receive = receive
        self._send = send
        self.deadline = deadline
        self.path = path
        self.complete = False  # the last body chunk was received
        self.client_gone = False  # the server said the client left before that
        self.timed_out = False
        self.answered = False  # this wrapper sent the response (408), not the application
        self.response_started = False
        self.received = 0

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.complete or self.client_gone:
            return await self._receive()  # after the body: waiting for a disconnect is fine
        try:
            # A chunk already buffered is returned without suspending, so the deadline never
            # takes away what did arrive in time.
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            await self._time_out()
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        elif message["type"] == "http.disconnect":
            self.client_gone = True
        return message

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the 408 went out; the application's own answer has nobody to go to
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _time_out(self) -> None:
        self.timed_out = True
        REFUSED.labels("body_timeout").inc()
        log.info("request body not complete in time", path=self.path, received=self.received)
        if not self.response_started:
            self.answered = True
            self.response_started = True
            await _respond(
                self._send,
                408,
                "request_timeout",
                "the request body did not arrive in time",
                close=True,
            )


class HttpLimitsMiddleware:
    """The ASGI half of the limits: head size and count, upload slots, the body deadline, and
    clients that leave mid-body. Lifespan and other scopes pass through untouched."""

    def __init__(
        self, app: ASGIApp, limits: HttpLimits, upload_slots: Sequence[UploadSlots] = ()
    ) -> None:
        self.app = app
        self.limits = limits
        self._slots: dict[str, _SlotGroup] = {}
        for slots in upload_slots:
            group = _SlotGroup(slots)
            for path in slots.paths:
                if path in self._slots:
                    raise ValueError(f"{path} is in two upload slot groups")
                self._slots[path] = group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _head_refusal(self, scope: Scope) -> str | None:
        if len(scope["headers"]) > self.limits.max_header_count:
            return "too_many_headers"
        if head_size(scope) > self.limits.max_header_bytes:
            return "headers_too_large"
        return None

    @staticmethod
    def _head_reason(refusal: str) -> str:
        return {
            "too_many_headers": "the request has too many header fields",
            "headers_too_large": "the request head is too large",
        }[refusal]

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._head_refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        REFUSED.labels(refusal).inc()
        log.info("websocket upgrade refused", reason=refusal, path=scope.get("path"))
        await receive()  # websocket.connect: the handshake is waiting for our answer
        if "websocket.http.response" in scope.get("extensions", {}):
            body = _error_body(refusal, self._head_reason(refusal))
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 431,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a server without denial responses answers 403
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._head_refusal(scope)
        if refusal is not None:
            REFUSED.labels(refusal).inc()
            log.info("request head refused", reason=refusal, path=scope.get("path"))
            await _respond(send, 431, refusal, self._head_reason(refusal), close=True)
            return
        group = self._slots.get(scope["path"]) if scope["method"] == "POST" else None
        if group is not None and not group.try_acquire():
            REFUSED.labels("uploads_busy").inc()
            log.debug("upload refused: no free slot", group=group.slots.group, path=scope["path"])
            retry_after = group.slots.retry_after
            await _respond(
                send,
                503,
                "busy",
                f"{group.slots.capacity} uploads are in progress; retry after {retry_after} s",
                headers=[(b"retry-after", str(retry_after).encode("ascii"))],
                # Kept open: uvicorn discards the unread body (the drain timer bounds it), and
                # the client reads its 503 instead of a reset mid-send.
                close=False,
            )
            return
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        body = _Body(receive, send, deadline=deadline, path=scope["path"])
        try:
            await self.app(scope, body.receive, body.send)
        except Exception as exc:
            if not ((body.client_gone or body.timed_out) and is_disconnect(exc)):
                raise
            # The application noticed that its client is gone; nobody is there to answer.
        finally:
            if group is not None:
                group.release()
            if body.client_gone:
                DISCONNECTS.inc()
                log.info(
                    "client left before its body was complete",
                    path=body.path,
                    received=body.received,
                )


def uvicorn_config(
    app: ASGIApp,
    settings: CommonSettings,
    *,
    upload_slots: Sequence[UploadSlots] = (),
    **overrides: Any,
) -> LimitedConfig:
    """uvicorn's configuration for every Edgeway server, with the HTTP limits from `settings`.

    `overrides` are further uvicorn settings (the gateway's WebSocket protocol and size).
    """
    limits = HttpLimits.from_settings(settings)
    options: dict[str, Any] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "loop": "uvloop",
        "http": LimitedHttpToolsProtocol,
        "log_config": None,
        "access_log": False,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": int(settings.graceful_timeout),
    }
    options.update(overrides)
    return LimitedConfig(HttpLimitsMiddleware(app, limits, upload_slots), limits=limits, **options)


def serve_http(config: uvicorn.Config) -> None:
    """Run uvicorn until SIGTERM (`uvicorn.run` without reload and workers, which Edgeway never
    uses); exit 3, as `uvicorn.run` does, when the server could not start."""
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
