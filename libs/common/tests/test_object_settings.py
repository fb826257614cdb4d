"""The object store's settings: read from `EDGEWAY_STORAGE_*`, MinIO's guessable default
credentials refused outside development, and where the local store's URLs point."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeway.common.objects import ObjectStoreSettings
from edgeway.common.testing.environment import isolate_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_settings(monkeypatch)


def test_without_an_endpoint_the_store_is_local_and_development_may_use_minios_defaults() -> None:
    settings = ObjectStoreSettings(storage_endpoint="minio:9000")
    assert settings.storage_access_key == "minioadmin"
    assert ObjectStoreSettings().storage_endpoint is None


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_outside_development_minios_default_credentials_are_refused(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", environment)
    # The local store has no credentials to guess.
    assert ObjectStoreSettings().storage_endpoint is None
    monkeypatch.setenv("EDGEWAY_STORAGE_ENDPOINT", "minio:9000")
    with pytest.raises(ValidationError, match="minioadmin"):
        ObjectStoreSettings()
    monkeypatch.setenv("EDGEWAY_STORAGE_ACCESS_KEY", "edgeway")
    with pytest.raises(ValidationError, match="EDGEWAY_STORAGE_SECRET_KEY"):
        ObjectStoreSettings()
    monkeypatch.setenv("EDGEWAY_STORAGE_SECRET_KEY", "a-long-real-secret")
    settings = ObjectStoreSettings()
    assert settings.storage_secret_key.get_secret_value() == "a-long-real-secret"
    assert "a-long-real-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("host", "port", "public", "expected"),
    [
        ("127.0.0.1", 8084, None, "http://127.0.0.1:8084"),
        ("0.0.0.0", 8085, None, "http://127.0.0.1:8085"),
        ("::", 8084, None, "http://127.0.0.1:8084"),
        ("::1", 8084, None, "http://[::1]:8084"),
        ("0.0.0.0", 8084, "https://frames.example.com", "https://frames.example.com"),
    ],
)
def test_local_urls_point_where_clients_reach_the_service(
    host: str, port: int, public: str | None, expected: str
) -> None:
    settings = ObjectStoreSettings(http_host=host, http_port=port, storage_public_url=public)
    assert settings.objects_base_url == expected
