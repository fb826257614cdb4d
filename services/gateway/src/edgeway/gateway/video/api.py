"""The video HTTP routes: `GET /health/video`, `GET /video/status`, `GET /h264/test` (the relay's
state, asked over request/reply) and `POST /api/restart`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from edgeway.common.envelope import Envelope
from edgeway.common.errors import error_response, error_responses
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.link import ServiceUnavailableError
from edgeway.gateway.state import Gateway, GatewayDep, require
from edgeway.gateway.video.consumers import CONSUME_ENDPOINT, RELAY
from edgeway.gateway.video.sockets import DEFAULT_DEVICE

router = APIRouter()
log = get_logger("edgeway.gateway.video")


async def _relay_status(gateway: Gateway) -> dict[str, Any]:
    link = gateway.link
    answer = await link.request(
        service=RELAY, queue=link.topology.video_requests_queue, body={"query": "status"}
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("streams"), dict):
        raise ServiceUnavailableError(f"{RELAY} answered {answer!r}")
    return answer


@router.get(
    "/health/video",
    summary="Video health (WorldSystem's fields)",
    dependencies=[require(Scope.VIDEO_SUBSCRIBE, "/health/video")],
)
async def health_video(gateway: GatewayDep) -> dict[str, Any]:
    """The seed's fields; `has_sps_pps` is false while the relay does not answer."""
    streams: dict[str, Any] = {}
    try:
        streams = (await _relay_status(gateway))["streams"]
    except ServiceUnavailableError as exc:
        log.warning("video relay status unavailable", reason=str(exc))
    has_sps_pps = any(bool(s.get("has_sps_pps")) for s in streams.values())
    # A URL that plays: the seed had one phone, named nothing; here each names itself, so
    # point at a device that streams now (the first, by name), or the seed's default.
    playing = sorted(d for d, s in streams.items() if s.get("has_sps_pps")) or sorted(streams)
    device = playing[0] if playing else DEFAULT_DEVICE
    return {
        "active_consumers": sum(gateway.video.consumer_counts().values()),
        "has_sps_pps": has_sps_pps,
        "video_url": f"{CONSUME_ENDPOINT}?device={device}",
        "devices": sorted(streams),
    }


@router.get(
    "/video/status",
    summary="Video streams and consumers",
    responses=error_responses(504),
    dependencies=[require(Scope.VIDEO_SUBSCRIBE, "/video/status")],
)
async def video_status(gateway: GatewayDep) -> dict[str, Any]:
    """The relay's streams (504 if it does not answer) and this replica's consumers."""
    return {**await _relay_status(gateway), "consumers": gateway.video.consumer_counts()}


@router.get(
    "/h264/test",
    summary="Whether the relay decodes H.264",
    responses=error_responses(504),
    dependencies=[require(Scope.VIDEO_SUBSCRIBE, "/h264/test")],
)
async def h264_test(gateway: GatewayDep) -> dict[str, Any]:
    """Whether the relay can decode H.264 (it holds the decoder, not the gateway)."""
    answer = await _relay_status(gateway)
    return {"h264_decoder": bool(answer.get("h264_decoder")), "pyav": answer.get("pyav")}


@router.post(
    "/api/restart",
    status_code=202,
    summary="Restart the video pipeline",
    responses=error_responses(503),
)
async def restart(
    gateway: GatewayDep,
    principal: Annotated[Principal, require(Scope.VIDEO_CONTROL, "/api/restart")],
) -> Response:
    """`{"type":"restart"}` to restart_exchange; the relay tells the viewers."""
    envelope = Envelope(type="video.restart.v1", producer=f"operator/{principal.subject}")
    try:
        await gateway.link.publish_stream(
            b'{"type":"restart"}',
            envelope=envelope,
            exchange=gateway.link.topology.worldsystem("restart"),
        )
    except Exception as exc:  # noqa: BLE001 - tell the operator, who can try again
        log.warning("restart not published", error=repr(exc))
        return error_response(
            503, ErrorCode.UNAVAILABLE, "the broker did not take it", fix="try again"
        )
    return JSONResponse({"status": "accepted", "message_id": envelope.message_id}, 202)
