"""`Phone`: a phone that streams for ever to a gateway, as the WorldSystem app does: a
`VideoLoop` replayed in real time to `WS /ws/video`, IMU samples to `WS /ws/phone`, each socket
reconnecting with backoff on its own."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.frames import CloseCode

from edgeway.common.logging import get_logger
from edgeway.edge.pacing import Backoff
from edgeway.edge.phone.media import VideoLoop, imu_sample
from edgeway.edge.phone.wire import PHONE_PATH, VIDEO_PATH, auth_headers, endpoint_url

LATE_S = 1.0  # a sender further behind real time than this skips ahead instead of catching up
STATS_INTERVAL_S = 30.0

log = get_logger("edgeway.edge.phone")


@dataclass(slots=True)
class PhoneCounters:
    """What a `Phone` did since it started."""

    frames: int = 0
    imu_samples: int = 0
    commands: int = 0
    errors: int = 0
    connections: int = 0
    skipped_s: float = 0.0  # seconds of real time skipped by senders that fell behind


Serve = Callable[[ClientConnection], Awaitable[None]]


class Phone:
    """A phone that streams for ever: `video` (a `VideoLoop`) to `WS /ws/video`, one packet a
    message in real time, and `imu_hz` IMU samples a second to `WS /ws/phone`. What comes back
    is logged: viewer commands on `/ws/phone`, error frames on either socket.

    Each socket reconnects with backoff on its own when it drops. A reconnected video stream
    starts at the loop's next GOP (SPS, PPS, keyframe), so the relay's parser and decoder start
    afresh there. Timestamps are the phone's clock, from one start: epoch µs for video, epoch ns
    for IMU. They keep increasing across reconnects: a gap in the stream shows as a jump in
    timestamps, as from a phone that stalled, never as time going back."""

    def __init__(
        self,
        gateway_url: str,
        device: str,
        token: str | None,
        video: VideoLoop,
        *,
        imu_hz: float = 100.0,
        backoff: Backoff | None = None,
        open_timeout_s: float = 10.0,
    ) -> None:
        self.device = device
        self.video_url = endpoint_url(gateway_url, VIDEO_PATH, device)
        self.phone_url = endpoint_url(gateway_url, PHONE_PATH, device)
        self.video = video
        self.imu_hz = imu_hz
        self.counters = PhoneCounters()
        self._headers = auth_headers(token)
        self._backoff = backoff if backoff is not None else Backoff(initial=0.5, maximum=10.0)
        self._open_timeout_s = open_timeout_s
        self._started = time.monotonic()
        self._epoch_ns = time.time_ns()
        self._frame = 0  # the next video frame, counted from the start (its time)
        self._cursor = 0  # the next frame of the loop (its picture)
        self._imu = 0  # the next IMU sample, counted from the start

    async def run(self) -> None:
        """Stream until cancelled."""
        self._started, self._epoch_ns = time.monotonic(), time.time_ns()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep("video", self.video_url, self._stream))
            tasks.create_task(self._keep("phone", self.phone_url, self._phone))
            tasks.create_task(self._report())

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    async def _keep(self, name: str, url: str, serve: Serve) -> None:
        """Keep `url` connected and `serve` it; reconnect with backoff when it drops."""
        delays = self._backoff.delays()
        trouble: str | None = None  # said once, not at every retry
        while True:
            try:
                async with websockets.connect(
                    url,
                    additional_headers=self._headers,
                    compression=None,
                    proxy=None,
                    open_timeout=self._open_timeout_s,
                    close_timeout=2,
                ) as connection:
                    delays, trouble = self._backoff.delays(), None
                    self.counters.connections += 1
                    log.info("connected", socket=name, url=url, device=self.device)
                    try:
                        await serve(connection)
                    except asyncio.CancelledError:
                        # Stopping: say so (1001) instead of the 1011 an exception would give.
                        await connection.close(CloseCode.GOING_AWAY, "the phone is stopping")
                        raise
                    why = "closed by the gateway"
            except websockets.InvalidStatus as exc:
                why = f"refused with HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why != trouble:
                log.warning("connection lost; reconnecting", socket=name, reason=why)
                trouble = why
            else:
                log.debug("connection still failing", socket=name, reason=why)
            await asyncio.sleep(next(delays))

    async def _stream(self, connection: ClientConnection) -> None:
        await _together(self._read(connection, "video"), self._send_video(connection))

    async def _phone(self, connection: ClientConnection) -> None:
        if self.imu_hz > 0:
            await _together(self._read(connection, "phone"), self._send_imu(connection))
        else:
            await self._read(connection, "phone")

    async def _send_video(self, connection: ClientConnection) -> None:
        fps, first_us = self.video.fps, self._epoch_ns // 1_000
        self._cursor = self.video.next_gop(self._cursor)
        self._frame = max(self._frame, math.ceil(self._elapsed() * fps))
        while True:
            self._frame = await self._wait_for(self._frame, fps)
            timestamp_us = first_us + round(self._frame * 1_000_000 / fps)
            for packet in self.video.packets(self._cursor, timestamp_us):
                await connection.send(packet.encode())
            self._frame += 1
            self._cursor = (self._cursor + 1) % len(self.video.frames)
            self.counters.frames += 1

    async def _send_imu(self, connection: ClientConnection) -> None:
        hz = self.imu_hz
        self._imu = max(self._imu, math.ceil(self._elapsed() * hz))
        while True:
            self._imu = await self._wait_for(self._imu, hz)
            timestamp_ns = self._epoch_ns + round(self._imu * 1e9 / hz)
            await connection.send(orjson.dumps(imu_sample(self._imu, timestamp_ns, hz)).decode())
            self._imu += 1
            self.counters.imu_samples += 1

    async def _wait_for(self, index: int, rate: float) -> int:
        """Sleep until item `index` of a `rate`-per-second sequence is due; the index to send
        now, which is later than `index` when the sender fell more than LATE_S behind."""
        delay = index / rate - self._elapsed()
        if delay > 0:
            await asyncio.sleep(delay)
            return index
        await asyncio.sleep(0)  # catching up: let the other sockets have their turn
        if delay < -LATE_S:
            self.counters.skipped_s += -delay
            log.warning("behind real time; skipping ahead", seconds=round(-delay, 3))
            return math.ceil(self._elapsed() * rate)
        return index

    async def _read(self, connection: ClientConnection, name: str) -> None:
        async for message in connection:
            self._take(name, message)

    def _take(self, name: str, message: str | bytes) -> None:
        if isinstance(message, bytes):
            log.warning("unexpected binary message", socket=name, size=len(message))
            return
        try:
            body = orjson.loads(message)
        except orjson.JSONDecodeError:
            log.warning("unreadable message", socket=name, message=message[:200])
            return
        kind = body.get("type") if isinstance(body, dict) else None
        if kind == "error":
            self.counters.errors += 1
            log.warning(
                "the gateway refused a message",
                socket=name,
                code=body.get("code"),
                reason=body.get("reason"),
            )
        else:
            self.counters.commands += 1
            log.info("command received", socket=name, device=self.device, kind=kind, command=body)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            log.info("streaming", device=self.device, **asdict(self.counters))


async def _together(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run `coroutines` until the first one ends (a connection's reader and writer: either one
    ends when the connection does); cancel the rest, and raise what the first one raised."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
