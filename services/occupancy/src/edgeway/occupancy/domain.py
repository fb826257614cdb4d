"""Occupancy rules, as pure functions: no I/O, so every rule is tested without a broker or database.

The arithmetic and the client message are Project Omega's (docs/replaced-systems.md), kept
wire-compatible; what Omega crashed on (unknown camera, zero zones) becomes a `Rejection` with a
code the producer is told.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.schemas.occupancy import ClientUpdate, FrameResult, Summary

# How many validation errors an error frame lists: enough to fix a payload, bounded in size.
MAX_ERROR_DETAILS = 10


class DomainError(ValueError):
    """An observation that breaks an occupancy rule; `code` is what the producer is told."""

    code: ErrorCode

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ZeroZonesError(DomainError):
    """Omega divided by zero here and lost the producer's connection."""

    code = ErrorCode.ZERO_ZONES


def occupancy_percent(summary: Summary) -> float:
    """Omega's formula: the share of occupied ROI zones (tables), in percent, not rounded.

    It counts zones, not people against capacity: that is what Omega's clients display.
    """
    zones = summary.zones
    if zones == 0:
        raise ZeroZonesError("summary has no zones: 'free' and 'occupied' are both empty")
    return len(summary.occupied) / zones * 100


@dataclass(frozen=True, slots=True)
class Reading:
    """A frame result that passed every rule that needs no lookup."""

    frame: FrameResult
    captured_at: datetime  # aware, UTC
    occupancy_percent: float


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an observation cannot be taken; stored and sent back to the producer."""

    code: ErrorCode
    reason: str
    details: Any = None

    def error_frame(self, *, message_id: str) -> ErrorFrame:
        return ErrorFrame(
            code=self.code, reason=self.reason, message_id=message_id, details=self.details
        )


def read_observation(body: bytes) -> Reading | Rejection:
    """Decode one frame result exactly as the producer sent it, and apply the rules."""
    try:
        frame = FrameResult.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(error["type"] == "json_invalid" for error in errors):
            return Rejection(ErrorCode.MALFORMED_JSON, "body is not valid JSON")
        details = [
            {"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}
            for error in errors[:MAX_ERROR_DETAILS]
        ]
        return Rejection(ErrorCode.INVALID_SHAPE, "body is not a frame result", details)
    try:
        captured_at = frame.captured_at().astimezone(UTC)
    except OverflowError:  # an ISO time whose offset pushes it past year 1 or 9999
        return Rejection(ErrorCode.INVALID_SHAPE, "timestamp is out of range")
    try:
        percent = occupancy_percent(frame.summary)
    except DomainError as exc:
        return Rejection(exc.code, exc.reason)
    return Reading(frame=frame, captured_at=captured_at, occupancy_percent=percent)


def unknown_camera(camera: str) -> Rejection:
    return Rejection(
        ErrorCode.UNKNOWN_CAMERA,
        f"camera {camera!r} is not mapped to a location: add it to the occupancy service's "
        f"EDGEWAY_OCCUPANCY_EXTRA_CAMERAS (JSON camera id -> location name, e.g. "
        f'\'{{"{camera}": "Library"}}\') or to its cameras table',
    )


def client_update(reading: Reading, *, location_name: str) -> ClientUpdate:
    """Omega's server->client message; the timestamp goes out exactly as the producer sent it."""
    return ClientUpdate(
        location_name=location_name,
        timestamp=reading.frame.timestamp,
        people_detected=reading.frame.summary.total_people,
        occupancy_percent=reading.occupancy_percent,
    )


# --- history ----------------------------------------------------------------------------------

# What a history query may ask: a day at most, in buckets of a second to an hour.
HISTORY_MAX_S = 24 * 3600
HISTORY_BUCKET_RANGE_S = (1, 3600)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One stored observation, as much of it as a history needs."""

    location_name: str
    captured_at: datetime
    occupancy_percent: float
    people: int


def history_query(request: dict[str, Any], *, now: datetime) -> tuple[datetime, int]:
    """`{"query": "history", "seconds": 3600, "bucket_s": 60}` -> (since, bucket_s); raises
    DomainError with what is wrong."""
    seconds, bucket = request.get("seconds", 3600), request.get("bucket_s", 60)
    for name, value in (("seconds", seconds), ("bucket_s", bucket)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DomainError(f"{name} must be an integer")
    if not 0 < seconds <= HISTORY_MAX_S:
        raise DomainError(f"seconds must be between 1 and {HISTORY_MAX_S}")
    low, high = HISTORY_BUCKET_RANGE_S
    if not low <= bucket <= high:
        raise DomainError(f"bucket_s must be between {low} and {high}")
    return now - timedelta(seconds=seconds), bucket


def history_series(rows: Iterable[HistoryRow], *, bucket_s: int) -> list[dict[str, Any]]:
    """Per location (by name), the mean percentage and people count of each `bucket_s` window
    that has observations: `points` of `[window start (s), percent, people]`, oldest first."""
    sums: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        start = int(row.captured_at.timestamp()) // bucket_s * bucket_s
        total = sums.setdefault(row.location_name, {}).setdefault(start, [0.0, 0.0, 0])
        total[0] += row.occupancy_percent
        total[1] += row.people
        total[2] += 1
    return [
        {
            "location_name": name,
            "points": [
                [start, round(percent / count, 2), round(people / count, 2)]
                for start, (percent, people, count) in sorted(windows.items())
            ],
        }
        for name, windows in sorted(sums.items())
    ]
