"""A live task's camera frames: relayed phone video and rtsp cameras, the newest of each.

- `relay` cameras: the video relay decodes each live phone's (or drone's) H.264 and publishes
  JPEGs on the fanout `video_frames_exchange` (so does the gateway's `/ws/phone`), with the
  device, size and receive time in headers. The task binds its own queue there while it runs
  (exclusive, auto-deleted, a few frames long with drop-head).
- `rtsp` cameras: the task reads each stream itself with PyAV in a worker thread
  (`edgeway.common.rtsp.capture`: through a loopback relay to an address the destination
  allowlist admits, redirects refused), at the task's frame pacing (`EDGEWAY_TARGET_FPS`),
  reconnecting with backoff; the URL is opened from its seal only here, and logged masked.

Either way the feed keeps the newest frame of each camera (`domain.LatestFrames`) and hands
them to the detector as fast as it goes; frames that came meanwhile are dropped and counted
(`edgeway_tracker_camera_frames_total`). A frame of another size than the camera declares is
scaled to it before detection (`media.fit`; boxes, hand-off rules and the homography are in the
declared pixels) and counted in `edgeway_tracker_camera_frames_scaled_total`; a relayed frame
that is not a JPEG is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
from faststream import AckPolicy
from faststream.rabbit import Channel
from faststream.rabbit.annotations import RabbitMessage

from edgeway.common.broker import whole_message
from edgeway.common.logging import get_logger
from edgeway.common.rtsp.capture import (
    Capture,
    CaptureError,
    CaptureLimits,
    CaptureMode,
    CapturePlan,
    mask_credentials,
)
from edgeway.common.schemas.tracking import CameraConfig, EnvironmentSpec, RtspSource
from edgeway.tracker import domain
from edgeway.tracker.media import decode_jpeg, fit
from edgeway.tracker.vision import Detection, Frame

if TYPE_CHECKING:
    from faststream.rabbit.subscriber import RabbitSubscriber

    from edgeway.tracker.app import Deps
    from edgeway.tracker.flows import Inference

log = get_logger("edgeway.tracker.feeds")

# Frames the broker pushes to the feed before it acks: the feed only keeps the newest.
PREFETCH = 4
# A live task reads its rtsp cameras until it is stopped: a capture "duration" past any run.
FOREVER_S = 10 * 365 * 24 * 3600.0


class FeedError(Exception):
    """A camera the task cannot read any more (the reason names it, credentials masked)."""


@dataclass(frozen=True, slots=True)
class Detected:
    """A detection round: the cameras seen, those whose frame did not decode, and those whose
    frame was scaled to the camera's size (with the size it came in)."""

    seen: dict[str, Seen]
    undecoded: list[str]
    scaled: dict[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Seen:
    """A camera's frame, detected: what a step takes from it."""

    image: Frame
    detections: list[Detection]
    captured_at: datetime


class CameraFeed:
    """One live task's relay and rtsp cameras, the newest frame of each, until closed."""

    def __init__(self, deps: Deps, spec: EnvironmentSpec) -> None:
        self.deps = deps
        self.latest = domain.LatestFrames(spec)
        self.sources = {camera.camera_id: camera.source.kind for camera in spec.cameras}
        self.cameras = {camera.camera_id: camera for camera in spec.cameras}
        self._ready = asyncio.Event()
        self._warned: set[str] = set()
        self._subscriber: RabbitSubscriber | None = None
        self._captures: list[Capture] = []
        self._readers: list[asyncio.Task[None]] = []
        self.failure: str | None = None

    @classmethod
    async def open(cls, deps: Deps, task_id: str, spec: EnvironmentSpec) -> CameraFeed:
        """Bind the task's relay queue and open its rtsp cameras."""
        feed = cls(deps, spec)
        if feed.latest.cameras:
            await feed._subscribe(task_id)
        for camera in spec.cameras:
            if isinstance(camera.source, RtspSource):
                feed._read(camera, camera.source)
        return feed

    def count(self, camera_id: str, outcome: str, amount: int = 1) -> None:
        source = self.sources.get(camera_id, "relay")
        self.deps.metrics.camera_frames.labels(source, outcome).inc(amount)

    def scaled(self, camera_id: str, size: tuple[int, int]) -> None:
        """A camera's frame came in another size and was scaled to the declared one (counted;
        logged once per camera)."""
        self.deps.metrics.camera_frames_scaled.labels(self.sources.get(camera_id, "relay")).inc()
        if camera_id in self._warned:
            return
        self._warned.add(camera_id)
        camera = self.cameras[camera_id]
        log.info(
            "camera frames scaled to the camera's size",
            camera_id=camera_id,
            frame_size=f"{size[0]}x{size[1]}",
            camera_size=f"{camera.width}x{camera.height}",
        )

    # --- relay ------------------------------------------------------------------------------

    async def _subscribe(self, task_id: str) -> None:
        topology = self.deps.topology
        subscriber = self.deps.broker.subscriber(
            topology.tracking_frames_queue(self.deps.settings.replica_id, task_id),
            topology.worldsystem("video_frames"),
            channel=Channel(prefetch_count=PREFETCH),
            ack_policy=AckPolicy.ACK_FIRST,
            decoder=whole_message,
            no_reply=True,
            persistent=False,
        )

        async def on_frame(message: RabbitMessage) -> None:
            self.put(dict(message.headers or {}), message.body)

        subscriber(on_frame)
        await subscriber.start()
        self._subscriber = subscriber
        log.info("relay frames bound", task_id=task_id, devices=sorted(self.latest.cameras))

    def put(self, headers: dict[str, object], body: bytes) -> None:
        """A relayed frame (any device's: the exchange is a fanout)."""
        frame = domain.relay_frame(headers, body, datetime.now(UTC))
        outcome = "rejected" if frame is None else self.latest.put(frame)
        if outcome != "waiting":  # a waiting frame is counted once tracked (or dropped)
            self.deps.metrics.camera_frames.labels("relay", outcome).inc()
        if outcome in ("waiting", "dropped"):
            self._ready.set()
        elif outcome == "rejected" and "?" not in self._warned:
            self._warned.add("?")
            log.warning("relayed frame without its device or size refused")

    # --- rtsp -------------------------------------------------------------------------------

    def _read(self, camera: CameraConfig, source: RtspSource) -> None:
        settings = self.deps.settings
        if source.sealed is None:
            self.failure = f"camera {camera.camera_id}: its rtsp URL was never sealed"
            return
        plan = CapturePlan(
            url=self.deps.cipher.open(source.sealed),
            mode=CaptureMode.CONTINUOUS,
            fps=settings.target_fps,
            duration_s=FOREVER_S,
        )
        limits = CaptureLimits(buffer_frames=1, reconnect_attempts=settings.rtsp_reconnect_attempts)
        capture = Capture(plan, limits, destinations=self.deps.destinations)
        self._captures.append(capture)
        self._readers.append(asyncio.create_task(self._frames_of(camera, capture)))
        log.info("rtsp camera opened", camera_id=camera.camera_id, url=source.url)

    async def _frames_of(self, camera: CameraConfig, capture: Capture) -> None:
        dropped = 0
        try:
            async for captured in capture.frames():
                image: Frame = np.ascontiguousarray(captured.image[..., ::-1])  # RGB to BGR
                frame = domain.CameraFrame(image, captured.captured_at)
                if self.latest.keep(camera.camera_id, frame) == "dropped":
                    self.count(camera.camera_id, "dropped")
                # Frames the capture's own one-frame buffer replaced before this one.
                self.count(camera.camera_id, "dropped", capture.dropped - dropped)
                dropped = capture.dropped
                self._ready.set()
        except CaptureError as exc:
            self.failure = f"camera {camera.camera_id}: {mask_credentials(exc.reason)}"
        else:
            self.failure = f"camera {camera.camera_id}: the rtsp stream ended"
        self._ready.set()

    # --- the detector's side ----------------------------------------------------------------

    async def next(self) -> dict[str, domain.RelayFrame | domain.CameraFrame]:
        """The newest frame of each camera that sent one since the last call (waits for one);
        FeedError once a camera can no longer be read."""
        while not self.latest:
            if self.failure is not None:
                raise FeedError(self.failure)
            self._ready.clear()
            await self._ready.wait()
        return self.latest.take()

    async def close(self) -> None:
        for capture in self._captures:
            capture.cancel()
        for reader in self._readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if self._subscriber is not None:
            try:
                await self._subscriber.stop()
            except Exception as exc:  # noqa: BLE001 - the queue goes with the connection anyway
                log.warning("relay frames not unbound", error=repr(exc))
            self._subscriber = None


def detect(
    inference: Inference,
    spec: EnvironmentSpec,
    frames: dict[str, domain.RelayFrame | domain.CameraFrame],
) -> Detected:
    """Decode the frames, scale each to its camera's declared size, and detect them, every
    camera in one detector call (blocking: a worker thread)."""
    images: dict[str, Frame] = {}
    scaled: dict[str, tuple[int, int]] = {}
    for camera_id, frame in frames.items():
        image = frame.image if isinstance(frame, domain.CameraFrame) else decode_jpeg(frame.jpeg)
        if image is None:
            continue
        camera = spec.camera(camera_id)  # frames are only kept for the spec's cameras
        height, width = image.shape[:2]
        if camera is not None and (width, height) != (camera.width, camera.height):
            scaled[camera_id] = (width, height)
            image = fit(image, camera.width, camera.height)
        images[camera_id] = image
    cameras = list(images)
    found = inference.detect([images[c] for c in cameras]) if cameras else []
    seen = {
        camera_id: Seen(images[camera_id], detections, frames[camera_id].captured_at)
        for camera_id, detections in zip(cameras, found, strict=True)
    }
    return Detected(seen, [c for c in frames if c not in images], scaled)
