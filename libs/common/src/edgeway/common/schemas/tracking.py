"""Tracking messages: what the gateway and the tracker say to each other and to clients.

SpotOn's wire (docs/replaced-systems.md) is kept where clients see it: `POST .../start` answers
`{task_id, message, status_url, websocket_url}`, the status is `{task_id, status, progress,
current_step, details}`, and `/ws/tracking/{task_id}` carries `{"type": ..., "payload": ...}`
messages. Environments (named sets of cameras) and edge detections are Edgeway's own; both are
checked here, by the gateway at the edge and again by the tracker, which owns them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictInt,
    TypeAdapter,
    model_validator,
)

from edgeway.common.schemas.ingest import RtspUrl

# Ids end up in routing keys, object keys, logs and URLs: no dots, slashes or spaces.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ResourceId = Annotated[str, Field(pattern=ID_PATTERN)]
# The video relay's device ids (the gateway's `?device=` on /ws/phone and /ws/video).
DEVICE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

# A task's video as the gateway serves it (SpotOn's media route); `media_available` names it.
MEDIA_PATH = (
    "/api/v1/media/tasks/{task_id}/environments/{environment_id}/cameras/{camera_id}"
    "/sub_videos/{filename}"
)
# A stored video's file name: `<video id>.<extension>` (the tracker makes both).
MEDIA_FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[a-z0-9]{1,4}$"
# Bytes of a video in one request/reply between the gateway and the tracker.
MAX_MEDIA_CHUNK = 1024 * 1024

# Message types (the AMQP `type` property).
COMMAND_TYPE = "tracking.command.v1"  # {"command": "run", "task_id"} on the commands queue
VIDEO_TYPE = "tracking.video.v1"  # a camera's video file, bytes as uploaded
DETECTIONS_TYPE = "tracking.detections.v1"  # one EdgeFrame
CONTROL_TYPE = "tracking.control.v1"  # {"stop": task_id} to every tracker replica
CLIENT_TYPE = "tracking.client.v1"  # a message for /ws/tracking clients (type + payload)
ERROR_TYPE = "error.v1"  # an ErrorFrame back to a producer

HEADER_ENVIRONMENT_ID = "x-environment-id"
HEADER_CAMERA_ID = "x-camera-id"
HEADER_VIDEO_ID = "x-video-id"

# Bounds. A camera set as large as SpotOn's biggest scene (4) with room to spare; points enough
# for a careful calibration; boxes and vectors for a crowded frame from a Re-ID model.
MAX_CAMERAS = 16
MAX_POINTS = 64
MAX_NPZ_BASE64 = 256 * 1024
MAX_DETECTIONS = 500
MAX_EMBEDDING = 2048
MAX_TRACK_ROWS = 10_000
# Year 3000 in epoch seconds: anything later is not seconds.
MAX_EPOCH_S = 32_503_680_000.0


class TaskStatus(StrEnum):
    """SpotOn's statuses, plus STOPPED (SpotOn had no stop)."""

    QUEUED = "QUEUED"
    INITIALIZING = "INITIALIZING"
    DOWNLOADING_DATA = "DOWNLOADING_DATA"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.STOPPED)


class TaskMode(StrEnum):
    BATCH = "batch"  # read every camera's video to its end
    LIVE = "live"  # track edge detections until stopped


# --- environments ----------------------------------------------------------------------------

Point = tuple[FiniteFloat, FiniteFloat]
Quadrant = Literal["upper_left", "upper_right", "lower_left", "lower_right"]


class HomographyPoints(BaseModel):
    """Image points and the map points they lie on, pair by pair (SpotOn's `.npz` content)."""

    model_config = ConfigDict(extra="forbid")

    image_points: Annotated[list[Point], Field(min_length=4, max_length=MAX_POINTS)]
    map_points: Annotated[list[Point], Field(min_length=4, max_length=MAX_POINTS)]

    @model_validator(mode="after")
    def _pairs(self) -> HomographyPoints:
        if len(self.image_points) != len(self.map_points):
            raise ValueError(
                f"{len(self.image_points)} image points but {len(self.map_points)} map points"
            )
        return self


class HomographyNpz(BaseModel):
    """SpotOn's `homography_points_<cam>_scene_<s>.npz`, base64: the tracker reads its
    `image_points` and `map_points` arrays (never pickles) and keeps the points."""

    model_config = ConfigDict(extra="forbid")

    npz_base64: Annotated[str, Field(min_length=4, max_length=MAX_NPZ_BASE64)]


class FileSource(BaseModel):
    """A video file in the tracker's object store (`PUT .../cameras/{cam}/video`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["file"] = "file"


class ExternalSource(BaseModel):
    """An edge device sends this camera's detections (`/ws/detections`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["external"] = "external"


class RelaySource(BaseModel):
    """A live phone or drone: the video relay's decoded frames of `device`
    (`video_frames_exchange`), detected and tracked by a live task."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["relay"] = "relay"
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)]


class RtspSource(BaseModel):
    """An RTSP camera a live task reads itself (PyAV, through `edgeway.common.rtsp`'s checked
    loopback relay). The tracker stores the URL masked (`rtsp://***@host/path`) and sealed
    (`sealed`, Fernet): clients never see the credentials again, and never send `sealed`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["rtsp"] = "rtsp"
    url: RtspUrl
    sealed: Annotated[str, Field(max_length=8192)] | None = None


Source = Annotated[
    FileSource | ExternalSource | RelaySource | RtspSource, Field(discriminator="kind")
]
# Sources a live task tracks (a batch task reads `file` cameras).
LIVE_SOURCES = (ExternalSource, RelaySource, RtspSource)


class HandoffRule(BaseModel):
    """SpotOn's exit rule: leaving through `quadrant`, a person shows up next in the target."""

    model_config = ConfigDict(extra="forbid")

    quadrant: Quadrant
    target_camera_id: ResourceId
    min_overlap: Annotated[float, Field(gt=0, le=1)] = 0.40


class CameraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    camera_id: ResourceId
    width: Annotated[int, Field(ge=16, le=7680)]
    height: Annotated[int, Field(ge=16, le=4320)]
    source: Source
    homography: HomographyPoints | HomographyNpz | None = None
    handoff_rules: Annotated[list[HandoffRule], Field(max_length=4)] = []


class EnvironmentSpec(BaseModel):
    """A named set of cameras: what `POST /api/v1/environments` takes."""

    model_config = ConfigDict(extra="forbid")

    environment_id: ResourceId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    cameras: Annotated[list[CameraConfig], Field(min_length=1, max_length=MAX_CAMERAS)]
    # Pairs of cameras whose views overlap (SpotOn's POSSIBLE_CAMERA_OVERLAPS).
    overlaps: Annotated[list[tuple[ResourceId, ResourceId]], Field(max_length=120)] = []

    @model_validator(mode="after")
    def _references(self) -> EnvironmentSpec:
        ids = [camera.camera_id for camera in self.cameras]
        duplicates = sorted({c for c in ids if ids.count(c) > 1})
        if duplicates:
            raise ValueError(f"camera ids must be unique: {duplicates} appear more than once")
        known = set(ids)
        devices = [c.source.device for c in self.cameras if isinstance(c.source, RelaySource)]
        shared = sorted({d for d in devices if devices.count(d) > 1})
        if shared:
            raise ValueError(
                f"relay devices must be one camera each: {shared} appear more than once"
            )
        for a, b in self.overlaps:
            if a == b:
                raise ValueError(f"overlap ({a}, {b}) names one camera twice")
            if not {a, b} <= known:
                raise ValueError(f"overlap ({a}, {b}) names a camera that is not in cameras")
        for camera in self.cameras:
            for rule in camera.handoff_rules:
                if rule.target_camera_id not in known or rule.target_camera_id == camera.camera_id:
                    raise ValueError(
                        f"camera {camera.camera_id}: hand-off target {rule.target_camera_id} "
                        "must be another camera of this environment"
                    )
        return self

    def camera(self, camera_id: str) -> CameraConfig | None:
        return next((c for c in self.cameras if c.camera_id == camera_id), None)


# --- tasks -----------------------------------------------------------------------------------


class StartTaskBody(BaseModel):
    """`POST /api/v1/processing-tasks/start` (SpotOn's body, plus the mode)."""

    environment_id: ResourceId
    mode: TaskMode = TaskMode.BATCH


# --- edge detections -------------------------------------------------------------------------

BBox = tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]
Embedding = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_EMBEDDING)]


class EdgeDetection(BaseModel):
    bbox_xyxy: BBox
    confidence: Annotated[FiniteFloat, Field(ge=0, le=1)]
    embedding: (
        Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_EMBEDDING)] | None
    ) = None

    @model_validator(mode="after")
    def _box(self) -> EdgeDetection:
        x1, y1, x2, y2 = self.bbox_xyxy
        if x1 < 0 or y1 < 0 or not (x1 < x2 and y1 < y2):
            raise ValueError("bbox_xyxy must be [x1, y1, x2, y2] with 0 <= x1 < x2, 0 <= y1 < y2")
        if self.embedding is not None and not any(self.embedding):
            raise ValueError("embedding must not be all zeros")
        return self


class EdgeFrame(BaseModel):
    """One camera frame's detections from an edge device (`/ws/detections`)."""

    environment_id: ResourceId
    camera_id: ResourceId
    frame_index: Annotated[StrictInt, Field(ge=0, le=2**53)]
    timestamp: Annotated[FiniteFloat, Field(ge=0, lt=MAX_EPOCH_S)]  # epoch seconds
    detections: Annotated[list[EdgeDetection], Field(max_length=MAX_DETECTIONS)]


def out_of_frame(frame: EdgeFrame, width: int, height: int) -> str | None:
    """Why a frame's boxes do not fit its camera (None when they all do)."""
    for index, detection in enumerate(frame.detections):
        _, _, x2, y2 = detection.bbox_xyxy
        if x2 > width or y2 > height:
            return (
                f"detections[{index}].bbox_xyxy {list(detection.bbox_xyxy)} leaves the "
                f"{width}x{height} frame of camera {frame.camera_id}"
            )
    return None


# --- request/reply between the gateway and the tracker ---------------------------------------


class CreateEnvironment(BaseModel):
    command: Literal["create_environment"] = "create_environment"
    environment: EnvironmentSpec


class ListEnvironments(BaseModel):
    command: Literal["list_environments"] = "list_environments"


class GetEnvironment(BaseModel):
    command: Literal["get_environment"] = "get_environment"
    environment_id: ResourceId


class ReplaceEnvironment(BaseModel):
    command: Literal["replace_environment"] = "replace_environment"
    environment_id: ResourceId
    environment: EnvironmentSpec


class DeleteEnvironment(BaseModel):
    command: Literal["delete_environment"] = "delete_environment"
    environment_id: ResourceId


class PrepareVideo(BaseModel):
    """May a video be uploaded for this camera? Asked before the gateway reads the body."""

    command: Literal["prepare_video"] = "prepare_video"
    environment_id: ResourceId
    camera_id: ResourceId


class StartTask(BaseModel):
    command: Literal["start_task"] = "start_task"
    environment_id: ResourceId
    mode: TaskMode = TaskMode.BATCH


class GetTaskStatus(BaseModel):
    command: Literal["task_status"] = "task_status"
    task_id: str


class StopTask(BaseModel):
    command: Literal["stop_task"] = "stop_task"
    task_id: str


class QueryTracks(BaseModel):
    """`GET .../{task_id}/tracks`: observations in (frame, camera, track) order, a page at a
    time (`after`: the `next_after` of the previous page)."""

    command: Literal["tracks"] = "tracks"
    task_id: str
    camera_id: ResourceId | None = None
    global_id: Annotated[str, Field(max_length=64)] | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=MAX_TRACK_ROWS)] = 1000
    format: Literal["json", "mot"] = "json"


class ReadMedia(BaseModel):
    """`GET MEDIA_PATH`: the video's size and type, and `length` bytes from `offset` (base64),
    or where to fetch it instead (`redirect`, a presigned URL)."""

    command: Literal["media"] = "media"
    task_id: str
    environment_id: ResourceId
    camera_id: ResourceId
    filename: Annotated[str, Field(pattern=MEDIA_FILE_PATTERN)]
    offset: Annotated[int, Field(ge=0)] = 0
    length: Annotated[int, Field(ge=0, le=MAX_MEDIA_CHUNK)] = 0


TrackingRequest = Annotated[
    CreateEnvironment
    | ListEnvironments
    | GetEnvironment
    | ReplaceEnvironment
    | DeleteEnvironment
    | PrepareVideo
    | StartTask
    | GetTaskStatus
    | StopTask
    | QueryTracks
    | ReadMedia,
    Field(discriminator="command"),
]
TRACKING_REQUEST: TypeAdapter[TrackingRequest] = TypeAdapter(TrackingRequest)


class TrackingReply(BaseModel):
    """The tracker's answer: the HTTP status the gateway gives and the body it sends.

    Error bodies are `{"type": "error", "code", "reason"}`; the tracker chooses the status
    because only it knows what a refusal means (404 unknown, 409 busy, 400 invalid).
    """

    status: int
    body: Any = None

    @classmethod
    def error(cls, status: int, code: str, reason: str) -> TrackingReply:
        return cls(status=status, body={"type": "error", "code": code, "reason": reason})
