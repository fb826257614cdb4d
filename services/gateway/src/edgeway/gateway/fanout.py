"""Fan-out of live results to WebSocket clients.

Each message is encoded once, upstream, and the same object goes to every client. Under the
gateway's own server (`edgeway.gateway.server`) its WebSocket frame is serialized once too, and
written straight to each client whose socket takes it at once. Several messages of a channel
that arrive in one broadcast (a `Batch`) go to such a client as one write of their frames.
Otherwise each client has a bounded send queue drained by its own writer task, so a slow or
dead client never delays the others or the broker consumer (under `Hub.serve`, that task runs
only while something is queued: an idle client costs no task but its own). A client that falls
a whole queue behind loses its oldest messages (lossy channels), is closed with a clear code
(reliable ones), or, for H.264, skips to the next keyframe so what it gets stays decodable;
every drop is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from starlette.websockets import WebSocket
from websockets.frames import Frame, Opcode

from edgeway.common.logging import get_logger
from edgeway.gateway.metrics import Metrics
from edgeway.gateway.server import PREPARED_FRAMES, Flag, WriteFrame


@dataclass(frozen=True, slots=True)
class Packet:
    """One H.264 packet off a `video.stream.<device>` channel, or one JPEG off
    `video.frames.<device>`; the socket gets `payload`.

    `kind` is the `x-packet-type` header ("sps", "pps", "keyframe", "frame", "jpeg"); `seq` is
    the relay's `x-packet-seq` for that device (0 when unknown: a packet of a GOP reply);
    `captured_ms` its `x-captured-ms`, when the phone captured it (Unix ms, 0 when unknown).
    """

    payload: bytes
    kind: str
    seq: int = 0
    captured_ms: int = 0


Message = str | bytes | Packet


class Batch:
    """Messages of one channel delivered together (`Hub.deliver_many`), in order. A client that
    keeps up gets them in one write; any other queues them one by one."""

    __slots__ = ("messages",)

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages = tuple(messages)


Send = Callable[[Message], Awaitable[None]]
# Write a message (or a batch, whole) to the socket now, without waiting; False when the socket
# would not take it so.
Write = Callable[[Message | Batch], bool]
Binder = Callable[[str], Awaitable[None]]
Read = Callable[[], Awaitable[None]]

log = get_logger("edgeway.gateway.fanout")

# Close code for a client that could not keep up on a reliable channel (RFC 6455 "try again later").
CLOSE_TOO_SLOW = 1013


class Policy(StrEnum):
    DROP_OLDEST = "drop-oldest"
    CLOSE = "close"
    SKIP_TO_KEYFRAME = "skip-to-keyframe"  # H.264 consumers: see VideoQueue


# Why a video consumer lost packets (the `reason` label of edgeway_gateway_dropped_total).
BEHIND_TO_KEYFRAME = "behind_to_keyframe"


class ClientQueue:
    """One client's bounded send queue and the task that drains it into the socket: `run`, for as
    long as the connection lasts, or, under `serve`, one started only while something is queued.

    With `write` (`prepared_writer`), a message offered while the writer is idle with nothing
    queued is written at once, in the caller, instead of waking the writer task: the common case
    of a client that keeps up. Anything the socket does not take at once is queued behind what is
    already queued, so the order holds either way. Nothing is written before the writer starts:
    a snapshot pushed in front must go out first.
    """

    __slots__ = (
        "_event",
        "_idle",
        "_queue",
        "_reader",
        "_send",
        "_stopping",
        "_write",
        "_writer",
        "admit",
        "closed",
        "endpoint",
        "metrics",
        "overflowed",
        "policy",
        "size",
    )

    def __init__(
        self,
        send: Send,
        *,
        size: int,
        policy: Policy,
        endpoint: str,
        metrics: Metrics,
        write: Write | None = None,
    ) -> None:
        self._send = send
        self._write = write
        self._idle = False  # the writer is waiting with nothing queued
        # A list: an empty deque holds a block of 64 slots (~600 bytes) for each idle client. The
        # queue is long only for a client that is behind, where moving it costs less than a send.
        self._queue: list[Message] = []
        self._event = Flag()  # wakes `run`
        # Under `serve`: the task that reads the client, and the writer while one runs.
        self._reader: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False  # the writer gave up: `serve` ends
        self.size = size
        self.policy = policy
        self.endpoint = endpoint
        self.metrics = metrics
        self.closed = False
        self.overflowed = False
        # When set, a message offered is dropped unless admit(message) is true.
        self.admit: Callable[[Message], bool] | None = None

    @classmethod
    def text(
        cls, websocket: WebSocket, *, size: int, policy: Policy, endpoint: str, metrics: Metrics
    ) -> ClientQueue:
        """A queue of text frames for `websocket`, written at once when the socket takes them."""
        return cls(
            send_text(websocket),
            write=prepared_writer(websocket, binary=False),
            size=size,
            policy=policy,
            endpoint=endpoint,
            metrics=metrics,
        )

    def offer(self, message: Message) -> None:
        """Write or queue without waiting; never blocks the caller."""
        if self.closed or (self.admit is not None and not self.admit(message)):
            return
        if len(self._queue) >= self.size:
            if self.policy is Policy.CLOSE:
                self.overflowed = True
                self._wake()
                return
            del self._queue[0]
            self.metrics.dropped.labels(self.endpoint, "slow_client").inc()
        self._put(message)

    def offer_many(self, batch: Batch) -> None:
        """`offer` each message of `batch` in order, but in one write when the writer is idle
        with nothing queued and the socket takes them at once (no snapshot filter pending)."""
        if (
            self._idle
            and not self._queue
            and self._write is not None
            and self.admit is None
            and not self.closed
            and self._write(batch)
        ):
            return
        for message in batch.messages:
            self.offer(message)

    def _put(self, message: Message) -> None:
        if self._idle and not self._queue and self._write is not None and self._write(message):
            return
        self._queue.append(message)
        self._wake()

    def _wake(self) -> None:
        """The writer has work: `run` is woken; under `serve`, a writer task starts if none runs."""
        if self._reader is None:
            self._event.set()
        elif self._writer is None and not self.closed:
            self._idle = False
            self._writer = asyncio.create_task(self._drain())

    def push_front(self, messages: list[Message]) -> None:
        """Put messages ahead of everything queued (a snapshot sent before live updates)."""
        self._queue[:0] = messages
        self._wake()

    def discard_queued(self, unwanted: Callable[[Message], bool]) -> int:
        """Remove the queued messages `unwanted` picks (live ones a snapshot already holds);
        returns how many."""
        queue = self._queue
        kept = [message for message in queue if not unwanted(message)]
        removed = len(queue) - len(kept)
        if removed:
            queue[:] = kept  # in place: the writer holds this list
        return removed

    def __len__(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Drain into the socket until closed. Returns when the client overflowed (CLOSE)."""
        queue, send, event = self._queue, self._send, self._event
        while not self.closed:
            self._idle = not queue
            await event.wait()
            self._idle = False
            event.clear()
            if self.overflowed:
                return
            while queue:
                await send(queue.pop(0))

    async def serve(self, read: Read) -> None:
        """Serve the client until `read` returns (it left) or the queue gives up: it overflowed
        (CLOSE) or a send failed. `read` runs in the caller's task; the queue is drained by a
        writer task that runs only while something is queued and ends once it is sent."""
        reader = asyncio.current_task()
        assert reader is not None, "serve runs in a task"
        self._reader = reader
        self._idle = True
        if self._queue or self.overflowed:
            self._wake()
        try:
            await read()
        except asyncio.CancelledError:
            # The writer cancels the reader to stop it; any other cancellation goes on.
            if not self._stopping or reader.uncancel():
                raise
        finally:
            self._reader = None  # from here on, no writer starts and none cancels this task
            await stop_tasks(self._writer)

    async def _drain(self) -> None:
        queue, send = self._queue, self._send
        try:
            while queue and not self.overflowed and not self.closed:
                await send(queue.pop(0))
        except Exception:  # noqa: BLE001 - the socket is gone or refused it: the client is done
            self._stop_reader()
        finally:
            self._writer = None
            self._idle = not queue
        if self.overflowed:
            self._stop_reader()

    def _stop_reader(self) -> None:
        if self._reader is not None and not self._stopping:
            self._stopping = True
            self._reader.cancel()

    def close(self) -> None:
        self.closed = True
        if self._queue:
            self.metrics.dropped.labels(self.endpoint, "disconnected").inc(len(self._queue))
            self._queue.clear()
        self._event.set()


class VideoQueue(ClientQueue):
    """A video consumer's queue, with the SKIP_TO_KEYFRAME policy.

    Dropping the oldest H.264 packet would leave the decoder with frames that refer to one it
    never got: garbage until the next keyframe. So when the queue is full, everything queued is
    dropped and incoming frames too, until the next keyframe, which goes out preceded by the
    current SPS and PPS: the consumer resumes at a point it can decode. Text (a "pong") is
    queued whatever the state.
    """

    __slots__ = ("_floor", "_pps", "_skipping", "_sps")

    def __init__(
        self,
        send: Send,
        *,
        size: int,
        endpoint: str,
        metrics: Metrics,
        write: Write | None = None,
    ) -> None:
        super().__init__(
            send,
            size=size,
            policy=Policy.SKIP_TO_KEYFRAME,
            endpoint=endpoint,
            metrics=metrics,
            write=write,
        )
        self._sps: Packet | None = None
        self._pps: Packet | None = None
        self._skipping = False
        # Live packets up to this sequence number were already sent as part of the GOP.
        self._floor = 0

    @property
    def skipping(self) -> bool:
        return self._skipping

    @property
    def has_sps_pps(self) -> bool:
        return self._sps is not None and self._pps is not None

    def _remember(self, message: Message) -> None:
        if isinstance(message, Packet):
            if message.kind == "sps":
                self._sps = message
            elif message.kind == "pps":
                self._pps = message

    def offer(self, message: Message) -> None:
        if self.closed:
            return
        if isinstance(message, Packet):
            if message.seq and message.seq <= self._floor:
                return  # already sent in the GOP
            self._remember(message)
        queue = self._queue
        if len(queue) >= self.size:
            self.metrics.dropped.labels(self.endpoint, BEHIND_TO_KEYFRAME).inc(len(queue))
            queue.clear()
            self._skipping = True
        if self._skipping and isinstance(message, Packet):
            if message.kind != "keyframe":
                if message.kind not in ("sps", "pps"):  # SPS and PPS go out before the keyframe
                    self.metrics.dropped.labels(self.endpoint, BEHIND_TO_KEYFRAME).inc()
                return
            self._skipping = False
            queue.extend(p for p in (self._sps, self._pps) if p is not None)
        self._put(message)

    def offer_many(self, batch: Batch) -> None:
        """One by one: each packet moves the skip policy."""
        for message in batch.messages:
            self.offer(message)

    def start(self, gop: Iterable[Packet], last_seq: int) -> None:
        """A late joiner's start: the GOP first, then only live packets newer than its last.

        Live packets queued while the GOP was being fetched stay queued (the consumer watched
        its channel before asking), minus those the GOP already holds. Without a keyframe in
        the GOP (no relay, or a stream that has not sent one yet) the consumer starts at the
        next keyframe instead.
        """
        gop = list(gop)
        live = [m for m in self._queue if not (isinstance(m, Packet) and 0 < m.seq <= last_seq)]
        self._queue.clear()
        self._floor = last_seq
        for packet in gop:
            self._remember(packet)
        if any(packet.kind == "keyframe" for packet in gop):
            self._skipping = False
            self._queue.extend(gop)
        else:
            self._skipping = True
        for message in live:
            self.offer(message)
        self._wake()


def send_text(websocket: WebSocket) -> Send:
    """A `Send` that writes each message to `websocket` as one text frame."""
    send = websocket.send

    async def send_text(message: Message) -> None:
        if isinstance(message, Packet):
            raise TypeError("H.264 packets go to binary sockets (send_frames)")
        if isinstance(message, bytes):
            message = message.decode()
        await send({"type": "websocket.send", "text": message})

    return send_text


def send_frames(websocket: WebSocket) -> Send:
    """A `Send` for video consumers: packets and bytes as binary frames, text as text."""
    send = websocket.send

    async def send_frames(message: Message) -> None:
        if isinstance(message, Packet):
            await send({"type": "websocket.send", "bytes": message.payload})
        elif isinstance(message, bytes):
            await send({"type": "websocket.send", "bytes": message})
        else:
            await send({"type": "websocket.send", "text": message})

    return send_frames


def prepared_writer(websocket: WebSocket, *, binary: bool) -> Write | None:
    """A `Write` of prepared frames for `websocket`: text frames (like `send_text`) or, with
    `binary`, binary ones for bytes and packets (like `send_frames`).

    None when the server does not offer `PREPARED_FRAMES` (another ASGI server, the test
    client): the client's messages then all go through its queue.
    """
    extension = (websocket.scope.get("extensions") or {}).get(PREPARED_FRAMES)
    if extension is None:
        return None
    write_frame: WriteFrame = extension["write"]

    def write(message: Message | Batch) -> bool:
        frame = _frames.frame(message, binary=binary)
        return frame is not None and write_frame(frame)

    return write


class PreparedFrames:
    """The serialized frames of the message being delivered, made once for all its clients.

    `Hub.deliver` offers one message object to every watcher in turn, so remembering the last
    message (by identity) is enough. At most a text and a binary frame per message. A `Batch`
    is the concatenation of its messages' frames, made once per kind of socket.
    """

    __slots__ = ("_batch_frames", "_frames", "_message")

    def __init__(self) -> None:
        self._message: Message | Batch | None = None
        self._frames: dict[Opcode, bytes] = {}
        self._batch_frames: dict[bool, bytes | None] = {}  # by `binary`

    def frame(self, message: Message | Batch, *, binary: bool) -> bytes | None:
        """None for what the socket does not take (a packet for a text socket): the queue's
        `Send` raises on it, in the client's writer, not in the middle of a delivery."""
        if message is not self._message:
            self._message = message
            self._frames = {}
            self._batch_frames = {}
        if isinstance(message, Batch):
            if binary not in self._batch_frames:
                frames = [_serialized(item, binary=binary) for item in message.messages]
                whole = [frame for frame in frames if frame is not None]
                self._batch_frames[binary] = b"".join(whole) if len(whole) == len(frames) else None
            return self._batch_frames[binary]
        opcode = _opcode(message, binary=binary)
        if opcode is None:
            return None
        frame = self._frames.get(opcode)
        if frame is None:
            frame = self._frames[opcode] = Frame(opcode, _payload(message)).serialize(mask=False)
        return frame


_frames = PreparedFrames()


def _serialized(message: Message, *, binary: bool) -> bytes | None:
    opcode = _opcode(message, binary=binary)
    return None if opcode is None else Frame(opcode, _payload(message)).serialize(mask=False)


def _opcode(message: Message, *, binary: bool) -> Opcode | None:
    """The frame type `send_text` (text) or `send_frames` (binary) sends `message` as."""
    if isinstance(message, str):
        return Opcode.TEXT
    if binary:
        return Opcode.BINARY
    return None if isinstance(message, Packet) else Opcode.TEXT


def _payload(message: Message) -> bytes:
    if isinstance(message, Packet):
        return message.payload
    if isinstance(message, str):
        return message.encode()
    return message


def _topic_regex(pattern: str) -> re.Pattern[str]:
    """AMQP topic matching: `*` is exactly one word, `#` is zero or more."""
    parts = []
    for word in pattern.split("."):
        if word == "*":
            parts.append(r"[^.]+")
        elif word == "#":
            parts.append(r".*")
        else:
            parts.append(re.escape(word))
    return re.compile(r"\.".join(parts).replace(r"\..*", r"(\..*)?") + r"\Z")


class SnapshotEcho:
    """Drops, once each, the live copies of what a new client already got in its snapshot.

    A service commits, then publishes. A snapshot (latest state, history) read in between holds
    messages whose live copies reach the gateway after it, or are queued for the client while it
    is fetched. `key` names a live message (None: not one a snapshot holds, such as a log line),
    and each expected key drops the first live message with that key; the rest pass. The guard
    sees every message the client is offered, so it takes itself off when every echo came, or
    after `EXPIRY_S` (a snapshot's own messages may have gone out before the client watched).
    """

    EXPIRY_S = 5.0

    def __init__(
        self, client: ClientQueue, expected: Iterable[Hashable], key: Callable[[Any], Hashable]
    ) -> None:
        self._client = client
        self._pending = Counter(expected)
        self._key = key
        self._until = time.monotonic() + self.EXPIRY_S

    def install(self) -> None:
        """Drop the echoes already queued, then filter what the client is offered next."""
        self._client.discard_queued(lambda message: not self.admit(message))
        self._client.admit = self.admit

    def admit(self, message: Message) -> bool:
        if not self._pending or time.monotonic() > self._until:
            self._client.admit = None
            return True
        try:
            decoded = orjson.loads(message) if isinstance(message, str | bytes) else None
        except orjson.JSONDecodeError:
            return True
        key = self._key(decoded)
        if key is None or self._pending[key] == 0:
            return True
        self._pending[key] -= 1
        if self._pending[key] == 0:
            del self._pending[key]
        return False


def canonical(value: Any) -> bytes:
    """JSON with sorted keys: equal for equal decoded values, so usable as a `SnapshotEcho` key."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class Hub:
    """Who watches which channel, and delivery of each message to every watcher.

    The first watcher of a pattern binds it on the gateway's broker queue (through `binder`);
    the last one to leave unbinds it, so a replica receives only what its clients watch.
    """

    def __init__(self, *, bind: Binder, unbind: Binder, metrics: Metrics) -> None:
        self._bind = bind
        self._metrics = metrics
        self._unbind = unbind
        self._watchers: dict[str, set[ClientQueue]] = {}
        self._regex: dict[str, re.Pattern[str]] = {}
        self._bound: dict[str, asyncio.Task[None]] = {}

    async def subscribe(self, pattern: str, client: ClientQueue) -> None:
        watchers = self._watchers.setdefault(pattern, set())
        watchers.add(client)
        self._regex.setdefault(pattern, _topic_regex(pattern))
        bound = self._bound.get(pattern)
        if bound is None or (bound.done() and bound.exception() is not None):
            # One bind per pattern, shared by everyone who subscribes while it is in flight.
            bound = self._bound[pattern] = asyncio.ensure_future(self._bind(pattern))
        await asyncio.shield(bound)

    async def unsubscribe(self, pattern: str, client: ClientQueue) -> None:
        watchers = self._watchers.get(pattern)
        if watchers is None:
            return
        watchers.discard(client)
        if watchers:
            return
        del self._watchers[pattern]
        self._regex.pop(pattern, None)
        bound = self._bound.pop(pattern, None)
        if bound is not None and bound.done() and not bound.exception():
            try:
                await self._unbind(pattern)
            except Exception:
                log.warning("unbind failed", pattern=pattern, exc_info=True)

    def deliver_many(self, channel: str, messages: Sequence[Message], *, kind: str) -> int:
        """`deliver` several messages of `channel` in order, as one `Batch` (one write to each
        client that keeps up); returns to how many clients. Counted per message."""
        if len(messages) == 1:
            return self.deliver(channel, messages[0], kind=kind)
        batch = Batch(messages)
        count = 0
        for pattern, watchers in self._watchers.items():
            if pattern == channel or self._regex[pattern].match(channel):
                for client in watchers:
                    client.offer_many(batch)
                count += len(watchers)
        if count:
            self._metrics.delivered.labels(kind).inc(count * len(messages))
        return count

    def deliver(self, channel: str, message: Message, *, kind: str) -> int:
        """Queue `message` for every client watching `channel`; returns how many."""
        count = 0
        for pattern, watchers in self._watchers.items():
            if pattern == channel or self._regex[pattern].match(channel):
                for client in watchers:
                    client.offer(message)
                count += len(watchers)
        if count:
            self._metrics.delivered.labels(kind).inc(count)
        return count

    def watchers(self, pattern: str) -> int:
        return len(self._watchers.get(pattern, ()))

    async def serve(
        self,
        client: ClientQueue,
        channels: Sequence[str],
        *,
        catch_up: Callable[[], Awaitable[None]],
        read: Read,
    ) -> None:
        """Serve one client until it leaves (`read` returns) or its queue gives up
        (`ClientQueue.serve`: an idle client has no task but the caller's).

        Watch `channels` first, then `catch_up()` (queue what the client missed: a snapshot, a
        history, a GOP): nothing published while that is fetched is lost.
        """
        try:
            for channel in channels:
                await self.subscribe(channel, client)
            await catch_up()
            await client.serve(read)
        finally:
            for channel in channels:
                await self.unsubscribe(channel, client)
            client.close()


async def stop_tasks(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel and await tasks, whatever they ended with (the connection is going away)."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def read_until_gone(websocket: WebSocket) -> None:
    """For clients whose messages mean nothing (the seeds ignore them): notice when they leave."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
