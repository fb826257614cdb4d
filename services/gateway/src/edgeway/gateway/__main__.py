"""`edgeway-gateway` / `python -m edgeway.gateway`."""

from __future__ import annotations

from prometheus_client import REGISTRY

from edgeway.common.http_limits import LimitedConfig, UploadSlots, serve_http, uvicorn_config
from edgeway.common.logging import configure_logging
from edgeway.common.service import tune_gc
from edgeway.gateway.app import DirectSockets, create_app
from edgeway.gateway.ingest import api as ingest_api
from edgeway.gateway.server import PreparedFramesProtocol
from edgeway.gateway.settings import GatewaySettings
from edgeway.gateway.telemetry import uploads

# The endpoints that hold a whole upload body in memory while they check it. Each group has its
# own slots, so a burst of one kind cannot shut out the other.
INGEST_UPLOAD_PATHS = frozenset({ingest_api.UPLOAD_ENDPOINT})
TELEMETRY_UPLOAD_PATHS = frozenset(uploads.UPLOAD_PATHS)


def upload_slots(settings: GatewaySettings) -> tuple[UploadSlots, ...]:
    return (
        UploadSlots(
            group="ingest",
            paths=INGEST_UPLOAD_PATHS,
            capacity=settings.ingest_upload_slots,
            retry_after=settings.upload_retry_after,
        ),
        UploadSlots(
            group="telemetry",
            paths=TELEMETRY_UPLOAD_PATHS,
            capacity=settings.telemetry_upload_slots,
            retry_after=settings.upload_retry_after,
        ),
    )


def server_config(settings: GatewaySettings) -> LimitedConfig:
    """The gateway app under the HTTP limits every Edgeway server has, plus its upload slots and
    its WebSocket protocol (`edgeway.gateway.server`), with the fan-out sockets served directly
    (`DirectSockets`)."""
    return uvicorn_config(
        DirectSockets(create_app(settings, registry=REGISTRY)),
        settings,
        upload_slots=upload_slots(settings),
        ws=PreparedFramesProtocol,
        ws_max_size=settings.ws_max_size,
    )


def main() -> None:
    settings = GatewaySettings()
    configure_logging(service="gateway", level=settings.log_level, fmt=settings.log_format)
    config = server_config(settings)
    tune_gc(settings)
    serve_http(config)


if __name__ == "__main__":
    main()
