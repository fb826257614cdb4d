"""The ingestion API's shapes (TrackShift's, docs/replaced-systems.md) and the gateway-service
requests.

The gateway checks a request with these models at the edge; the ingestion service checks it again
with the same models when the request reaches it, so neither trusts the other's input.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# The seed allowed any 1-100 characters and put them into file paths and object keys. Edgeway
# allows letters, digits, '_', '-' and '.', starting with a letter or digit, never '..': no
# separator and no parent step can reach a key (the service generates keys anyway).
CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
RTSP_SCHEMES = ("rtsp", "rtsps")
MAX_URL_LENGTH = 2048
# The validation error type of a URL refused for safety (a character that could end a line of
# the RTSP request it becomes), and the service's reply code for a destination it may not reach:
# the gateway answers both with 422.
URL_REFUSED = "url_refused"

# Message types on `ingest.request.<id>` and the frames exchange.
PROGRESS_TYPE = "ingest.progress.v1"
FRAME_STORED_TYPE = "ingest.frame.stored.v1"
UPLOAD_FILE_TYPE = "ingest.upload.file.v1"

# Headers of a file message on the uploads exchange: the gateway sets them, the service checks.
HEADER_KIND = "x-file-kind"  # a FileKind
HEADER_FILE_ID = "x-file-id"  # a UUID the gateway gave the file
HEADER_FILE_NAME = "x-file-name"  # the client's name for it: display only, never a path
HEADER_REQUEST_ID = "x-request-id"  # images: the upload request
HEADER_CAMERA_ID = "x-camera-id"  # images
HEADER_DEVICE = "x-device"  # phone CSV files: the phone's device id
MAX_FILE_NAME = 255

# A status lists a request's frames a page at a time (a one-hour capture at 30 fps has 108,000):
# `limit` frames (this many by default, at most FRAMES_PAGE_MAX), after an opaque `cursor`
# taken from the previous page's `next_cursor`.
FRAMES_PAGE_DEFAULT = 100
FRAMES_PAGE_MAX = 1000
MAX_CURSOR_LENGTH = 512


def check_camera_id(value: str) -> str:
    if not CAMERA_ID.fullmatch(value) or ".." in value:
        raise ValueError(
            "camera_id must be 1 to 100 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit, without '..'"
        )
    return value


def _unsafe_character(value: str) -> str | None:
    """Why `value` cannot be sent as a URL, or None: it must be printable ASCII without spaces.

    urlsplit silently drops CR, LF and tab, so checking its parts says nothing of the raw text;
    and FFmpeg writes the URL into its RTSP request line as given, so a CR or LF there starts a
    request line or header of the caller's choosing. Anything else outside printable ASCII is
    refused too: a URL carries other characters percent-encoded.
    """
    for position, character in enumerate(value):
        if "!" <= character <= "~":
            continue
        if unicodedata.category(character).startswith("C"):
            kind = "a control character"
        elif character.isspace():
            kind = "whitespace"
        else:
            kind = "a non-ASCII character"
        return (
            f"rtsp_url contains {kind} (U+{ord(character):04X}) at position {position}: "
            "a URL is printable ASCII without spaces, other characters percent-encoded"
        )
    return None


def check_rtsp_url(value: str) -> str:
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"rtsp_url is longer than {MAX_URL_LENGTH} characters")
    unsafe = _unsafe_character(value)
    if unsafe is not None:
        # A ValueError too, so callers outside pydantic catch it like the others.
        raise PydanticCustomError(URL_REFUSED, "{reason}", {"reason": unsafe})
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a malformed port
    except ValueError:
        raise ValueError("rtsp_url is not a valid URL") from None
    if parts.scheme.lower() not in RTSP_SCHEMES:
        raise ValueError("rtsp_url must start with rtsp:// or rtsps://")
    if not parts.hostname:
        raise ValueError("rtsp_url has no host")
    if port == 0:
        raise ValueError("rtsp_url has port 0")
    return value


CameraId = Annotated[str, AfterValidator(check_camera_id)]
RtspUrl = Annotated[str, AfterValidator(check_rtsp_url)]


class FileKind(StrEnum):
    IMAGE = "image"  # a file of `POST /api/v1/ingest/upload`
    CSV = "csv"  # a phone's `file_upload` on `/ws/phone`


class CaptureMode(StrEnum):
    SINGLE_FRAME = "single_frame"
    CONTINUOUS = "continuous"
    # Frames kept only when the scene changed beyond a threshold (the seed's was continuous).
    EVENT_DRIVEN = "event_driven"


class RequestStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED)


class SourceType(StrEnum):
    UPLOAD = "upload"
    RTSP = "rtsp"


class FrameMetadata(BaseModel):
    """The seed's `meta`; other keys are kept as they came (a producer's own annotations)."""

    model_config = ConfigDict(extra="allow")

    session: str | None = None
    timestamp_ref: str | None = None
    location: str | None = None
    camera_angle: str | None = None
    exposure: float | None = Field(default=None, ge=0)
    sensor_info: dict[str, Any] | None = None


class RtspIngestionRequest(BaseModel):
    """`POST /api/v1/ingest/rtsp`: the seed's `RTSPIngestionRequest`, with its bounds."""

    model_config = ConfigDict(extra="forbid")

    rtsp_url: RtspUrl
    camera_id: CameraId
    capture_mode: CaptureMode = CaptureMode.SINGLE_FRAME
    # When the first frame was taken, if the caller knows better than the service's clock.
    frame_timestamp: datetime | None = None
    capture_duration: float | None = Field(default=None, ge=1, le=3600)
    fps: float | None = Field(default=None, gt=0, le=30)
    meta: FrameMetadata | None = None


class RejectedFile(BaseModel):
    """A file of an upload that was not stored, and why."""

    filename: str
    code: str
    reason: str


class FrameInfo(BaseModel):
    frame_id: str
    storage_path: str
    # Presigned when read (valid `presign_expiry_s`); None on the embedded local store.
    storage_url: str | None = None
    timestamp: datetime
    width: int
    height: int
    size_bytes: int
    format: str


class IngestionResponse(BaseModel):
    """The seed's `IngestionResponse`, plus what was refused and how far the request got.

    `frames` is one page, in capture order: the first `limit` after the page's cursor (the
    first page when there is none). `frames_total` counts all of them; `next_cursor` asks for
    the page after this one, and is None on the last.
    """

    request_id: str
    status: RequestStatus
    camera_id: str
    source_type: SourceType
    frames: list[FrameInfo] = Field(default_factory=list)
    frames_total: int = 0
    next_cursor: str | None = None
    message: str | None = None
    created_at: datetime
    completed_at: datetime | None = None
    capture_mode: CaptureMode | None = None
    files_expected: int | None = None
    rejected: list[RejectedFile] = Field(default_factory=list)


# --- gateway -> ingestion service (request/reply on Topology.ingest_requests_queue) -------------


class Caller(BaseModel):
    """Who asks, as the gateway verified it: the token's subject, and whether it holds the
    operator scope (`ingest:admin`). A request belongs to the caller that opened it; status and
    cancel are answered only to it or to an operator, and as `not_found` to anyone else."""

    model_config = ConfigDict(frozen=True)

    subject: str
    operator: bool = False


class AcceptedFile(BaseModel):
    file_id: str
    filename: str
    size_bytes: int


class CreateUpload(BaseModel):
    """Open an upload request before its files are published, so its status exists at once."""

    op: Literal["create_upload"] = "create_upload"
    request_id: str
    caller: Caller
    camera_id: CameraId
    meta: FrameMetadata | None = None
    files: list[AcceptedFile]
    rejected: list[RejectedFile] = Field(default_factory=list)


class StartCapture(BaseModel):
    """Admit an RTSP capture (or refuse it: the stream caps, a destination it may not reach)."""

    op: Literal["start_capture"] = "start_capture"
    request_id: str
    caller: Caller
    request: RtspIngestionRequest


PageLimit = Annotated[int, Field(ge=1, le=FRAMES_PAGE_MAX)]
PageCursor = Annotated[str, Field(min_length=1, max_length=MAX_CURSOR_LENGTH)]


class FramesPage(BaseModel):
    """Which page of a request's frames a status shows (the query of its endpoint)."""

    model_config = ConfigDict(extra="ignore")

    limit: PageLimit = FRAMES_PAGE_DEFAULT
    cursor: PageCursor | None = None


class GetStatus(BaseModel):
    op: Literal["status"] = "status"
    request_id: str
    caller: Caller
    limit: PageLimit = FRAMES_PAGE_DEFAULT
    cursor: PageCursor | None = None


class CancelRequest(BaseModel):
    op: Literal["cancel"] = "cancel"
    request_id: str
    caller: Caller


IngestCommand = Annotated[
    CreateUpload | StartCapture | GetStatus | CancelRequest, Field(discriminator="op")
]


class IngestReply(BaseModel):
    """The service's answer: the request as it stands, or why it was refused."""

    ok: bool
    response: IngestionResponse | None = None
    # A code: not_found, stream_limit, invalid, conflict, url_refused (URL_REFUSED).
    error: str | None = None
    message: str | None = None
