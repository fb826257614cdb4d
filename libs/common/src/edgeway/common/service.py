"""The small internal HTTP server every service runs: `/healthz`, `/readyz`, `/metrics`.

`/healthz` is liveness: the process answers, nothing else is checked (a broker outage must not
make Kubernetes restart every replica). `/readyz` is readiness: the broker is connected and every
check the service registered (database reachable, migrations applied, models loaded) passes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import uvicorn
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.types import Scope
from faststream.rabbit import RabbitBroker
from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app

from edgeway.common.logging import get_logger
from edgeway.common.settings import CommonSettings

# A readiness check raises (any exception) when its dependency is not ready.
ReadinessCheck = Callable[[], Awaitable[None]]

log = get_logger("edgeway.service")


def _json(status: int, body: Mapping[str, Any]) -> AsgiResponse:
    return AsgiResponse(orjson.dumps(body), status, headers={"content-type": "application/json"})


def service_app(
    broker: RabbitBroker,
    *,
    checks: Mapping[str, ReadinessCheck],
    on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
    after_startup: Sequence[Callable[[], Awaitable[None]]] = (),
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
    registry: CollectorRegistry = REGISTRY,
    broker_timeout: float = 2.0,
) -> AsgiFastStream:
    """The service as one ASGI app: the broker's consumers plus the operations endpoints."""

    @get(include_in_schema=False)
    async def healthz(scope: Scope) -> AsgiResponse:
        return _json(200, {"status": "ok"})

    @get(include_in_schema=False)
    async def readyz(scope: Scope) -> AsgiResponse:
        failures: dict[str, str] = {}
        if not await broker.ping(broker_timeout):
            failures["broker"] = "not connected"
        for name, check in checks.items():
            try:
                await check()
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with its reason
                failures[name] = f"{type(exc).__name__}: {exc}"
        if failures:
            return _json(503, {"status": "not ready", "failures": failures})
        return _json(200, {"status": "ready"})

    return AsgiFastStream(
        broker,
        asgi_routes=[
            ("/healthz", healthz),
            ("/readyz", readyz),
            ("/metrics", make_asgi_app(registry)),
        ],
        on_startup=on_startup,
        after_startup=after_startup,
        on_shutdown=on_shutdown,
    )


def run(app: Any, settings: CommonSettings) -> None:
    """Serve an ASGI app with uvloop; SIGTERM drains in-flight work within the grace period."""
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="uvloop",
        log_config=None,
        access_log=False,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
    )
