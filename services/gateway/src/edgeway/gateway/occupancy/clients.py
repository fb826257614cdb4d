"""Occupancy out: `WS /client/ws/connect` (every location's latest state at once, then every update,
in Omega's exact shape), `GET /discover/health` (Omega's liveness reply) and
`GET /api/v1/occupancy/history` (each location's recent occupancy per time window: the web
console's sparklines), from the occupancy service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from weakref import WeakKeyDictionary

import orjson
from fastapi import APIRouter, Query, WebSocket

from edgeway.common.errors import error_responses
from edgeway.common.logging import get_logger
from edgeway.common.topology import Channels
from edgeway.gateway.auth import Scope
from edgeway.gateway.coalesce import Coalesced
from edgeway.gateway.fanout import (
    SnapshotEcho,
    canonical,
)
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require

CLIENT_ENDPOINT = "/client/ws/connect"

router = APIRouter()
log = get_logger("edgeway.gateway.occupancy")


async def _latest_updates(gateway: Gateway) -> list[dict[str, Any]]:
    """Every location's latest state, from the occupancy service (request/reply)."""
    link = gateway.link
    updates = await link.request(
        service="occupancy",
        queue=link.topology.occupancy_requests_queue,
        body={"query": "latest"},
    )
    if not isinstance(updates, list):  # {"error": ...}: its database is unavailable, say
        raise ServiceUnavailableError(f"occupancy did not give the latest state: {updates}")
    return [update for update in updates if isinstance(update, dict)]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every location's latest state, as each new client gets it: encoded once for all the
    clients that share the request (10,000 reconnecting clients must not each hold a copy)."""

    messages: tuple[str, ...]  # Omega's update of each location, JSON text
    keys: tuple[bytes, ...]  # their `canonical` forms, for `SnapshotEcho`


async def _snapshot(gateway: Gateway) -> Snapshot:
    latest = await _latest_updates(gateway)
    return Snapshot(
        tuple(orjson.dumps(update).decode() for update in latest),
        tuple(canonical(update) for update in latest),
    )


# Per gateway: new clients that ask at the same time share one request (`Coalesced`).
_snapshots: WeakKeyDictionary[Gateway, Coalesced[Snapshot]] = WeakKeyDictionary()


def latest_snapshot(gateway: Gateway) -> Coalesced[Snapshot]:
    shared = _snapshots.get(gateway)
    if shared is None:
        shared = _snapshots[gateway] = Coalesced(lambda: _snapshot(gateway))
    return shared


def _update_key(update: Any) -> bytes | None:
    return canonical(update) if isinstance(update, dict) else None


@router.websocket(CLIENT_ENDPOINT)
async def client_connect(websocket: WebSocket, gateway: GatewayDep) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.OCCUPANCY_SUBSCRIBE, endpoint=CLIENT_ENDPOINT
    )
    if principal is None:
        return
    client = gateway.client_queue(websocket, CLIENT_ENDPOINT)

    async def latest_first() -> None:
        try:
            snapshot = await latest_snapshot(gateway)()
        except ServiceUnavailableError as exc:
            log.warning("no latest state for a new client", reason=str(exc))
            return
        # Per location, the live update equal to the snapshot's is dropped, once: a newer one
        # of the same group, or an older one still on its way, goes through.
        SnapshotEcho(client, snapshot.keys, _update_key).install()
        client.push_front(list(snapshot.messages))

    await gateway.serve_client(
        websocket, client, (Channels.OCCUPANCY_LOCATIONS,), catch_up=latest_first
    )


@router.get("/discover/health", summary="Omega's liveness reply")
async def discover_health() -> dict[str, str]:
    """Omega's fixed liveness reply, kept for its clients (readiness is `/readyz`)."""
    return {"status": "ok", "message": "Server is running!"}


HISTORY_ENDPOINT = "/api/v1/occupancy/history"


@router.get(
    HISTORY_ENDPOINT,
    summary="Each location's recent occupancy, averaged per time window",
    responses=error_responses(504),
    dependencies=[require(Scope.OCCUPANCY_SUBSCRIBE, HISTORY_ENDPOINT)],
)
async def occupancy_history(
    gateway: GatewayDep,
    seconds: Annotated[int, Query(ge=1, le=24 * 3600, description="how far back")] = 3600,
    bucket_s: Annotated[int, Query(ge=1, le=3600, description="window length")] = 60,
) -> dict[str, Any]:
    """`{"bucket_s", "since", "locations": [{"location_name", "points": [[window start (s),
    percent, people], ...]}]}` from the occupancy service's stored observations (what the web
    console's sparklines draw)."""
    link = gateway.link
    answer = await link.request(
        service="occupancy",
        queue=link.topology.occupancy_requests_queue,
        body={"query": "history", "seconds": seconds, "bucket_s": bucket_s},
    )
    if not isinstance(answer, dict) or "locations" not in answer:
        raise ServiceUnavailableError(f"occupancy did not give the history: {answer}")
    return answer
