"""Videos operators upload for `file` cameras: checked, stored, recorded.

The gateway asked first (`answers.prepare_video`) and published the file as one persistent
message; here it is written to a staging file, opened with PyAV in a worker thread (a video
stream whose first frame decodes, the camera's frame size), put in the object store under its
key and recorded, all before the delivery is acked. A refused file is recorded with its reason
(the environment's `video.status` says it) and not kept. The video id is the upload's, so a
redelivery is a no-op.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeway.common.db import with_db_retry
from edgeway.common.logging import get_logger
from edgeway.common.schemas.tracking import (
    HEADER_CAMERA_ID,
    HEADER_ENVIRONMENT_ID,
    HEADER_VIDEO_ID,
    EnvironmentSpec,
    FileSource,
)
from edgeway.tracker import store
from edgeway.tracker.domain import VideoFacts
from edgeway.tracker.media import VideoError, VideoProbe, VideoStore, probe_video

if TYPE_CHECKING:
    from edgeway.tracker.app import Deps

log = get_logger("edgeway.tracker.videos")


@dataclass(frozen=True, slots=True)
class Upload:
    environment_id: str
    camera_id: str
    video_id: str
    data: bytes

    @classmethod
    def of(cls, headers: dict[str, object], body: bytes) -> Upload | None:
        values = [
            headers.get(h) for h in (HEADER_ENVIRONMENT_ID, HEADER_CAMERA_ID, HEADER_VIDEO_ID)
        ]
        if not all(isinstance(v, str) and v for v in values):
            return None
        environment_id, camera_id, video_id = (str(v) for v in values)
        return cls(environment_id, camera_id, video_id, body)


def check(
    objects: VideoStore, upload: Upload, *, width: int, height: int, max_bytes: int
) -> VideoProbe | str:
    """Stage and probe the file (blocking): its probe, or why it is refused."""
    if len(upload.data) > max_bytes:
        return f"the video is {len(upload.data)} bytes; the limit is {max_bytes}"
    staged = objects.stage(upload.data)
    try:
        probe = probe_video(staged)
        if (probe.width, probe.height) != (width, height):
            raise VideoError(
                f"the video is {probe.width}x{probe.height}; camera {upload.camera_id} is "
                f"declared {width}x{height}"
            )
    except VideoError as exc:
        return str(exc)
    finally:
        staged.unlink(missing_ok=True)
    return probe


async def take(upload: Upload, deps: Deps) -> str:
    """Check, store and record one upload; its outcome (ready, rejected, duplicate)."""
    async with deps.sessions() as session:
        if await store.video_known(session=session, video_id=upload.video_id):
            return "duplicate"
        environment = await store.get_environment(
            session=session, environment_id=upload.environment_id
        )
        busy = await store.active_tasks(session=session, environment_id=upload.environment_id)
    spec = None if environment is None else EnvironmentSpec.model_validate(environment.spec)
    camera = None if spec is None else spec.camera(upload.camera_id)
    if camera is None or not isinstance(camera.source, FileSource):
        log.info("video for a camera that is gone dropped", video_id=upload.video_id)
        return "rejected"
    outcome: VideoProbe | str
    if busy:
        outcome = f"tasks ran on the environment when the video arrived ({', '.join(busy)})"
    else:
        outcome = await asyncio.to_thread(
            check,
            deps.objects,
            upload,
            width=camera.width,
            height=camera.height,
            max_bytes=deps.settings.max_video_bytes,
        )
    probe = outcome if isinstance(outcome, VideoProbe) else None
    key = None
    if probe is not None:
        ids = (upload.environment_id, upload.camera_id, upload.video_id)
        key = deps.objects.key(*ids, probe.extension)
        # Stored before it is recorded: a crash between the two leaves an object no record
        # names (the redelivery puts it again under the same key), never a record without one.
        await deps.objects.put(key, upload.data)
    record = VideoFacts(
        video_id=upload.video_id,
        status="ready" if probe is not None else "rejected",
        reason=outcome if isinstance(outcome, str) else None,
        object_key=key,
        size_bytes=len(upload.data),
        frames=probe.frames if probe else 0,
        fps=probe.fps if probe else 0.0,
    )

    async def save() -> str | None:
        """Record it; the replaced video's key when nothing needs that any more."""
        async with deps.sessions.begin() as session:
            replaced = await store.record_video(
                session=session,
                environment_id=upload.environment_id,
                camera_id=upload.camera_id,
                video=record,
            )
            if replaced is None or replaced == key:
                return None
            used = await store.keys_in_use(
                session=session, environment_id=upload.environment_id, keys=[replaced]
            )
            return None if used else replaced

    replaced = await with_db_retry(save, delays=deps.settings.db_retry_delays, forever=True)
    if replaced is not None:
        await deps.objects.delete(replaced)
    log.info(
        "video taken",
        environment_id=upload.environment_id,
        camera_id=upload.camera_id,
        status=record.status,
        reason=record.reason,
        frames=record.frames,
    )
    return record.status
