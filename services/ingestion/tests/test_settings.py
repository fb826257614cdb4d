"""Ingestion settings: the seed's defaults, the credentials key required outside development,
everything named by `EDGEWAY_` environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from edgeway.common.testing.environment import isolate_settings
from edgeway.ingestion.settings import MIB, IngestionSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_settings(monkeypatch)


def test_defaults_are_the_seeds_bucket_expiry_limits_and_an_embedded_store() -> None:
    settings = IngestionSettings()
    assert settings.storage_bucket == "trackshift-frames"
    assert settings.presign_expiry_s == 3600
    assert settings.max_concurrent_streams == 10
    assert settings.max_file_bytes == 50 * MIB
    assert (settings.default_fps, settings.default_capture_duration_s) == (1.0, 30.0)
    assert settings.reconnect_attempts == 3
    assert settings.http_port == 8084
    # Nothing to run beside it: a local directory and an SQLite file, a key made on first start.
    assert settings.storage_endpoint is None
    assert settings.database_url is None
    assert settings.is_development
    assert settings.credentials_key is None


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_outside_development_the_credentials_key_is_required(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", environment)
    with pytest.raises(ValidationError, match="EDGEWAY_CREDENTIALS_KEY must be set") as caught:
        IngestionSettings()
    # The message says how to make one.
    assert "Fernet.generate_key()" in str(caught.value)


@pytest.mark.parametrize(
    ("access", "secret"), [(None, None), ("edgeway", None), (None, "a-long-real-secret")]
)
def test_outside_development_minios_default_credentials_are_refused(
    monkeypatch: pytest.MonkeyPatch, access: str | None, secret: str | None
) -> None:
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", "production")
    monkeypatch.setenv("EDGEWAY_CREDENTIALS_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("EDGEWAY_STORAGE_ENDPOINT", "minio:9000")
    for name, value in (("ACCESS", access), ("SECRET", secret)):
        if value is not None:
            monkeypatch.setenv(f"EDGEWAY_STORAGE_{name}_KEY", value)
    with pytest.raises(ValidationError, match="minioadmin"):
        IngestionSettings()
    monkeypatch.setenv("EDGEWAY_STORAGE_ACCESS_KEY", "edgeway")
    monkeypatch.setenv("EDGEWAY_STORAGE_SECRET_KEY", "a-long-real-secret")
    assert IngestionSettings().storage_access_key == "edgeway"


def test_production_starts_with_a_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", "production")
    monkeypatch.setenv("EDGEWAY_CREDENTIALS_KEY", key)
    settings = IngestionSettings()
    assert settings.credentials_key is not None
    assert settings.credentials_key.get_secret_value() == key
    assert key not in repr(settings)


def test_storage_database_and_limits_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in {
        "EDGEWAY_STORAGE_ENDPOINT": "minio:9000",
        "EDGEWAY_STORAGE_ACCESS_KEY": "ingest",
        "EDGEWAY_STORAGE_SECRET_KEY": "very-secret",
        "EDGEWAY_STORAGE_SECURE": "true",
        "EDGEWAY_STORAGE_REGION": "eu-west-1",
        "EDGEWAY_STORAGE_BUCKET": "frames-prod",
        "EDGEWAY_PRESIGN_EXPIRY_S": "600",
        "EDGEWAY_MAX_CONCURRENT_STREAMS": "4",
        "EDGEWAY_MAX_FILE_BYTES": "1048576",
        "EDGEWAY_RETENTION_DAYS": "7",
        "EDGEWAY_INGESTION_DATABASE_URL": "postgresql://db/ingestion",
        "EDGEWAY_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    settings = IngestionSettings()
    assert settings.storage_endpoint == "minio:9000"
    assert settings.storage_access_key == "ingest"
    assert settings.storage_secret_key.get_secret_value() == "very-secret"
    assert "very-secret" not in repr(settings)
    assert settings.storage_secure is True
    assert settings.storage_region == "eu-west-1"
    assert settings.storage_bucket == "frames-prod"
    assert settings.presign_expiry_s == 600
    assert settings.max_concurrent_streams == 4
    assert settings.max_file_bytes == MIB
    assert settings.retention_days == 7.0
    assert settings.database_url == "postgresql://db/ingestion"
    assert settings.data_dir == tmp_path


def test_an_unprefixed_database_url_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone-else/db")
    assert IngestionSettings().database_url is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EDGEWAY_PRESIGN_EXPIRY_S", "30"),  # shorter than a client can use
        ("EDGEWAY_PRESIGN_EXPIRY_S", str(8 * 24 * 3600)),  # past S3's 7-day SigV4 limit
        ("EDGEWAY_MAX_CONCURRENT_STREAMS", "0"),
        ("EDGEWAY_MAX_STREAMS_PER_PRINCIPAL", "0"),
        ("EDGEWAY_DEFAULT_FPS", "60"),
        ("EDGEWAY_JPEG_QUALITY", "101"),
        ("EDGEWAY_CHANGE_THRESHOLD", "1.5"),
    ],
)
def test_values_out_of_bounds_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("EDGEWAY_").lower()
    with pytest.raises(ValidationError, match=field):
        IngestionSettings()


def test_a_credentials_key_that_is_not_a_fernet_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a Fernet key"):
        IngestionSettings(credentials_key="not-a-key")


def test_captures_reach_public_cameras_on_the_rtsp_ports_unless_listed_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = IngestionSettings()
    assert settings.rtsp_allowed_destinations == ["*:554", "*:322"]
    assert settings.max_streams_per_principal == 3
    monkeypatch.setenv("EDGEWAY_RTSP_ALLOWED_DESTINATIONS", '["127.0.0.1", "10.0.0.0/8:554"]')
    monkeypatch.setenv("EDGEWAY_MAX_STREAMS_PER_PRINCIPAL", "1")
    settings = IngestionSettings()
    assert settings.rtsp_allowed_destinations == ["127.0.0.1", "10.0.0.0/8:554"]
    assert settings.max_streams_per_principal == 1


def test_a_bad_destination_entry_stops_the_service_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEWAY_RTSP_ALLOWED_DESTINATIONS", '["*:554", "10.0.0.1/8"]')
    with pytest.raises(ValidationError, match=r"10\.0\.0\.1/8.*host bits"):
        IngestionSettings()
