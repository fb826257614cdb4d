"""The offset of this host's clock from NTP, kept fresh in the background.

The seed synchronised at start-up, blocking, trying eight servers with a 5 s timeout each (up to
40 s offline) and then re-synced from a thread on demand. Here `start()` only launches a task:
ntplib runs in a worker thread (`asyncio.to_thread`), servers are tried in order until one
answers, every `interval_s`. Until the first answer the offset is 0.0, so timestamps are this
host's clock, and `age_s` is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence

import ntplib  # type: ignore[import-untyped]
from prometheus_client import Gauge

from edgeway.common.logging import get_logger

log = get_logger(__name__)

OFFSET = Gauge("edgeway_ntp_offset_seconds", "NTP time minus this host's clock, at the last answer")
AGE = Gauge(
    "edgeway_ntp_age_seconds",
    "Seconds since the last NTP answer (+Inf while none has come)",
)

NTP_PORT = 123
# Leap indicator 3 means "clock not synchronised"; stratum 0 is a kiss-o'-death (RFC 5905 §7.3).
_UNSYNCHRONISED_LEAP = 3


def split_server(server: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` as (host, port); a bare IPv6 has no port."""
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else NTP_PORT
    if server.count(":") == 1:
        host, port = server.split(":")
        return host, int(port)
    return server, NTP_PORT


class TimeSync:
    """`servers` are tried in order at each sync; an empty list turns synchronisation off."""

    def __init__(
        self, servers: Sequence[str], *, interval_s: float = 60, timeout_s: float = 2
    ) -> None:
        self.servers = [split_server(server) for server in servers]
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.offset_s = 0.0
        self.server: str | None = None  # the one that gave the current offset
        self._synced_at: float | None = None  # time.monotonic() of the last answer
        self._task: asyncio.Task[None] | None = None

    @property
    def age_s(self) -> float | None:
        """Seconds since the last answer; None until the first."""
        if self._synced_at is None:
            return None
        return time.monotonic() - self._synced_at

    def now(self) -> float:
        """NTP-corrected epoch seconds."""
        return time.time() + self.offset_s

    def start(self) -> None:
        """Launch the background sync and return at once (never delays start-up)."""
        if not self.servers or self._task is not None:
            return
        AGE.set_function(self._age_for_gauge)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ntp-sync")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sync(self) -> bool:
        """Ask the servers in order until one answers; True when one did."""
        for host, port in self.servers:
            try:
                stats = await asyncio.to_thread(self._request, host, port)
            except (OSError, ntplib.NTPException) as exc:
                log.debug("ntp server did not answer", server=host, port=port, error=str(exc))
                continue
            if stats.leap == _UNSYNCHRONISED_LEAP or stats.stratum == 0:
                log.debug("ntp server is not synchronised", server=host, port=port)
                continue
            self.offset_s = float(stats.offset)
            self._synced_at = time.monotonic()
            self.server = host if port == NTP_PORT else f"{host}:{port}"
            OFFSET.set(self.offset_s)
            return True
        return False

    async def _run(self) -> None:
        failing = False
        while True:
            if await self.sync():
                if failing:
                    log.info("ntp answering again", server=self.server, offset_s=self.offset_s)
                failing = False
            elif not failing:
                log.warning(
                    "no ntp server answered; keeping the last offset",
                    offset_s=self.offset_s,
                    servers=[host for host, _ in self.servers],
                )
                failing = True
            await asyncio.sleep(self.interval_s)

    def _request(self, host: str, port: int) -> ntplib.NTPStats:
        return ntplib.NTPClient().request(host, version=3, port=port, timeout=self.timeout_s)

    def _age_for_gauge(self) -> float:
        age = self.age_s
        return math.inf if age is None else age
