"""Listeners that record what arrived, for tests to assert on.

`RecordingListener`: a TCP listener on loopback that records every byte it receives: the proof
that a request reached a host, or never did (an injected header, a redirect followed, a port
probed). `answer`, if given, is called once per connection with what arrived up to the first
blank line (a request's head) and may return bytes to send back, as a server of any protocol
would. With `tls`, connections are TLS (server side) and what is recorded is what came inside.

`BrokerListener`: what a RabbitMQ queue delivers (a private one bound to an exchange, such as the
broadcast exchange, or a queue a service would read), in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

Answer = Callable[[bytes], bytes | None]


class RecordingListener:
    """Accepts connections on 127.0.0.1 (a free port) until stopped; `received` has what each
    connection sent, in order of arrival."""

    def __init__(
        self,
        answer: Answer | None = None,
        *,
        linger_s: float = 2.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.answer = answer
        self.linger_s = linger_s  # how long a connection is read after the answer
        self.tls = tls
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._lock = threading.Lock()
        self._received: list[bytearray] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="recording-listener", daemon=True)

    @property
    def received(self) -> list[bytes]:
        with self._lock:
            return [bytes(data) for data in self._received]

    def wait_for(self, connections: int, timeout: float = 10.0) -> list[bytes]:
        """What was received once `connections` connections came (or the time ran out)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < connections and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _accept(self) -> None:
        self._socket.settimeout(0.1)  # closing it would not wake a blocked accept() on Linux
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(None)  # accepted sockets inherit the listener's timeout
            data = bytearray()
            with self._lock:
                self._received.append(data)
            threading.Thread(target=self._serve, args=(connection, data), daemon=True).start()

    def _serve(self, connection: socket.socket, data: bytearray) -> None:
        answered = self.answer is None
        deadline = time.monotonic() + 10.0
        if self.tls is not None:
            try:
                connection.settimeout(5.0)
                connection = self.tls.wrap_socket(connection, server_side=True)
            except (OSError, ssl.SSLError):
                connection.close()
                return
        with connection:
            connection.settimeout(0.2)
            while time.monotonic() < deadline:
                try:
                    chunk = connection.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                with self._lock:
                    data += chunk
                if not answered and (b"\r\n\r\n" in data or b"\n\n" in data):
                    answered = True
                    assert self.answer is not None
                    reply = self.answer(bytes(data))
                    if reply is not None:
                        connection.sendall(reply)
                    deadline = time.monotonic() + self.linger_s

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class BrokerListener:
    """Every message `queue` delivers, acknowledged on receipt and kept in arrival order, with
    when it arrived (`arrived_at`, `time.monotonic()`, one per message of `received`)."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.received: list[AbstractIncomingMessage] = []
        self.arrived_at: list[float] = []
        self.taken = 0  # messages `get` has returned
        self._arrived = asyncio.Event()

    @classmethod
    async def bind(
        cls, channel: AbstractChannel, exchange: str, *routing_keys: str
    ) -> BrokerListener:
        """A private queue bound to `exchange` with `routing_keys` (a fanout exchange: none),
        consuming from now on."""
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in routing_keys or ("",):
            await queue.bind(exchange, routing_key=key)
        return await cls(queue).start()

    @classmethod
    async def drain(cls, channel: AbstractChannel, name: str) -> BrokerListener:
        """The declared queue `name` (one nobody else reads in the test), emptied first."""
        queue = await channel.get_queue(name, ensure=True)
        await queue.purge()
        return await cls(queue).start()

    async def start(self) -> Self:
        await self.queue.consume(self._take, no_ack=True)
        return self

    async def _take(self, message: AbstractIncomingMessage) -> None:
        self.arrived_at.append(time.monotonic())
        self.received.append(message)
        self._arrived.set()

    async def wait_for(
        self,
        count: int,
        matches: Callable[[AbstractIncomingMessage], bool] = lambda _: True,
        within: float = 5.0,
    ) -> list[AbstractIncomingMessage]:
        """The first `count` matching messages, once they have come (TimeoutError otherwise)."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            found = [message for message in self.received if matches(message)]
            if len(found) >= count:
                return found[:count]
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"{len(found)} of {count} messages in {within} s")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def get(self, within: float = 5.0) -> AbstractIncomingMessage:
        """The next message not taken by `get` yet."""
        messages = await self.wait_for(self.taken + 1, within=within)
        self.taken += 1
        return messages[-1]

    async def settle(self, quiet: float = 0.5) -> None:
        """Until nothing has arrived for `quiet` seconds (what was still on its way is in)."""
        seen = -1
        while seen != len(self.received):
            seen = len(self.received)
            await asyncio.sleep(quiet)

    async def none(self, wait: float = 0.3) -> None:
        """Nothing more arrives within `wait` seconds (beyond what `get` took)."""
        await asyncio.sleep(wait)
        assert len(self.received) == self.taken, self.received[self.taken].body
