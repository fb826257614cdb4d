"""Settings of the ingestion service (`EDGEWAY_` environment variables)."""

from __future__ import annotations

from pydantic import Field

from edgeway.common.objects import ObjectStoreSettings
from edgeway.common.rtsp.settings import RtspSettings
from edgeway.common.settings import database_url_field

MIB = 1024 * 1024


class IngestionSettings(ObjectStoreSettings, RtspSettings):
    """What the ingestion service reads from its environment (the object store's and the RTSP
    cameras' settings are `ObjectStoreSettings` and `RtspSettings`)."""

    database_url: str | None = database_url_field("ingestion")
    http_port: int = 8084

    storage_bucket: str = "trackshift-frames"  # the seed's bucket
    # Presigned GET URLs are made when a status is read, valid this long (the seed's 1 h).
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

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
