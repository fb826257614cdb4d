"""Gateway settings (environment prefix `EDGEWAY_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from edgeway.common.settings import CommonSettings

# Used only when nothing else is configured in development; refused everywhere else.
DEVELOPMENT_SECRET = "edgeway-development-only-secret-do-not-deploy"  # noqa: S105
# The gateway's internal metrics port outside development (the manifests' scrape annotation).
METRICS_PORT = 9108


class GatewaySettings(CommonSettings):
    http_port: int = 8000

    # Token verification: an HS256 shared secret (development), or asymmetric keys (production)
    # as one PEM public key or a JWKS file whose keys are picked by `kid`.
    jwt_secret: SecretStr | None = None
    jwt_public_key_file: Path | None = None
    jwks_file: Path | None = None
    jwt_audience: str = "edgeway"
    jwt_issuer: str = "edgeway"
    # Scopes granted to a connection that sends no token. Empty: every endpoint needs a token.
    anonymous_scopes: frozenset[str] = frozenset()
    # Browser origins allowed to open WebSockets ("*" allows any; only sensible in development).
    allowed_origins: frozenset[str] = frozenset()

    # Edge limits. Omega frame results are ~1 KB; 64 KiB leaves room for many segments.
    max_message_bytes: int = 64 * 1024
    # Frames above this are refused by the WebSocket protocol itself (close 1009). Above the
    # largest endpoint limit (a phone JPEG), so those limits answer with an error frame instead.
    ws_max_size: int = 16 * 1024 * 1024
    # Telemetry uploads: a CompressedBatch of 10 000 records is ~300 KB.
    max_upload_bytes: int = 1024 * 1024
    producer_rate: float = 1000.0  # messages/s per producer connection (token bucket)
    producer_burst: int = 2000
    # Messages published but not yet confirmed, per producer connection.
    publish_window: int = 256
    # Per client send queue; a client this far behind starts losing its oldest messages.
    client_queue_size: int = 1024
    # Phone video: one `/ws/video` message (an Android H.264 packet or a few; a 4K keyframe at
    # a high bitrate is ~1 MB) and one `/ws/phone` JPEG (a 12 MP photo at high quality is ~6 MB).
    max_video_message_bytes: int = 4 * 1024 * 1024
    max_jpeg_bytes: int = 8 * 1024 * 1024
    # Packets queued per video consumer before it skips to the next keyframe. Must hold a whole
    # GOP (keyframe interval x frame rate + SPS and PPS) or late joiners skip their GOP: 256 is
    # ~8 s at 30 fps, against the 1-2 s keyframe interval phones use.
    video_queue_size: int = 256
    # Ingestion (the seed's 50 MiB per file and 10 files per batch). The whole upload body is
    # held in memory while it is checked, so it has its own, smaller cap.
    ingest_max_file_bytes: int = 50 * 1024 * 1024
    ingest_max_files: int = 10
    ingest_max_body_bytes: int = 128 * 1024 * 1024
    # An image declaring more pixels than this is a decompression bomb (checked from its header).
    ingest_max_pixels: int = 40_000_000
    # Upload requests served at once (each holds its body, up to its cap, in memory); one more
    # is answered 503 with Retry-After before its body is read (`edgeway.gateway.limits`).
    # Ingest: 4 x the 128 MiB body cap = 512 MiB at most. Telemetry: 128 x the 1 MiB cap =
    # 128 MiB at most; an upload is held for milliseconds, and the benchmark's 32-50 loggers
    # sending at once stay well inside it.
    ingest_upload_slots: int = Field(default=4, ge=1)
    telemetry_upload_slots: int = Field(default=128, ge=1)
    upload_retry_after: int = Field(default=2, ge=1)  # seconds, the 503's Retry-After
    # Telemetry uploads waiting for a publish while the broker confirms earlier ones
    # (`edgeway.gateway.telemetry.publisher`): past either bound an upload gets 503 with
    # Retry-After instead of waiting. An upload left by its client stays waiting (it may be
    # published yet), so the upload slots alone do not bound them. 1024 uploads or 16 MiB is
    # four full publishes' worth (256 uploads, 4 MiB each): a broker that far behind is slow.
    telemetry_waiting_uploads: int = Field(default=1024, ge=1)
    telemetry_waiting_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    # How long the list of registered vehicles is trusted before it is asked for again: a
    # vehicle retired through any replica (or the telemetry service) stops being accepted
    # within this many seconds, as long as the telemetry service answers.
    telemetry_vehicles_cache_s: float = Field(default=5.0, gt=0, le=3600)
    # A phone's CSV file (`file_upload` on /ws/phone), whole or chunked; uploads open at once.
    max_phone_file_bytes: int = 10 * 1024 * 1024
    max_phone_uploads: int = 4
    # Tracking: a camera's video (`PUT .../cameras/{cam}/video`) is held whole while it is
    # checked and published as one message, well under RabbitMQ's 128 MiB message limit;
    # `tracking_video_slots` of them at once (2 x 64 MiB in memory at most). An edge frame of
    # detections: 50 people with 512-d Re-ID vectors as JSON text is ~300 KB.
    tracking_max_video_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    tracking_video_slots: int = Field(default=2, ge=1)
    tracking_max_detections_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Request/reply to services (latest state, history).
    request_timeout: float = 2.0
    # Sockets whose messages fan out to people, limited to what their purpose needs.
    # A logger's control socket: status, acks and log lines of a line or two each; its log lines
    # reach every dashboard, so beyond `logger_lines_rate` a second they are dropped (and
    # counted, and said once). A loop printing every record is ~10 lines/s (the seed's logger).
    max_control_message_bytes: int = 16 * 1024
    control_rate: float = 50.0
    control_burst: int = 100
    logger_lines_rate: float = 10.0
    logger_lines_burst: int = 50
    max_log_line_chars: int = 1000
    # Viewer commands to phones: a joystick sends ~30 a second (the seed app's touch rate).
    viewer_command_rate: float = 60.0
    viewer_command_burst: int = 120
    # The API documents (/docs, /redoc, /openapi.json): on in development, off elsewhere unless
    # asked for (they map every endpoint for whoever finds the gateway).
    docs: bool | None = None
    # The web console's build (`npm run build` in web/); None: the repository's web/dist. The
    # images carry it at /app/console (deploy/docker/service.Dockerfile).
    console_dir: Path | None = None
    # Where Prometheus reads /metrics. Outside development only on this internal port (default
    # METRICS_PORT), never on the public one; in development on the public port unless set.
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # inside the pod or container; not behind the ingress

    @property
    def docs_enabled(self) -> bool:
        return self.is_development if self.docs is None else self.docs

    @property
    def internal_metrics_port(self) -> int | None:
        """The internal port for /metrics, or None to serve it on the public port."""
        if self.metrics_port is None and not self.is_development:
            return METRICS_PORT
        return self.metrics_port

    @model_validator(mode="after")
    def _keys_fail_closed(self) -> GatewaySettings:
        if self.is_development:
            if not (self.jwt_secret or self.jwt_public_key_file or self.jwks_file):
                self.jwt_secret = SecretStr(DEVELOPMENT_SECRET)
            return self
        if self.jwt_secret and self.jwt_secret.get_secret_value() == DEVELOPMENT_SECRET:
            raise ValueError("the development JWT secret is refused outside development")
        if self.jwt_secret and len(self.jwt_secret.get_secret_value()) < 32:
            raise ValueError("EDGEWAY_JWT_SECRET must be at least 32 characters")
        if not (self.jwt_secret or self.jwt_public_key_file or self.jwks_file):
            raise ValueError(
                "no token keys: set EDGEWAY_JWT_SECRET, EDGEWAY_JWT_PUBLIC_KEY_FILE or "
                "EDGEWAY_JWKS_FILE (outside development there is no default)"
            )
        if "*" in self.allowed_origins:
            raise ValueError("EDGEWAY_ALLOWED_ORIGINS='*' is refused outside development")
        return self
