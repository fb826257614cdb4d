"""What the ingestion service announces, and where: the events committed with the changes they
report (the transactional outbox, `store.add_event`) and published by `outbox.OutboxRelay`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from edgeway.common.schemas.ingest import FRAME_STORED_TYPE, PROGRESS_TYPE
from edgeway.common.topology import Channels
from edgeway.ingestion.domain import NewFrame

# Where an event goes: the broadcast exchange (clients) or the frames exchange (the tracker).
TO_BROADCAST = "broadcast"
TO_FRAMES = "frames"


@dataclass(frozen=True)
class Event:
    target: str  # TO_BROADCAST or TO_FRAMES
    routing_key: str
    type: str
    body: dict[str, Any]


class RequestState(Protocol):
    """A request as its row keeps it: what a progress event reports."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def camera_id(self) -> str: ...
    @property
    def source_type(self) -> str: ...
    @property
    def frames_stored(self) -> int: ...
    @property
    def files_rejected(self) -> int: ...
    @property
    def message(self) -> str | None: ...


def progress(request: RequestState, *, frame_id: str | None = None) -> Event:
    """A request's progress on `ingest.request.<id>` (clients watching it): its status and counts,
    and the frame just stored, if one was."""
    body: dict[str, Any] = {
        "type": "ingest_progress",
        "request_id": request.id,
        "status": request.status,
        "camera_id": request.camera_id,
        "source_type": request.source_type,
        "frames_stored": request.frames_stored,
        "files_rejected": request.files_rejected,
        "message": request.message,
    }
    if frame_id is not None:
        body["frame_id"] = frame_id
    return Event(TO_BROADCAST, Channels.ingest_request(request.id), PROGRESS_TYPE, body)


def frame_stored(frame: NewFrame) -> Event:
    """A stored frame on the frames exchange (the tracker reads the object itself)."""
    body = {
        "frame_id": frame.id,
        "request_id": frame.request_id,
        "camera_id": frame.camera_id,
        "source_type": frame.source_type.value,
        "storage_bucket": frame.storage_bucket,
        "storage_path": frame.storage_path,
        "content_type": frame.content_type,
        "width": frame.width,
        "height": frame.height,
        "size_bytes": frame.size_bytes,
        "capture_timestamp": frame.capture_timestamp.isoformat(),
    }
    return Event(TO_FRAMES, "", FRAME_STORED_TYPE, body)
