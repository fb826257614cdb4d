"""Tracker rules as pure functions and small state machines: no I/O, no clocks of their own.

What an environment must be to be stored, what a task needs to start, SpotOn's message shapes
(docs/replaced-systems.md), MOTChallenge text, how a live task groups edge frames into steps, and
how often clients hear about a task's status.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from edgeway.common.rtsp.capture import mask_credentials
from edgeway.common.schemas.tracking import (
    DEVICE_PATTERN,
    LIVE_SOURCES,
    MAX_EPOCH_S,
    MEDIA_PATH,
    EdgeFrame,
    EnvironmentSpec,
    FileSource,
    HomographyNpz,
    HomographyPoints,
    RelaySource,
    RtspSource,
    TaskMode,
    TaskStatus,
    TrackingReply,
)
from edgeway.tracker.vision import (
    CameraSpec,
    Detection,
    Frame,
    HandoffRule,
    HomographyError,
    TrackOutput,
    fit_homography,
)

# SpotOn's default when a video does not say its frame rate (docs/replaced-systems.md, SpotOn).
FALLBACK_FPS = 25.0
MAX_ERROR_DETAILS = 5


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request cannot be done: the HTTP status the client gets, a code and a reason."""

    status: int
    code: str
    reason: str

    def reply(self) -> TrackingReply:
        return TrackingReply.error(self.status, self.code, self.reason)


def validation_reason(error: ValidationError) -> str:
    """A pydantic error in a client's words: where and what, for the first few problems."""
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:MAX_ERROR_DETAILS]:
        where = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# --- environments ----------------------------------------------------------------------------


def read_npz(data: bytes) -> HomographyPoints:
    """SpotOn's homography file: the `image_points` and `map_points` arrays, never a pickle."""
    if not data.startswith(b"PK"):  # np.load would take anything else for a pickle
        raise ValueError("not a readable .npz file (a zip archive of .npy arrays)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            missing = {"image_points", "map_points"} - set(arrays.files)
            found = {} if missing else {k: arrays[k] for k in ("image_points", "map_points")}
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"not a readable .npz file ({exc})") from None
    except ValueError:  # object arrays (pickles) are refused by allow_pickle=False
        raise ValueError("the .npz arrays must hold numbers, N x 2 each") from None
    if missing:
        raise ValueError(f"the .npz file lacks {sorted(missing)}")
    try:
        points = {
            k: np.asarray(v, dtype=np.float64).reshape(-1, 2).tolist() for k, v in found.items()
        }
    except (TypeError, ValueError):
        raise ValueError("the .npz arrays must hold numbers, N x 2 each") from None
    return HomographyPoints.model_validate(points)


def normalise_environment(spec: EnvironmentSpec) -> EnvironmentSpec | Refusal:
    """The environment as it is stored: `.npz` homographies read into points, and every
    homography checked to be fittable, so a task never starts on one that is not."""
    cameras = []
    for camera in spec.cameras:
        homography = camera.homography
        where = f"camera {camera.camera_id}: homography"
        if isinstance(homography, HomographyNpz):
            try:
                data = base64.b64decode(homography.npz_base64, validate=True)
                homography = read_npz(data)
            except binascii.Error:
                return Refusal(400, "invalid_homography", f"{where}: npz_base64 is not base64")
            except ValidationError as exc:
                return Refusal(400, "invalid_homography", f"{where}: {validation_reason(exc)}")
            except ValueError as exc:
                return Refusal(400, "invalid_homography", f"{where}: {exc}")
        if homography is not None:
            try:
                fit_homography(homography.image_points, homography.map_points)
            except HomographyError as exc:
                return Refusal(400, "invalid_homography", f"{where}: {exc}")
        cameras.append(camera.model_copy(update={"homography": homography}))
    return spec.model_copy(update={"cameras": cameras})


class Sealer(Protocol):
    def seal(self, url: str) -> str: ...


def seal_rtsp(
    spec: EnvironmentSpec, cipher: Sealer, stored: EnvironmentSpec | None = None
) -> EnvironmentSpec:
    """The environment as stored: each rtsp camera's URL masked (`rtsp://***@host/path`) and
    sealed. A URL sent back as it was read (masked, unchanged) keeps the stored seal, so an
    edit need not repeat the password; `sealed` from a client is never taken."""
    cameras = []
    for camera in spec.cameras:
        source = camera.source
        if isinstance(source, RtspSource):
            before = None if stored is None else stored.camera(camera.camera_id)
            kept = before.source if before is not None else None
            if isinstance(kept, RtspSource) and kept.sealed and kept.url == source.url:
                source = kept
            else:
                source = RtspSource(
                    url=mask_credentials(source.url), sealed=cipher.seal(source.url)
                )
            camera = camera.model_copy(update={"source": source})
        cameras.append(camera)
    return spec.model_copy(update={"cameras": cameras})


def camera_specs(spec: EnvironmentSpec) -> list[CameraSpec]:
    """The vision core's cameras for a stored environment (homographies fitted again)."""
    out = []
    for camera in spec.cameras:
        homography = None
        if isinstance(camera.homography, HomographyPoints):
            homography = fit_homography(
                camera.homography.image_points, camera.homography.map_points
            )
        out.append(
            CameraSpec(
                camera.camera_id,
                (camera.width, camera.height),
                homography=homography,
                handoff_rules=tuple(
                    HandoffRule(rule.quadrant, rule.target_camera_id, rule.min_overlap)
                    for rule in camera.handoff_rules
                ),
            )
        )
    return out


def videos_kept(old: EnvironmentSpec, new: EnvironmentSpec) -> list[str]:
    """Cameras whose uploaded video still applies after an edit: still there, still a `file`
    source, the same size (the others' videos are forgotten)."""
    kept = []
    for camera in new.cameras:
        before = old.camera(camera.camera_id)
        if (
            before is not None
            and isinstance(before.source, FileSource)
            and isinstance(camera.source, FileSource)
            and (before.width, before.height) == (camera.width, camera.height)
        ):
            kept.append(camera.camera_id)
    return kept


@dataclass(frozen=True, slots=True)
class VideoFacts:
    """What the tracker knows of a camera's uploaded video."""

    video_id: str
    status: str  # ready, rejected
    reason: str | None
    object_key: str | None
    size_bytes: int
    frames: int
    fps: float

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {"video_id": self.video_id, "status": self.status}
        if self.status == "ready":
            view.update(size_bytes=self.size_bytes, frames=self.frames, fps=self.fps)
        else:
            view["reason"] = self.reason
        return view


def environment_view(spec: EnvironmentSpec, videos: Mapping[str, VideoFacts]) -> dict[str, Any]:
    """An environment as clients read it: its spec, and each file camera's video."""
    body = spec.model_dump(mode="json")
    for camera in body["cameras"]:
        camera["source"].pop("sealed", None)  # an rtsp URL's credentials never leave
        if camera["source"]["kind"] == "file":
            video = videos.get(camera["camera_id"])
            camera["video"] = None if video is None else video.view()
    body["ready"] = not start_refusals(spec, videos, None)
    return body


def start_refusals(
    spec: EnvironmentSpec, videos: Mapping[str, VideoFacts], mode: TaskMode | None
) -> list[str]:
    """Why a task of `mode` cannot start on this environment (empty: it can). With no mode,
    the mode its cameras' sources call for. `external` and `relay` cameras are live: a live
    task tracks them together; `file` cameras are read by a batch task."""
    live = {isinstance(camera.source, LIVE_SOURCES) for camera in spec.cameras}
    if len(live) > 1:
        return ["its cameras mix file and live (external, relay) sources: a task tracks one kind"]
    if mode is None:
        mode = TaskMode.LIVE if live == {True} else TaskMode.BATCH
    reasons = []
    for camera in spec.cameras:
        if mode is TaskMode.BATCH:
            if isinstance(camera.source, LIVE_SOURCES):
                reasons.append(
                    f"camera {camera.camera_id} is {camera.source.kind}: its frames are tracked "
                    "by a live task"
                )
                continue
            video = videos.get(camera.camera_id)
            if video is None:
                reasons.append(
                    f"camera {camera.camera_id} has no video yet: PUT "
                    f"/api/v1/environments/{spec.environment_id}/cameras/"
                    f"{camera.camera_id}/video"
                )
            elif video.status != "ready":
                reasons.append(f"camera {camera.camera_id}'s video was refused: {video.reason}")
        elif isinstance(camera.source, FileSource):
            reasons.append(
                f"camera {camera.camera_id} is a file: a batch task reads it (live tasks track "
                "external and relay cameras)"
            )
    return reasons


def frame_skip(fps: float, target_fps: float) -> int:
    """SpotOn's pacing: every `round(fps / target)`-th frame, at least every one."""
    if not math.isfinite(fps) or fps <= 0:
        fps = FALLBACK_FPS
    return max(1, round(fps / target_fps))


def steps_of(frames: int, skip: int) -> int:
    """How many frames of a video of `frames` frames are read at that skip."""
    return -(-frames // skip)


# --- task status -----------------------------------------------------------------------------


class TaskLike(Protocol):
    """What the status messages need of a task (the store's row has it)."""

    @property
    def id(self) -> str: ...
    @property
    def environment_id(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def progress(self) -> float: ...
    @property
    def current_step(self) -> str: ...
    @property
    def details(self) -> str: ...
    @property
    def frames_done(self) -> int: ...
    @property
    def frames_total(self) -> int | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def updated_at(self) -> datetime: ...


def status_view(task: TaskLike) -> dict[str, Any]:
    """`GET .../{task_id}/status`: SpotOn's five fields."""
    return {
        "task_id": task.id,
        "status": task.status,
        "progress": round(task.progress, 4),
        "current_step": task.current_step,
        "details": task.details,
    }


def status_payload(task: TaskLike) -> dict[str, Any]:
    """The payload of `status_update`: SpotOn sent its whole task dict; this is ours."""
    return {
        **status_view(task),
        "environment_id": task.environment_id,
        "mode": task.mode,
        "start_time": (task.started_at or task.created_at).isoformat(),
        "last_update_time": task.updated_at.isoformat(),
        "processed_frames_count_total": task.frames_done,
        "total_frames": task.frames_total,
    }


def status_message(task: TaskLike) -> dict[str, Any]:
    return {"type": "status_update", "payload": status_payload(task)}


@dataclass(slots=True)
class StatusThrottle:
    """At most one status update per `interval` seconds, and one at once on every change of
    status (SpotOn sent two per frame)."""

    interval: float
    _last_status: str | None = None
    _last_sent: float = -math.inf

    def due(self, status: str, now: float) -> bool:
        if status != self._last_status or now - self._last_sent >= self.interval:
            self._last_status = status
            self._last_sent = now
            return True
        return False


# --- tracking messages -----------------------------------------------------------------------


def tracking_update(
    *,
    global_frame_index: int,
    scene_id: str,
    processed_at: datetime,
    tracks: Mapping[str, Sequence[TrackOutput]],
) -> dict[str, Any]:
    """SpotOn's `tracking_update` (docs/replaced-systems.md, SpotOn): every camera, its tracks."""
    return {
        "type": "tracking_update",
        "payload": {
            "global_frame_index": global_frame_index,
            "scene_id": scene_id,
            "timestamp_processed_utc": processed_at.isoformat(),
            "cameras": {
                camera_id: {
                    "image_source": f"{global_frame_index:06d}.jpg",
                    "tracks": [track.to_wire() for track in camera_tracks],
                }
                for camera_id, camera_tracks in tracks.items()
            },
        },
    }


def batch_complete(task_id: str, frames: int) -> dict[str, Any]:
    """SpotOn's `batch_processing_complete`; a task here is one batch (index 0)."""
    return {
        "type": "batch_processing_complete",
        "payload": {"task_id": task_id, "sub_video_batch_index": 0, "frames": frames},
    }


# --- a batch task's videos (SpotOn's media_available and media route) ------------------------

# What the media route says a stored video is, by the extension `media.probe_video` chose.
CONTENT_TYPES = {
    "mp4": "video/mp4",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
    "ts": "video/mp2t",
}
# Statuses before a batch task has found its videos: no media_available yet.
NO_MEDIA_YET = frozenset({TaskStatus.QUEUED, TaskStatus.INITIALIZING, TaskStatus.DOWNLOADING_DATA})


def content_type(filename: str) -> str:
    return CONTENT_TYPES.get(filename.rpartition(".")[2], "application/octet-stream")


def media_file(object_key: str) -> str:
    """A stored video's file name in its URL (`<video id>.<extension>`, the key's last part)."""
    return object_key.rpartition("/")[2]


def media_available(
    task_id: str, spec: EnvironmentSpec, videos: Mapping[str, VideoFacts]
) -> dict[str, Any]:
    """SpotOn's `media_available` for a task's videos: one batch (index 0) of whole videos,
    each at the gateway's media route, which serves it as long as the task is kept."""
    urls = []
    for camera in spec.cameras:
        facts = videos.get(camera.camera_id)
        if facts is None or facts.object_key is None:
            continue
        filename = media_file(facts.object_key)
        urls.append(
            {
                "camera_id": camera.camera_id,
                "sub_video_filename": filename,
                "url": MEDIA_PATH.format(
                    task_id=task_id,
                    environment_id=spec.environment_id,
                    camera_id=camera.camera_id,
                    filename=filename,
                ),
                "start_global_frame_index": 0,
                "num_frames_in_sub_video": facts.frames,
            }
        )
    return {
        "type": "media_available",
        "payload": {"sub_video_batch_index": 0, "media_urls": urls},
    }


def media_key(videos: Mapping[str, VideoFacts], *, camera_id: str, filename: str) -> str | None:
    """The object key of the task's video that a media URL names (None: it names none)."""
    facts = videos.get(camera_id)
    if facts is None or facts.object_key is None or media_file(facts.object_key) != filename:
        return None
    return facts.object_key


def task_videos(environment: Mapping[str, Any]) -> dict[str, VideoFacts]:
    """The videos of a task's copy of its environment (as it was when the task started)."""
    return {
        camera: VideoFacts(**facts) for camera, facts in (environment.get("videos") or {}).items()
    }


def edge_detections(frame: EdgeFrame) -> list[Detection]:
    """An edge frame's boxes for the vision core (its embeddings as float32 vectors)."""
    return [
        Detection(
            d.bbox_xyxy,
            d.confidence,
            None if d.embedding is None else np.asarray(d.embedding, dtype=np.float32),
        )
        for d in frame.detections
    ]


class ObservationLike(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def camera_id(self) -> str: ...
    @property
    def frame_index(self) -> int: ...
    @property
    def captured_at(self) -> datetime: ...
    @property
    def track_id(self) -> int: ...
    @property
    def global_id(self) -> str: ...
    @property
    def x1(self) -> float: ...
    @property
    def y1(self) -> float: ...
    @property
    def x2(self) -> float: ...
    @property
    def y2(self) -> float: ...
    @property
    def confidence(self) -> float: ...
    @property
    def map_x(self) -> float | None: ...
    @property
    def map_y(self) -> float | None: ...


def observation_view(row: ObservationLike) -> dict[str, Any]:
    return {
        "camera_id": row.camera_id,
        "frame_index": row.frame_index,
        "timestamp": row.captured_at.isoformat(),
        "track_id": row.track_id,
        "global_id": row.global_id,
        "bbox_xyxy": [row.x1, row.y1, row.x2, row.y2],
        "confidence": row.confidence,
        "map_coords": None if row.map_x is None or row.map_y is None else [row.map_x, row.map_y],
    }


def mot_text(rows: Iterable[ObservationLike]) -> str:
    """MOTChallenge rows: `frame,id,bb_left,bb_top,bb_width,bb_height,conf,x,y,z`.

    Frames count from 1 (MOT) where ours count from 0; the id is the camera's track id (MOT
    files are per sequence, so one camera); x, y are the map position, -1 without one."""
    lines = []
    for row in rows:
        x = -1.0 if row.map_x is None else row.map_x
        y = -1.0 if row.map_y is None else row.map_y
        lines.append(
            f"{row.frame_index + 1},{row.track_id},{row.x1:.2f},{row.y1:.2f},"
            f"{row.x2 - row.x1:.2f},{row.y2 - row.y1:.2f},{row.confidence:.4f},"
            f"{x:.4f},{y:.4f},-1\n"
        )
    return "".join(lines)


# --- live tasks: edge frames into steps ------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    first_seen: float
    frames: dict[str, EdgeFrame] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """One frame index of a live task: what each camera that sent it saw."""

    frame_index: int
    frames: dict[str, EdgeFrame]


class FrameAssembler:
    """Groups a live task's edge frames by frame index into steps, in order.

    A step is ready when every camera sent its frame, or `wait` seconds after the first did
    (the silent ones count as seeing nobody), or as soon as a later frame index is ready (steps
    never go back). A frame for an index already stepped is late: dropped, and counted.
    """

    def __init__(self, cameras: Iterable[str], *, wait: float, last_index: int = -1) -> None:
        self.cameras = frozenset(cameras)
        self.wait = wait
        self.last_index = last_index
        self._pending: dict[int, _Pending] = {}
        self.late = 0

    def add(self, frame: EdgeFrame, now: float) -> bool:
        """Take a frame; False when it is late (its index was already stepped)."""
        if frame.frame_index <= self.last_index:
            self.late += 1
            return False
        pending = self._pending.setdefault(frame.frame_index, _Pending(now))
        pending.frames[frame.camera_id] = frame
        return True

    def ready(self, now: float) -> list[Step]:
        """The steps that can be taken now, oldest first."""
        ready_upto = -1
        for index, pending in self._pending.items():
            if set(pending.frames) >= self.cameras or now - pending.first_seen >= self.wait:
                ready_upto = max(ready_upto, index)
        steps = []
        for index in sorted(i for i in self._pending if i <= ready_upto):
            steps.append(Step(index, self._pending.pop(index).frames))
            self.last_index = index
        return steps

    def next_deadline(self) -> float | None:
        """When the oldest waiting step becomes ready by time (None: nothing waits)."""
        if not self._pending:
            return None
        return min(p.first_seen for p in self._pending.values()) + self.wait


# --- live tasks: relayed phone frames and rtsp cameras --------------------------------------

# The relay's device when a frame has no `x-device` header (the seed's one phone).
DEFAULT_DEVICE = "phone"
_DEVICE = re.compile(DEVICE_PATTERN)


@dataclass(frozen=True, slots=True)
class RelayFrame:
    """One decoded phone frame from the video relay (`video_frames_exchange`), still a JPEG."""

    device: str
    width: int
    height: int
    captured_at: datetime
    jpeg: bytes


def _header_text(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, bool) or value is None:
        return None
    return str(value)


def _header_int(headers: Mapping[str, Any], name: str) -> int | None:
    text = _header_text(headers, name)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def relay_frame(headers: Mapping[str, Any], body: bytes, now: datetime) -> RelayFrame | None:
    """A frame as the relay (and the gateway's `/ws/phone`) publish it: headers `x-device`,
    `width`, `height` and `ntp_time` (the NTP-corrected receive time in ns), strings as the
    seed sent them. None when the device or the size is missing or not what they write."""
    device = _header_text(headers, "x-device") or DEFAULT_DEVICE
    width, height = _header_int(headers, "width"), _header_int(headers, "height")
    if not _DEVICE.match(device) or width is None or height is None or not body:
        return None
    ntp_ns = _header_int(headers, "ntp_time")
    captured = now
    if ntp_ns is not None and 0 < ntp_ns / 1e9 < MAX_EPOCH_S:
        captured = datetime.fromtimestamp(ntp_ns / 1e9, UTC)
    return RelayFrame(device, width, height, captured, body)


@dataclass(frozen=True, slots=True)
class CameraFrame:
    """A frame of a camera the task reads itself (rtsp), decoded (BGR)."""

    image: Frame
    captured_at: datetime


class LatestFrames:
    """The newest frame of each relay or rtsp camera, waiting for the detector.

    A frame that comes while an older one of its camera still waits replaces it (latest wins:
    a live task tracks what is seen now, never a backlog); `take` empties it. Relayed frames of
    other devices are ignored. A frame of another size than the camera's is kept: it is scaled
    to the declared size once decoded (`media.fit`).
    """

    def __init__(self, spec: EnvironmentSpec) -> None:
        self.cameras = {
            camera.source.device: camera
            for camera in spec.cameras
            if isinstance(camera.source, RelaySource)
        }
        self._waiting: dict[str, RelayFrame | CameraFrame] = {}

    def put(self, frame: RelayFrame) -> str:
        """Keep a relayed frame; its outcome: `waiting`, `dropped` (it replaced one that
        waited) or `ignored` (not a device of this task)."""
        camera = self.cameras.get(frame.device)
        if camera is None:
            return "ignored"
        return self.keep(camera.camera_id, frame)

    def keep(self, camera_id: str, frame: RelayFrame | CameraFrame) -> str:
        """Keep a camera's frame: `waiting`, or `dropped` when it replaced one that waited."""
        replaced = self._waiting.pop(camera_id, None)
        self._waiting[camera_id] = frame
        return "waiting" if replaced is None else "dropped"

    def take(self) -> dict[str, RelayFrame | CameraFrame]:
        """Every waiting frame, by camera id (empty when none waits)."""
        taken, self._waiting = self._waiting, {}
        return taken

    def __len__(self) -> int:
        return len(self._waiting)
