"""Running tasks: the run command's whole life, batch and live runs, checkpoints, live routing.

A task's `run` command is held unacked for as long as its run lasts: the commands queue's
prefetch (`tasks_per_worker`) is then exactly how many tasks a replica runs, the other replicas
take the rest (competing consumers), and a replica that dies (kill -9, a lost node) hands its
tasks back at once, because RabbitMQ requeues what a closed connection held. The replica that
gets the command again takes the task up (`store.claim_task`: a new generation) and resumes from
its checkpoint: the frame index and `MultiCameraTracker.snapshot()` committed in the same
transaction as the observations up to that frame, so no frame is stored twice and none is lost.
An earlier run that still lives (a partition, not a crash) fails its next checkpoint's fence and
ends. A replica that is asked to stop (SIGTERM) hands its tasks back the same way, with a fresh
command (a requeue would count toward the queue's delivery limit).

Detection, decoding and tracking run in a worker thread, one step (every camera's frame, one
detector call) at a time; the event loop publishes, commits and listens for stops meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage

from edgeway.common.broker import encode, publish
from edgeway.common.db import with_db_retry
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.tracking import (
    CLIENT_TYPE,
    COMMAND_TYPE,
    EdgeFrame,
    EnvironmentSpec,
    ExternalSource,
    RelaySource,
    RtspSource,
    TaskStatus,
)
from edgeway.common.topology import Channels, Topology
from edgeway.tracker import domain, feeds, store
from edgeway.tracker.media import LocalVideo, VideoReader
from edgeway.tracker.settings import TrackerSettings
from edgeway.tracker.vision import (
    Detection,
    Detector,
    Embedder,
    Frame,
    HogDetector,
    MultiCameraTracker,
    TrackOutput,
    make_detector,
    make_embedder,
)

if TYPE_CHECKING:
    from edgeway.tracker.app import Deps

SERVICE = "tracker"
T = TypeVar("T")
# A replica shutting down waits this long before passing on a command it got, so that the
# command bounces slowly (if no other replica runs) while the process ends.
HANDOFF_PAUSE_S = 0.5

log = get_logger("edgeway.tracker.flows")


class Lost(Exception):  # noqa: N818 - not an error: the task is no longer this run's
    """The task was stopped, or another run took it up: this run ends without a word."""


class TaskFailedError(Exception):
    """The task cannot go on; the reason is the client's (`details` of the FAILED status)."""


# --- inference ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inference:
    """The detector and embedder every run of a replica shares, and the threads they run in.

    One detector call at a time per replica (a lock): the models are not documented as thread
    safe, and on a CPU concurrent calls only share the same cores.
    """

    detector: Detector
    embedder: Embedder | None
    pool: concurrent.futures.ThreadPoolExecutor
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: TrackerSettings) -> Inference:
        """Load the configured models; a missing file or runtime fails the start, with why."""
        detector: Detector
        if settings.detector == "hog":
            detector = HogDetector(
                confidence_threshold=settings.detection_confidence,
                scale=settings.hog_scale,
                tight_boxes=settings.hog_tight_boxes,
            )
        else:
            detector = make_detector(
                settings.detector,
                confidence_threshold=settings.detection_confidence,
                weights_path=settings.detector_weights,
                device=settings.device,
            )
        embedder = make_embedder(
            settings.embedder, weights_path=settings.embedder_weights, device=settings.device
        )
        pool = concurrent.futures.ThreadPoolExecutor(
            settings.tasks_per_worker, thread_name_prefix="edgeway-tracker"
        )
        return cls(detector, embedder, pool)

    def detect(self, frames: list[Frame]) -> list[list[Detection]]:
        with self.lock:
            return self.detector.detect(frames)

    async def call(self, function: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.pool.submit(function))

    def submit(self, function: Callable[[], T]) -> concurrent.futures.Future[T]:
        """For work whose thread side must be waited for even when its caller stops waiting."""
        return self.pool.submit(function)


# --- what runs report --------------------------------------------------------------------------


async def publish_client(deps: Deps, task_id: str, message: Mapping[str, Any]) -> None:
    """A `/ws/tracking/{task_id}` message: live, lossy, never worth failing a task over."""
    try:
        await publish(
            deps.broker,
            encode(message),
            envelope=Envelope(type=CLIENT_TYPE, producer=SERVICE),
            exchange=deps.topology.broadcast,
            routing_key=Channels.tracking_task(task_id),
            durable=False,
        )
    except Exception as exc:  # noqa: BLE001 - the broker is away: clients miss this one
        log.warning("client message not published", task_id=task_id, error=repr(exc))


async def queue_run(broker: RabbitBroker, topology: Topology, task_id: str) -> None:
    """The durable `run` command of a task (confirmed before this returns)."""
    await publish(
        broker,
        encode({"command": "run", "task_id": task_id}),
        envelope=Envelope(type=COMMAND_TYPE, producer=SERVICE),
        exchange=topology.tracking_commands,
        durable=True,
    )


@dataclass(slots=True)
class TaskState:
    """A run's view of its task row (what the status messages show)."""

    id: str
    environment_id: str
    mode: str
    status: str
    progress: float
    current_step: str
    details: str
    frames_done: int
    frames_total: int | None
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: store.Task) -> TaskState:
        return cls(
            row.id,
            row.environment_id,
            row.mode,
            row.status,
            row.progress,
            row.current_step,
            row.details,
            row.frames_done,
            row.frames_total,
            row.created_at,
            row.started_at,
            row.updated_at,
        )


class Run:
    """What batch and live runs share: the task as taken up, checkpoints, status, updates."""

    def __init__(self, deps: Deps, row: store.Task) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.task_id = row.id
        self.generation = row.generation
        self.state = TaskState.of(row)
        self.spec = EnvironmentSpec.model_validate(row.environment["spec"])
        self.videos = domain.task_videos(row.environment)
        self.started_at = row.started_at or row.created_at
        self.checkpoint_frame: int = row.checkpoint_frame
        self.checkpoint: dict[str, Any] | None = row.checkpoint
        self.last_frame = row.checkpoint_frame
        self.rows: list[store.ObservationRow] = []
        self.steps_since_commit = 0
        self.last_commit = time.monotonic()
        self.throttle = domain.StatusThrottle(self.settings.status_interval_s)

    # --- the vision core ----------------------------------------------------------------------

    def build_tracker(self) -> MultiCameraTracker:
        tracker = MultiCameraTracker(
            domain.camera_specs(self.spec),
            [(a, b) for a, b in self.spec.overlaps],
            embedder=self.deps.inference.embedder,
        )
        if self.checkpoint is not None:
            tracker.restore(self.checkpoint["tracker"])
            self.deps.metrics.tasks_resumed.inc()
            log.info("task resumed", task_id=self.task_id, after_frame=self.checkpoint_frame)
        return tracker

    # --- commits ------------------------------------------------------------------------------

    async def commit(
        self,
        status: TaskStatus,
        *,
        step: str,
        details: str,
        progress: float | None = None,
        tracker: MultiCameraTracker | None = None,
    ) -> None:
        """Observations so far and the task's progress, in one fenced transaction (Lost when the
        task is no longer this run's)."""
        if tracker is not None:
            self.checkpoint = {"tracker": tracker.snapshot()}
            self.checkpoint_frame = self.last_frame
        now = datetime.now(UTC)
        progress = self.state.progress if progress is None else progress
        update = store.Progress(
            status=status,
            progress=progress,
            current_step=step,
            details=details,
            frames_done=self.state.frames_done,
            checkpoint_frame=self.checkpoint_frame,
            checkpoint=self.checkpoint,
            frames_total=self.state.frames_total,
        )
        rows = self.rows

        async def save() -> bool:
            async with self.deps.sessions.begin() as session:
                if not await store.save_progress(
                    session=session,
                    task_id=self.task_id,
                    generation=self.generation,
                    progress=update,
                    now=now,
                ):
                    return False
                await store.insert_observations(session=session, task_id=self.task_id, rows=rows)
                return True

        if not await with_db_retry(save, delays=self.settings.db_retry_delays, forever=True):
            raise Lost
        self.deps.metrics.observations.inc(len(rows))
        self.rows = []
        self.steps_since_commit = 0
        self.last_commit = time.monotonic()
        self.state.status, self.state.current_step, self.state.details = status, step, details
        self.state.progress = progress
        self.state.updated_at = now
        await self.announce()

    async def announce(self) -> None:
        """A status update, if one is due (always at a change of status)."""
        if self.throttle.due(self.state.status, time.monotonic()):
            await publish_client(self.deps, self.task_id, domain.status_message(self.state))

    def checkpoint_due(self) -> bool:
        return (
            self.steps_since_commit >= self.settings.checkpoint_frames
            or time.monotonic() - self.last_commit >= self.settings.checkpoint_interval_s
        )

    async def tracked(
        self,
        frame_index: int,
        tracks: Mapping[str, list[TrackOutput]],
        captured: Mapping[str, datetime],
    ) -> None:
        """One step done: its update goes to clients now, its rows with the next checkpoint."""
        await publish_client(
            self.deps,
            self.task_id,
            domain.tracking_update(
                global_frame_index=frame_index,
                scene_id=self.spec.environment_id,
                processed_at=datetime.now(UTC),
                tracks=tracks,
            ),
        )
        for camera_id, outputs in tracks.items():
            self.rows.extend(
                store.ObservationRow(
                    camera_id=camera_id,
                    frame_index=frame_index,
                    captured_at=captured[camera_id],
                    track_id=out.track_id,
                    global_id=out.global_id,
                    bbox=out.bbox_xyxy,
                    confidence=out.confidence,
                    map_coords=out.map_coords,
                )
                for out in outputs
            )
        self.last_frame = frame_index
        self.state.frames_done += 1
        self.steps_since_commit += 1
        self.deps.metrics.frames.inc()

    async def fail(self, reason: str) -> None:
        log.warning("task failed", task_id=self.task_id, reason=reason)
        await self.commit(TaskStatus.FAILED, step="Failed", details=reason)


# --- batch runs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepResult:
    tracks: dict[str, list[TrackOutput]]
    source_frames: dict[str, int]  # the video frame each camera's image came from


class BatchPipeline:
    """The thread side of a batch run: every camera's video read in lockstep, detected in one
    call per step, tracked. Used from one thread at a time (the run awaits each step)."""

    def __init__(
        self,
        readers: dict[str, VideoReader],
        tracker: MultiCameraTracker,
        inference: Inference,
    ) -> None:
        self.readers = readers
        self.tracker = tracker
        self.inference = inference

    def step(self, frame_index: int) -> StepResult:
        frames: dict[str, Frame] = {}
        sources: dict[str, int] = {}
        for camera_id, reader in self.readers.items():
            read = reader.read()
            if read is not None:
                sources[camera_id], frames[camera_id] = read
        cameras = list(frames)
        detections = self.inference.detect([frames[c] for c in cameras]) if cameras else []
        tracks = self.tracker.update(
            frame_index, dict(zip(cameras, detections, strict=True)), frames
        )
        return StepResult({c: tracks[c] for c in cameras}, sources)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class BatchRun(Run):
    """Every camera's video, in lockstep, to the end (SpotOn's batch processing)."""

    async def execute(self) -> None:
        await self.commit(
            TaskStatus.INITIALIZING, step="Initializing", details="loading the tracker"
        )
        tracker = self.build_tracker()
        await self.commit(
            TaskStatus.DOWNLOADING_DATA,
            step="Opening videos",
            details=f"{len(self.spec.cameras)} cameras from the object store",
        )
        skips = {}
        opened: dict[str, LocalVideo] = {}
        try:
            for camera in self.spec.cameras:
                facts = self.videos[camera.camera_id]
                try:
                    if facts.object_key is None:
                        raise FileNotFoundError(camera.camera_id)
                    opened[camera.camera_id] = await self.deps.objects.open(facts.object_key)
                except FileNotFoundError:
                    raise TaskFailedError(
                        f"the video of camera {camera.camera_id} is not in the store"
                    ) from None
                skips[camera.camera_id] = domain.frame_skip(facts.fps, self.settings.target_fps)
            await self._track_videos(tracker, opened, skips)
        finally:
            await asyncio.to_thread(lambda: [self.deps.objects.close(v) for v in opened.values()])

    async def _track_videos(
        self,
        tracker: MultiCameraTracker,
        opened: Mapping[str, LocalVideo],
        skips: Mapping[str, int],
    ) -> None:
        """Read every camera's video in lockstep from the checkpoint on, to the end."""
        inference = self.deps.inference
        paths = {camera: video.path for camera, video in opened.items()}
        start = self.checkpoint_frame + 1

        def open_pipeline() -> BatchPipeline:
            readers = {
                camera: VideoReader(path, skip=skips[camera], start=start)
                for camera, path in paths.items()
            }
            return BatchPipeline(readers, tracker, inference)

        pipeline = await inference.call(open_pipeline)
        total = max(
            domain.steps_of(self.videos[camera].frames, skip) for camera, skip in skips.items()
        )
        self.state.frames_total = total
        in_flight: concurrent.futures.Future[StepResult] | None = None
        try:
            await self.commit(
                TaskStatus.PROCESSING,
                step="Processing",
                details=f"{len(paths)} cameras, {total} frames each at most",
            )
            await publish_client(
                self.deps,
                self.task_id,
                domain.media_available(self.task_id, self.spec, self.videos),
            )
            for frame_index in range(start, total):
                started = time.perf_counter()
                in_flight = inference.submit(lambda i=frame_index: pipeline.step(i))  # type: ignore[misc]
                result = await asyncio.wrap_future(in_flight)
                self.deps.metrics.step_seconds.observe(time.perf_counter() - started)
                if not result.tracks:
                    break  # every video ended early (a frame count that was too high)
                captured = {
                    camera: self.started_at
                    + timedelta(seconds=source / (self.videos[camera].fps or domain.FALLBACK_FPS))
                    for camera, source in result.source_frames.items()
                }
                await self.tracked(frame_index, result.tracks, captured)
                self.state.progress = self.state.frames_done / total
                if self.checkpoint_due():
                    await self.commit(
                        TaskStatus.PROCESSING,
                        step="Processing",
                        details=f"frame {frame_index + 1} of {total}",
                        tracker=tracker,
                    )
                else:
                    await self.announce()
            await self.commit(
                TaskStatus.COMPLETED,
                step="Completed",
                details=f"{self.state.frames_done} frames tracked",
                progress=1.0,
                tracker=tracker,
            )
            await publish_client(
                self.deps, self.task_id, domain.batch_complete(self.task_id, self.state.frames_done)
            )
        finally:
            # A step may still run in its thread (the run was stopped): close after it.
            if in_flight is not None:
                in_flight.add_done_callback(lambda _: pipeline.close())
            else:
                pipeline.close()


# --- live runs --------------------------------------------------------------------------------


class Inbox:
    """A live task's edge frames on this replica, bounded: the oldest go first when it is full."""

    def __init__(self, spec: EnvironmentSpec, size: int) -> None:
        self.spec = spec
        self.size = size
        self._frames: asyncio.Queue[EdgeFrame] = asyncio.Queue()
        self.dropped = 0

    def put(self, frame: EdgeFrame) -> None:
        if self._frames.qsize() >= self.size:
            self._frames.get_nowait()
            self.dropped += 1
        self._frames.put_nowait(frame)

    async def get(self, within: float) -> EdgeFrame | None:
        """The next frame, or None when none came within `within` seconds."""
        try:
            return await asyncio.wait_for(self._frames.get(), timeout=max(within, 0.0))
        except TimeoutError:
            return None


# Edge frames waiting for one live task: 10 s of 8 cameras at 30 fps.
INBOX_SIZE = 2400


class LiveRouter:
    """Which environments this replica runs live tasks on, and their inboxes.

    A live task binds `<environment_id>.*` on the replica's own detections queue while it runs,
    so only its replica gets that environment's frames; what no replica takes goes to the
    detections' alternate exchange (`handlers.on_unrouted`).
    """

    def __init__(self) -> None:
        self._inboxes: dict[str, Inbox] = {}
        self._bind: Callable[[str, bool], Any] | None = None

    def connect(self, bind: Callable[[str, bool], Any]) -> None:
        """`bind(environment_id, on)`: (un)bind that environment's frames to this replica."""
        self._bind = bind

    def inbox(self, environment_id: str) -> Inbox | None:
        return self._inboxes.get(environment_id)

    async def open(self, spec: EnvironmentSpec) -> Inbox:
        inbox = self._inboxes[spec.environment_id] = Inbox(spec, INBOX_SIZE)
        if self._bind is not None:
            await self._bind(spec.environment_id, True)
        return inbox

    async def close(self, environment_id: str) -> None:
        if self._inboxes.pop(environment_id, None) is not None and self._bind is not None:
            try:
                await self._bind(environment_id, False)
            except Exception as exc:  # noqa: BLE001 - the queue goes with the connection anyway
                log.warning("unbind failed", environment_id=environment_id, error=repr(exc))


class LiveRun(Run):
    """Live cameras until stopped: `external` cameras' edge detections, stepped by frame index
    (`domain.FrameAssembler`), and `relay` and `rtsp` cameras' frames, detected here.

    Their frames are detected as fast as the detector goes, the newest of each camera each
    time (`feeds.CameraFeed`: what came meanwhile is dropped and counted). With external
    cameras the edge devices' frame indexes drive the steps, and each other camera joins a step
    with its newest detections not tracked yet; without, each detection round is a step,
    numbered on from the last. A camera with nothing new at a step sees nobody in it.
    """

    def __init__(self, deps: Deps, row: store.Task) -> None:
        super().__init__(deps, row)
        self.fed: dict[str, feeds.Seen] = {}  # detected, not tracked yet
        self.fed_ready = asyncio.Event()

    async def execute(self) -> None:
        await self.commit(
            TaskStatus.INITIALIZING, step="Initializing", details="loading the tracker"
        )
        tracker = self.build_tracker()
        external = [c.camera_id for c in self.spec.cameras if isinstance(c.source, ExternalSource)]
        fed = [c for c in self.spec.cameras if isinstance(c.source, RelaySource | RtspSource)]
        assembler = domain.FrameAssembler(
            external, wait=self.settings.live_step_wait_s, last_index=self.checkpoint_frame
        )
        inbox = await self.deps.live.open(self.spec) if external else None
        feed: feeds.CameraFeed | None = None
        detecting: asyncio.Task[None] | None = None
        try:
            if fed:
                feed = await feeds.CameraFeed.open(self.deps, self.task_id, self.spec)
                detecting = asyncio.create_task(self._detect_fed(feed))
            kinds = [("edge detections", len(external))]
            kinds += [
                (f"{kind} video", sum(c.source.kind == kind for c in fed))
                for kind in ("relay", "rtsp")
            ]
            parts = [f"{what} of {n} camera{'s' * (n != 1)}" for what, n in kinds if n]
            await self.commit(TaskStatus.PROCESSING, step="Tracking", details=", ".join(parts))
            while True:
                if detecting is not None and detecting.done():
                    detecting.result()  # the feed failed: so does the task, with why
                    raise TaskFailedError("camera frames are no longer detected")
                if inbox is None:
                    await self._next_fed(tracker)
                else:
                    await self._next(inbox, assembler, tracker)
        finally:
            if detecting is not None:
                detecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await detecting
            if feed is not None:
                await feed.close()
            if inbox is not None:
                await self.deps.live.close(self.spec.environment_id)

    async def _detect_fed(self, feed: feeds.CameraFeed) -> None:
        """Detect the newest relay and rtsp frames, round after round, for the next step."""
        while True:
            try:
                frames = await feed.next()
            except feeds.FeedError as exc:
                raise TaskFailedError(str(exc)) from None
            detected = await self.deps.inference.call(
                lambda f=frames: feeds.detect(self.deps.inference, self.spec, f)  # type: ignore[misc]
            )
            for camera_id in detected.undecoded:
                feed.count(camera_id, "rejected")
            for camera_id, size in detected.scaled.items():
                feed.scaled(camera_id, size)
            for camera_id in self.fed.keys() & detected.seen.keys():
                feed.count(camera_id, "dropped")
            self.fed.update(detected.seen)
            if detected.seen:
                self.fed_ready.set()

    def _take_fed(self) -> dict[str, feeds.Seen]:
        taken, self.fed = self.fed, {}
        self.fed_ready.clear()
        return taken

    async def _next_fed(self, tracker: MultiCameraTracker) -> None:
        """No external cameras: each detection round of the relay and rtsp cameras is a step."""
        wake = self.last_commit + self.settings.checkpoint_interval_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.fed_ready.wait(), timeout=max(wake - time.monotonic(), 0.0))
        seen = self._take_fed()
        if seen:
            await self._step(tracker, self.last_frame + 1, {}, seen)
        await self._checkpoint_or_announce(tracker)

    async def _next(
        self, inbox: Inbox, assembler: domain.FrameAssembler, tracker: MultiCameraTracker
    ) -> None:
        now = time.monotonic()
        wake = self.last_commit + self.settings.checkpoint_interval_s
        deadline = assembler.next_deadline()
        if deadline is not None:
            wake = min(wake, deadline)
        frame = await inbox.get(wake - now)
        if frame is not None and not assembler.add(frame, time.monotonic()):
            self.deps.metrics.edge_frames.labels("late").inc()
        for step in assembler.ready(time.monotonic()):
            await self._step(tracker, step.frame_index, step.frames, self._take_fed())
        await self._checkpoint_or_announce(tracker)

    async def _step(
        self,
        tracker: MultiCameraTracker,
        frame_index: int,
        edge: Mapping[str, EdgeFrame],
        seen: Mapping[str, feeds.Seen],
    ) -> None:
        """Track one step: the edge frames that came for it and the relay and rtsp cameras seen."""
        # Every camera is updated (one with nothing new sees nobody); clients hear of those
        # that had a frame.
        detections: dict[str, list[Detection]] = {c.camera_id: [] for c in self.spec.cameras}
        detections.update({c: domain.edge_detections(f) for c, f in edge.items()})
        detections.update({c: s.detections for c, s in seen.items()})
        images = {c: s.image for c, s in seen.items()}
        tracks = await self.deps.inference.call(
            lambda: tracker.update(frame_index, detections, images)
        )
        self.deps.metrics.edge_frames.labels("tracked").inc(len(edge))
        for camera_id in seen:
            source = self.spec.camera(camera_id)
            kind = "relay" if source is None else source.source.kind
            self.deps.metrics.camera_frames.labels(kind, "tracked").inc()
        captured = {c: datetime.fromtimestamp(f.timestamp, UTC) for c, f in edge.items()}
        captured.update({c: s.captured_at for c, s in seen.items()})
        await self.tracked(frame_index, {c: tracks[c] for c in captured}, captured)

    async def _checkpoint_or_announce(self, tracker: MultiCameraTracker) -> None:
        if self.checkpoint_due():
            await self.commit(
                TaskStatus.PROCESSING,
                step="Tracking",
                details=f"{self.state.frames_done} frames tracked",
                tracker=tracker,
            )
        else:
            await self.announce()


# --- the run command --------------------------------------------------------------------------


@dataclass(slots=True)
class _Running:
    runner: asyncio.Task[None] | None = None
    reason: str | None = None  # "stop" or "release" once asked to end


class TaskRuns:
    """The runs of this replica, each held by its run command's delivery."""

    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}
        self._handlers: set[asyncio.Future[Any]] = set()
        self.closing = False  # shutting down: commands that still come are passed on

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._running

    async def handle(self, message: RabbitMessage, deps: Deps) -> None:
        """Run the task a `run` command names; ack (or hand back) when the run is over."""
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            await self._handle(message, deps)
        except Exception:
            # Unacked, the command would hold a prefetch slot until the connection closes:
            # back to the queue, whose delivery limit dead-letters one that always fails.
            log.exception("run command failed; requeued")
            await message.nack(requeue=True)
        finally:
            if handler is not None:
                self._handlers.discard(handler)

    async def _handle(self, message: RabbitMessage, deps: Deps) -> None:
        try:
            body = orjson.loads(message.body)
            task_id = str(body["task_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("run command without a task id dropped", body=message.body[:200])
            await message.ack()
            return
        if self.closing:
            # Its consumer still runs while this replica hands its tasks back, and may get one
            # of them again: another replica (or this one, restarted) takes a fresh command.
            await asyncio.sleep(HANDOFF_PAUSE_S)
            await queue_run(deps.broker, deps.topology, task_id)
            await message.ack()
            return
        now = datetime.now(UTC)

        async def claim() -> store.Task | None:
            async with deps.sessions.begin() as session:
                return await store.claim_task(
                    session=session, task_id=task_id, owner=deps.settings.replica_id, now=now
                )

        row = await with_db_retry(claim, delays=deps.settings.db_retry_delays, forever=True)
        if row is None:  # finished, stopped before it ran, or unknown: nothing to do
            await message.ack()
            return
        run: BatchRun | LiveRun = LiveRun(deps, row) if row.mode == "live" else BatchRun(deps, row)
        entry = self._running[task_id] = _Running()
        deps.metrics.tasks_running.inc()
        try:
            entry.runner = asyncio.create_task(self._execute(run))
            await asyncio.wait([entry.runner])
        finally:
            if entry.runner is not None and not entry.runner.done():
                entry.runner.cancel()  # this handler was cancelled: its run goes with it
            del self._running[task_id]
            deps.metrics.tasks_running.dec()
        if entry.reason == "release":
            # Handed back with a fresh command: another replica resumes from the checkpoint.
            await queue_run(deps.broker, deps.topology, task_id)
            log.info("task handed back", task_id=task_id)
        elif entry.reason == "stop":
            deps.metrics.tasks_finished.labels(TaskStatus.STOPPED.value).inc()
        await message.ack()

    async def _execute(self, run: BatchRun | LiveRun) -> None:
        try:
            await run.execute()
        except Lost:
            log.info("task no longer this run's", task_id=run.task_id)
            return
        except TaskFailedError as exc:
            await self._fail(run, str(exc))
        except Exception as exc:
            log.exception("task crashed", task_id=run.task_id)
            await self._fail(run, f"internal error: {type(exc).__name__}: {exc}")
        else:
            run.deps.metrics.tasks_finished.labels(run.state.status).inc()

    @staticmethod
    async def _fail(run: BatchRun | LiveRun, reason: str) -> None:
        try:
            await run.fail(reason)
        except Lost:
            return
        run.deps.metrics.tasks_finished.labels(TaskStatus.FAILED.value).inc()

    def stop(self, task_id: str) -> bool:
        """End the task's run here now (its STOPPED status is already committed)."""
        return self._end(task_id, "stop")

    def _end(self, task_id: str, reason: str) -> bool:
        entry = self._running.get(task_id)
        if entry is None or entry.runner is None:
            return False
        entry.reason = reason
        entry.runner.cancel()
        return True

    async def release_all(self, grace: float) -> None:
        """Hand every task back (shutting down): runs end, commands go back to the queue."""
        self.closing = True
        for task_id in list(self._running):
            self._end(task_id, "release")
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=grace)
