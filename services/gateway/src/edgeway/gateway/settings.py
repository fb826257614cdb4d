"""Gateway settings (environment prefix `EDGEWAY_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr, model_validator

from edgeway.common.settings import CommonSettings

# Used only when nothing else is configured in development; refused everywhere else.
DEVELOPMENT_SECRET = "edgeway-development-only-secret-do-not-deploy"  # noqa: S105


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
    # A phone's CSV file (`file_upload` on /ws/phone), whole or chunked; uploads open at once.
    max_phone_file_bytes: int = 10 * 1024 * 1024
    max_phone_uploads: int = 4
    # Request/reply to services (latest state, history).
    request_timeout: float = 2.0

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
