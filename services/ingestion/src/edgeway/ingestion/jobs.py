"""RTSP captures as background jobs: admitted under a cap, leased, cancellable, never blocking.

A capture is admitted in one transaction that counts the captures running anywhere (active, with
a live lease), all of them and its caller's, and inserts its own row; on PostgreSQL an advisory
lock makes those counts and the insert atomic across replicas. A URL naming an address or port
the destination allowlist refuses is refused then (a host name is checked when connecting).
The replica that admitted it runs it: frames come from `edgeway.common.rtsp.capture` (PyAV in a
worker thread), are re-encoded as JPEG in a worker thread, stored as objects, then committed as
rows with their announcements. While it runs, the job renews its lease; a replica that dies
stops renewing, and the sweeper fails its requests. Cancellation reaches the owner through the
control exchange, and through the lease renewal, which reads the request's status.

Why a capture failed goes to the log only: the request says one thing for every failure, so it
cannot tell a closed port from an open one, or a name that does not resolve from one refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.db import dialect_of
from edgeway.common.logging import get_logger
from edgeway.common.objects import ObjectStore
from edgeway.common.rtsp.capture import (
    Capture,
    CapturedFrame,
    CaptureError,
    CaptureLimits,
    CapturePlan,
    mask_credentials,
)
from edgeway.common.rtsp.credentials import CredentialCipher
from edgeway.common.rtsp.destinations import Destination, DestinationPolicy
from edgeway.common.schemas.ingest import (
    URL_REFUSED,
    Caller,
    CaptureMode,
    IngestReply,
    RequestStatus,
    SourceType,
    StartCapture,
)
from edgeway.ingestion import domain, store
from edgeway.ingestion.domain import CANCELLED_BY_REQUEST, CAPTURE_FAILED, Ending, NewFrame
from edgeway.ingestion.images import ImageSanitizer
from edgeway.ingestion.settings import IngestionSettings

# Any constant: the key of the PostgreSQL advisory lock that serialises admissions.
ADMISSION_LOCK = 0x1A6E57
URL_NOT_ALLOWED = "rtsp_url names a host or port this service may not connect to"

log = get_logger("edgeway.ingestion.jobs")


@dataclass
class JobMetrics:
    frame_stored: Callable[[], None] = lambda: None
    reconnected: Callable[[int], None] = lambda count: None
    dropped: Callable[[int], None] = lambda count: None


@dataclass
class _Running:
    camera_id: str
    meta: dict[str, Any] | None
    task: asyncio.Task[None] | None = None
    capture: Capture | None = None
    cancelled: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


class CaptureJobs:
    """The captures this replica runs."""

    def __init__(
        self,
        *,
        settings: IngestionSettings,
        sessions: async_sessionmaker[AsyncSession],
        objects: ObjectStore,
        sanitizer: ImageSanitizer,
        cipher: CredentialCipher,
        replica_id: str,
        committed: Callable[[], None],
        respond: Callable[[str, Caller], Awaitable[IngestReply]],
        metrics: JobMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._objects = objects
        self._sanitizer = sanitizer
        self._cipher = cipher
        self._replica_id = replica_id
        self._committed = committed  # nudges the outbox relay
        self._respond = respond  # the request as it stands, as its caller sees it
        self._destinations = DestinationPolicy.parse(settings.rtsp_allowed_destinations)
        self._metrics = metrics or JobMetrics()
        self._running: dict[str, _Running] = {}
        self._admission = asyncio.Lock()
        self._lease = timedelta(seconds=settings.job_lease_s)

    @property
    def running(self) -> int:
        return len(self._running)

    # --- admission ----------------------------------------------------------------------------

    async def start(self, command: StartCapture) -> IngestReply:
        request = command.request
        settings = self._settings
        refusal = self._destinations.early_refusal(Destination.of(request.rtsp_url))
        if refusal is not None:
            log.info(
                "capture refused",
                request_id=command.request_id,
                url=mask_credentials(request.rtsp_url),
                reason=refusal,
            )
            return IngestReply(ok=False, error=URL_REFUSED, message=URL_NOT_ALLOWED)
        caller = command.caller.subject
        now = _now()
        async with self._admission, self._sessions.begin() as session:
            if dialect_of(session) == "postgresql":
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK}
                )
            if await session.get(store.IngestionRequest, command.request_id) is not None:
                return IngestReply(
                    ok=False, error="conflict", message=f"request {command.request_id} exists"
                )
            mine = await store.active_captures(session=session, now=now, requester=caller)
            if mine >= settings.max_streams_per_principal:
                return IngestReply(
                    ok=False,
                    error="stream_limit",
                    message=(
                        f"{mine} of your RTSP captures are running, the limit per caller is "
                        f"{settings.max_streams_per_principal}: try again when one has finished"
                    ),
                )
            active = await store.active_captures(session=session, now=now)
            if active >= settings.max_concurrent_streams:
                return IngestReply(
                    ok=False,
                    error="stream_limit",
                    message=(
                        f"{active} RTSP captures are running, the limit is "
                        f"{settings.max_concurrent_streams}: try again when one has finished"
                    ),
                )
            mode = request.capture_mode
            duration = None
            if mode is not CaptureMode.SINGLE_FRAME:
                duration = request.capture_duration or settings.default_capture_duration_s
            await store.add_request(
                session=session,
                request=store.IngestionRequest(
                    id=command.request_id,
                    camera_id=request.camera_id,
                    source_type=SourceType.RTSP.value,
                    status=RequestStatus.IN_PROGRESS.value,
                    requester=caller,
                    rtsp_url=mask_credentials(request.rtsp_url),
                    rtsp_url_sealed=self._cipher.seal(request.rtsp_url),
                    capture_mode=mode.value,
                    capture_duration=duration,
                    fps=request.fps or settings.default_fps,
                    frame_timestamp=request.frame_timestamp,
                    meta_info=request.meta.model_dump(exclude_none=True) if request.meta else None,
                    frames_stored=0,
                    files_rejected=0,
                    owner=self._replica_id,
                    lease_expires_at=now + self._lease,
                    created_at=now,
                    updated_at=now,
                ),
            )
        plan = CapturePlan(
            url=request.rtsp_url,
            mode=mode,
            fps=request.fps or settings.default_fps,
            duration_s=duration,
            change_threshold=settings.change_threshold,
        )
        running = _Running(
            camera_id=request.camera_id,
            meta=request.meta.model_dump(exclude_none=True) if request.meta else None,
        )
        self._running[command.request_id] = running
        running.task = asyncio.create_task(
            self._run(command.request_id, plan, request.frame_timestamp),
            name=f"capture-{command.request_id}",
        )
        log.info(
            "capture started",
            request_id=command.request_id,
            camera_id=request.camera_id,
            url=mask_credentials(request.rtsp_url),
            mode=mode.value,
            duration_s=duration,
        )
        return await self._respond(command.request_id, command.caller)

    # --- cancellation -------------------------------------------------------------------------

    async def cancel(self, request_id: str, caller: Caller) -> IngestReply:
        """Cancel a capture wherever it runs; a finished request stays as it ended. Only its
        requester or an operator may: anyone else is told it does not exist."""
        async with self._sessions.begin() as session:
            request = await store.lock_request(session=session, request_id=request_id)
            if request is None or not domain.may_see(caller, request.requester):
                return IngestReply(ok=False, error="not_found", message=f"no request {request_id}")
            if request.source_type != SourceType.RTSP.value:
                return IngestReply(
                    ok=False, error="conflict", message="only RTSP captures can be cancelled"
                )
            store.finish(
                session=session,
                request=request,
                status=RequestStatus.CANCELLED,
                now=_now(),
                message=CANCELLED_BY_REQUEST,
            )
        self._committed()
        self.stop_local(request_id)
        return await self._respond(request_id, caller)

    def stop_local(self, request_id: str) -> None:
        """Stop the capture if it runs here (a cancellation from any replica)."""
        running = self._running.get(request_id)
        if running is not None:
            running.cancelled = True
            if running.capture is not None:
                running.capture.cancel()

    async def stop_all(self, reason: str) -> None:
        """At shutdown: stop every capture here and fail its request with `reason`."""
        tasks = []
        for request_id, running in list(self._running.items()):
            running.cancelled = True
            if running.capture is not None:
                running.capture.cancel()
            if running.task is not None:
                tasks.append(running.task)
            await self._finish(request_id, RequestStatus.FAILED, reason)
        if tasks:
            await asyncio.wait(tasks, timeout=self._settings.graceful_timeout)

    # --- running ------------------------------------------------------------------------------

    async def _run(
        self, request_id: str, plan: CapturePlan, frame_timestamp: datetime | None
    ) -> None:
        settings = self._settings
        capture = Capture(
            plan,
            CaptureLimits(
                open_timeout_s=settings.open_timeout_s,
                stall_timeout_s=settings.stall_timeout_s,
                reconnect_attempts=settings.reconnect_attempts,
                backoff_initial_s=settings.backoff_initial_s,
                backoff_max_s=settings.backoff_max_s,
                buffer_frames=settings.capture_buffer_frames,
            ),
            destinations=self._destinations,
        )
        running = self._running[request_id]
        running.capture = capture
        heartbeat = asyncio.create_task(self._renew(request_id, running))
        status, message = RequestStatus.COMPLETED, None
        first: datetime | None = None
        try:
            async for frame in capture.frames():
                first = first or frame.captured_at
                # The caller's clock for the first frame, if it gave one (the seed ignored it).
                taken = frame.captured_at
                if frame_timestamp is not None:
                    taken = frame_timestamp + (frame.captured_at - first)
                await self._store(request_id, running, frame, taken)
            if running.cancelled:
                status, message = RequestStatus.CANCELLED, CANCELLED_BY_REQUEST
        except CaptureError as exc:
            log.warning("capture failed", request_id=request_id, reason=exc.reason)
            status, message = RequestStatus.FAILED, CAPTURE_FAILED
        except Exception as exc:
            log.exception("capture failed", request_id=request_id)
            status, message = RequestStatus.FAILED, f"capture failed: {type(exc).__name__}"
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._metrics.reconnected(capture.reconnects)
            self._metrics.dropped(capture.dropped)
        try:
            await self._finish(request_id, status, message)
        finally:
            self._running.pop(request_id, None)
        log.info("capture ended", request_id=request_id, status=status.value, reason=message)

    async def _store(
        self, request_id: str, running: _Running, frame: CapturedFrame, taken: datetime
    ) -> None:
        image = await self._sanitizer.encode_frame(frame.image)
        frame_id = domain.new_frame_id()
        camera_id = running.camera_id
        # Keyed by when it was really captured (the caller's `frame_timestamp` may be any date):
        # the sweeper looks for orphans under today's and yesterday's prefixes only.
        key = domain.frame_key(frame.captured_at, camera_id, frame_id, image.extension)
        await self._objects.put(
            key,
            image.data,
            content_type=image.content_type,
            metadata={"camera_id": camera_id, "request_id": request_id, "frame_id": frame_id},
        )
        now = _now()
        async with self._sessions.begin() as session:
            request = await store.lock_request(session=session, request_id=request_id)
            if request is None or not domain.may_end(request.status):
                # Cancelled while this frame was on its way: it is not part of the request.
                await self._objects.delete(key)
                return
            await store.add_frame(
                session=session,
                request=request,
                frame=NewFrame.stored(
                    image,
                    id=frame_id,
                    request_id=request_id,
                    camera_id=camera_id,
                    source_type=SourceType.RTSP,
                    storage_path=key,
                    storage_bucket=self._objects.bucket,
                    capture_timestamp=taken,
                    meta=running.meta,
                    change_score=frame.change,
                ),
                now=now,
            )
            store.announce(session=session, request=request, now=now, frame_id=frame_id)
        self._metrics.frame_stored()
        self._committed()

    async def _renew(self, request_id: str, running: _Running) -> None:
        """Keep the lease alive; stop the capture if the request was cancelled elsewhere."""
        while True:
            await asyncio.sleep(self._settings.job_lease_s / 3)
            try:
                async with self._sessions.begin() as session:
                    status = await store.renew_lease(
                        session=session,
                        request_id=request_id,
                        owner=self._replica_id,
                        until=_now() + self._lease,
                    )
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried at the next
                log.warning("lease renewal failed", request_id=request_id, error=repr(exc))
                continue
            if status is None or status.final:
                self.stop_local(request_id)

    async def _finish(self, request_id: str, status: RequestStatus, message: str | None) -> None:
        async with self._sessions.begin() as session:
            request = await store.lock_request(session=session, request_id=request_id)
            if request is None:
                return
            ending = domain.capture_ending(
                Ending(status, message), frames_stored=request.frames_stored
            )
            store.finish(
                session=session,
                request=request,
                status=ending.status,
                now=_now(),
                message=ending.message,
            )
        self._committed()
