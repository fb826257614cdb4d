"""What a service instance says about itself on `system.readiness.<service>`.

Every service publishes its readiness (`edgeway.common.readiness`) on the broadcast exchange,
so the gateway can show each instance's `/readyz` without knowing where the instances run.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

READY = "ready"
NOT_READY = "not ready"

# The longest failure reason a report carries (an exception's text is cut to it).
REASON_MAX_CHARS = 500

Reason = Annotated[str, StringConstraints(max_length=REASON_MAX_CHARS)]


class ReadinessReport(BaseModel):
    """One instance's readiness: what its `/readyz` answers, at `checked_at`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    service: str = Field(pattern=r"^[a-z][a-z0-9-]{0,63}$", description="e.g. `occupancy`")
    instance: str = Field(
        min_length=1, max_length=255, description="`<hostname>/<pid>` of the process"
    )
    status: Literal["ready", "not ready"]
    failures: dict[str, Reason] = Field(
        default_factory=dict,
        max_length=32,
        description="each failing check (`broker`, `database`, `migrations`, ...) and why",
    )
    checked_at: float = Field(description="epoch seconds, when the checks ran")
    interval_s: float = Field(gt=0, description="seconds until the instance reports again")
    version: str | None = Field(default=None, max_length=64)
