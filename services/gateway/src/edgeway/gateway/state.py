"""The gateway's process-wide state and the dependencies that hand it to endpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Security, WebSocket
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from opentelemetry.sdk.trace import TracerProvider
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
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.link import BrokerLink, NotConnectedError
from edgeway.gateway.metrics import AUTH_REFUSED
from edgeway.gateway.settings import GatewaySettings
from edgeway.gateway.telemetry_state import TelemetryState
from edgeway.gateway.tracking_state import TrackingState
from edgeway.gateway.video_state import VideoState

log = get_logger("edgeway.gateway")

# Refused upgrades logged: 20 at once, then 5 a second.
REFUSAL_LOG_BURST = 20
REFUSAL_LOG_RATE = 5.0


class Gateway:
    def __init__(self, settings: GatewaySettings, *, tracer_provider: TracerProvider) -> None:
        self.settings = settings
        self.verifier = Verifier(settings)
        self.link = BrokerLink(settings, tracer_provider=tracer_provider)
        # Open producer connections per endpoint; a connection leaves its set however it ends.
        self.producers: dict[str, set[object]] = {}
        self.telemetry = TelemetryState(self.link)
        self.video = VideoState()
        self.tracking = TrackingState(settings)
        # Refused WebSocket upgrades logged: a client retrying with a bad token in a loop
        # (or an attacker) must not flood the log; AUTH_REFUSED counts them all.
        self.refusals_logged = TokenBucket(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST)
        # NTP-corrected time for the phone frames' `ntp_time` header (the seed's).
        self.clock = TimeSync(settings.ntp_servers)

    def producer_count(self, endpoint: str) -> int:
        return len(self.producers.get(endpoint, ()))


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
            AUTH_REFUSED.labels(self.endpoint, str(error.status)).inc()
            raise
        gateway.link.check_connected()  # 503 until the broker is reached
        return principal


def require(scope: Scope, endpoint: str) -> Any:
    """An HTTP dependency: the caller must hold `scope` (401/403 otherwise)."""
    return Security(RequireScope(scope, endpoint), scopes=[scope.value])


async def admit_websocket(
    websocket: WebSocket, gateway: Gateway, *, scope: Scope, endpoint: str
) -> Principal | None:
    """Check origin and token before the upgrade; refuse with a real HTTP status and reason."""
    try:
        check_origin(gateway.settings, websocket)
        principal = authorize(gateway.verifier, websocket, scope)
    except AuthError as error:
        AUTH_REFUSED.labels(endpoint, str(error.status)).inc()
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
    return principal
