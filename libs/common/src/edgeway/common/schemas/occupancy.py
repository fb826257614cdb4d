"""Project Omega's occupancy messages (docs/replaced-systems.md), kept wire-compatible.

What the camera model sends:
`{"event":"frame_result","camera":"Flint_1","timestamp":<epoch float or ISO>,
  "summary":{"total_people":int,"free":[roi],"occupied":[roi]},"segments":[...]}`
What clients receive: `{"location_name","timestamp","people_detected","occupancy_percent"}`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

OBSERVATION_TYPE = "occupancy.observation.v1"
UPDATE_TYPE = "occupancy.update.v1"

# Omega camera ids look like "Flint_1", "SU_3"; they also end up in logs and metrics labels.
CameraId = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
RoiName = Annotated[str, Field(max_length=200)]


class Summary(BaseModel):
    model_config = ConfigDict(extra="allow")

    total_people: Annotated[StrictInt, Field(ge=0, le=100_000)]
    free: Annotated[list[RoiName], Field(max_length=10_000)]
    occupied: Annotated[list[RoiName], Field(max_length=10_000)]

    @property
    def zones(self) -> int:
        return len(self.free) + len(self.occupied)


class FrameResult(BaseModel):
    """One frame result from a camera model. Unknown extra fields are kept and ignored."""

    model_config = ConfigDict(extra="allow")

    event: str | None = "frame_result"
    camera: CameraId
    # Omega's producer sends `time.time()` floats; its README says ISO strings. Both are taken,
    # and the value is forwarded to clients exactly as it came.
    timestamp: StrictFloat | StrictInt | str
    summary: Summary
    segments: list[dict[str, Any]] | None = None

    @field_validator("timestamp")
    @classmethod
    def _timestamp_is_readable(cls, value: float | int | str) -> float | int | str:
        parse_timestamp(value)
        return value

    def captured_at(self) -> datetime:
        return parse_timestamp(self.timestamp)


def parse_timestamp(value: float | int | str) -> datetime:
    """Epoch seconds or ISO 8601 to an aware UTC datetime; naive ISO times are taken as UTC."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("timestamp must be epoch seconds or an ISO 8601 string") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if not 0 <= value < 32_503_680_000:  # year 3000: anything later is not seconds
        raise ValueError("timestamp must be epoch seconds (non-negative, before year 3000)")
    return datetime.fromtimestamp(value, tz=UTC)


class ClientUpdate(BaseModel):
    """Omega's server→client message, field for field."""

    location_name: str
    timestamp: float | int | str
    people_detected: int
    occupancy_percent: float
