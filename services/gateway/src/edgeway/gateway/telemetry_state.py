"""What the gateway holds for telemetry: known vehicles, the upload publisher, connected loggers,
open dashboards."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from edgeway.common.logging import get_logger
from edgeway.gateway.auth import Identity
from edgeway.gateway.link import BrokerLink, ServiceUnavailableError
from edgeway.gateway.producers import ProducerSeats
from edgeway.gateway.telemetry_publisher import UploadPublisher

log = get_logger("edgeway.gateway.telemetry")

# Known vehicles are asked of the telemetry service again after this long, or on a miss (at most
# once per REFRESH_MISS_S), so a vehicle an operator adds is accepted within seconds.
VEHICLES_TTL_S = 30.0
CONTROL_ENDPOINT = "/telemetry/control/ws"
REFRESH_MISS_S = 1.0


class VehicleDirectory:
    """The VINs the telemetry service knows, cached.

    Until the service has answered once, nothing is refused here: the upload is queued and the
    service itself keeps what it cannot place as a rejection. Queuing while the service is down
    is the point of the work queue.
    """

    def __init__(self) -> None:
        self._known: frozenset[str] | None = None
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def knows(self, link: BrokerLink, vin: str) -> bool:
        if self._fetched_at is None:  # the first upload waits for the first answer
            await self._refresh(link)
        age = time.monotonic() - (self._fetched_at or 0.0)
        if self._known is None or age > VEHICLES_TTL_S:
            # In the background: while the service is down, uploads must not wait on it.
            if self._background is None or self._background.done():
                self._background = asyncio.create_task(self._refresh(link))
        elif vin not in self._known and age > REFRESH_MISS_S:
            await self._refresh(link)  # added since the last look? ask before refusing
        return self._known is None or vin in self._known

    async def _refresh(self, link: BrokerLink) -> None:
        asked = time.monotonic()
        async with self._lock:
            if self._fetched_at is not None and self._fetched_at >= asked:
                return  # answered while this one waited for the lock (uploads that came at once)
            try:
                answer = await link.request(
                    service="telemetry",
                    queue=link.topology.telemetry_requests_queue,
                    body={"query": "vehicles"},
                )
            except ServiceUnavailableError as exc:
                log.warning("vehicle list unavailable", reason=str(exc))
                return
            finally:
                self._fetched_at = time.monotonic()
            self._known = frozenset(answer.get("vehicles", ()))


@dataclass(eq=False)  # one per socket: compared and hashed by identity
class LoggerSession:
    """One edge logger's control socket, as it last described itself."""

    vin: str
    running: bool = False
    offline: bool = False
    buffered: int = 0


class TelemetryState:
    """What the gateway holds for telemetry: known vehicles, the upload publisher, connected
    loggers and dashboards."""

    def __init__(self, link: BrokerLink) -> None:
        self.vehicles = VehicleDirectory()
        self.uploads = UploadPublisher(
            lambda body, envelope: link.publish_work(
                body, envelope=envelope, exchange=link.topology.telemetry_raw
            )
        )
        self.loggers: set[LoggerSession] = set()
        # The one control socket of each vehicle on this replica.
        self.controls = ProducerSeats(CONTROL_ENDPOINT, Identity.VIN)
        self.dashboards = 0
