"""Settings of the tracker service (`EDGEWAY_` environment variables)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgeway.common.objects import ObjectStoreSettings
from edgeway.common.rtsp.settings import RtspSettings
from edgeway.common.settings import database_url_field


class TrackerSettings(ObjectStoreSettings, RtspSettings):
    """What the tracker reads from its environment (the videos' object store is
    `ObjectStoreSettings`, `EDGEWAY_STORAGE_*`; `rtsp` cameras' destinations and URL key are
    `RtspSettings`)."""

    database_url: str | None = database_url_field("tracker")
    http_port: int = 8085
    # Names this replica's own queues (edge detections, stops); unique per process.
    replica_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Uploaded videos: in an S3 bucket when EDGEWAY_STORAGE_ENDPOINT is set (every replica
    # reaches it), else in a local directory, which several replicas must share as a volume:
    # `objects_dir`, default `<data_dir>/objects/<storage_bucket>`.
    storage_bucket: str = "tracker"
    objects_dir: Path | None = None
    # How long the media route's presigned URLs of an S3 store's videos work (each ask signs
    # a fresh one).
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

    # Tasks one replica runs at once: the prefetch of its consumer on the commands queue, so
    # a replica never takes more than it runs and the others take the rest.
    tasks_per_worker: int = Field(default=2, ge=1, le=64)
    # The vision core's plug-ins (edgeway.tracker.vision). HOG needs no weights file; the
    # others load one from a path (nothing is downloaded). `none`: tracking on motion and map
    # position only; the ImageNet MobileNetV2 features merge different people (README).
    detector: Literal["hog", "fasterrcnn", "onnx"] = "hog"
    detector_weights: Path | None = None
    detection_confidence: float = Field(default=0.5, ge=0, le=1)  # SpotOn's threshold
    # HOG's image pyramid step: 1.05 (the vision core's default, best recall) costs about
    # twice 1.1 per frame on the rendered scenes (scenes.py), for a few points of recall.
    hog_scale: float = Field(default=1.05, gt=1.0, le=1.5)
    # HOG's box is its 64x128 detection window, a margin around the person: shrunk as OpenCV's
    # peopledetect sample does, its bottom is nearer the feet. On the demo scene (every 10th
    # frame of its three cameras): recall at IoU 0.3 0.50 -> 0.77, false boxes 31 -> 1, map
    # error of the bottom-centre median 1.37 -> 0.48 m.
    hog_tight_boxes: bool = True
    embedder: Literal["none", "mobilenetv2", "osnet"] = "none"
    embedder_weights: Path | None = None
    device: str = "auto"  # torch/onnxruntime device: auto, cpu, cuda
    # SpotOn's TARGET_FPS: a video is read at most this many frames a second of its own time
    # (frame skip `round(fps / target_fps)`, at least 1).
    target_fps: float = Field(default=23.0, gt=0)

    # Observations and the tracker's state are committed together every this many frames or
    # seconds, whichever comes first: what a crash can cost, and each commit's size.
    checkpoint_frames: int = Field(default=10, ge=1)
    checkpoint_interval_s: float = Field(default=2.0, gt=0)
    # SpotOn sent two status updates per frame; clients get at most one per this interval (and
    # one at once on every change of status).
    status_interval_s: float = Field(default=0.5, ge=0.1)
    # A live task steps a frame index once every external camera sent it, or this long after
    # the first one did (the others count as seeing nobody).
    live_step_wait_s: float = Field(default=0.25, gt=0)

    # Uploaded videos: the gateway's cap is the first bound, this the service's own.
    max_video_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Finished tasks (and their observations) are deleted after this many days; checked every
    # `retention_sweep_s` by every replica.
    retention_days: float = Field(default=30.0, gt=0)
    retention_sweep_s: float = Field(default=3600.0, gt=0)

    # `rtsp` cameras (where they may be and the key sealing their URLs: `RtspSettings`).
    # Consecutive connections without a frame before the task fails (with the masked reason).
    rtsp_reconnect_attempts: int = Field(default=3, ge=1)
