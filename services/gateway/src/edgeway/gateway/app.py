"""The gateway application: FastAPI for HTTP and WebSocket, FastStream for RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    make_asgi_app,
)
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeway.common.errors import error_responses, install_error_handlers
from edgeway.common.http_limits import uvicorn_config
from edgeway.common.logging import get_logger
from edgeway.common.tracing import configure_tracing
from edgeway.gateway import console, docs
from edgeway.gateway.auth import AuthError
from edgeway.gateway.ingest import api as ingest_api
from edgeway.gateway.link import NotConnectedError, ServiceUnavailableError
from edgeway.gateway.occupancy import cameras, clients
from edgeway.gateway.settings import GatewaySettings
from edgeway.gateway.state import Gateway, GatewayDep
from edgeway.gateway.system import api as system_api
from edgeway.gateway.system.state import gateway_failures
from edgeway.gateway.telemetry import dashboards, loggers, uploads, vehicles
from edgeway.gateway.tracking import api as tracking_api
from edgeway.gateway.tracking import detections, live
from edgeway.gateway.video import api as video_api
from edgeway.gateway.video import consumers, frames, phones, streams, viewers

log = get_logger("edgeway.gateway")
access_log = get_logger("edgeway.gateway.access")

DOCS_URL = "/docs"
DOCS_ASSETS_URL = "/docs/assets"
TAGS = [
    {"name": "occupancy", "description": "Project Omega's camera models and room occupancy."},
    {"name": "telemetry", "description": "Vehicle loggers, dashboards and the vehicle registry."},
    {"name": "video", "description": "Phone and drone video, IMU, viewers and their commands."},
    {"name": "ingestion", "description": "Image uploads and RTSP captures (TrackShift's API)."},
    {"name": "tracking", "description": "Multi-camera tracking environments and tasks (SpotOn)."},
    {"name": "system", "description": "Each service instance's readiness, and the gateway's."},
]
# Each tag's route modules, in the order the API documents list them.
ROUTES: dict[str, tuple[ModuleType, ...]] = {
    "occupancy": (cameras, clients),
    "telemetry": (uploads, dashboards, loggers, vehicles),
    "video": (phones, streams, consumers, frames, viewers, video_api),
    "ingestion": (ingest_api,),
    "tracking": (tracking_api, live, detections),
    "system": (system_api,),
}

# The long-lived fan-out sockets: each may hold tens of thousands of idle connections, so their
# upgrades skip FastAPI's per-request stack (`DirectSockets`).
SocketEndpoint = Callable[[WebSocket, Gateway], Awaitable[None]]
DIRECT_SOCKETS: dict[str, SocketEndpoint] = {
    clients.CLIENT_ENDPOINT: clients.client_connect,
    dashboards.DASHBOARD_ENDPOINT: dashboards.dashboard,
}
# The loggers' uploads, one record per request: FastAPI's routing, dependency solving and
# middlewares cost the gateway more than the upload itself, so they skip it too.
HttpEndpoint = Callable[[Request, Gateway], Awaitable[Response]]
DIRECT_POSTS: dict[str, HttpEndpoint] = dict.fromkeys(uploads.UPLOAD_PATHS, uploads.direct_upload)


class DirectSockets:
    """The gateway app as its server runs it: WebSocket upgrades of `DIRECT_SOCKETS` and upload
    POSTs of `DIRECT_POSTS` go straight to their endpoint function, with the app's gateway;
    everything else goes to the app.

    FastAPI keeps, for the whole life of a connection, the frames of its middlewares, routing,
    dependency solving and half a dozen `AsyncExitStack`s: about 8 KiB per idle client. These
    endpoints take nothing from FastAPI but the `WebSocket` and the gateway, and answer refusals
    and errors themselves (`admit_websocket`), so they behave the same either way. They stay in
    the app's routes, for the API documents and for tests that drive the app alone. The upload
    POSTs get what the app wraps around a route and they need: its access log and its 500
    answer (`direct_upload` admits and refuses as the route does); they halve the gateway's CPU
    per single-record upload (302 -> 158 µs).
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.gateway: Gateway = app.state.gateway
        # Where traces are exported, the uploads keep FastAPI's HTTP spans: they go through it.
        self.posts = DIRECT_POSTS if self.gateway.settings.otel_exporter == "none" else {}
        # What FastAPI wraps a route in that the direct ones need: the access log, and the
        # app's 500 answer to an exception the endpoint did not expect.
        self.direct_http = ServerErrorMiddleware(
            AccessLog(self._post), handler=app.exception_handlers.get(Exception)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            endpoint = DIRECT_SOCKETS.get(scope["path"])
            if endpoint is not None:
                await endpoint(WebSocket(scope, receive, send), self.gateway)
                return
        elif scope["type"] == "http" and scope["path"] in self.posts and scope["method"] == "POST":
            await self.direct_http(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.posts[scope["path"]](Request(scope, receive, send), self.gateway)
        await response(scope, receive, send)


class AccessLog:
    """One line per HTTP request: method, path without its query (tokens live there), status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            access_log.info(
                "http",
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )


class _InnerServer(uvicorn.Server):
    """A second uvicorn server in the gateway's process: the main one owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def metrics_server(
    settings: GatewaySettings, port: int, registry: CollectorRegistry
) -> uvicorn.Server:
    """/metrics on the internal port, served on the gateway's own event loop (so its gauges read
    the loop's state) under the same HTTP limits as every Edgeway server."""
    config = uvicorn_config(
        make_asgi_app(registry), settings, host=settings.metrics_host, port=port, lifespan="off"
    )
    return _InnerServer(config)


def create_app(
    settings: GatewaySettings | None = None, *, registry: CollectorRegistry | None = None
) -> FastAPI:
    """The gateway app. Its metrics go to `registry`: the process's (`prometheus_client.REGISTRY`)
    when it serves (`edgeway.gateway.__main__`); by default one of its own, so that a process may
    build several apps (tests, the documents' builders)."""
    settings = settings or GatewaySettings()
    registry = registry if registry is not None else CollectorRegistry()
    tracer_provider = configure_tracing(settings, service="gateway")
    gateway = Gateway(settings, tracer_provider=tracer_provider, registry=registry)

    metrics_port = settings.internal_metrics_port

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        internal: tuple[uvicorn.Server, asyncio.Task[None]] | None = None
        if metrics_port is not None:
            server = metrics_server(settings, metrics_port, registry)
            internal = server, asyncio.create_task(server.serve())
        gateway.clock.start()
        # In the background: the port opens (and /healthz answers, and SIGTERM is heard) while
        # RabbitMQ is still out of reach; /readyz and every endpoint say 503 until it answers.
        connecting = asyncio.create_task(gateway.link.connect())
        log.info(
            "gateway started",
            gateway_id=gateway.link.gateway_id,
            port=settings.http_port,
            metrics_port=metrics_port or settings.http_port,
        )
        yield
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        await gateway.link.stop()
        await gateway.clock.stop()
        if internal is not None:
            server, serving = internal
            server.should_exit = True  # closes its port, as the main server does its own
            await serving

    options: dict[str, Any] = {
        "title": "Edgeway gateway",
        "version": "0.1.0",
        "lifespan": lifespan,
        # FastAPI's own OpenTelemetry: HTTP spans only when traces go somewhere (with the
        # provider's sampler off it still built a span's context per request); metrics are
        # Prometheus's (/metrics), logs structlog's.
        "telemetry": {
            "tracer_provider": tracer_provider,
            "tracing": settings.otel_exporter != "none",
            "metrics": False,
            "logs": False,
        },
    }
    docs_url = DOCS_URL if settings.docs_enabled else None
    if docs_url is not None:
        # Swagger UI's and ReDoc's assets from the fastapi-offline package, served here: the
        # documents load on a machine without internet (FastAPI's own pages use a CDN).
        app = FastAPIOffline(
            docs_url=docs_url,
            redoc_url="/redoc",
            static_url=DOCS_ASSETS_URL,
            description=docs.description(docs_url=docs_url),
            openapi_tags=TAGS,
            swagger_ui_parameters={"persistAuthorization": True},
            **options,
        )
        app.include_router(docs.asyncapi_routes(settings.exchanges))
    else:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, **options)
    app.state.gateway = gateway
    app.add_middleware(AccessLog)
    for tag, modules in ROUTES.items():
        # Every tracking route asks the tracker (504 when it does not answer); their other
        # errors are listed where edgeway.gateway.tracking declares them.
        responses = error_responses(504) if tag == "tracking" else None
        for module in modules:
            app.include_router(module.router, tags=[tag], responses=responses)
    app.include_router(console.routes(settings.console_dir))  # the web console (web/), at /
    install_error_handlers(app, docs_url=docs_url)
    docs.document(app)

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, error: AuthError) -> Response:
        return error.response()

    @app.exception_handler(ServiceUnavailableError)
    async def service_unavailable(_: Request, error: ServiceUnavailableError) -> Response:
        return error.response()

    @app.exception_handler(NotConnectedError)
    async def not_connected(_: Request, error: NotConnectedError) -> Response:
        return error.response()

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(gw: GatewayDep) -> JSONResponse:
        failures = await gateway_failures(gw.link)
        if not failures:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "failures": failures}, status_code=503)

    if metrics_port is None:

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
