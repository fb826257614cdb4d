"""What the gateway holds for telemetry: known vehicles, the upload publisher, connected loggers,
open dashboards."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from edgeway.common.logging import get_logger
from edgeway.gateway.auth import Identity
from edgeway.gateway.link import BrokerLink, ServiceUnavailableError
from edgeway.gateway.producers import ProducerSeats
from edgeway.gateway.telemetry.publisher import UploadPublisher

log = get_logger("edgeway.gateway.telemetry")

CONTROL_ENDPOINT = "/telemetry/control/ws"
UPLOAD_ENDPOINT = "/telemetry"  # and the seed README's `/api/telemetry`; metrics name this one
# A VIN missing from the list is asked about again before it is refused, at most once per this
# many seconds; while the service does not answer, it is asked at most this often too.
REFRESH_MISS_S = 1.0


class VehicleCheck(Enum):
    """What the gateway may say about an upload's VIN."""

    ACCEPT = "accept"  # in the last list the service gave, or the service never answered yet
    UNKNOWN = "unknown"  # the service's current list does not have it: 422, for good
    UNAVAILABLE = "unavailable"  # not in the last list, and the service cannot say now: 503


class VehicleDirectory:
    """The VINs the telemetry service has registered, cached for `ttl` seconds.

    Only a successful answer can make a vehicle unknown. An error answer (the service's
    database is down) or no answer in time leaves the last good list in place: a VIN in it is
    still accepted (the upload waits in the work queue, and the service refuses it itself if
    it was retired meanwhile, keeping its bytes), and a VIN not in it gets 503 with
    Retry-After, so its logger keeps the packets and sends them again. Until the service has
    answered once, nothing is refused here: queuing while the service is down is the point of
    the work queue, and the service keeps what it cannot place as a rejection.

    A list older than `ttl` is asked for again before it is used, so a vehicle retired through
    any gateway replica stops being accepted by every replica within `ttl` seconds while the
    service answers (the replica that retired it forgets it at once, `learn`). While the
    service does not answer, uploads never wait for it: it is asked again in the background,
    at most once per REFRESH_MISS_S.
    """

    def __init__(
        self,
        *,
        ttl: float,
        retry_s: float = REFRESH_MISS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._retry_s = retry_s
        self._clock = clock
        self._known: frozenset[str] | None = None  # the last list the service gave
        self._answered_at = 0.0  # when that list was asked for
        self._tried_at: float | None = None  # the last time it was asked, answered or not
        self._available = True  # whether that last time it answered
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """Whether the service gave its list the last time it was asked."""
        return self._available

    async def check(self, link: BrokerLink, vin: str) -> VehicleCheck:
        if self._tried_at is None:
            await self._refresh(link)  # the first upload waits for the first answer
        if self._known is None:  # never answered: the upload is queued for the service
            self._renew_later(link)
            return VehicleCheck.ACCEPT
        if self._age() > self._ttl:
            await self._renew(link)
        if vin not in self._known and self._age() > self._retry_s:
            await self._renew(link)  # registered since the last look? ask before refusing
        if vin in self._known:
            return VehicleCheck.ACCEPT
        return VehicleCheck.UNKNOWN if self._available else VehicleCheck.UNAVAILABLE

    def learn(self, vin: str, *, registered: bool) -> None:
        """A registration or retirement this replica made: in force here at once."""
        if self._known is not None:
            self._known = (self._known | {vin}) if registered else (self._known - {vin})

    def _age(self) -> float:
        return self._clock() - self._answered_at

    async def _renew(self, link: BrokerLink) -> None:
        """Ask now while the service answers (milliseconds); in the background while it does
        not, so no upload waits a request timeout for it."""
        if self._available:
            await self._refresh(link)
        else:
            self._renew_later(link)

    def _renew_later(self, link: BrokerLink) -> None:
        if self._tried_at is not None and self._clock() - self._tried_at < self._retry_s:
            return
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._refresh(link))

    async def _refresh(self, link: BrokerLink) -> None:
        asked = self._clock()
        async with self._lock:
            if self._tried_at is not None and self._tried_at >= asked:
                return  # asked while this one waited for the lock (uploads that came at once)
            try:
                answer = await link.request(
                    service="telemetry",
                    queue=link.topology.telemetry_requests_queue,
                    body={"query": "vehicles"},
                )
            except ServiceUnavailableError as exc:
                self._unavailable(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - the broker failed the request: no answer
                self._unavailable(repr(exc))
                return
            finally:
                self._tried_at = self._clock()
            vins = answer.get("vehicles") if isinstance(answer, dict) else None
            if not isinstance(vins, list) or not all(isinstance(vin, str) for vin in vins):
                # `{"error": ..., "code": "unavailable"}` when its database is down: no list,
                # so nothing is learnt, least of all that every vehicle is unknown.
                self._unavailable(f"telemetry answered {answer!r}")
                return
            if not self._available:
                log.info("vehicle list available again", vehicles=len(vins))
            self._known = frozenset(vins)
            self._answered_at = asked
            self._available = True

    def _unavailable(self, reason: str) -> None:
        if self._available:
            log.warning(
                "vehicle list unavailable; keeping the last one",
                reason=reason,
                vehicles=None if self._known is None else len(self._known),
            )
        self._available = False


@dataclass(eq=False)  # one per socket: compared and hashed by identity
class LoggerSession:
    """One edge logger's control socket, as it last described itself."""

    vin: str
    running: bool = False
    offline: bool = False
    buffered: int = 0
    # The last commands it acknowledged (their ids), which a command's answer waits for.
    acked: deque[str] = field(default_factory=lambda: deque(maxlen=32))


class TelemetryState:
    """What the gateway holds for telemetry: known vehicles, the upload publisher, connected
    loggers and dashboards."""

    def __init__(self, link: BrokerLink) -> None:
        settings = link.settings
        self.vehicles = VehicleDirectory(ttl=settings.telemetry_vehicles_cache_s)
        self.uploads = UploadPublisher(
            lambda body, envelope: link.publish_work(
                body, envelope=envelope, exchange=link.topology.telemetry_raw
            ),
            metrics=link.metrics,
            max_waiting=settings.telemetry_waiting_uploads,
            max_waiting_bytes=settings.telemetry_waiting_bytes,
        )
        # Bound once: a label lookup per accepted upload was a measurable share of its CPU.
        self.uploads_published = link.metrics.published.labels(UPLOAD_ENDPOINT)
        self.loggers: set[LoggerSession] = set()
        # The one control socket of each vehicle on this replica.
        self.controls = ProducerSeats(CONTROL_ENDPOINT, Identity.VIN)
        self.dashboards = 0
