"""The small internal HTTP server every service runs: `/healthz`, `/readyz`, `/metrics`.

`/healthz` is liveness: the process answers, nothing else is checked (a broker outage must not
make Kubernetes restart every replica). `/readyz` is readiness: the broker is connected and every
check the service registered (database reachable, migrations applied, models loaded) passes.
The same checks go to the gateways every few seconds (`edgeway.common.readiness`), which show
each instance's readiness on the web console.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.handlers import HttpHandler
from faststream.asgi.types import Receive, Scope, Send
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from edgeway.common.amqp import AmqpLink, Consumer, Handler
from edgeway.common.broker import DEFAULT_PREFETCH, make_broker
from edgeway.common.db import Migrations, make_engine, make_sessionmaker, ping
from edgeway.common.errors import ErrorObject
from edgeway.common.http_limits import serve_http, uvicorn_config
from edgeway.common.logging import configure_logging, get_logger
from edgeway.common.readiness import ReadinessCheck, Reporter, failures
from edgeway.common.settings import CommonSettings, async_database_url
from edgeway.common.topology import Topology
from edgeway.common.tracing import configure_tracing

Hook = Callable[[], Awaitable[None]]

SettingsT = TypeVar("SettingsT", bound=CommonSettings)
SettingsT_contra = TypeVar("SettingsT_contra", bound=CommonSettings, contravariant=True)


class AppFactory(Protocol[SettingsT_contra]):
    """A service's `build_app`: its settings and tracer provider in, its ASGI app out."""

    def __call__(
        self, settings: SettingsT_contra, /, *, tracer_provider: TracerProvider
    ) -> AsgiFastStream: ...


log = get_logger("edgeway.service")


def _json(status: int, body: Mapping[str, Any]) -> AsgiResponse:
    return AsgiResponse(orjson.dumps(body), status, headers={"content-type": "application/json"})


class InternalApp(AsgiFastStream):
    """FastStream's ASGI app whose own answers are the error object: a path it does not serve
    (FastStream says "Application doesn't support regular HTTP protocol") and a method one of
    its routes does not take (a plain-text 405)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # lifespan; WebSocket: not_found
            return
        for path, route in self.routes:
            if scope["path"] != path:
                continue
            if isinstance(route, HttpHandler) and scope["method"] not in route.methods:
                allowed = ", ".join(route.methods)
                error = ErrorObject(
                    code="method_not_allowed",
                    reason=f"{scope['method']} is not allowed on {path}",
                    fix=f"use {allowed}",
                )
                await error.response(405, headers={"Allow": allowed})(scope, receive, send)
                return
            await route(scope, receive, send)
            return
        await self.not_found(scope, receive, send)

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        paths = ", ".join(path for path, _ in self.routes)
        error = ErrorObject(
            code="not_found",
            reason=f"nothing at {scope.get('path', '')}: this is a service's internal port",
            fix=f"it serves {paths}",
        )
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
            "extensions", {}
        ):
            await super().not_found(scope, receive, send)  # no denial response: a close
            return
        await error.response(404)(scope, receive, send)


def service_app(
    broker: RabbitBroker,
    *,
    service: str,
    settings: CommonSettings,
    checks: Mapping[str, ReadinessCheck],
    on_startup: Sequence[Hook] = (),
    after_startup: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
    registry: CollectorRegistry = REGISTRY,
    broker_timeout: float = 2.0,
) -> AsgiFastStream:
    """The service as one ASGI app: the broker's consumers plus the operations endpoints.

    Once started, it also reports its readiness (the same checks as `/readyz`) to the gateways
    every `settings.readiness_interval_s` (`edgeway.common.readiness.Reporter`)."""

    async def failing() -> dict[str, str]:
        return await failures(broker, checks, broker_timeout=broker_timeout)

    reporter = Reporter(
        broker,
        service=service,
        exchange=Topology(settings.exchanges).broadcast,
        interval_s=settings.readiness_interval_s,
        check=failing,
    )

    @get(include_in_schema=False)
    async def healthz(scope: Scope) -> AsgiResponse:
        return _json(200, {"status": "ok"})

    @get(include_in_schema=False)
    async def readyz(scope: Scope) -> AsgiResponse:
        failed = await failing()
        if failed:
            return _json(503, {"status": "not ready", "failures": failed})
        return _json(200, {"status": "ready"})

    return InternalApp(
        broker,
        asgi_routes=[
            ("/healthz", healthz),
            ("/readyz", readyz),
            ("/metrics", make_asgi_app(registry)),
        ],
        on_startup=on_startup,
        # First: while the rest of the start-up runs, the report says what is not ready yet.
        after_startup=[reporter.start, *after_startup],
        on_shutdown=[reporter.stop, *on_shutdown],
    )


def database_service_app(
    broker: RabbitBroker,
    *,
    service: str,
    settings: CommonSettings,
    engine: AsyncEngine,
    url: str,
    migrations: Migrations,
    prepare: Hook,
    declare: Hook,
    checks: Mapping[str, ReadinessCheck] | None = None,
    registry: CollectorRegistry = REGISTRY,
    start: Hook | None = None,
    stop: Hook | None = None,
) -> AsgiFastStream:
    """`service_app` for a service that owns a schema and consumes from queues it declares.

    At start, before the broker connects: its migrations, then `prepare` (seed the tables, load
    what it keeps in memory). Once the broker is connected: `declare` its queues, then `start`
    what consumes apart from the broker (its per-message paths, `edgeway.common.amqp`). Ready
    when the broker is connected, the database answers, the schema is at the latest migration
    and the queues are declared (and started), and each of `checks` passes. At shutdown `stop`
    runs first (it drains what it holds), then the broker drains its in-flight messages, then
    the engine is closed.
    """
    declared = asyncio.Event()

    async def prepare_database() -> None:
        await migrations.upgrade_async(url)
        await prepare()

    async def declare_topology() -> None:
        await declare()
        if start is not None:
            await start()
        declared.set()

    async def database_reachable() -> None:
        await ping(engine)

    async def migrations_at_head() -> None:
        if not await migrations.at_head(url):
            raise RuntimeError("database schema is not at the latest migration")

    async def topology_declared() -> None:
        if not declared.is_set():
            raise RuntimeError("queues not declared yet")

    app = service_app(
        broker,
        service=service,
        settings=settings,
        checks={
            "database": database_reachable,
            "migrations": migrations_at_head,
            "topology": topology_declared,
            **(checks or {}),
        },
        on_startup=[prepare_database],
        after_startup=[declare_topology],
        registry=registry,
    )

    if stop is not None:
        app.on_shutdown(stop)

    async def close_database() -> None:
        await engine.dispose()

    # After the broker has drained in-flight messages (on_shutdown hooks run before that).
    app.after_shutdown(close_database)
    return app


# --- what every service's build_app starts from ----------------------------------------------


def service_link(
    settings: CommonSettings,
    *,
    service: str,
    registry: CollectorRegistry = REGISTRY,
    tracer_provider: TracerProvider | None = None,
) -> AmqpLink:
    """A service's own AMQP link for its per-message paths (`edgeway.common.amqp`), traced only
    where spans are exported, as FastStream's middleware is (`make_broker`)."""
    return AmqpLink(
        settings.amqp_url,
        name=service,
        registry=registry,
        tracer_provider=tracer_provider if settings.otel_exporter != "none" else None,
    )


def link_ready(link: AmqpLink) -> ReadinessCheck:
    """A readiness check: the service's own AMQP link (`service_link`) is connected."""

    async def check() -> None:
        if not link.ready:
            raise RuntimeError("the service's own AMQP link is not connected")

    return check


@dataclass(frozen=True, slots=True)
class _Parts:
    service: str
    settings: CommonSettings
    broker: RabbitBroker
    registry: CollectorRegistry
    tracer_provider: TracerProvider

    def link(self) -> AmqpLink:
        """The service's own AMQP link (`service_link`)."""
        return service_link(
            self.settings,
            service=self.service,
            registry=self.registry,
            tracer_provider=self.tracer_provider,
        )

    def consumer(self, link: AmqpLink, queue: str, handler: Handler) -> Consumer:
        """A queue's consumer on `link`, at the broker's prefetch, given the grace period to
        finish what it holds at shutdown."""
        return Consumer(
            link, queue, handler, prefetch=DEFAULT_PREFETCH, grace=self.settings.graceful_timeout
        )


@dataclass(frozen=True, slots=True)
class BrokerService(_Parts):
    """What a service without a database builds first (`broker_service`): its broker."""

    def app(
        self,
        *,
        checks: Mapping[str, ReadinessCheck],
        on_startup: Sequence[Hook] = (),
        after_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
    ) -> AsgiFastStream:
        """`service_app` on this broker and registry."""
        return service_app(
            self.broker,
            service=self.service,
            settings=self.settings,
            checks=checks,
            on_startup=on_startup,
            after_startup=after_startup,
            on_shutdown=on_shutdown,
            registry=self.registry,
        )


@dataclass(frozen=True, slots=True)
class DatabaseService(_Parts):
    """What a service that owns a schema builds first (`database_service`): its broker and its
    database (async URL, engine, sessions)."""

    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    def app(
        self,
        *,
        migrations: Migrations,
        prepare: Hook,
        declare: Hook,
        checks: Mapping[str, ReadinessCheck] | None = None,
        start: Hook | None = None,
        stop: Hook | None = None,
    ) -> AsgiFastStream:
        """`database_service_app` on this broker, database and registry."""
        return database_service_app(
            self.broker,
            service=self.service,
            settings=self.settings,
            engine=self.engine,
            url=self.url,
            migrations=migrations,
            prepare=prepare,
            declare=declare,
            checks=checks,
            registry=self.registry,
            start=start,
            stop=stop,
        )


def broker_service(
    settings: CommonSettings,
    *,
    service: str,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> BrokerService:
    """The first lines of a broker service's `build_app`: its broker (`make_broker`)."""
    broker = make_broker(
        settings, service=service, tracer_provider=tracer_provider, registry=registry
    )
    return BrokerService(service, settings, broker, registry, tracer_provider)


def database_service(
    settings: CommonSettings,
    *,
    service: str,
    database_url: str | None,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> DatabaseService:
    """The first lines of a database service's `build_app`: its broker (`make_broker`) and its
    database at `database_url` (None: the embedded SQLite file, `async_database_url`)."""
    base = broker_service(
        settings, service=service, tracer_provider=tracer_provider, registry=registry
    )
    url = async_database_url(database_url, service=service, data_dir=settings.data_dir)
    engine = make_engine(url)
    return DatabaseService(
        service,
        settings,
        base.broker,
        registry,
        tracer_provider,
        url=url,
        engine=engine,
        sessions=make_sessionmaker(engine),
    )


def serve(service: str, settings: SettingsT, build_app: AppFactory[SettingsT]) -> None:
    """A broker service's entry point: logging and tracing set up, then its app until SIGTERM."""
    configure_logging(service=service, level=settings.log_level, fmt=settings.log_format)
    tracer_provider = configure_tracing(settings, service=service)
    run(build_app(settings, tracer_provider=tracer_provider), settings)


def tune_gc(settings: CommonSettings) -> None:
    """Make the cyclic garbage collector cheap for a message-processing loop; call it once the
    app is built, just before serving.

    Every message makes many short-lived container objects (envelopes, rows, records, tuples),
    and CPython collects its young generation every 700 allocations; each older collection also
    walks everything that survived, including every module and object made at start-up. In the
    telemetry service that was nearly half the CPU per record (`bench.telemetry_ingest`).
    `gc.freeze()` moves what exists at start-up out of the collector's sight for good, and a
    young-generation threshold of `settings.gc_threshold` (with older generations collected
    every 10 young and 10 middle collections) trades a little memory held by garbage cycles
    for far fewer passes. Reference counting, which frees almost everything, is unchanged.
    """
    if settings.gc_threshold == 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(settings.gc_threshold, 10, 10)


def run(app: Any, settings: CommonSettings) -> None:
    """Serve an ASGI app with uvloop under the HTTP limits (`edgeway.common.http_limits`);
    SIGTERM drains in-flight work within the grace period."""
    tune_gc(settings)
    serve_http(uvicorn_config(app, settings))
