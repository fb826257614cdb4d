"""Fuzzing fixtures: one real stack for the connected fuzz targets, and the summary table.

The stack is the gateway (EDGEWAY_ENVIRONMENT=development, a test secret), occupancy, telemetry
(each on its own PostgreSQL database) and the video relay, on a private RabbitMQ virtual host.
The ingestion service is deliberately not started: a fuzzed `POST /api/v1/ingest/rtsp` that
passes the edge checks would make it open an RTSP connection to whatever host was generated, and
nothing here may leave this machine. Its endpoints answer 504 with the documented ErrorResponse
instead, which the HTTP fuzz accepts only in that shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from edgeway.common.testing import (
    ServiceProcess,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    make_token,
)
from edgeway.gateway.auth import Scope
from tests.fuzz.harness import TALLIES, GatewayWatch, budget
from tests.stack import Stack

# The fuzz tokens' subject: a VIN that is also a device id, so a token bound by its subject
# (no `device` or `vin` claim) produces for this phone and this vehicle.
PRODUCER = "5YJ3E1EA1KF0FUZZ1"
LIMITS = {
    # Small enough that an oversized message is cheap to send: each has an error frame that
    # names its exact size, which the WebSocket fuzz uses as a sentinel (see test_websockets.py).
    "EDGEWAY_MAX_MESSAGE_BYTES": "16384",
    "EDGEWAY_MAX_JPEG_BYTES": "65536",
    "EDGEWAY_MAX_VIDEO_MESSAGE_BYTES": "65536",
    "EDGEWAY_MAX_PHONE_FILE_BYTES": "65536",
    "EDGEWAY_MAX_UPLOAD_BYTES": "262144",
    "EDGEWAY_INGEST_MAX_BODY_BYTES": "1048576",
    "EDGEWAY_INGEST_MAX_FILE_BYTES": "262144",
    # Rate limits out of the way: a rate_limited frame is a valid answer, but hides the rest.
    "EDGEWAY_PRODUCER_RATE": "100000",
    "EDGEWAY_PRODUCER_BURST": "100000",
    "EDGEWAY_CONTROL_RATE": "100000",
    "EDGEWAY_CONTROL_BURST": "100000",
    "EDGEWAY_VIEWER_COMMAND_RATE": "100000",
    "EDGEWAY_VIEWER_COMMAND_BURST": "100000",
    "EDGEWAY_REQUEST_TIMEOUT": "1.0",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz: a bounded fuzz run (EDGEWAY_FUZZ_EXAMPLES sets the budget)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLIES:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"fuzz targets (EDGEWAY_FUZZ_EXAMPLES={budget()})")
    width = max(len(name) for name in TALLIES)
    write(f"{'target':<{width}}  {'engine':<12} {'cases':>7} {'failures':>8}")
    for name, tally in sorted(TALLIES.items()):
        write(f"{name:<{width}}  {tally.engine:<12} {tally.tried:>7} {len(tally.failures):>8}")
        for kind in tally.failures:
            write(f"{'':<{width}}    ! {kind}")


def token(*scopes: str, subject: str = PRODUCER) -> str:
    return make_token(*scopes, subject=subject)


ALL_SCOPES = tuple(scope.value for scope in Scope)


@dataclass
class FuzzStack:
    stack: Stack
    watch: GatewayWatch
    all_scopes: str  # a token with every scope

    @property
    def gateway(self) -> ServiceProcess:
        return self.stack.gateway

    @property
    def url(self) -> str:
        return self.stack.gateway.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1)


@pytest.fixture(scope="session")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    # A virtual host of its own: this stack lives as long as the session, and its services,
    # on the session's host, would compete for the work queues of the end-to-end tests' stacks.
    vhost, amqp_url = create_vhost("edgeway-fuzz")
    occupancy_db = create_postgres_database("edgeway_fuzz_occupancy")
    telemetry_db = create_postgres_database("edgeway_fuzz_telemetry")
    stack = Stack(
        amqp_url=amqp_url,
        database_url=occupancy_db,
        workdir=tmp_path_factory.mktemp("fuzz-stack"),
        extra_env={"EDGEWAY_ENVIRONMENT": "development", **LIMITS},
        telemetry_database_url=telemetry_db,
        video_relay=True,
    )
    processes = [*stack.services, stack.gateway]
    try:
        for process in processes:  # started together: the gateway needs none of them to start
            process.start(wait=0)
        for process in processes:
            process.wait_ready(90)
        yield FuzzStack(stack, GatewayWatch(stack.gateway), token(*ALL_SCOPES))
    finally:
        stack.stop()
        drop_postgres_database(occupancy_db)
        drop_postgres_database(telemetry_db)
        drop_vhost(vhost)
