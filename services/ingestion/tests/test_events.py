"""What the service announces: a request's progress to the clients watching it, a stored frame
to the tracker."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from edgeway.common.schemas.ingest import FRAME_STORED_TYPE, PROGRESS_TYPE, SourceType
from edgeway.common.topology import Channels
from edgeway.ingestion.domain import NewFrame
from edgeway.ingestion.events import TO_BROADCAST, TO_FRAMES, frame_stored, progress

WHEN = datetime(2025, 11, 21, 12, 0, 0, 250000, tzinfo=UTC)


@dataclass
class Request:
    id: str = "r-1"
    status: str = "in_progress"
    camera_id: str = "cam-1"
    source_type: str = "rtsp"
    frames_stored: int = 4
    files_rejected: int = 1
    message: str | None = None


def test_progress_goes_to_the_requests_channel_with_its_counts() -> None:
    event = progress(Request())
    assert (event.target, event.routing_key, event.type) == (
        TO_BROADCAST,
        Channels.ingest_request("r-1"),
        PROGRESS_TYPE,
    )
    assert event.body == {
        "type": "ingest_progress",
        "request_id": "r-1",
        "status": "in_progress",
        "camera_id": "cam-1",
        "source_type": "rtsp",
        "frames_stored": 4,
        "files_rejected": 1,
        "message": None,
    }
    assert progress(Request(), frame_id="f-9").body["frame_id"] == "f-9"


def test_a_stored_frame_is_announced_with_where_to_read_it() -> None:
    frame = NewFrame(
        id="f-1",
        request_id="r-1",
        camera_id="cam-1",
        source_type=SourceType.UPLOAD,
        storage_path="frames/2025/11/21/cam-1/f-1.jpg",
        storage_bucket="trackshift-frames",
        width=640,
        height=480,
        size_bytes=12_345,
        format="jpeg",
        content_type="image/jpeg",
        capture_timestamp=WHEN,
        meta={"location": "north gate"},
        original_name="gate.jpg",
    )
    event = frame_stored(frame)
    assert (event.target, event.routing_key, event.type) == (TO_FRAMES, "", FRAME_STORED_TYPE)
    assert event.body == {
        "frame_id": "f-1",
        "request_id": "r-1",
        "camera_id": "cam-1",
        "source_type": "upload",
        "storage_bucket": "trackshift-frames",
        "storage_path": "frames/2025/11/21/cam-1/f-1.jpg",
        "content_type": "image/jpeg",
        "width": 640,
        "height": 480,
        "size_bytes": 12_345,
        "capture_timestamp": WHEN.isoformat(),
    }
