"""Readiness: the checks behind `/readyz`, and the reports that carry them to the gateway.

`failures` runs a service's checks (the broker connected, then each registered check); its
`/readyz` answers from it, and so does the `Reporter`, which publishes the result every
`readiness_interval_s` on the broadcast exchange (`system.readiness.<service>`, transient). The
gateway keeps the latest report of each instance and serves them to the console: it cannot ask
the instances themselves, whose addresses it does not know (each service scales on its own).
A report that cannot be published is dropped (logged at debug): the broker may be what is down,
and the gateway notices the silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

from faststream.rabbit import RabbitBroker, RabbitExchange

from edgeway.common.broker import encode, publish
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.system import NOT_READY, READY, REASON_MAX_CHARS, ReadinessReport
from edgeway.common.topology import Channels

# A readiness check raises (any exception) when its dependency is not ready.
ReadinessCheck = Callable[[], Awaitable[None]]

REPORT_TYPE = "system.readiness.v1"

log = get_logger("edgeway.readiness")


async def failures(
    broker: RabbitBroker, checks: Mapping[str, ReadinessCheck], *, broker_timeout: float
) -> dict[str, str]:
    """Each failing check and why (empty: ready). The broker is checked first, as `broker`."""
    failed: dict[str, str] = {}
    if not await broker.ping(broker_timeout):
        failed["broker"] = "not connected"
    for name, check in checks.items():
        try:
            await check()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with its reason
            failed[name] = f"{type(exc).__name__}: {exc}"[:REASON_MAX_CHARS]
    return failed


def instance_name() -> str:
    """This process among its service's replicas: `<hostname>/<pid>` (a pod's name in
    Kubernetes, a container's id in compose)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def service_version(service: str) -> str | None:
    """The installed version of the service's package (`edgeway-<service>`), if it is one."""
    try:
        return importlib.metadata.version(f"edgeway-{service}")
    except importlib.metadata.PackageNotFoundError:
        return None


class Reporter:
    """Publishes this instance's readiness every `interval_s` until stopped (see the module)."""

    def __init__(
        self,
        broker: RabbitBroker,
        *,
        service: str,
        exchange: RabbitExchange,
        interval_s: float,
        check: Callable[[], Awaitable[dict[str, str]]],
    ) -> None:
        self.broker = broker
        self.service = service
        self.exchange = exchange
        self.interval_s = interval_s
        self.instance = instance_name()
        self.version = service_version(service)
        self._check = check
        self._declared = False
        self._task: asyncio.Task[None] | None = None

    async def report(self) -> ReadinessReport:
        """Run the checks now, as `/readyz` does."""
        failed = await self._check()
        return ReadinessReport(
            service=self.service,
            instance=self.instance,
            status=NOT_READY if failed else READY,
            failures=failed,
            checked_at=time.time(),
            interval_s=self.interval_s,
            version=self.version,
        )

    async def publish_once(self) -> ReadinessReport:
        """Check and publish one report; raises when the broker does not take it in time."""
        report = await self.report()
        # Waits no longer than the next report: a broker that is away is waited out by them.
        async with asyncio.timeout(self.interval_s):
            if not self._declared:
                # A publish to an exchange that does not exist yet would close the broker's
                # channel, which its consumers share.
                await self.broker.declare_exchange(self.exchange)
                self._declared = True
            await publish(
                self.broker,
                encode(report.model_dump(mode="json")),
                envelope=Envelope(type=REPORT_TYPE, producer=self.service),
                exchange=self.exchange,
                routing_key=Channels.system_readiness(self.service),
                durable=False,
            )
        return report

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.publish_once()
            except Exception as exc:  # noqa: BLE001 - never stops the service: the gateway sees the silence
                log.debug("readiness not reported", service=self.service, error=repr(exc))
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="readiness reporter")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
