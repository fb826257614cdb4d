"""Settings of the ingestion service (`EDGEWAY_` environment variables)."""

from __future__ import annotations

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, field_validator, model_validator

from edgeway.common.rtsp.destinations import DEFAULT_DESTINATIONS, parse_rule
from edgeway.common.settings import CommonSettings, database_url_field

MIB = 1024 * 1024
DEFAULT_STORAGE_KEY = "minioadmin"  # MinIO's default, refused outside development


class IngestionSettings(CommonSettings):
    """What the ingestion service reads from its environment."""

    database_url: str | None = database_url_field("ingestion")
    http_port: int = 8084

    # Object storage. No endpoint: a local directory under the data directory (the embedded
    # default, for `make run`); otherwise any S3 API through the `minio` client.
    storage_endpoint: str | None = None  # host:port, e.g. minio:9000
    # MinIO's own defaults, so a development stack talks to a fresh MinIO; refused elsewhere.
    storage_access_key: str = DEFAULT_STORAGE_KEY
    storage_secret_key: SecretStr = SecretStr(DEFAULT_STORAGE_KEY)
    storage_secure: bool = False
    storage_region: str | None = None
    storage_bucket: str = "trackshift-frames"  # the seed's bucket
    # Presigned GET URLs are made when a status is read, valid this long (the seed's 1 h).
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Without an endpoint the service serves the local store's objects itself, on its HTTP
    # port, at signed URLs made with this base (default: http://<http_host>:<http_port>, with
    # 127.0.0.1 for a wildcard host). Set it where clients reach the service by another name.
    storage_public_url: str | None = None

    # Images: the seed's 50 MiB per file (checked again here, whatever the gateway let through);
    # decoding is bounded by pixels, time and threads.
    max_file_bytes: int = Field(default=50 * MIB, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)
    decode_timeout_s: float = Field(default=5.0, gt=0)
    decode_workers: int = Field(default=2, ge=1)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    # Files of one upload being checked and stored at once, per replica.
    upload_prefetch: int = Field(default=16, ge=1)

    # RTSP captures (the seed's defaults: 1 fps, 30 s capture timeout, 3 reconnects, 10 streams).
    max_concurrent_streams: int = Field(default=10, ge=1)
    # Of those, how many one caller (a token's subject) may run at once: one caller cannot take
    # every stream from the others.
    max_streams_per_principal: int = Field(default=3, ge=1)
    # Where a capture may connect (destinations.py): entries HOST[:PORTS]. HOST is '*' or a host
    # name ('*.example.com' too), which admit public addresses only, or an address or CIDR
    # network, which admit any address inside it: the only way to loopback and private ranges.
    # PORTS: 554, 8554-8560 or '*' (the default). The default: public cameras on the RTSP ports.
    rtsp_allowed_destinations: list[str] = Field(default_factory=lambda: list(DEFAULT_DESTINATIONS))
    default_fps: float = Field(default=1.0, gt=0, le=30)
    default_capture_duration_s: float = Field(default=30.0, ge=1, le=3600)
    open_timeout_s: float = Field(default=10.0, gt=0)
    stall_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_attempts: int = Field(default=3, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    capture_buffer_frames: int = Field(default=100, ge=1)
    change_threshold: float = Field(default=0.08, gt=0, lt=1)
    # A running capture renews its lease this often (a third of it); a lease that ran out means
    # its replica died, and the sweeper fails the request.
    job_lease_s: float = Field(default=15.0, gt=0)

    # Housekeeping.
    sweep_interval_s: float = Field(default=60.0, gt=0)
    # An object with no row this old was left by a crash between put and commit.
    orphan_grace_s: float = Field(default=600.0, ge=0)
    # An upload whose files have not all arrived this long after it was opened has lost some.
    upload_timeout_s: float = Field(default=600.0, gt=0)
    retention_days: float = Field(default=30.0, gt=0)

    # Fernet key (urlsafe base64, 32 bytes) sealing RTSP URLs with credentials at rest. In
    # development a key is made once and kept in the data directory; elsewhere it must be set.
    credentials_key: SecretStr | None = None

    @property
    def objects_base_url(self) -> str:
        """Where clients reach the local store's signed URLs."""
        if self.storage_public_url is not None:
            return self.storage_public_url
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    @field_validator("credentials_key")
    @classmethod
    def _a_fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                Fernet(value.get_secret_value().encode())
            except ValueError:
                raise ValueError(
                    "EDGEWAY_CREDENTIALS_KEY is not a Fernet key (32 url-safe base64-encoded bytes)"
                ) from None
        return value

    @field_validator("rtsp_allowed_destinations")
    @classmethod
    def _destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_rule(entry)  # a ValueError says which entry and what is wrong with it
        return value

    @model_validator(mode="after")
    def _key_outside_development(self) -> IngestionSettings:
        if self.credentials_key is None and not self.is_development:
            raise ValueError(
                "EDGEWAY_CREDENTIALS_KEY must be set outside development (a Fernet key: "
                "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())')"
            )
        secret = self.storage_secret_key.get_secret_value()
        if (
            self.storage_endpoint
            and not self.is_development
            and DEFAULT_STORAGE_KEY
            in (
                self.storage_access_key,
                secret,
            )
        ):
            raise ValueError(
                "the S3 storage uses MinIO's default credentials (minioadmin), which anyone "
                "can guess: set EDGEWAY_STORAGE_ACCESS_KEY and EDGEWAY_STORAGE_SECRET_KEY"
            )
        return self
