"""`python -m edgeway.telemetry`: the telemetry service with its operations endpoints."""

from __future__ import annotations

from edgeway.common.logging import configure_logging
from edgeway.common.service import run
from edgeway.common.tracing import configure_tracing
from edgeway.telemetry.handlers import SERVICE, build_app
from edgeway.telemetry.settings import TelemetrySettings


def main() -> None:
    settings = TelemetrySettings()
    configure_logging(service=SERVICE, level=settings.log_level, fmt=settings.log_format)
    tracer_provider = configure_tracing(settings, service=SERVICE)
    run(build_app(settings, tracer_provider=tracer_provider), settings)


if __name__ == "__main__":
    main()
