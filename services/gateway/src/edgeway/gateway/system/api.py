"""`GET /api/v1/system/services`: every service instance's readiness, and the gateway's."""

from __future__ import annotations

from fastapi import APIRouter

from edgeway.gateway.auth import Scope
from edgeway.gateway.state import GatewayDep, require
from edgeway.gateway.system.state import SystemReadiness

router = APIRouter()

SERVICES_PATH = "/api/v1/system/services"


@router.get(
    SERVICES_PATH,
    summary="Readiness of every service instance",
    dependencies=[require(Scope.SYSTEM_READ, SERVICES_PATH)],
)
async def services(gateway: GatewayDep) -> SystemReadiness:
    """Each service's instances as their latest readiness reports say (what each one's
    `/readyz` answered, every few seconds), and this gateway replica's own readiness.

    An instance silent for three of its intervals is `not reporting`; a service none of whose
    instances reports has no instances."""
    return await gateway.system.readiness()
