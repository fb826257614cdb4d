"""File messages and object keys (what the service takes from the uploads queue, where it stores),
who may see a request and how one ends, page cursors."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

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
)
from edgeway.ingestion.domain import (
    CAPTURE_FAILED,
    NO_FILE_STORED,
    BadCursorError,
    BadFileMessageError,
    Ending,
    FramePosition,
    capture_ending,
    file_key,
    frame_key,
    lost_files_ending,
    may_end,
    may_see,
    new_frame_id,
    read_file_message,
    upload_ending,
)

FILE_ID = "6f1c2a8e-3b7d-4c5e-9f0a-1b2c3d4e5f60"
REQUEST_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def image_headers(**changes: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {
        HEADER_KIND: FileKind.IMAGE.value,
        HEADER_FILE_ID: FILE_ID,
        HEADER_FILE_NAME: "front gate.jpg",
        HEADER_REQUEST_ID: REQUEST_ID,
        HEADER_CAMERA_ID: "cam-01.north_gate",
    }
    headers.update(changes)
    return {name: value for name, value in headers.items() if value is not None}


def csv_headers(**changes: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {
        HEADER_KIND: FileKind.CSV.value,
        HEADER_FILE_ID: FILE_ID,
        HEADER_FILE_NAME: "imu log.csv",
        HEADER_DEVICE: "pixel_7-a",
    }
    headers.update(changes)
    return {name: value for name, value in headers.items() if value is not None}


# --- file messages --------------------------------------------------------------------------------


def test_an_image_message_names_its_upload_and_camera() -> None:
    message = read_file_message(image_headers())
    assert message.kind is FileKind.IMAGE
    assert message.file_id == FILE_ID
    assert message.request_id == REQUEST_ID
    assert message.owner == "cam-01.north_gate"
    assert message.filename == "front gate.jpg"


def test_a_csv_message_belongs_to_the_phones_device_and_no_upload() -> None:
    message = read_file_message(csv_headers())
    assert message.kind is FileKind.CSV
    assert message.file_id == FILE_ID
    assert message.request_id is None
    assert message.owner == "pixel_7-a"
    assert message.filename == "imu log.csv"


def test_headers_as_bytes_read_like_text() -> None:
    """AMQP clients may deliver string headers as bytes (long strings in the wire format)."""
    headers = {name: str(value).encode() for name, value in image_headers().items()}
    assert read_file_message(headers) == read_file_message(image_headers())


def test_ids_are_read_in_their_canonical_form() -> None:
    # The same file, written in upper case, must land on the same key and row as before.
    message = read_file_message(
        image_headers(**{HEADER_FILE_ID: FILE_ID.upper(), HEADER_REQUEST_ID: REQUEST_ID.upper()})
    )
    assert (message.file_id, message.request_id) == (FILE_ID, REQUEST_ID)


def test_a_long_file_name_is_cut_and_a_missing_one_is_empty() -> None:
    long = read_file_message(image_headers(**{HEADER_FILE_NAME: "x" * 1000 + ".jpg"}))
    assert long.filename == "x" * MAX_FILE_NAME
    assert read_file_message(image_headers(**{HEADER_FILE_NAME: None})).filename == ""


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        (image_headers(**{HEADER_FILE_ID: "not-a-uuid"}), HEADER_FILE_ID),
        (image_headers(**{HEADER_FILE_ID: None}), HEADER_FILE_ID),
        (image_headers(**{HEADER_REQUEST_ID: "../../etc/passwd"}), HEADER_REQUEST_ID),
        (image_headers(**{HEADER_REQUEST_ID: None}), HEADER_REQUEST_ID),
        (csv_headers(**{HEADER_FILE_ID: "1234"}), HEADER_FILE_ID),
        (image_headers(**{HEADER_KIND: "video"}), HEADER_KIND),
        (image_headers(**{HEADER_KIND: None}), HEADER_KIND),
        ({}, HEADER_KIND),
        (image_headers(**{HEADER_CAMERA_ID: "../cam"}), "camera_id"),
        (image_headers(**{HEADER_CAMERA_ID: "cams/front"}), "camera_id"),
        (image_headers(**{HEADER_CAMERA_ID: "cam..1"}), "camera_id"),
        (image_headers(**{HEADER_CAMERA_ID: ".hidden"}), "camera_id"),
        (image_headers(**{HEADER_CAMERA_ID: "c" * 101}), "camera_id"),
        (image_headers(**{HEADER_CAMERA_ID: None}), "camera_id"),
        (csv_headers(**{HEADER_DEVICE: "../phone"}), "device"),
        (csv_headers(**{HEADER_DEVICE: "phone.1"}), "device"),
        (csv_headers(**{HEADER_DEVICE: "p" * 65}), "device"),
        (csv_headers(**{HEADER_DEVICE: None}), "device"),
    ],
)
def test_a_bad_header_is_refused_saying_which(headers: dict[str, Any], complaint: str) -> None:
    with pytest.raises(BadFileMessageError, match=complaint):
        read_file_message(headers)


# --- keys -----------------------------------------------------------------------------------------


def test_a_frame_key_follows_the_seeds_layout() -> None:
    key = frame_key(WHEN, "cam-01", FILE_ID, "jpg")
    assert key == f"frames/2025/01/02/cam-01/{FILE_ID}.jpg"


def test_a_phone_file_key_sits_under_files_with_its_device() -> None:
    assert file_key(WHEN, "pixel_7-a", FILE_ID) == f"files/2025/01/02/pixel_7-a/{FILE_ID}.csv"


@pytest.mark.parametrize("camera_id", ["../other", "a/b", "..", ".", "", "cam\\..\\x", "c" * 101])
def test_a_frame_key_refuses_a_path_like_camera_id(camera_id: str) -> None:
    with pytest.raises(ValueError, match="camera_id"):
        frame_key(WHEN, camera_id, FILE_ID, "jpg")


def test_new_frame_ids_are_distinct_uuids() -> None:
    ids = {new_frame_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(str(uuid.UUID(frame_id)) == frame_id for frame_id in ids)


# --- page cursors -------------------------------------------------------------------------


def test_a_cursor_comes_back_as_the_position_it_was_made_from() -> None:
    position = FramePosition(WHEN, WHEN + timedelta(microseconds=7), FILE_ID)
    cursor = position.cursor()
    assert cursor.isascii()
    assert "=" not in cursor  # safe in a query string as it is
    assert FramePosition.from_cursor(cursor) == position
    # Times in another zone are the same instants.
    elsewhere = timezone(timedelta(hours=5))
    shifted = FramePosition(WHEN.astimezone(elsewhere), WHEN.astimezone(elsewhere), FILE_ID)
    assert FramePosition.from_cursor(shifted.cursor()) == FramePosition(WHEN, WHEN, FILE_ID)


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        "",
        "%%%%",
        base64.urlsafe_b64encode(b"[1, 2, 3]").decode(),
        base64.urlsafe_b64encode(b'[2, "2025-01-02T03:04:05+00:00", "2025-01-02", "x"]').decode(),
        base64.urlsafe_b64encode(
            b'[1, "2025-01-02T03:04:05", "2025-01-02T03:04:05", "x"]'
        ).decode(),
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
    ],
)
def test_a_cursor_this_service_did_not_make_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursorError, match="not one this service made"):
        FramePosition.from_cursor(cursor)


# --- requests: who may see one, how one ends ------------------------------------------------------


@dataclass
class Counts:
    files_expected: int | None
    frames_stored: int
    files_rejected: int


def test_a_request_is_seen_by_its_requester_and_operators_only() -> None:
    assert may_see(Caller(subject="alice"), "alice")
    assert not may_see(Caller(subject="bob"), "alice")
    assert may_see(Caller(subject="ops", operator=True), "alice")
    # A request from before requesters were kept: operators only.
    assert not may_see(Caller(subject="alice"), None)
    assert may_see(Caller(subject="ops", operator=True), None)


def test_only_a_request_under_way_may_end() -> None:
    assert may_end(RequestStatus.PENDING.value)
    assert may_end(RequestStatus.IN_PROGRESS.value)
    for final in (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED):
        assert not may_end(final.value)


def test_an_upload_ends_once_every_file_was_stored_or_refused() -> None:
    assert upload_ending(Counts(3, 1, 1)) is None  # one still on its way
    assert upload_ending(Counts(3, 2, 1)) == Ending(RequestStatus.COMPLETED)
    assert upload_ending(Counts(2, 0, 2)) == Ending(RequestStatus.FAILED, NO_FILE_STORED)
    assert upload_ending(Counts(None, 5, 0)) is None  # a capture: it ends otherwise


def test_an_upload_whose_files_stopped_arriving_says_how_many_were_lost() -> None:
    ending = lost_files_ending(Counts(5, 2, 1))
    assert ending.status is RequestStatus.FAILED
    assert ending.message == "2 accepted file(s) never reached the ingestion service"


def test_a_capture_that_ran_out_without_a_frame_failed() -> None:
    ran_out = Ending(RequestStatus.COMPLETED)
    assert capture_ending(ran_out, frames_stored=0) == Ending(RequestStatus.FAILED, CAPTURE_FAILED)
    assert capture_ending(ran_out, frames_stored=3) == ran_out
    # Cancelled or failed otherwise: it says so, frames or not.
    cancelled = Ending(RequestStatus.CANCELLED, "cancelled by request")
    assert capture_ending(cancelled, frames_stored=0) == cancelled
