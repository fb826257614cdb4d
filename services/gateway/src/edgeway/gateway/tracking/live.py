"""`WS /ws/tracking/{task_id}`: a task's status now, then its messages, SpotOn's shapes."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket

from edgeway.common.logging import get_logger
from edgeway.common.schemas.tracking import (
    GetTaskStatus,
)
from edgeway.common.topology import Channels
from edgeway.gateway.auth import Scope
from edgeway.gateway.fanout import (
    SnapshotEcho,
    canonical,
)
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import GatewayDep, admit_websocket
from edgeway.gateway.tracking.api import ask

TRACKING_ENDPOINT = "/ws/tracking/{task_id}"

router = APIRouter()
log = get_logger("edgeway.gateway.tracking")


def _media_key(message: Any) -> bytes | None:
    if isinstance(message, dict) and message.get("type") == "media_available":
        return canonical(message)
    return None


@router.websocket(TRACKING_ENDPOINT)
async def tracking_socket(websocket: WebSocket, task_id: str, gateway: GatewayDep) -> None:
    """The task's status now, then its messages, SpotOn's shapes, until the client leaves."""
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.TRACKING_SUBSCRIBE, endpoint=TRACKING_ENDPOINT
    )
    if principal is None:
        return

    async def refuse(code: str, reason: str, close_code: int) -> None:
        gateway.metrics.rejected.labels(TRACKING_ENDPOINT, code).inc()
        await websocket.send_text(
            orjson.dumps({"type": "error", "code": code, "reason": reason}).decode()
        )
        await websocket.close(close_code, code)

    try:
        checked = str(uuid.UUID(task_id))
    except ValueError:
        await refuse("not_found", f"{task_id[:80]!r} is not a task id", 1008)
        return
    try:
        known = await ask(gateway, GetTaskStatus(task_id=checked))
    except ServiceUnavailableError as exc:
        await refuse("unavailable", str(exc), 1011)
        return
    if known.status != 200:
        await refuse(known.body.get("code", "not_found"), known.body.get("reason", ""), 1008)
        return
    client = gateway.client_queue(websocket, TRACKING_ENDPOINT)

    async def status_first() -> None:
        # Asked again once the channel is watched: no change between the two is lost.
        try:
            reply = await ask(gateway, GetTaskStatus(task_id=checked))
        except ServiceUnavailableError as exc:
            log.warning("no status for a new tracking client", reason=str(exc))
            return
        if reply.status == 200:
            first = [reply.body["message"]]
            if reply.body.get("media"):
                first.append(reply.body["media"])
                # The task may have announced its videos while this client subscribed: that
                # live copy is the one it just got, dropped once.
                SnapshotEcho(client, [canonical(reply.body["media"])], _media_key).install()
            client.push_front([orjson.dumps(message).decode() for message in first])

    await gateway.serve_client(
        websocket, client, (Channels.tracking_task(checked),), catch_up=status_first
    )
