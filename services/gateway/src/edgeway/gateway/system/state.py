"""What this gateway replica keeps of the services' readiness: the latest report of each
instance, from its own queue on `system.readiness.*`.

The gateway does not know where the instances run (each service scales on its own), so it
does not ask them: each publishes what its `/readyz` says every `interval_s`. An instance
silent for `SILENT_INTERVALS` of its intervals is shown as not reporting (it stopped, or it
cannot reach the broker); after `FORGET_INTERVALS` it is forgotten (a replica scaled away).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from faststream import AckPolicy
from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage
from pydantic import BaseModel, Field, ValidationError

from edgeway.common.broker import whole_message
from edgeway.common.logging import get_logger
from edgeway.common.readiness import instance_name
from edgeway.common.schemas.system import NOT_READY, READY, ReadinessReport
from edgeway.common.topology import Topology
from edgeway.gateway.link import BrokerLink

log = get_logger("edgeway.gateway.system")

# Every Edgeway service, listed even while none of its instances reports (never started here).
SERVICES = ("occupancy", "telemetry", "video-relay", "ingestion", "tracker")
NOT_REPORTING = "not reporting"
SILENT_INTERVALS = 3
# Five minutes at the default interval (5 s).
FORGET_INTERVALS = 60

Status = Literal["ready", "not ready", "not reporting"]


class InstanceReadiness(BaseModel):
    """One instance of a service, as its latest report says."""

    instance: str = Field(description="`<hostname>/<pid>` of the process")
    status: Status = Field(
        description="`not reporting`: no report for three of its intervals (the last one's "
        "failures are kept)"
    )
    failures: dict[str, str] = Field(description="each failing check and why")
    age_s: float = Field(description="seconds since this gateway received its latest report")
    checked_at: float = Field(description="epoch seconds, when the instance ran its checks")
    interval_s: float = Field(description="seconds between its reports")
    version: str | None = None


class ServiceReadiness(BaseModel):
    service: str
    instances: list[InstanceReadiness] = Field(description="empty: no instance reports")


class GatewayReadiness(BaseModel):
    """The gateway replica that answers: its `/readyz`."""

    gateway_id: str
    instance: str
    status: Literal["ready", "not ready"]
    failures: dict[str, str]


class SystemReadiness(BaseModel):
    gateway: GatewayReadiness
    services: list[ServiceReadiness]


@dataclass(slots=True)
class _Seen:
    report: ReadinessReport
    received: float  # this gateway's monotonic clock: instances' clocks may differ from ours


class Board:
    """The latest report of each service instance (see the module)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[tuple[str, str], _Seen] = {}

    def take(self, report: ReadinessReport) -> None:
        self._seen[(report.service, report.instance)] = _Seen(report, self._clock())

    def take_message(self, body: bytes) -> None:
        """A report as it came off the broker; one that does not validate is logged, dropped."""
        try:
            report = ReadinessReport.model_validate_json(body)
        except ValidationError as exc:
            log.warning("readiness report dropped", reason=str(exc.errors()[:1]))
            return
        self.take(report)

    def services(self) -> list[ServiceReadiness]:
        """Every known service (`SERVICES`, then any other that reports), its instances by name."""
        now = self._clock()
        for key, seen in list(self._seen.items()):
            if now - seen.received > FORGET_INTERVALS * seen.report.interval_s:
                del self._seen[key]
        by_service: dict[str, list[InstanceReadiness]] = {name: [] for name in SERVICES}
        for (service, _), seen in sorted(self._seen.items()):
            by_service.setdefault(service, []).append(_instance(seen, now))
        return [
            ServiceReadiness(service=name, instances=found) for name, found in by_service.items()
        ]


def _instance(seen: _Seen, now: float) -> InstanceReadiness:
    report = seen.report
    age = now - seen.received
    silent = age > SILENT_INTERVALS * report.interval_s
    return InstanceReadiness(
        instance=report.instance,
        status=NOT_REPORTING if silent else report.status,
        failures=report.failures,
        age_s=round(age, 3),
        checked_at=report.checked_at,
        interval_s=report.interval_s,
        version=report.version,
    )


def subscribe(broker: RabbitBroker, topology: Topology, gateway_id: str, board: Board) -> None:
    """The replica's queue of readiness reports (`Topology.gateway_system_queue`), into `board`;
    started with the broker. Apart from the clients' fan-out: a few messages a second."""

    @broker.subscriber(
        topology.gateway_system_queue(gateway_id),
        topology.broadcast,
        ack_policy=AckPolicy.ACK_FIRST,
        decoder=whole_message,
        no_reply=True,
    )
    async def on_report(message: RabbitMessage) -> None:
        board.take_message(message.body)


async def gateway_failures(link: BrokerLink) -> dict[str, str]:
    """What keeps this gateway from being ready (empty: ready); its `/readyz` says the same."""
    if await link.ready():
        return {}
    return {"broker": "not connected" if link.connected.is_set() else "not reached yet"}


class SystemState:
    """The readiness reports this replica receives, and its own readiness."""

    def __init__(self, link: BrokerLink) -> None:
        self.link = link
        self.board = Board()
        self.instance = instance_name()
        subscribe(link.broker, link.topology, link.gateway_id, self.board)

    async def readiness(self) -> SystemReadiness:
        failures = await gateway_failures(self.link)
        return SystemReadiness(
            gateway=GatewayReadiness(
                gateway_id=self.link.gateway_id,
                instance=self.instance,
                status=NOT_READY if failures else READY,
                failures=failures,
            ),
            services=self.board.services(),
        )
