"""Fan-out of live results to WebSocket clients.

Each message is encoded once, upstream, and the same object goes to every client. Each client
has a bounded send queue drained by its own writer task, so a slow or dead client never delays
the others or the broker consumer. A client that falls a whole queue behind loses its oldest
messages (lossy channels) or is closed with a clear code (reliable ones); both are counted.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum

from starlette.websockets import WebSocket

from edgeway.common.logging import get_logger
from edgeway.gateway.metrics import DELIVERED, DROPPED

Message = str | bytes
Send = Callable[[Message], Awaitable[None]]
Binder = Callable[[str], Awaitable[None]]

log = get_logger("edgeway.gateway.fanout")

# Close code for a client that could not keep up on a reliable channel (RFC 6455 "try again later").
CLOSE_TOO_SLOW = 1013


class Policy(StrEnum):
    DROP_OLDEST = "drop-oldest"
    CLOSE = "close"


class ClientQueue:
    """One client's bounded send queue and the task that drains it into the socket."""

    __slots__ = ("_event", "_queue", "_send", "closed", "endpoint", "overflowed", "policy", "size")

    def __init__(self, send: Send, *, size: int, policy: Policy, endpoint: str) -> None:
        self._send = send
        self._queue: deque[Message] = deque()
        self._event = asyncio.Event()
        self.size = size
        self.policy = policy
        self.endpoint = endpoint
        self.closed = False
        self.overflowed = False

    def offer(self, message: Message) -> None:
        """Queue without waiting; never blocks the caller."""
        if self.closed:
            return
        if len(self._queue) >= self.size:
            if self.policy is Policy.CLOSE:
                self.overflowed = True
                self._event.set()
                return
            self._queue.popleft()
            DROPPED.labels(self.endpoint, "slow_client").inc()
        self._queue.append(message)
        self._event.set()

    def push_front(self, messages: list[Message]) -> None:
        """Put messages ahead of everything queued (a snapshot sent before live updates)."""
        self._queue.extendleft(reversed(messages))
        self._event.set()

    def __len__(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Drain into the socket until closed. Returns when the client overflowed (CLOSE)."""
        queue, send, event = self._queue, self._send, self._event
        while not self.closed:
            await event.wait()
            event.clear()
            if self.overflowed:
                return
            while queue:
                await send(queue.popleft())

    def close(self) -> None:
        self.closed = True
        if self._queue:
            DROPPED.labels(self.endpoint, "disconnected").inc(len(self._queue))
            self._queue.clear()
        self._event.set()


def send_text(websocket: WebSocket) -> Send:
    """A `Send` that writes each message to `websocket` as one text frame."""
    send = websocket.send

    async def send_text(message: Message) -> None:
        if isinstance(message, bytes):
            message = message.decode()
        await send({"type": "websocket.send", "text": message})

    return send_text


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


class Hub:
    """Who watches which channel, and delivery of each message to every watcher.

    The first watcher of a pattern binds it on the gateway's broker queue (through `binder`);
    the last one to leave unbinds it, so a replica receives only what its clients watch.
    """

    def __init__(self, *, bind: Binder, unbind: Binder) -> None:
        self._bind = bind
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

    def deliver(self, channel: str, message: Message, *, kind: str) -> int:
        """Queue `message` for every client watching `channel`; returns how many."""
        count = 0
        for pattern, watchers in self._watchers.items():
            if pattern == channel or self._regex[pattern].match(channel):
                for client in watchers:
                    client.offer(message)
                count += len(watchers)
        if count:
            DELIVERED.labels(kind).inc(count)
        return count

    def watchers(self, pattern: str) -> int:
        return len(self._watchers.get(pattern, ()))
