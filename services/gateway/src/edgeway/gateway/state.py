"""The gateway's process-wide state and the dependencies that hand it to endpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, Security, WebSocket
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from starlette.requests import HTTPConnection

from edgeway.common.logging import get_logger
from edgeway.common.timesync import TimeSync
from edgeway.gateway.auth import (
    HOW_TO_AUTHENTICATE,
    AuthError,
    Principal,
    Scope,
    Verifier,
    authorize,
    check_origin,
)
from edgeway.gateway.fanout import ClientQueue, Policy, read_until_gone
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.link import BrokerLink, NotConnectedError
from edgeway.gateway.metrics import Metrics
from edgeway.gateway.settings import GatewaySettings
from edgeway.gateway.system.state import SystemState
from edgeway.gateway.telemetry.state import TelemetryState
from edgeway.gateway.tracking.state import TrackingState
from edgeway.gateway.video.state import VideoState

log = get_logger("edgeway.gateway")

# Refused upgrades logged: 20 at once, then 5 a second.
REFUSAL_LOG_BURST = 20
REFUSAL_LOG_RATE = 5.0
# Error frames, acks and commands waiting for a producer that does not read them; older ones go.
PRODUCER_QUEUE_SIZE = 256


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tracer_provider: TracerProvider,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics.create(registry)
        self.verifier = Verifier(settings)
        self.link = BrokerLink(
            settings, tracer_provider=tracer_provider, metrics=self.metrics, registry=registry
        )
        # Open producer connections per endpoint; a connection leaves its set however it ends.
        self.producers: dict[str, set[object]] = {}
        self.telemetry = TelemetryState(self.link)
        self.video = VideoState()
        self.tracking = TrackingState(settings)
        self.system = SystemState(self.link)
        # Refused WebSocket upgrades logged: a client retrying with a bad token in a loop
        # (or an attacker) must not flood the log; metrics.auth_refused counts them all.
        self.refusals_logged = TokenBucket(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST)
        # NTP-corrected time for the phone frames' `ntp_time` header (the seed's).
        self.clock = TimeSync(settings.ntp_servers)

    def producer_count(self, endpoint: str) -> int:
        return len(self.producers.get(endpoint, ()))

    def producer_queue(self, websocket: WebSocket, endpoint: str) -> ClientQueue:
        """What goes down a producer's socket (error frames, acks, commands), oldest dropped
        first when it does not read."""
        return ClientQueue.text(
            websocket,
            size=PRODUCER_QUEUE_SIZE,
            policy=Policy.DROP_OLDEST,
            endpoint=endpoint,
            metrics=self.metrics,
        )

    def client_queue(self, websocket: WebSocket, endpoint: str) -> ClientQueue:
        """A client's send queue. What clients watch is state (occupancy, records, poses, task
        and request progress): one far behind is better served fresh than complete."""
        return ClientQueue.text(
            websocket,
            size=self.settings.client_queue_size,
            policy=Policy.DROP_OLDEST,
            endpoint=endpoint,
            metrics=self.metrics,
        )

    async def serve_client(
        self,
        websocket: WebSocket,
        client: ClientQueue,
        channels: Sequence[str],
        *,
        catch_up: Callable[[], Awaitable[None]],
    ) -> None:
        """`client` watches `channels` (its snapshot first, from `catch_up`) until it leaves;
        what it sends is not read. Counted in the connections gauge meanwhile."""
        connections = self.metrics.connections.labels(client.endpoint)
        connections.inc()
        try:
            await self.link.hub.serve(
                client, channels, catch_up=catch_up, read=lambda: read_until_gone(websocket)
            )
        finally:
            connections.dec()


# Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency
# in a worker thread, which cost ~30% of the gateway's CPU on telemetry uploads (py-spy, measured
# with bench.telemetry_ingest).
async def get_gateway(connection: HTTPConnection) -> Gateway:
    gateway: Gateway = connection.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


# The API documents' name for the gateway's tokens (their Authorize button).
SECURITY_SCHEME = "bearer"


class RequireScope(SecurityBase):
    """The caller must hold `scope` (401/403 otherwise), and the broker must be reached (503).

    A FastAPI security scheme, so that the API documents list the bearer token and each route's
    scope; the token itself is read by `edgeway.gateway.auth`, from the header or `?token=`.
    """

    def __init__(self, scope: Scope, endpoint: str) -> None:
        self.model = HTTPBearerModel(
            bearerFormat="JWT",
            description="A JWT whose `scope` claim holds the scope each route lists. "
            f"{HOW_TO_AUTHENTICATE}. Also taken as the `token` query parameter (browsers' "
            "WebSockets cannot set headers).",
        )
        self.scheme_name = SECURITY_SCHEME
        self.scope = scope
        self.endpoint = endpoint

    async def __call__(self, connection: HTTPConnection, gateway: GatewayDep) -> Principal:
        try:
            principal = authorize(gateway.verifier, connection, self.scope)
        except AuthError as error:
            gateway.metrics.auth_refused.labels(self.endpoint, str(error.status)).inc()
            raise
        gateway.link.check_connected()  # 503 until the broker is reached
        return principal


def require(scope: Scope, endpoint: str) -> Any:
    """An HTTP dependency: the caller must hold `scope` (401/403 otherwise)."""
    return Security(RequireScope(scope, endpoint), scopes=[scope.value])


async def admit_websocket(
    websocket: WebSocket, gateway: Gateway, *, scope: Scope, endpoint: str
) -> Principal | None:
    """Check origin and token before the upgrade: refused with a real HTTP status and reason
    (None), else accepted (the caller)."""
    try:
        check_origin(gateway.settings, websocket)
        principal = authorize(gateway.verifier, websocket, scope)
    except AuthError as error:
        gateway.metrics.auth_refused.labels(endpoint, str(error.status)).inc()
        if gateway.refusals_logged.take():  # every refusal is counted; a flood is not all logged
            log.info(
                "websocket refused", endpoint=endpoint, status=error.status, reason=error.reason
            )
        await websocket.send_denial_response(error.response())
        return None
    try:
        gateway.link.check_connected()
    except NotConnectedError as error:
        await websocket.send_denial_response(error.response())
        return None
    await websocket.accept()
    return principal
