"""The gateway's WebSocket routes, as AsyncAPI channels: what each direction carries, and who
may connect.

FastStream documents brokers, not WebSockets, so this part is written here: one `Route` per
path the gateway serves. Operations take the gateway's side: what a client sends, the gateway
`receive`s; what the gateway sends, the client receives. The document's test compares this
table with the routes the gateway's app registers (paths, query parameters, scopes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from edgeway.common.asyncapi.amqp import (
    ANALYSIS_MODE,
    IMU_SAMPLE,
    LOG_LINE,
    LOGGER_COMMAND,
    PHONE_IMU,
    TELEMETRY_RECORD,
    TRACKING_CLIENT,
    VIEWER,
    VIEWER_COMMAND,
    json_object,
)
from edgeway.common.schemas.errors import ErrorFrame
from edgeway.common.schemas.ingest import IngestionResponse
from edgeway.common.schemas.occupancy import ClientUpdate, FrameResult
from edgeway.common.schemas.tracking import EdgeFrame

BINARY = {"type": "string", "format": "binary"}
TEXT = "text/plain"
OCTETS = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    summary: str
    payload: type[BaseModel] | dict[str, Any]
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    scope: str  # the token scope the upgrade needs
    summary: str
    receives: tuple[Message, ...]  # client -> gateway
    sends: tuple[Message, ...]  # gateway -> client
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # besides `token`


ERROR = Message(
    "error",
    "What the client sent cannot be taken (`code`, `reason`, `fix`): the socket stays open. "
    "A refusal that ends the connection is this frame, then a close with code 1008.",
    ErrorFrame,
)
DEVICE = {"type": "string", "default": "phone", "description": "the phone's (or drone's) id"}
TIMING = {
    "type": "string",
    "enum": ["0", "1"],
    "default": "0",
    "description": "1: a `timing` message before each binary one",
}
TIMING_MESSAGE = Message(
    "timing",
    "With `?timing=1`, right before each binary message: its number on this socket (from 1), "
    "its kind and when the phone captured it (Unix ms, null when the relay cannot say).",
    json_object(
        "",
        type={"const": "timing"},
        seq={"type": "integer"},
        kind={"enum": ["sps", "pps", "keyframe", "frame", "jpeg"]},
        captured_ms={"type": ["integer", "null"]},
    ),
)
NO_STREAM = Message(
    "status",
    "The device has no stream yet.",
    json_object(
        "",
        type={"const": "status"},
        code={"const": "no_stream"},
        reason={"type": "string"},
        device={"type": "string"},
    ),
)
PING = Message("ping", "Text `ping`: the seed's keepalive.", {"const": "ping"}, TEXT)
PONG = Message("pong", "Text `pong`.", {"const": "pong"}, TEXT)

ROUTES = (
    Route(
        "/model/ws/connect",
        "occupancy:publish",
        "Camera models push frame results (Project Omega).",
        receives=(Message("frame_result", "One frame's occupancy from a model.", FrameResult),),
        sends=(
            Message(
                "ack",
                "With `?ack=1`: the broker took message `seq` (counted from 1).",
                json_object(
                    "",
                    type={"const": "ack"},
                    seq={"type": "integer"},
                    message_id={"type": "string"},
                ),
            ),
            ERROR,
        ),
        query={"ack": {"type": "boolean", "default": False, "description": "acknowledge each"}},
    ),
    Route(
        "/client/ws/connect",
        "occupancy:subscribe",
        "Room occupancy: each location's latest at once, then every change (Project Omega).",
        receives=(),
        sends=(Message("occupancy", "A location's occupancy, Omega's shape.", ClientUpdate),),
    ),
    Route(
        "/ws",
        "telemetry:subscribe",
        "Telemetry dashboards: a `log`, the `history`, then each record and logger line.",
        receives=(),
        sends=(
            Message("telemetry", "One record of a vehicle.", TELEMETRY_RECORD),
            Message(
                "history",
                "The last records, once, on connect.",
                json_object("", type={"const": "history"}, data={"type": "array"}),
            ),
            Message("log", "A line from the gateway or a logger.", LOG_LINE),
        ),
    ),
    Route(
        "/telemetry/control/ws",
        "telemetry:publish",
        "Vehicle loggers: commands in, acknowledgements, status and log lines out.",
        receives=(
            Message(
                "status",
                "The logger's state.",
                json_object(
                    "",
                    type={"const": "status"},
                    running={"type": "boolean"},
                    offline={"type": "boolean"},
                    buffered={"type": "integer", "minimum": 0},
                ),
            ),
            Message(
                "ack",
                "A command done (or failed: `error`), with the logger's state.",
                json_object(
                    "",
                    type={"const": "ack"},
                    command_id={"type": "string"},
                    error={"type": "string"},
                    running={"type": "boolean"},
                    offline={"type": "boolean"},
                    buffered={"type": "integer", "minimum": 0},
                ),
            ),
            Message("log", "A line for the dashboards.", LOG_LINE),
        ),
        sends=(Message("command", "Do this.", LOGGER_COMMAND), ERROR),
        query={"vin": {"type": "string", "description": "the vehicle (17 characters)"}},
    ),
    Route(
        "/ws/phone",
        "video:publish",
        "Phones: JPEG frames, IMU and analysis mode, CSV files; viewer commands come back.",
        receives=(
            Message(
                "frame",
                "Binary: an 8-byte big-endian timestamp (ns), then a JPEG.",
                BINARY,
                OCTETS,
            ),
            Message("imu_data", "One IMU sample.", PHONE_IMU),
            Message("analysis_mode", "The phone's analysis mode.", ANALYSIS_MODE),
            Message(
                "file_upload",
                "A CSV file: whole (`file_upload`), or `file_upload_start`, "
                "`file_upload_chunk`s and `file_upload_complete`.",
                json_object(
                    "",
                    type={
                        "enum": [
                            "file_upload",
                            "file_upload_start",
                            "file_upload_chunk",
                            "file_upload_complete",
                        ]
                    },
                    fileName={"type": "string"},
                    fileContent={"type": "string"},
                ),
            ),
        ),
        sends=(
            Message("command", "A viewer's command for this phone, verbatim.", VIEWER_COMMAND),
            Message(
                "file_upload_ack",
                "The file was stored.",
                json_object(
                    "",
                    type={"const": "file_upload_ack"},
                    fileName={"type": "string"},
                    file_id={"type": "string"},
                    bytes={"type": "integer"},
                ),
            ),
            ERROR,
        ),
        query={"device": DEVICE},
    ),
    Route(
        "/ws/video",
        "video:publish",
        "Phones and drones: the H.264 byte stream, one binary message at a time.",
        receives=(Message("h264", "A piece of the Annex B byte stream.", BINARY, "video/h264"),),
        sends=(ERROR,),
        query={"device": DEVICE},
    ),
    Route(
        "/ws/video/consume",
        "video:subscribe",
        "A stream's H.264 packets from its last keyframe (the GOP), then live ones.",
        receives=(PING,),
        sends=(
            Message("packet", "Binary: one packet, the seed's framing.", BINARY, "video/h264"),
            TIMING_MESSAGE,
            PONG,
            NO_STREAM,
            ERROR,
        ),
        query={"device": DEVICE, "timing": TIMING},
    ),
    Route(
        "/ws/video/frames",
        "video:subscribe",
        "A stream's decoded JPEGs (the relay's, a few a second) for viewers without H.264: "
        "the latest at once, then live ones; a slow viewer loses its oldest.",
        receives=(PING,),
        sends=(
            Message("jpeg", "Binary: one decoded frame.", BINARY, "image/jpeg"),
            TIMING_MESSAGE,
            PONG,
            NO_STREAM,
            ERROR,
        ),
        query={"device": DEVICE, "timing": TIMING},
    ),
    Route(
        "/ws/viewer",
        "video:subscribe",
        "Viewers: trajectory, restarts and IMU out; commands to phones in (`video:control`).",
        receives=(Message("command", "For the phones (needs `video:control`).", VIEWER_COMMAND),),
        sends=(
            Message("viewer", "A trajectory update or a restart.", VIEWER),
            Message("imu_data", "A phone's IMU sample.", IMU_SAMPLE),
            ERROR,
        ),
    ),
    Route(
        "/ws/ingest/{request_id}",
        "ingest:read",
        "An ingestion request's status at once, then each of its progress events.",
        receives=(),
        sends=(
            Message(
                "ingest_status", "The request now (`type`: `ingest_status`).", IngestionResponse
            ),
            Message(
                "ingest_progress",
                "A frame stored, a status change, the end.",
                json_object("", type={"type": "string"}, request_id={"type": "string"}),
            ),
        ),
    ),
    Route(
        "/ws/tracking/{task_id}",
        "tracking:subscribe",
        "A tracking task's status at once, then its messages (SpotOn's shapes).",
        receives=(),
        sends=(Message("task", "One of the task's messages.", TRACKING_CLIENT),),
    ),
    Route(
        "/ws/detections",
        "tracking:publish",
        "Edge devices send their cameras' boxes, one message per camera frame.",
        receives=(Message("detections", "One camera frame's boxes.", EdgeFrame),),
        sends=(ERROR,),
    ),
)

TOKEN = {
    "type": "string",
    "description": "the JWT, where the client cannot set `Authorization` (browsers)",
}


def _key(path: str) -> str:
    """A channel key from a path: `/ws/ingest/{request_id}` -> `ws.ingest.request_id`."""
    return "ws" + path.replace("/", ".").replace("{", "").replace("}", "").rstrip(".")


def channels(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The routes as AsyncAPI: channels, operations, messages, and the models their payloads
    name (`models`, for the components' schemas)."""
    found: dict[str, Any] = {"channels": {}, "operations": {}, "messages": {}, "models": []}
    for route in routes:
        key = _key(route.path)
        messages = {}
        for message in (*route.receives, *route.sends):
            name = f"{key}.{message.name}"
            payload: Any = message.payload
            if isinstance(payload, type):
                found["models"].append(payload)
                payload = {"$ref": f"#/components/schemas/{payload.__name__}"}
            found["messages"][name] = {
                "name": message.name,
                "title": message.name,
                "summary": message.summary,
                "contentType": message.content_type,
                "payload": payload,
            }
            messages[message.name] = {"$ref": f"#/components/messages/{name}"}
        channel: dict[str, Any] = {
            "address": route.path,
            "title": route.path,
            "summary": route.summary,
            "servers": [{"$ref": "#/servers/gateway"}],
            "messages": messages,
            "bindings": {
                "ws": {
                    "method": "GET",
                    "query": {
                        "type": "object",
                        "properties": {"token": TOKEN, **route.query},
                    },
                    "bindingVersion": "0.1.0",
                }
            },
        }
        names = [part[1:-1] for part in route.path.split("/") if part.startswith("{")]
        if names:
            channel["parameters"] = {name: {"description": f"the {name}"} for name in names}
        found["channels"][key] = channel
        security = [
            {"$ref": "#/components/securitySchemes/bearer"},
            {"$ref": "#/components/securitySchemes/token"},
        ]
        for action, sent in (("receive", route.receives), ("send", route.sends)):
            if not sent:
                continue
            found["operations"][f"{key}.{action}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{key}"},
                "title": f"{route.path}: {'from' if action == 'receive' else 'to'} the client",
                "summary": route.summary,
                "security": security,
                "x-scopes": [route.scope],
                "tags": [{"name": "gateway"}, {"name": "websocket"}],
                "messages": [
                    {"$ref": f"#/channels/{key}/messages/{message.name}"} for message in sent
                ],
            }
    return found


SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": (
            "`Authorization: Bearer <jwt>`. The token's `scope` claim (space-separated) must "
            "hold the operation's `x-scopes`; a missing or invalid token refuses the upgrade "
            "with 401, a missing scope with 403, each with the error object as the body."
        ),
    },
    "token": {
        "type": "httpApiKey",
        "name": "token",
        "in": "query",
        "description": "The same JWT as `?token=`, for clients that cannot set headers.",
    },
}
