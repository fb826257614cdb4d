"""Group commit: many concurrent handlers, one database transaction.

FastStream on aio-pika handles each delivery in its own task (up to the prefetch). Committing
each message alone makes the database's WAL flush the limit (measured here: ~8 ms per commit,
so ~120 messages/s whatever the CPU). A `GroupCommit` lets those handlers hand their work to
one flusher, which takes everything waiting (up to `max_size`) into one transaction while the
previous one commits. Every handler still learns its own outcome only after its commit, so it
acks only what is durable. Items are flushed in the order they were submitted.

At a steady, moderate rate each flush finds only the item or two that came during the last one,
and every commit costs its fixed statements again. `linger` makes the flusher wait that long
before it takes a group that is not full yet: fewer, larger commits for that much more latency.

The same reasoning holds for AMQP messages: a publish, its confirm, a delivery and its ack cost
about the same whatever they carry. So messages that fall due together (one commit group's
broadcasts, a camera's frames that arrive while its earlier ones await their confirms) may share
one AMQP message; one alone goes as it always did. Such a message says how many it carries in
its `x-batch` header (`BATCH_HEADER`), keeps their `type`, and takes one of two forms:

- a broadcast (`join_lines`, `split_lines`): the messages' JSON joined by "\n" (orjson writes no
  raw newline), for clients that get each as a message of its own; `x-batch-correlation-ids`
  names what each one answers, comma-separated;
- durable work (`pack_work`, `unpack_work`): a JSON array of the producers' bodies as they came,
  byte for byte, with each one's envelope in `x-batch-*` headers (comma-separated lists: message
  id, body length, capture and receive times); producer, reply channel and trace are the
  message's own. Consumers stay idempotent per item, on its message id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from edgeway.common.envelope import Envelope

# How many messages an AMQP message carries, where more than one (a decimal string).
BATCH_HEADER = "x-batch"
BATCH_CORRELATION_IDS = "x-batch-correlation-ids"
BATCH_MESSAGE_IDS = "x-batch-message-ids"
BATCH_LENGTHS = "x-batch-lengths"
BATCH_CAPTURED_AT = "x-batch-captured-at"
BATCH_RECEIVED_AT = "x-batch-received-at"

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int = 128,
        isolate: Callable[[Exception], bool] = lambda _: True,
        linger: float = 0.0,
    ) -> None:
        """`isolate(exc)`: whether a failed group is retried item by item to find the bad one
        (false for outages, where every item would fail again). `linger`: seconds to wait for
        more items before flushing a group smaller than `max_size`."""
        self._flush = flush
        self._max_size = max_size
        self._linger = linger
        self._isolate = isolate
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Wait until `item` is committed (with whatever else was waiting) and return its result."""
        (future,) = self._enqueue([item])
        return await future

    async def submit_all(self, items: Sequence[T]) -> list[R]:
        """`submit` for several items, queued together in this order; their results in order.

        Every item is settled before this returns; if any failed, the first failure is raised.
        """
        settled = await asyncio.gather(*self._enqueue(items), return_exceptions=True)
        for outcome in settled:
            if isinstance(outcome, BaseException):
                raise outcome
        return settled  # type: ignore[return-value]

    def _enqueue(self, items: Sequence[T]) -> list[asyncio.Future[R]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())
        return futures

    async def _run(self) -> None:
        while self._pending:
            if self._linger and len(self._pending) < self._max_size:
                await asyncio.sleep(self._linger)
            group = self._pending[: self._max_size]
            del self._pending[: self._max_size]
            await self._commit(group)

    async def _commit(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in group])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting handlers
            if len(group) == 1 or not self._isolate(exc):
                for _, future in group:
                    _settle(future, exc=exc)
                return
            # One bad item must not fail its neighbours: try each alone, so only it fails.
            for entry in group:
                await self._commit([entry])
            return
        for (_, future), result in zip(group, results, strict=True):
            _settle(future, result=result)


def _settle(
    future: asyncio.Future[R], *, result: R | None = None, exc: Exception | None = None
) -> None:
    if future.done():  # the handler was cancelled (shutdown): nothing to tell
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def batch_size(headers: Mapping[str, Any] | None) -> int:
    """How many messages a delivery carries (1 for one without `BATCH_HEADER`); ValueError for
    a count that is not a positive number."""
    value = headers.get(BATCH_HEADER) if headers else None
    if value is None:
        return 1
    try:
        count = int(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{BATCH_HEADER} is not a count: {value!r}") from None
    if count < 1:
        raise ValueError(f"{BATCH_HEADER} is not a positive count: {count}")
    return count


def join_lines(bodies: Sequence[bytes]) -> bytes:
    """The body of a broadcast batch: one JSON message a line. ValueError for a body with a raw
    newline (not compact JSON: the lines would not split back)."""
    for body in bodies:
        if b"\n" in body:
            raise ValueError("a message of a batch holds a raw newline")
    return b"\n".join(bodies)


def split_lines(text: str, count: int) -> list[str]:
    """The `count` messages of a broadcast batch's (decoded) body, in order."""
    lines = text.split("\n")
    if len(lines) != count:
        raise ValueError(f"the batch says {count} messages and holds {len(lines)}")
    return lines


def pack_work(items: Sequence[tuple[bytes, Envelope]]) -> tuple[bytes, dict[str, str]]:
    """Several producers' bodies (valid JSON each) as one work message: its body and the
    headers that carry each one's envelope (see the module). The caller's envelope for the whole
    message carries what they share (producer, reply channel)."""
    bodies = [body for body, _ in items]
    envelopes = [envelope for _, envelope in items]
    headers = {
        BATCH_HEADER: str(len(items)),
        BATCH_MESSAGE_IDS: ",".join(envelope.message_id for envelope in envelopes),
        BATCH_LENGTHS: ",".join(str(len(body)) for body in bodies),
        BATCH_CAPTURED_AT: ",".join(
            "" if envelope.captured_at is None else f"{envelope.captured_at:.6f}"
            for envelope in envelopes
        ),
        BATCH_RECEIVED_AT: ",".join(f"{envelope.received_at:.6f}" for envelope in envelopes),
    }
    return b"[" + b",".join(bodies) + b"]", headers


def unpack_work(
    body: bytes, headers: Mapping[str, Any], shared: Envelope
) -> list[tuple[bytes, Envelope]]:
    """The items of a `pack_work` message, each with its own envelope (`shared`'s producer,
    reply channel and trace); ValueError when body and headers do not agree."""
    count = batch_size(headers)
    columns = [
        _header_list(headers, name, count)
        for name in (BATCH_MESSAGE_IDS, BATCH_LENGTHS, BATCH_CAPTURED_AT, BATCH_RECEIVED_AT)
    ]
    items: list[tuple[bytes, Envelope]] = []
    position = 1
    try:
        for message_id, length, captured, received in zip(*columns, strict=True):
            end = position + int(length)
            if body[position - 1 : position] != (b"," if items else b"[") or end <= position:
                raise ValueError("the body is not the array its lengths describe")
            if not message_id:
                raise ValueError("an item has no message id")
            items.append(
                (
                    body[position:end],
                    Envelope(
                        type=shared.type,
                        producer=shared.producer,
                        message_id=message_id,
                        captured_at=float(captured) if captured else None,
                        received_at=float(received),
                        reply_channel=shared.reply_channel,
                        content_type=shared.content_type,
                        traceparent=shared.traceparent,
                    ),
                )
            )
            position = end + 1
    except ValueError as exc:
        raise ValueError(f"malformed work batch: {exc}") from None
    if body[position - 1 :] != b"]":
        raise ValueError("malformed work batch: the body is not the array its lengths describe")
    return items


def _header_list(headers: Mapping[str, Any], name: str, count: int) -> list[str]:
    value = headers.get(name)
    text = value.decode() if isinstance(value, bytes) else value
    if not isinstance(text, str):
        raise ValueError(f"malformed work batch: no {name} header")
    values = text.split(",")
    if len(values) != count:
        raise ValueError(f"malformed work batch: {name} has {len(values)} values, not {count}")
    return values
