"""Occupancy rules: Omega's formula and client message, and what Omega crashed on."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from edgeway.common.broker import encode
from edgeway.common.schemas.errors import ErrorCode
from edgeway.common.schemas.occupancy import Summary
from edgeway.occupancy import domain


def frame(**overrides: Any) -> dict[str, Any]:
    """What Omega's camera model (`Model/main.py`) sends."""
    body: dict[str, Any] = {
        "event": "frame_result",
        "camera": "Flint_1",
        "timestamp": 1731790000.123456,
        "summary": {"total_people": 5, "free": ["T1", "T2", "T3"], "occupied": ["T4"]},
        "segments": [{"index": 0, "name": "T1", "capacity": 2, "count": 0, "status": "free"}],
    }
    body.update(overrides)
    return body


def read(body: dict[str, Any] | bytes) -> domain.Reading | domain.Rejection:
    return domain.read_observation(body if isinstance(body, bytes) else orjson.dumps(body))


def accepted(body: dict[str, Any]) -> domain.Reading:
    reading = read(body)
    assert isinstance(reading, domain.Reading), reading
    return reading


def rejected(body: dict[str, Any] | bytes) -> domain.Rejection:
    rejection = read(body)
    assert isinstance(rejection, domain.Rejection), rejection
    return rejection


def client_json(reading: domain.Reading, location_name: str = "Flint Loop") -> bytes:
    return encode(domain.client_update(reading, location_name=location_name).model_dump())


# --- Omega's formula ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "occupied", "percent"),
    [
        (["a", "b", "c"], ["d"], 25.0),
        ([], ["a", "b"], 100.0),
        (["a", "b"], [], 0.0),
        # Not rounded: exactly what Omega's `len(occupied) / (len(free)+len(occupied)) * 100` gives.
        (["a", "b"], ["c"], 1 / 3 * 100),
        (["a"] * 6, ["b"], 1 / 7 * 100),
    ],
)
def test_occupancy_is_the_share_of_occupied_zones(
    free: list[str], occupied: list[str], percent: float
) -> None:
    summary = Summary(total_people=0, free=free, occupied=occupied)
    assert domain.occupancy_percent(summary) == percent


def test_zero_zones_is_a_domain_error_not_a_division_by_zero() -> None:
    summary = Summary(total_people=3, free=[], occupied=[])
    with pytest.raises(domain.ZeroZonesError) as caught:
        domain.occupancy_percent(summary)
    assert caught.value.code is ErrorCode.ZERO_ZONES
    assert not isinstance(caught.value, ZeroDivisionError)


# --- the client message ---------------------------------------------------------------------------


def test_client_message_is_omegas_shape_byte_for_byte() -> None:
    reading = accepted(frame())
    assert client_json(reading) == (
        b'{"location_name":"Flint Loop","timestamp":1731790000.123456,'
        b'"people_detected":5,"occupancy_percent":25.0}'
    )


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (1731790000.123456, 1731790000.123456),
        (1731790000, 1731790000),  # an int stays an int
        (1731790000.0, 1731790000.0),  # and a float with no fraction stays a float
        ("2025-11-16T21:26:40+02:00", "2025-11-16T21:26:40+02:00"),
        ("2025-11-16T19:26:40", "2025-11-16T19:26:40"),
    ],
)
def test_timestamp_is_forwarded_exactly_as_sent(
    timestamp: float | int | str, expected: float | int | str
) -> None:
    sent = orjson.loads(client_json(accepted(frame(timestamp=timestamp))))["timestamp"]
    assert sent == expected
    assert type(sent) is type(expected)


def test_capture_time_is_utc_whatever_the_producer_sent() -> None:
    expected = datetime(2025, 11, 16, 19, 26, 40, tzinfo=UTC)
    from_epoch = accepted(frame(timestamp=1763321200))
    from_iso = accepted(frame(timestamp="2025-11-16T21:26:40+02:00"))
    from_naive_iso = accepted(frame(timestamp="2025-11-16T19:26:40"))
    for reading in (from_epoch, from_iso, from_naive_iso):
        assert reading.captured_at == expected
        assert reading.captured_at.utcoffset() == UTC.utcoffset(None)


def test_optional_and_extra_fields_are_accepted() -> None:
    body = frame(model="yolo12x", process_time_ms=41)
    del body["event"], body["segments"]
    reading = accepted(body)
    assert reading.frame.segments is None
    assert reading.occupancy_percent == 25.0


# --- what cannot be taken -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b'{"camera": "Flint_1",', b"\xff\xfe\x00garbage"]
)
def test_malformed_json_is_rejected_with_its_code(body: bytes) -> None:
    assert rejected(body).code is ErrorCode.MALFORMED_JSON


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (frame(summary=None), "summary"),
        (frame(camera=""), "camera"),
        (frame(camera="Flint 1; DROP TABLE"), "camera"),
        (frame(timestamp=True), "timestamp"),
        (frame(timestamp=-5), "timestamp"),
        (frame(timestamp="yesterday"), "timestamp"),
        (frame(summary={"total_people": -1, "free": [], "occupied": ["a"]}), "summary"),
        (frame(summary={"total_people": 1, "free": "T1", "occupied": []}), "summary"),
    ],
)
def test_wrong_shape_is_rejected_with_the_field_named(body: dict[str, Any], field: str) -> None:
    rejection = rejected(body)
    assert rejection.code is ErrorCode.INVALID_SHAPE
    assert any(detail["loc"].startswith(field) for detail in rejection.details)


def test_a_json_value_that_is_not_an_object_is_the_wrong_shape() -> None:
    assert rejected(b"[1, 2, 3]").code is ErrorCode.INVALID_SHAPE


def test_a_timestamp_out_of_range_after_its_offset_is_the_wrong_shape() -> None:
    rejection = rejected(frame(timestamp="0001-01-01T00:00:00+05:00"))
    assert rejection.code is ErrorCode.INVALID_SHAPE


def test_zero_zones_is_rejected_with_its_code() -> None:
    body = frame(summary={"total_people": 2, "free": [], "occupied": []})
    assert rejected(body).code is ErrorCode.ZERO_ZONES


def test_unknown_camera_error_frame_names_the_camera_and_the_message() -> None:
    rejection = domain.unknown_camera("Nowhere_9")
    assert rejection.code is ErrorCode.UNKNOWN_CAMERA
    sent = orjson.loads(rejection.error_frame(message_id="m-1").encode())
    assert sent["type"] == "error"
    assert sent["code"] == "unknown_camera"
    assert sent["message_id"] == "m-1"
    assert "Nowhere_9" in sent["reason"]
    # It says how to map the camera: the setting that adds cameras.
    assert "EDGEWAY_OCCUPANCY_EXTRA_CAMERAS" in sent["reason"]
    assert "details" not in sent


# --- history --------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_a_history_query_defaults_to_the_last_hour_by_the_minute() -> None:
    since, bucket = domain.history_query({"query": "history"}, now=NOW)
    assert (NOW - since).total_seconds() == 3600
    assert bucket == 60


@pytest.mark.parametrize(
    ("request_body", "complaint"),
    [
        ({"seconds": "3600"}, "seconds must be an integer"),
        ({"seconds": True}, "seconds must be an integer"),
        ({"seconds": 0}, "seconds must be between"),
        ({"seconds": 7 * 24 * 3600}, "seconds must be between"),
        ({"bucket_s": 0}, "bucket_s must be between"),
        ({"bucket_s": 1.5}, "bucket_s must be an integer"),
    ],
)
def test_a_history_query_out_of_bounds_says_what_is_wrong(
    request_body: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(domain.DomainError, match=complaint):
        domain.history_query({"query": "history", **request_body}, now=NOW)


def test_history_averages_each_window_per_location() -> None:
    def row(name: str, second: float, percent: float, people: int) -> domain.HistoryRow:
        at = datetime.fromtimestamp(1_800_000_000 + second, tz=UTC)
        return domain.HistoryRow(name, at, percent, people)

    rows = [
        row("Library", 0, 10.0, 2),
        row("Library", 59, 30.0, 4),  # the same minute: averaged
        row("Library", 125, 50.0, 7),  # two minutes on; the minute between has nothing
        row("Flint Loop", 5, 100.0, 9),
    ]
    series = domain.history_series(rows, bucket_s=60)
    assert series == [
        {"location_name": "Flint Loop", "points": [[1_800_000_000, 100.0, 9.0]]},
        {
            "location_name": "Library",
            "points": [[1_800_000_000, 20.0, 3.0], [1_800_000_120, 50.0, 7.0]],
        },
    ]
    assert domain.history_series([], bucket_s=60) == []
