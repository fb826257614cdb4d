"""The error frame a client or producer gets when what it sent cannot be taken."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ValidationError

from edgeway.common.errors import ErrorObject, validation_reason


class ErrorCode(StrEnum):
    MALFORMED_JSON = "malformed_json"
    INVALID_SHAPE = "invalid_shape"
    ZERO_ZONES = "zero_zones"
    UNKNOWN_CAMERA = "unknown_camera"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    UNKNOWN_VEHICLE = "unknown_vehicle"
    INVALID_TELEMETRY = "invalid_telemetry"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    FORBIDDEN = "forbidden"  # the token may not produce for what it names
    IN_USE = "in_use"  # another connection produces for that device or vehicle
    INVALID_VIN = "invalid_vin"  # not 17 characters of digits and capitals other than I, O, Q
    NOT_FOUND = "not_found"  # no such thing (a vehicle that is not registered)
    UNKNOWN_ENVIRONMENT = "unknown_environment"  # no tracking environment of that id
    OUT_OF_FRAME = "out_of_frame"  # a detection box outside its camera's frame
    NOT_TRACKING = "not_tracking"  # no live task takes this environment's detections now


class ErrorFrame(ErrorObject):
    """The error object (`edgeway.common.errors`) on a WebSocket, with the `message_id` of the
    message it refuses when that message had one; the socket stays open."""

    code: ErrorCode
    message_id: str | None = None

    def encode(self) -> str:
        """The frame as WebSocket text."""
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def invalid(cls, error: ValidationError, *, what: str = "message") -> ErrorFrame:
        """What a producer is told when its `what` does not validate, whichever endpoint caught
        it: `malformed_json` when it is not JSON, else `invalid_shape` with the first problems
        as `where: what; ...` (`edgeway.common.errors.validation_reason`, as HTTP's 422 says)."""
        problems = error.errors(include_url=False, include_input=False)
        if any(problem["type"] == "json_invalid" for problem in problems):
            return cls(code=ErrorCode.MALFORMED_JSON, reason=f"the {what} is not valid JSON")
        return cls(code=ErrorCode.INVALID_SHAPE, reason=validation_reason(list(problems)))
