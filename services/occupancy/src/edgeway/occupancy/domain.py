"""Occupancy rules, as pure functions: no I/O, so every rule is tested without a broker or database.

The arithmetic and the client message are Project Omega's (docs/seed-systems.md §1), kept
wire-compatible; what Omega crashed on (unknown camera, zero zones) becomes a `Rejection` with a
code the producer is told.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
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
    return Rejection(ErrorCode.UNKNOWN_CAMERA, f"camera {camera!r} is not mapped to a location")


def client_update(reading: Reading, *, location_name: str) -> ClientUpdate:
    """Omega's server->client message; the timestamp goes out exactly as the producer sent it."""
    return ClientUpdate(
        location_name=location_name,
        timestamp=reading.frame.timestamp,
        people_detected=reading.frame.summary.total_people,
        occupancy_percent=reading.occupancy_percent,
    )
