"""`python -m edgeway.telemetry`: the telemetry service with its operations endpoints."""

from __future__ import annotations

from edgeway.common.service import serve
from edgeway.telemetry.app import SERVICE, build_app
from edgeway.telemetry.settings import TelemetrySettings


def main() -> None:
    serve(SERVICE, TelemetrySettings(), build_app)


if __name__ == "__main__":
    main()
