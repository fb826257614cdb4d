"""Typed settings shared by every Edgeway process.

Every service derives its own settings class from `CommonSettings`; values come from the
environment with the `EDGEWAY_` prefix (nested fields use `__`, e.g.
`EDGEWAY_EXCHANGES__BROADCAST`). Settings are built by each entry point through a factory, never
as a module-level singleton, so tests can build as many as they need.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"


class ExchangeNames(BaseModel):
    """Exchange names, overridable one by one (`EDGEWAY_EXCHANGES__<FIELD>`).

    The WorldSystem names are kept as they are so its producers and consumers keep working.
    """

    broadcast: str = "edgeway.broadcast"
    dead_letter: str = "edgeway.dead-letter"
    occupancy_observations: str = "edgeway.occupancy.observations"
    telemetry_raw: str = "edgeway.telemetry.raw"
    video_imu: str = "edgeway.video.imu"
    ingest_uploads: str = "edgeway.ingest.uploads"
    ingest_frames: str = "edgeway.ingest.frames"
    ingest_control: str = "edgeway.ingest.control"
    tracking_commands: str = "edgeway.tracking.commands"
    tracking_videos: str = "edgeway.tracking.videos"
    tracking_detections: str = "edgeway.tracking.detections"
    tracking_unrouted: str = "edgeway.tracking.detections.unrouted"
    tracking_control: str = "edgeway.tracking.control"
    # WorldSystem ingress exchanges (docs/replaced-systems.md), used by the video issue.
    video_frames: str = "video_frames_exchange"
    video_stream: str = "video_stream_exchange"
    imu_data: str = "imu_data_exchange"
    processed_frames: str = "processed_frames_exchange"
    analysis_mode: str = "analysis_mode_exchange"
    trajectory_data: str = "trajectory_data_exchange"
    restart: str = "restart_exchange"
    ply_fanout: str = "ply_fanout_exchange"


class CommonSettings(BaseSettings):
    """Settings every Edgeway process has."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEWAY_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    # Production unless said otherwise: development signs tokens with a secret anyone can read,
    # so a process started without the variable must not fall into it. `make run`, the tests
    # and the compose and Kubernetes dev profiles say development explicitly.
    environment: Environment = Environment.PRODUCTION
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchanges: ExchangeNames = Field(default_factory=ExchangeNames)
    # Where the embedded defaults (SQLite files, local object store) live.
    data_dir: Path = Path("var")

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    # Tracing is always on in-process (the context travels in AMQP headers); exporting is opt-in.
    otel_exporter: Literal["none", "otlp", "jsonl"] = "none"
    otel_endpoint: str | None = (
        None  # OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces
    )
    otel_file: Path | None = None  # where the jsonl exporter writes one span per line

    # Seconds between tries of a commit while the database is unreachable (the last repeats
    # until it answers). 0.5 s doubling to 4 s: a PostgreSQL restart or fail-over is seen
    # within a few seconds, and an outage costs a few connection attempts a minute.
    db_retry_delays: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0], min_length=1)

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # HTTP limits on every server, the gateway and each service's internal one
    # (`edgeway.common.http_limits`). A request head: at most 32 KiB, nginx's
    # `large_client_header_buffers 4 8k` (so nothing an nginx ingress passes is refused here;
    # uvicorn's h11 default is 16 KiB), and 100 fields, Apache's `LimitRequestFields`.
    http_max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    http_max_header_count: int = Field(default=100, ge=8)
    # Seconds to send a whole request head. Apache's mod_reqtimeout allows 20 (header=20-40);
    # our heads are small (a token, no cookies), so half that.
    http_header_timeout: float = Field(default=10.0, gt=0)
    # Seconds from a request's head to the last byte of its body (408 after that). Sized for the
    # largest body accepted, the gateway's 128 MiB ingest upload, at about 10 Mbit/s.
    http_body_timeout: float = Field(default=120.0, gt=0)
    # Seconds between two readiness reports of a service instance to the gateways
    # (`edgeway.common.readiness`); an instance silent for three is shown as not reporting.
    readiness_interval_s: float = Field(default=5.0, gt=0, le=300)
    # Seconds a stopping process gives in-flight work before it exits.
    graceful_timeout: float = 10.0
    # Allocations between two young-generation garbage collections (CPython's default is 700;
    # 0 keeps it). See `edgeway.common.service.tune_gc`.
    gc_threshold: int = Field(default=10_000, ge=0)
    # NTP servers for `edgeway.common.timesync.TimeSync`, tried in order (`host` or `host:port`);
    # an empty list turns synchronisation off. EDGEWAY_NTP_SERVERS='["ntp.local"]' or '[]'.
    ntp_servers: list[str] = Field(
        default_factory=lambda: ["pool.ntp.org", "time.cloudflare.com", "time.google.com"]
    )

    @property
    def is_development(self) -> bool:
        return self.environment is Environment.DEVELOPMENT


def database_url_field(service: str) -> Any:
    """A `database_url` field read from `EDGEWAY_<SERVICE>_DATABASE_URL`.

    None means the embedded default: an SQLite file for this service under the data directory.
    """
    # One alias only: pydantic-settings reads every alias from the environment, so a bare
    # `database_url` alias would let an unrelated DATABASE_URL variable configure the service.
    # `Settings(database_url=...)` still works (populate_by_name).
    return Field(
        default=None,
        validation_alias=f"EDGEWAY_{service.upper().replace('-', '_')}_DATABASE_URL",
    )


def async_database_url(url: str | None, *, service: str, data_dir: Path) -> str:
    """The SQLAlchemy async URL for a configured URL, or the embedded SQLite default."""
    if not url:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(data_dir / f'{service}.sqlite3').resolve()}"
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        return "sqlite+aiosqlite://" + url.removeprefix("sqlite://")
    return url


def sync_database_url(async_url: str) -> str:
    """The synchronous twin of an async URL, for Alembic."""
    return async_url.replace("sqlite+aiosqlite://", "sqlite://")
