"""Edge limits: per-connection rate limiting, and request bodies read under a cap."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request

from edgeway.common.errors import ErrorObject


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is longer than `limit` (never read whole).

    Its deadline is the server's (`edgeway.common.http_limits`): a body that is late, or whose
    client leaves, ends here as Starlette's ClientDisconnect, which that layer answers (408) or
    logs and counts; what was read so far goes with this frame.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


@dataclass(frozen=True, slots=True)
class RefusedBody:
    """A request body refused before it is parsed: the HTTP status and the error object."""

    status: int
    error: ErrorObject


async def read_json_body(request: Request, limit: int) -> bytes | RefusedBody:
    """A JSON request's body, read under `limit`; 415 for another content type, 413 when longer.

    Each API answers the refusal in its own error shape (the ingestion routes add their seed's
    fields), so the reader gives the error object and the route turns it into a response.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return RefusedBody(
            415,
            ErrorObject(
                code="unsupported_media_type",
                reason=f"content type {content_type or 'none'!r}: send the request as "
                "application/json",
            ),
        )
    body = await read_body(request, limit)
    if body is None:
        return RefusedBody(
            413, ErrorObject(code="too_large", reason=f"the body is over {limit} bytes")
        )
    return body


class TokenBucket:
    """`rate` messages per second on average, bursts of up to `burst`."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
