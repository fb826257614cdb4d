"""The suite as real processes on RabbitMQ and PostgreSQL: the gateway, occupancy, and the
telemetry, video-relay, ingestion and tracker services when a test asks for them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeway.common.testing import TEST_SECRET, ServiceProcess, free_port, make_token
from edgeway.occupancy.settings import OMEGA_PLACES

CAMERAS = OMEGA_PLACES  # the seed the occupancy service starts with


def frame(
    camera: str, *, people: int, free: int = 2, occupied: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "event": "frame_result",
        "camera": camera,
        "timestamp": time.time(),
        "summary": {
            "total_people": people,
            "free": [f"free_{i}" for i in range(free)],
            "occupied": [f"occupied_{i}" for i in range(occupied)],
        },
        "segments": [],
        **extra,
    }


@dataclass
class Stack:
    """The gateway and occupancy, and whichever other services the test configures."""

    amqp_url: str
    database_url: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    telemetry_database_url: str | None = None
    video_relay: bool = False
    # The ingestion service's own settings (database, storage, limits); None: not started.
    ingestion_env: dict[str, str] | None = None
    # The tracker's own settings (database, detector, checkpoints); None: not started.
    tracker_env: dict[str, str] | None = None
    # Per service ("gateway", "occupancy", "telemetry", "video-relay", "ingestion", "tracker"),
    # settings that override every other: the fault suite gives each its own broker and
    # database addresses, each through its own fault proxy.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    occupancy: ServiceProcess = field(init=False)
    gateway: ServiceProcess = field(init=False)
    telemetry: ServiceProcess | None = field(init=False, default=None)
    relay: ServiceProcess | None = field(init=False, default=None)
    ingestion: ServiceProcess | None = field(init=False, default=None)
    tracker: ServiceProcess | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        common = {
            "EDGEWAY_AMQP_URL": self.amqp_url,
            "EDGEWAY_JWT_SECRET": TEST_SECRET,
            "EDGEWAY_OCCUPANCY_DATABASE_URL": self.database_url,
            "EDGEWAY_PRODUCER_RATE": "5000",
            "EDGEWAY_PRODUCER_BURST": "5000",
            "EDGEWAY_NTP_SERVERS": "[]",  # no internet here; timesync has its own tests
            **self.extra_env,
        }
        self.occupancy = ServiceProcess(
            "edgeway.occupancy",
            env={
                **common,
                "EDGEWAY_OTEL_FILE": str(self.workdir / "occupancy.spans.jsonl"),
                **self.service_env.get("occupancy", {}),
            },
            port=free_port(),
            log_path=self.workdir / "occupancy.log",
        )
        if self.telemetry_database_url is not None:
            self.telemetry = ServiceProcess(
                "edgeway.telemetry",
                env={
                    **common,
                    "EDGEWAY_TELEMETRY_DATABASE_URL": self.telemetry_database_url,
                    **self.service_env.get("telemetry", {}),
                },
                port=free_port(),
                log_path=self.workdir / "telemetry.log",
            )
        if self.video_relay:
            self.relay = ServiceProcess(
                "edgeway.video_relay",
                env={**common, **self.service_env.get("video-relay", {})},
                port=free_port(),
                log_path=self.workdir / "video-relay.log",
            )
        if self.ingestion_env is not None:
            self.ingestion = ServiceProcess(
                "edgeway.ingestion",
                env={
                    **common,
                    "EDGEWAY_DATA_DIR": str(self.workdir),
                    **self.ingestion_env,
                    **self.service_env.get("ingestion", {}),
                },
                port=free_port(),
                log_path=self.workdir / "ingestion.log",
            )
        if self.tracker_env is not None:
            self.tracker = ServiceProcess(
                "edgeway.tracker",
                env={
                    **common,
                    "EDGEWAY_DATA_DIR": str(self.workdir),
                    **self.tracker_env,
                    **self.service_env.get("tracker", {}),
                },
                port=free_port(),
                log_path=self.workdir / "tracker.log",
            )
        self.gateway = ServiceProcess(
            "edgeway.gateway",
            env={
                **common,
                "EDGEWAY_OTEL_FILE": str(self.workdir / "gateway.spans.jsonl"),
                **self.service_env.get("gateway", {}),
            },
            port=free_port(),
            log_path=self.workdir / "gateway.log",
        )

    @property
    def services(self) -> list[ServiceProcess]:
        """Everything but the gateway, in start order."""
        optional = (self.telemetry, self.relay, self.ingestion, self.tracker)
        return [self.occupancy, *(service for service in optional if service is not None)]

    def start(self) -> Stack:
        for service in self.services:
            service.start()
        self.gateway.start()
        return self

    def stop(self) -> None:
        self.gateway.stop()
        for service in reversed(self.services):
            service.stop()

    def ws(self, path: str, *scopes: str, device: str | None = None) -> str:
        """A WebSocket URL with a token; `device` binds a phone's token and names it
        (`&device=`)."""
        url = self.gateway.url.replace("http", "ws") + path
        if device is None:
            return f"{url}?token={make_token(*scopes)}"
        return f"{url}?token={make_token(*scopes, device=[device])}&device={device}"

    @property
    def model_url(self) -> str:
        return self.ws("/model/ws/connect", "occupancy:publish")

    @property
    def client_url(self) -> str:
        return self.ws("/client/ws/connect", "occupancy:subscribe")
