"""`edgeway-gateway` / `python -m edgeway.gateway`."""

from __future__ import annotations

import uvicorn

from edgeway.common.logging import configure_logging
from edgeway.common.service import tune_gc
from edgeway.gateway.app import create_app
from edgeway.gateway.server import PreparedFramesProtocol
from edgeway.gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging(service="gateway", level=settings.log_level, fmt=settings.log_format)
    app = create_app(settings)
    tune_gc(settings)
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="uvloop",
        ws=PreparedFramesProtocol,
        ws_max_size=settings.ws_max_size,
        ws_per_message_deflate=False,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
    )


if __name__ == "__main__":
    main()
