"""Edgeway's AMQP flows, described with FastStream so that its AsyncAPI generator writes them.

Each `Flow` is one service publishing to an exchange or consuming from a queue. `broker` turns
them into typed FastStream publishers and subscribers of a broker that is never connected: it
only describes. `amend` adds what FastStream's generator leaves out of the AMQP bindings (queue
and exchange arguments, the exchange a queue is bound to, the parameters of an address), names
things with the characters AsyncAPI allows in component keys, and tags each operation with its
service.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue

from edgeway.common.batching import (
    BATCH_CAPTURED_AT,
    BATCH_CORRELATION_IDS,
    BATCH_HEADER,
    BATCH_LENGTHS,
    BATCH_MESSAGE_IDS,
    BATCH_RECEIVED_AT,
)
from edgeway.common.envelope import (
    HEADER_CAPTURED_AT,
    HEADER_PRODUCER,
    HEADER_RECEIVED_AT,
    HEADER_REPLY_CHANNEL,
    HEADER_TRACEPARENT,
)
from edgeway.common.schemas.errors import ErrorFrame
from edgeway.common.schemas.ingest import IngestCommand, IngestReply
from edgeway.common.schemas.occupancy import ClientUpdate, FrameResult
from edgeway.common.schemas.system import ReadinessReport
from edgeway.common.schemas.tracking import EdgeFrame, TrackingReply, TrackingRequest
from edgeway.common.topology import Channels, Topology

# Who takes part. `worldsystem` stands for WorldSystem's own services, outside Edgeway, which
# keep their exchanges; `rabbitmq` for the broker itself (dead-lettering, alternate exchange).
GATEWAY = "gateway"
OCCUPANCY = "occupancy"
TELEMETRY = "telemetry"
VIDEO_RELAY = "video-relay"
INGESTION = "ingestion"
TRACKER = "tracker"
WORLDSYSTEM = "worldsystem"
RABBITMQ = "rabbitmq"
# The video relay's bridge queues' bound (see `bridge_queue`).
BRIDGE_QUEUE_MAX_LENGTH = 1_000

# A message body with no schema of its own: its bytes (protobuf, H.264, JPEG, a file).
Binary = bytes


def json_object(description: str, **properties: Any) -> dict[str, Any]:
    """A JSON object's schema, for bodies no pydantic model describes."""
    return {"type": "object", "description": description, "properties": properties}


QUERY = json_object(
    "A query to a service; the reply goes to the asker's `reply_to` (RabbitMQ direct reply-to).",
    query={"type": "string", "description": "what is asked, e.g. `status`, `latest`, `history`"},
)
TELEMETRY_RECORD = json_object(
    "One stored record of a vehicle, reconstructed where the logger sent a prediction.",
    type={"const": "telemetry"},
    data={"type": "object", "description": "the record's fields (speed, battery, power, ...)"},
)
LOGGER_COMMAND = json_object(
    "A command for the edge loggers (`telemetry.control.all` reaches every one).",
    type={"const": "command"},
    command={"enum": ["start", "stop", "toggle_offline", "clear_data"]},
    command_id={"type": "string"},
)
LOG_LINE = json_object(
    "A line for the dashboards.",
    type={"const": "log"},
    message={"type": "string"},
    log_type={"type": "string"},
)
VIEWER = json_object(
    "For every viewer: `trajectory_update` (a pose from WorldSystem) or `restart`.",
    type={"enum": ["trajectory_update", "restart"]},
    pose={"description": "the trajectory's pose, as WorldSystem sent it"},
)
IMU_SAMPLE = json_object(
    "One phone IMU sample, in the phone's order.",
    type={"const": "imu_data"},
    imu_data={"type": "object"},
)
PHONE_IMU = json_object(
    "An IMU sample as the phone sent it (`x-device` header: the phone).",
    type={"const": "imu_data"},
    timestamp={"type": "integer", "description": "nanoseconds"},
)
VIEWER_COMMAND = json_object(
    "A viewer's command, relayed verbatim to the phones (`device` addresses one).",
    type={"enum": ["joystick", "movement", "rotation", "camera", "flightmode"]},
    device={"type": "string"},
)
ANALYSIS_MODE = json_object(
    "The phone's analysis mode, for WorldSystem's services.",
    type={"const": "analysis_mode"},
    data={"type": "string"},
    device={"type": "string"},
)
INGEST_EVENT = json_object(
    "Progress of one ingestion request: a frame stored, a status change, completion.",
    type={"type": "string", "description": "e.g. `ingest_progress`"},
    request_id={"type": "string"},
)
FRAME_STORED = json_object(
    "A frame stored and committed by the ingestion service.",
    request_id={"type": "string"},
    frame_id={"type": "string"},
)
CANCEL_CAPTURE = json_object("Stop this RTSP capture.", request_id={"type": "string"})
TRACKING_CLIENT = json_object(
    "SpotOn's task messages: `tracking_update`, `status_update`, `media_available`, "
    "`batch_processing_complete`.",
    type={
        "enum": [
            "tracking_update",
            "status_update",
            "media_available",
            "batch_processing_complete",
        ]
    },
    payload={"type": "object"},
)
RUN_TASK = json_object(
    "Run this task (persistent; any tracker replica takes it).",
    command={"const": "run"},
    task_id={"type": "string"},
)
STOP_TASK = json_object("Stop this task, wherever it runs.", stop={"type": "string"})

# The envelope's headers (`edgeway.common.envelope`), on every Edgeway message.
ENVELOPE_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": (
        "The envelope: AMQP properties carry `message_id` (a UUIDv7 kept through retries), "
        "`correlation_id`, `content_type` and `type` (schema name and version); these headers "
        "carry the rest."
    ),
    "properties": {
        HEADER_PRODUCER: {"type": "string", "description": "who produced the message"},
        HEADER_RECEIVED_AT: {
            "type": "string",
            "description": "epoch seconds (decimal text) when it reached the Edgeway edge",
        },
        HEADER_CAPTURED_AT: {
            "type": "string",
            "description": "epoch seconds (decimal text) when the producer captured it",
        },
        HEADER_REPLY_CHANNEL: {
            "type": "string",
            "description": "broadcast routing key where a rejection of this message goes",
        },
        HEADER_TRACEPARENT: {"type": "string", "description": "W3C Trace Context"},
        BATCH_HEADER: {
            "type": "string",
            "description": (
                "a batch: how many messages of its `type` the body carries (decimal text, more "
                "than one); a broadcast's are JSON lines, durable work's a JSON array of the "
                "producers' bodies as they came (`edgeway.common.batching`)"
            ),
        },
        BATCH_CORRELATION_IDS: {
            "type": "string",
            "description": "a broadcast batch: what each message answers, comma-separated",
        },
        BATCH_MESSAGE_IDS: {
            "type": "string",
            "description": "a work batch: each item's message id, comma-separated",
        },
        BATCH_LENGTHS: {
            "type": "string",
            "description": "a work batch: each item's body length in bytes, comma-separated",
        },
        BATCH_CAPTURED_AT: {
            "type": "string",
            "description": "a work batch: each item's capture time (empty: none), comma-separated",
        },
        BATCH_RECEIVED_AT: {
            "type": "string",
            "description": "a work batch: each item's receive time, comma-separated",
        },
    },
    "required": [HEADER_PRODUCER, HEADER_RECEIVED_AT],
}


@dataclass(frozen=True, slots=True)
class Flow:
    """One service's side of one AMQP flow: it publishes to `exchange`, or consumes `queue`."""

    name: str  # the channel's and operation's key in the document
    service: str
    description: str
    payload: Any  # a Python type (pydantic model, union, bytes) or a JSON schema (dict)
    exchange: RabbitExchange
    queue: RabbitQueue | None = None  # set: the service consumes it; None: it publishes
    routing_key: str = ""
    persistent: bool = False
    content_type: str = "application/json"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def consumes(self) -> bool:
        return self.queue is not None


def flows(topology: Topology) -> list[Flow]:
    """Every AMQP flow of Edgeway, grouped as `docs/architecture.md` groups them."""
    t = topology
    ws = t.worldsystem
    out: list[Flow] = []

    def publish(
        name: str, service: str, exchange: RabbitExchange, payload: Any, what: str, /, **kw: Any
    ) -> None:
        out.append(Flow(name, service, what, payload, exchange, **kw))

    def consume(
        name: str,
        service: str,
        queue: RabbitQueue,
        exchange: RabbitExchange,
        payload: Any,
        what: str,
        /,
        **kw: Any,
    ) -> None:
        out.append(Flow(name, service, what, payload, exchange, queue=queue, **kw))

    # --- durable work: quorum queues with a delivery limit and dead letters -------------------
    publish(
        "gateway.occupancy.observations",
        GATEWAY,
        t.occupancy_observations,
        FrameResult,
        "Camera models' frame results (`/model/ws/connect`), checked at the edge; those a "
        "connection sends while its earlier ones await their confirms go together (`x-batch`).",
        persistent=True,
    )
    consume(
        "occupancy.observations",
        OCCUPANCY,
        t.occupancy_observations_queue,
        t.occupancy_observations,
        FrameResult,
        "Applies the rules, stores, then publishes each location's update; a batch is taken "
        "frame by frame (idempotent on each one's message id) and acked once all are.",
    )
    publish(
        "gateway.telemetry.raw",
        GATEWAY,
        t.telemetry_raw,
        Binary,
        "Vehicle loggers' protobuf uploads (`edgeway.common.telemetry.uploads`: one "
        "`Upload`, or `Uploads` when several go together).",
        persistent=True,
        content_type="application/x-protobuf",
    )
    consume(
        "telemetry.raw",
        TELEMETRY,
        t.telemetry_raw_queue,
        t.telemetry_raw,
        Binary,
        "Decodes each vehicle's packets in order (single active consumer), stores them.",
        content_type="application/x-protobuf",
    )
    publish(
        "gateway.ingest.uploads",
        GATEWAY,
        t.ingest_uploads,
        Binary,
        "One accepted file per message: an uploaded image, or a phone's CSV file.",
        persistent=True,
        content_type="application/octet-stream",
    )
    consume(
        "ingestion.uploads",
        INGESTION,
        t.ingest_uploads_queue,
        t.ingest_uploads,
        Binary,
        "Decodes and stores each file; announces each stored frame.",
        content_type="application/octet-stream",
    )
    publish(
        "tracker.tracking.commands",
        TRACKER,
        t.tracking_commands,
        RUN_TASK,
        "A task to run, once per task.",
        persistent=True,
    )
    consume(
        "tracker.commands",
        TRACKER,
        t.tracking_commands_queue,
        t.tracking_commands,
        RUN_TASK,
        "Runs the task; any replica may take it.",
    )
    publish(
        "gateway.tracking.videos",
        GATEWAY,
        t.tracking_videos,
        Binary,
        "A `file` camera's video an operator uploaded, one message per file.",
        persistent=True,
        content_type="application/octet-stream",
    )
    consume(
        "tracker.videos",
        TRACKER,
        t.tracking_videos_queue,
        t.tracking_videos,
        Binary,
        "Stores the camera's video.",
        content_type="application/octet-stream",
    )
    for work in t.work_queues:
        publish(
            f"rabbitmq.dead-letter.{work.name}",
            RABBITMQ,
            t.dead_letter,
            Binary,
            f"What `{work.name}` rejected or could not deliver within its delivery limit.",
            routing_key=work.name,
        )
        consume(
            f"gateway.dead-letters.{work.name}",
            GATEWAY,
            t.dead_letter_queue(work.name),
            t.dead_letter,
            Binary,
            "Waits for an operator: `edgeway-dead-letters` counts and moves them back "
            "to the work queue.",
            routing_key=work.name,
        )

    # --- live results: the broadcast exchange, routing key = client channel --------------------
    broadcast = t.broadcast
    publish(
        "occupancy.broadcast.location",
        OCCUPANCY,
        broadcast,
        ClientUpdate,
        "A location's occupancy, after each committed observation; the updates of one commit "
        "group go together (`x-batch`, one JSON message a line).",
        # Its id is a number, so the pattern stands for it here.
        routing_key=Channels.OCCUPANCY_LOCATIONS.replace("*", "{location_id}"),
    )
    publish(
        "telemetry.broadcast.vehicle",
        TELEMETRY,
        broadcast,
        TELEMETRY_RECORD,
        "Each stored record of a vehicle, for the dashboards.",
        routing_key=Channels.telemetry_vehicle("{vin}"),
    )
    publish(
        "gateway.broadcast.telemetry-control",
        GATEWAY,
        broadcast,
        LOGGER_COMMAND,
        "Logger commands, to whichever gateway replica holds the logger's socket.",
        routing_key=Channels.telemetry_control("{vin}"),
    )
    publish(
        "gateway.broadcast.telemetry-log",
        GATEWAY,
        broadcast,
        LOG_LINE,
        "A logger's log lines, for every dashboard on every replica.",
        routing_key=Channels.telemetry_log("{vin}"),
    )
    publish(
        "video-relay.broadcast.viewer",
        VIDEO_RELAY,
        broadcast,
        VIEWER,
        "Trajectory updates and restarts bridged from WorldSystem, for every viewer.",
        routing_key=Channels.VIDEO_VIEWER,
    )
    publish(
        "video-relay.broadcast.stream",
        VIDEO_RELAY,
        broadcast,
        Binary,
        "One phone's parsed H.264 packets, in order (transient; headers `x-packet-type`, "
        "`x-packet-seq`, `x-timestamp-us`, `x-captured-ms`).",
        routing_key=Channels.video_stream("{device}"),
        content_type="video/h264",
    )
    publish(
        "video-relay.broadcast.frames",
        VIDEO_RELAY,
        broadcast,
        Binary,
        "One phone's decoded JPEGs for viewers without H.264 (transient; headers "
        "`x-packet-type` `jpeg`, `x-packet-seq`, `x-captured-ms`).",
        routing_key=Channels.video_frames("{device}"),
        content_type="image/jpeg",
    )
    publish(
        "video-relay.broadcast.imu",
        VIDEO_RELAY,
        broadcast,
        IMU_SAMPLE,
        "One phone's IMU samples, in order, for viewers.",
        routing_key=Channels.video_imu("{device}"),
    )
    publish(
        "gateway.broadcast.video-control",
        GATEWAY,
        broadcast,
        VIEWER_COMMAND,
        "Viewer commands for one phone (`all`: every phone).",
        routing_key=Channels.video_control("{device}"),
    )
    publish(
        "ingestion.broadcast.request",
        INGESTION,
        broadcast,
        INGEST_EVENT,
        "Progress and completion of one ingestion request (from the outbox, after commit).",
        routing_key=Channels.ingest_request("{request_id}"),
    )
    publish(
        "tracker.broadcast.task",
        TRACKER,
        broadcast,
        TRACKING_CLIENT,
        "One tracking task's messages, SpotOn's shapes.",
        routing_key=Channels.tracking_task("{task_id}"),
    )
    for service in (OCCUPANCY, TRACKER):
        publish(
            f"{service}.broadcast.producer",
            service,
            broadcast,
            ErrorFrame,
            "A rejection of what one producer connection sent (its `x-reply-channel`).",
            routing_key=Channels.producer("{gateway_id}", "{connection_id}"),
        )
    consume(
        "gateway.broadcast",
        GATEWAY,
        t.gateway_queue("{gateway_id}"),
        broadcast,
        Binary,
        "One gateway replica's view of the broadcast exchange: it binds the channels its "
        "clients watch (and `gateway.<gateway_id>.*`), and fans each message out.",
        routing_key=Channels.producers_of("{gateway_id}"),
    )
    for service in (OCCUPANCY, TELEMETRY, VIDEO_RELAY, INGESTION, TRACKER):
        publish(
            f"{service}.broadcast.readiness",
            service,
            broadcast,
            ReadinessReport,
            "What each instance's `/readyz` says, every `EDGEWAY_READINESS_INTERVAL_S` "
            "seconds (transient; `edgeway.common.readiness`).",
            routing_key=Channels.system_readiness("{service}"),
        )
    consume(
        "gateway.system",
        GATEWAY,
        t.gateway_system_queue("{gateway_id}"),
        broadcast,
        ReadinessReport,
        "One gateway replica's copy of every instance's readiness reports: it keeps the "
        "latest of each for `GET /api/v1/system/services`.",
        routing_key=Channels.SYSTEM_READINESS,
    )

    # --- request/reply: the default exchange, routing key = queue name -------------------------
    default = RabbitExchange("")
    requests: tuple[tuple[str, RabbitQueue, Any, Any], ...] = (
        (OCCUPANCY, t.occupancy_requests_queue, QUERY, dict),
        (TELEMETRY, t.telemetry_requests_queue, QUERY, dict),
        (VIDEO_RELAY, t.video_requests_queue, QUERY, dict),
        (INGESTION, t.ingest_requests_queue, IngestCommand, IngestReply),
        (TRACKER, t.tracking_requests_queue, TrackingRequest, TrackingReply),
    )
    for service, queue, ask, _ in requests:
        publish(
            f"gateway.requests.{service}",
            GATEWAY,
            default,
            ask,
            f"A request to the {service} service; 504 to the client when no reply comes in time.",
            routing_key=queue.name,
        )
        consume(
            f"{service}.requests",
            service,
            queue,
            default,
            ask,
            "Answers each request on its `reply_to`; acked whatever happens.",
            routing_key=queue.name,
        )

    # --- video and the phone link (WorldSystem's exchanges kept) -------------------------------
    publish(
        "gateway.video.stream",
        GATEWAY,
        ws("video_stream"),
        Binary,
        "A phone's H.264 byte stream, one WebSocket message per AMQP message (`x-device`).",
        content_type="video/h264",
    )
    consume(
        "video-relay.stream",
        VIDEO_RELAY,
        t.video_stream_queue,
        ws("video_stream"),
        Binary,
        "Parses each phone's stream into packets.",
        content_type="video/h264",
    )
    publish("gateway.video.imu", GATEWAY, t.video_imu, PHONE_IMU, "Phones' raw IMU samples.")
    consume(
        "video-relay.imu",
        VIDEO_RELAY,
        t.video_imu_queue,
        t.video_imu,
        PHONE_IMU,
        "Puts each phone's samples in order.",
    )
    publish(
        "gateway.video.frames",
        GATEWAY,
        ws("video_frames"),
        Binary,
        "A phone's JPEG frame (`/ws/phone`), with the seed's headers.",
        content_type="application/octet-stream",
    )
    publish(
        "video-relay.video.frames",
        VIDEO_RELAY,
        ws("video_frames"),
        Binary,
        "A decoded frame of a phone's H.264 stream, as JPEG.",
        content_type="application/octet-stream",
    )
    consume(
        "tracker.frames",
        TRACKER,
        t.tracking_frames_queue("{replica_id}", "{task_id}"),
        ws("video_frames"),
        Binary,
        "One live task's copy of the phones' frames; it keeps the newest per camera.",
        content_type="application/octet-stream",
    )
    publish(
        "video-relay.imu-data",
        VIDEO_RELAY,
        ws("imu_data"),
        IMU_SAMPLE,
        "Each phone's IMU samples in order, for WorldSystem's services.",
    )
    publish(
        "gateway.analysis-mode",
        GATEWAY,
        ws("analysis_mode"),
        ANALYSIS_MODE,
        "A phone's analysis mode, for WorldSystem's services.",
    )
    publish(
        "worldsystem.trajectory-data",
        WORLDSYSTEM,
        ws("trajectory_data"),
        VIEWER,
        "WorldSystem's trajectory updates.",
    )
    consume(
        "video-relay.trajectory",
        VIDEO_RELAY,
        bridge_queue("trajectory"),
        ws("trajectory_data"),
        VIEWER,
        "Bridges each update to the viewers.",
    )
    publish(
        "gateway.restart",
        GATEWAY,
        ws("restart"),
        VIEWER,
        '`{"type":"restart"}` (`POST /api/restart`).',
    )
    consume(
        "video-relay.restart",
        VIDEO_RELAY,
        bridge_queue("restart"),
        ws("restart"),
        VIEWER,
        "Tells every viewer.",
    )
    publish(
        "worldsystem.processed-frames",
        WORLDSYSTEM,
        ws("processed_frames"),
        Binary,
        "WorldSystem's processed frames (declared by Edgeway, used by WorldSystem).",
        content_type="application/octet-stream",
    )
    publish(
        "worldsystem.ply-fanout",
        WORLDSYSTEM,
        ws("ply_fanout"),
        Binary,
        "WorldSystem's point clouds (declared by Edgeway, used by WorldSystem).",
        content_type="application/octet-stream",
    )

    # --- ingestion's announcements and control -------------------------------------------------
    publish(
        "ingestion.frames",
        INGESTION,
        t.ingest_frames,
        FRAME_STORED,
        "Every stored frame, once committed (from the outbox).",
    )
    publish(
        "ingestion.control",
        INGESTION,
        t.ingest_control,
        CANCEL_CAPTURE,
        "A cancelled capture, for whichever replica runs it.",
    )
    consume(
        "ingestion.control.replica",
        INGESTION,
        t.ingest_control_queue("{replica_id}"),
        t.ingest_control,
        CANCEL_CAPTURE,
        "Stops the capture if it runs here.",
    )

    # --- tracking: edge detections, unrouted ones, stops ---------------------------------------
    publish(
        "gateway.tracking.detections",
        GATEWAY,
        t.tracking_detections,
        EdgeFrame,
        "Edge devices' boxes (`/ws/detections`), one message per camera frame (transient).",
        routing_key=t.tracking_detections_key("{environment_id}", "{camera_id}"),
    )
    consume(
        "tracker.detections",
        TRACKER,
        t.tracking_detections_queue("{replica_id}"),
        t.tracking_detections,
        EdgeFrame,
        "A replica's live tasks' detections: it binds `<environment_id>.*` per task.",
        routing_key="{environment_id}.*",
    )
    publish(
        "rabbitmq.tracking.unrouted",
        RABBITMQ,
        t.tracking_unrouted,
        EdgeFrame,
        "Detections no live task takes (the alternate exchange of the detections).",
    )
    consume(
        "tracker.unrouted",
        TRACKER,
        t.tracking_unrouted_queue,
        t.tracking_unrouted,
        EdgeFrame,
        "Tells the producer why: `not_tracking` on its reply channel.",
    )
    publish(
        "tracker.tracking.control",
        TRACKER,
        t.tracking_control,
        STOP_TASK,
        "A stopped task, for whichever replica runs it.",
    )
    consume(
        "tracker.control",
        TRACKER,
        t.tracking_control_queue("{replica_id}"),
        t.tracking_control,
        STOP_TASK,
        "Ends the task if it runs here.",
    )
    return out


def bridge_queue(kind: str) -> RabbitQueue:
    """The video relay's own queue on a WorldSystem exchange (the seed's `server_*` queues).

    The relay declares it (`edgeway.video_relay.handlers.bridge_queue`); the document's test
    compares the two, since this library cannot import a service.
    """
    return RabbitQueue(
        f"edgeway.video-relay.{{instance}}.{kind}",
        exclusive=True,
        auto_delete=True,
        durable=False,
        arguments={"x-max-length": BRIDGE_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
    )


def _handler(payload: Any) -> Callable[..., Any]:
    """A handler whose only job is to carry the payload type FastStream documents."""

    async def handle(body: Any) -> None:
        del body

    handle.__annotations__ = {
        "body": dict[str, Any] if isinstance(payload, dict) else payload,
        "return": None,
    }
    return handle


def broker(described: list[Flow], *, url: str) -> RabbitBroker:
    """A broker that describes `described` (never connected)."""
    rabbit = RabbitBroker(url, description="RabbitMQ: every Edgeway service's only link")
    for flow in described:
        if flow.queue is not None:
            rabbit.subscriber(
                flow.queue, flow.exchange, title=flow.name, description=flow.description
            )(_handler(flow.payload))
        else:
            publisher = rabbit.publisher(
                exchange=flow.exchange,
                routing_key=flow.routing_key,
                title=flow.name,
                description=flow.description,
                persist=flow.persistent,
            )
            publisher(_handler(flow.payload))
    return rabbit


# What AsyncAPI allows in a component's key.
COMPONENT_KEY = re.compile(r"^[\w\d.\-_]+$")
PARAMETER = re.compile(r"{(\w+)}")


def _key(name: str) -> str:
    return name.replace(":", ".")


def _rekey(value: Any) -> Any:
    """FastStream's `name:Message` keys and their references, with `.` for `:`."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                parts = [quote(_key(unquote(part)), safe="#") for part in item.split("/")]
                out[key] = "/".join(parts)
            elif key == "title" and isinstance(item, str):
                out[key] = _key(item)
            else:
                out[_key(key) if ":" in key else key] = _rekey(item)
        return out
    if isinstance(value, list):
        return [_rekey(item) for item in value]
    return value


def _queue(queue: RabbitQueue) -> dict[str, Any]:
    """A queue as declared, arguments and type included (AsyncAPI's binding has neither)."""
    binding: dict[str, Any] = {
        "name": queue.name,
        "durable": queue.durable,
        "exclusive": queue.exclusive,
        "autoDelete": queue.auto_delete,
        "vhost": "/",
    }
    if queue.arguments:
        binding["x-arguments"] = dict(queue.arguments)
    return binding


def _exchange(exchange: RabbitExchange) -> dict[str, Any]:
    binding: dict[str, Any] = {
        "name": exchange.name,
        "type": exchange.type.value if exchange.name else "default",
        "durable": exchange.durable,
        "autoDelete": exchange.auto_delete,
        "vhost": "/",
    }
    if exchange.arguments:
        binding["x-arguments"] = dict(exchange.arguments)
    return binding


def parameters(address: str) -> dict[str, Any]:
    """The parameters of an address's `{name}` expressions (required by AsyncAPI)."""
    return {name: {"description": f"the {name}"} for name in PARAMETER.findall(address)}


def amend(spec: dict[str, Any], described: list[Flow]) -> dict[str, Any]:
    """FastStream's document with what its generator leaves out (see the module's docstring)."""
    spec = _rekey(spec)
    channels: dict[str, Any] = spec["channels"]
    operations: dict[str, Any] = spec["operations"]
    messages: dict[str, Any] = spec["components"]["messages"]
    for flow in described:
        channel = channels[flow.name]
        amqp: dict[str, Any] = {"bindingVersion": "0.3.0"}
        if flow.queue is not None:
            amqp |= {"is": "queue", "queue": _queue(flow.queue)}
            # The exchange it is bound to, and by which key (AsyncAPI's binding has no place).
            amqp["x-bound-to"] = {"exchange": _exchange(flow.exchange)}
            if flow.routing_key:
                amqp["x-bound-to"]["routingKey"] = flow.routing_key
            channel["address"] = flow.queue.name
        else:
            amqp |= {"is": "routingKey", "exchange": _exchange(flow.exchange)}
            channel["address"] = flow.routing_key or None
        channel["bindings"] = {"amqp": amqp}
        channel["title"] = flow.name
        if channel["address"] and (found := parameters(channel["address"])):
            channel["parameters"] = found
        channel.pop("servers", None)  # absent: on every server; there is one broker
        operation = operations[flow.name]
        operation["title"] = f"{flow.service} {'consumes' if flow.consumes else 'publishes'}"
        operation["summary"] = flow.description
        operation["tags"] = [{"name": flow.service}]
        for reference in channel["messages"].values():
            message = messages[unquote(reference["$ref"].rsplit("/", 1)[1])]
            message["contentType"] = flow.content_type
            message["headers"] = {"$ref": "#/components/schemas/EnvelopeHeaders"}
            if isinstance(flow.payload, dict):
                message["payload"] = flow.payload
    spec["components"]["schemas"]["EnvelopeHeaders"] = ENVELOPE_HEADERS
    _drop_unused_schemas(spec)
    return spec


def _drop_unused_schemas(spec: dict[str, Any]) -> None:
    """Payload schemas that a hand-written payload replaced are referenced by nothing."""
    schemas: dict[str, Any] = spec["components"]["schemas"]
    while True:
        text = repr({k: v for k, v in spec.items() if k != "components"}) + repr(
            {k: v for k, v in spec["components"].items() if k != "schemas"}
        )
        used = set(re.findall(r"#/components/schemas/([^'\"]+)", text + repr(schemas)))
        unused = [name for name in schemas if quote(name, safe="") not in used and name not in used]
        if not unused:
            return
        for name in unused:
            del schemas[name]
