"""The ingestion API's shapes: an RTSP URL is refused if any character of it could end a line of
the RTSP request it becomes, and every gateway-service command names its caller."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from edgeway.common.schemas.ingest import (
    FRAMES_PAGE_DEFAULT,
    FRAMES_PAGE_MAX,
    MAX_CURSOR_LENGTH,
    URL_REFUSED,
    CancelRequest,
    FramesPage,
    GetStatus,
    RtspIngestionRequest,
    StartCapture,
    check_rtsp_url,
)

BASE = "rtsp://user:p%40ss@cam.example.com:554/live/ch1"


@pytest.mark.parametrize(
    ("tail", "kind"),
    [
        ("\r\nSET x y\r\nX:", "control character (U+000D)"),  # the penetration test's URL
        ("\nSET x y", "control character (U+000A)"),
        ("\r", "control character (U+000D)"),
        ("\tx", "control character (U+0009)"),  # urlsplit drops tabs too
        ("\x00", "control character (U+0000)"),
        ("\x7f", "control character (U+007F)"),
        ("\x85", "control character (U+0085)"),  # NEL
        (" x", "whitespace (U+0020)"),
        ("\u00a0", "whitespace (U+00A0)"),
        ("\u2028", "whitespace (U+2028)"),  # a line separator
        ("\u200b", "control character (U+200B)"),  # zero width space: a format character
        ("/caméra", "non-ASCII character (U+00E9)"),
    ],
)
def test_control_characters_whitespace_and_non_ascii_are_refused_anywhere(
    tail: str, kind: str
) -> None:
    for url in (BASE + tail, BASE.replace("cam.", "cam" + tail + "."), tail + BASE):
        with pytest.raises(ValidationError) as caught:
            RtspIngestionRequest(rtsp_url=url, camera_id="cam-1")
        (error,) = caught.value.errors()
        assert error["type"] == URL_REFUSED
        assert kind in error["msg"]
        assert "percent-encoded" in error["msg"]
        with pytest.raises(ValueError, match="rtsp_url contains"):
            check_rtsp_url(url)


@pytest.mark.parametrize(
    "url",
    [
        BASE,
        "rtsps://[fd00::7]:322/stream?profile=1&token=a%20b",
        "rtsp://10.0.0.5/cam/ca%C3%A9mera",
        "RTSP://Cam.Example.com/x",
    ],
)
def test_printable_ascii_urls_pass_as_written(url: str) -> None:
    assert RtspIngestionRequest(rtsp_url=url, camera_id="cam-1").rtsp_url == url


def test_the_other_url_checks_are_plain_validation_errors() -> None:
    for url in ("http://cam/x", "rtsp:///x", "rtsp://cam:0/x", "rtsp://cam:99999/x"):
        with pytest.raises(ValidationError) as caught:
            RtspIngestionRequest(rtsp_url=url, camera_id="cam-1")
        assert caught.value.errors()[0]["type"] == "value_error"


def test_status_cancel_and_capture_commands_name_their_caller() -> None:
    request_id = str(uuid.uuid4())
    capture = RtspIngestionRequest(rtsp_url=BASE, camera_id="cam-1")
    for command, fields in (
        (GetStatus, {"request_id": request_id}),
        (CancelRequest, {"request_id": request_id}),
        (StartCapture, {"request_id": request_id, "request": capture}),
    ):
        with pytest.raises(ValidationError, match="caller"):
            command.model_validate(fields)
        named = command.model_validate({**fields, "caller": {"subject": "alice"}})
        assert (named.caller.subject, named.caller.operator) == ("alice", False)


def test_a_status_asks_for_one_bounded_page_of_frames() -> None:
    caller = {"subject": "alice"}
    asked = GetStatus.model_validate({"request_id": str(uuid.uuid4()), "caller": caller})
    assert (asked.limit, asked.cursor) == (FRAMES_PAGE_DEFAULT, None)
    # The endpoint's query, as strings.
    assert FramesPage.model_validate({"limit": "1000", "cursor": "abc"}).limit == FRAMES_PAGE_MAX
    for query in ({"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"cursor": ""}):
        with pytest.raises(ValidationError):
            FramesPage.model_validate(query)
    with pytest.raises(ValidationError, match="at most 512"):
        FramesPage.model_validate({"cursor": "x" * (MAX_CURSOR_LENGTH + 1)})
