"""Pure rules of the ingestion service: file messages, object keys, who may see a request, how a
request ends, the frames a page holds. No I/O."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from edgeway.common.schemas.ingest import (
    HEADER_CAMERA_ID,
    HEADER_DEVICE,
    HEADER_FILE_ID,
    HEADER_FILE_NAME,
    HEADER_KIND,
    HEADER_REQUEST_ID,
    MAX_FILE_NAME,
    Caller,
    FileKind,
    RequestStatus,
    SourceType,
    check_camera_id,
)
from edgeway.common.video import check_device

if TYPE_CHECKING:
    from edgeway.ingestion.images import CleanImage

# The seed's key layout: frames/YYYY/MM/DD/<camera_id>/<frame_id>.<ext>. Phone CSV files sit
# beside them under files/ with the phone's device id.
FRAMES_PREFIX = "frames/"
FILES_PREFIX = "files/"


class BadFileMessageError(ValueError):
    """A file message the gateway should never have sent: dead-lettered, not retried."""


@dataclass(frozen=True)
class FileMessage:
    kind: FileKind
    file_id: str
    filename: str
    request_id: str | None  # images: the upload they belong to
    owner: str  # images: the camera id; CSV files: the phone's device id


def _text(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _uuid(value: str | None, name: str) -> str:
    try:
        return str(uuid.UUID(value or ""))
    except ValueError:
        raise BadFileMessageError(f"{name} is not a UUID: {value!r}") from None


def read_file_message(headers: Mapping[str, Any]) -> FileMessage:
    """The file's identity from its headers, checked again here (the gateway checked first)."""
    try:
        kind = FileKind(_text(headers, HEADER_KIND) or "")
    except ValueError:
        raise BadFileMessageError(f"unknown {HEADER_KIND}") from None
    file_id = _uuid(_text(headers, HEADER_FILE_ID), HEADER_FILE_ID)
    filename = (_text(headers, HEADER_FILE_NAME) or "")[:MAX_FILE_NAME]
    if kind is FileKind.IMAGE:
        request_id = _uuid(_text(headers, HEADER_REQUEST_ID), HEADER_REQUEST_ID)
        try:
            owner = check_camera_id(_text(headers, HEADER_CAMERA_ID) or "")
        except ValueError as exc:
            raise BadFileMessageError(str(exc)) from None
        return FileMessage(kind, file_id, filename, request_id, owner)
    device = _text(headers, HEADER_DEVICE) or ""
    reason = check_device(device)
    if reason is not None:
        raise BadFileMessageError(reason)
    return FileMessage(kind, file_id, filename, None, device)


def object_key(prefix: str, when: datetime, owner: str, object_id: str, extension: str) -> str:
    """`<prefix>YYYY/MM/DD/<owner>/<object_id>.<extension>`, from checked parts only."""
    return f"{prefix}{when:%Y/%m/%d}/{owner}/{object_id}.{extension}"


def frame_key(when: datetime, camera_id: str, frame_id: str, extension: str) -> str:
    return object_key(FRAMES_PREFIX, when, check_camera_id(camera_id), frame_id, extension)


def file_key(when: datetime, device: str, file_id: str) -> str:
    return object_key(FILES_PREFIX, when, device, file_id, "csv")


def new_frame_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class NewFrame:
    """A frame to record: its object is stored, its row not yet."""

    id: str
    request_id: str
    camera_id: str
    source_type: SourceType
    storage_path: str
    storage_bucket: str
    width: int
    height: int
    size_bytes: int
    format: str
    content_type: str
    capture_timestamp: datetime
    meta: dict[str, Any] | None
    original_name: str | None = None
    change_score: float | None = None

    @classmethod
    def stored(
        cls,
        image: CleanImage,
        *,
        id: str,
        request_id: str,
        camera_id: str,
        source_type: SourceType,
        storage_path: str,
        storage_bucket: str,
        capture_timestamp: datetime,
        meta: dict[str, Any] | None,
        original_name: str | None = None,
        change_score: float | None = None,
    ) -> NewFrame:
        """The row of `image` once it is stored at `storage_path`: what the image says of itself
        (size, format, dimensions) comes from it."""
        return cls(
            id=id,
            request_id=request_id,
            camera_id=camera_id,
            source_type=source_type,
            storage_path=storage_path,
            storage_bucket=storage_bucket,
            width=image.width,
            height=image.height,
            size_bytes=len(image.data),
            format=image.format.value,
            content_type=image.content_type,
            capture_timestamp=capture_timestamp,
            meta=meta,
            original_name=original_name,
            change_score=change_score,
        )


# --- requests: who may see one, how one ends ------------------------------------------------

# A request under way; every other status is final, and a final status never changes.
ACTIVE = (RequestStatus.PENDING.value, RequestStatus.IN_PROGRESS.value)

CANCELLED_BY_REQUEST = "cancelled by request"
# What a request says of every capture that got no frame (the reason is in the log only, so a
# request cannot tell a closed port from an open one, or a name that does not resolve from one
# refused).
CAPTURE_FAILED = (
    "no frame could be captured: the camera could not be reached, refused the connection or "
    "the credentials, or sent no usable video"
)
CAPTURE_INTERRUPTED = "interrupted: the replica running the capture stopped"
NO_FILE_STORED = "no file of the upload could be stored"


class FileCounts(Protocol):
    """An upload's progress, as its row keeps it."""

    @property
    def files_expected(self) -> int | None: ...
    @property
    def frames_stored(self) -> int: ...
    @property
    def files_rejected(self) -> int: ...


@dataclass(frozen=True)
class Ending:
    """A final status, and what the request says of it."""

    status: RequestStatus
    message: str | None = None


def may_see(caller: Caller, requester: str | None) -> bool:
    """Whether `caller` may read or cancel a request `requester` opened. Anyone else is told
    there is no such request: ids are not secrets, so an answer must not reveal one exists."""
    return caller.operator or (requester is not None and requester == caller.subject)


def may_end(status: str) -> bool:
    """Whether a request in `status` may still move to a final one (it is under way)."""
    return not RequestStatus(status).final


def upload_ending(upload: FileCounts) -> Ending | None:
    """How an upload ends once every file the gateway accepted was stored or refused: completed
    if any was stored, else failed; None while some are still on their way."""
    if upload.files_expected is None:
        return None
    if upload.frames_stored + upload.files_rejected < upload.files_expected:
        return None
    if upload.frames_stored:
        return Ending(RequestStatus.COMPLETED)
    return Ending(RequestStatus.FAILED, NO_FILE_STORED)


def lost_files_ending(upload: FileCounts) -> Ending:
    """An upload whose files stopped arriving: some were lost on the way (a publish that failed
    halfway, files dead-lettered)."""
    missing = (upload.files_expected or 0) - (upload.frames_stored + upload.files_rejected)
    return Ending(
        RequestStatus.FAILED, f"{missing} accepted file(s) never reached the ingestion service"
    )


def capture_ending(stopped: Ending, *, frames_stored: int) -> Ending:
    """How a capture that stopped (`stopped`: how it ran out) ends: one that ran to its end
    without storing a frame failed."""
    if stopped.status is RequestStatus.COMPLETED and frames_stored == 0:
        return Ending(RequestStatus.FAILED, CAPTURE_FAILED)
    return stopped


# --- pages of frames ------------------------------------------------------------------------

CURSOR_VERSION = 1


class BadCursorError(ValueError):
    """A page cursor this service did not make (or made in another format)."""


@dataclass(frozen=True)
class FramePosition:
    """Where a page of a request's frames ended: the last frame's place in capture order
    (capture time, then when it was stored, then its id: a total order, so a page never
    repeats or skips a frame that shares its capture time with another)."""

    captured: datetime
    created: datetime
    frame_id: str

    def cursor(self) -> str:
        """Opaque to clients: URL-safe base64 of a versioned JSON array."""
        body = [
            CURSOR_VERSION,
            self.captured.astimezone(UTC).isoformat(),
            self.created.astimezone(UTC).isoformat(),
            self.frame_id,
        ]
        return base64.urlsafe_b64encode(orjson.dumps(body)).decode().rstrip("=")

    @classmethod
    def from_cursor(cls, cursor: str) -> FramePosition:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            version, captured, created, frame_id = orjson.loads(raw)
            if version != CURSOR_VERSION or not isinstance(frame_id, str):
                raise ValueError("unknown cursor version")
            position = cls(
                _aware(datetime.fromisoformat(captured)),
                _aware(datetime.fromisoformat(created)),
                frame_id,
            )
        except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError):
            raise BadCursorError(
                "cursor is not one this service made: pass a status's next_cursor as it came"
            ) from None
        return position


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("a cursor's times are UTC")
    return value.astimezone(UTC)
