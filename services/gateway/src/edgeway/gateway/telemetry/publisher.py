"""Telemetry uploads to the broker: alone while it keeps up, gathered while it confirms.

A logger gets its 202 only once the broker confirmed its upload. A publish costs the gateway,
RabbitMQ and the telemetry service about the same whatever it carries (a confirm, a quorum-log
entry, a delivery, an ack, FastStream's middlewares on both sides), so under load the uploads
that arrive while `window` publishes await their confirms wait for the next one and go together,
as one `telemetry.uploads.v1` message (`edgeway.common.telemetry.uploads`). An upload that finds
fewer than `window` publishes in flight goes at once, alone, as the plain message it always was:
nothing waits longer than it would have at low rates. A publish that fails fails every upload it
carried, and each logger gets its 503 and sends again.

The uploads waiting are bounded by count and bytes (`max_waiting`, `max_waiting_bytes`): past
either, an upload is refused at once (`UploadsBackloggedError`, which the endpoint answers with
503 and Retry-After) instead of holding its body in memory behind a broker that is not keeping
up. Its logger keeps the packets and sends them again later.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable

from edgeway.common.envelope import Envelope
from edgeway.common.telemetry.uploads import PROTOBUF, UPLOADS_TYPE, pack
from edgeway.gateway.metrics import Metrics

# Publish one message (the body and its envelope); returns once the broker confirmed it.
Publish = Callable[[bytes, Envelope], Awaitable[None]]


class UploadsBackloggedError(Exception):
    """Too many uploads (or bytes) already wait for a publish: this one is not taken."""


class UploadPublisher:
    def __init__(
        self,
        publish: Publish,
        *,
        metrics: Metrics,
        window: int = 2,
        max_uploads: int = 256,
        max_bytes: int = 4 * 1024 * 1024,
        max_waiting: int = 1024,
        max_waiting_bytes: int = 16 * 1024 * 1024,
        producer: str = "gateway",
    ) -> None:
        if window < 1 or max_uploads < 1 or max_waiting < 1:
            raise ValueError("window, max_uploads and max_waiting must be at least 1")
        self._publish = publish
        self.metrics = metrics
        # Bound once: a label lookup per upload is a measurable share of its CPU.
        self._single = metrics.upload_messages.labels("single")
        self._batched = metrics.upload_messages.labels("batched")
        self._window = window
        self._max_uploads = max_uploads
        self._max_bytes = max_bytes
        self._max_waiting = max_waiting
        self._max_waiting_bytes = max_waiting_bytes
        self._producer = producer
        self._in_flight = 0
        self._waiting: deque[tuple[bytes, Envelope, asyncio.Future[None]]] = deque()
        self._waiting_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_bytes(self) -> int:
        return self._waiting_bytes

    async def publish(self, body: bytes, envelope: Envelope) -> None:
        """Returns once the broker confirmed the message that carried this upload.

        Raises UploadsBackloggedError at once, publishing nothing, when the uploads waiting
        are at their bound (an upload that finds none waiting is always taken, whatever its
        size: the endpoint's body cap bounds it).
        """
        if self._in_flight < self._window and not self._waiting:
            self._in_flight += 1
            self._single.inc()
            try:
                await self._publish(body, envelope)
            finally:
                self._finished()
            return
        if self._waiting and (
            len(self._waiting) >= self._max_waiting
            or self._waiting_bytes + len(body) > self._max_waiting_bytes
        ):
            raise UploadsBackloggedError(
                f"{len(self._waiting)} uploads ({self._waiting_bytes} bytes) already wait for "
                "the broker"
            )
        future = asyncio.get_running_loop().create_future()
        # Retrieved here too, so a failure whose client left is not reported as never retrieved.
        future.add_done_callback(_retrieve)
        self._waiting.append((body, envelope, future))
        self._waiting_bytes += len(body)
        # Shielded: a client that leaves does not take its upload out of a message being sent.
        await asyncio.shield(future)

    def _finished(self) -> None:
        self._in_flight -= 1
        if self._waiting:
            self._start_next()

    def _start_next(self) -> None:
        group = [self._waiting.popleft()]
        size = len(group[0][0])
        while self._waiting and len(group) < self._max_uploads:
            body = self._waiting[0][0]
            if size + len(body) > self._max_bytes:
                break
            group.append(self._waiting.popleft())
            size += len(body)
        self._waiting_bytes -= size
        self._in_flight += 1
        if len(group) == 1:
            self._single.inc()
        else:
            self._batched.inc()
            self.metrics.batched_uploads.inc(len(group))
        # Its own context: not a child of the request whose confirm happened to start it.
        task = asyncio.create_task(self._send(group), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[bytes, Envelope, asyncio.Future[None]]]) -> None:
        try:
            if len(group) == 1:
                body, envelope, _ = group[0]
                await self._publish(body, envelope)
            else:
                uploads = [(body, envelope) for body, envelope, _ in group]
                await self._publish(
                    pack(uploads),
                    Envelope(type=UPLOADS_TYPE, producer=self._producer, content_type=PROTOBUF),
                )
        except Exception as exc:  # noqa: BLE001 - each waiting upload gets the failure
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
        else:
            for _, _, future in group:
                if not future.done():
                    future.set_result(None)
        finally:
            self._finished()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
