"""The settings of a service that reads RTSP cameras: the destination allowlist checked entry by
entry at start, and the credentials key a Fernet key, required outside development."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from edgeway.common.rtsp.destinations import DEFAULT_DESTINATIONS
from edgeway.common.rtsp.settings import RtspSettings
from edgeway.common.testing.environment import isolate_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_settings(monkeypatch)


def test_defaults_admit_public_cameras_on_the_rtsp_ports_and_make_the_key_in_development() -> None:
    settings = RtspSettings()
    assert settings.rtsp_allowed_destinations == list(DEFAULT_DESTINATIONS)
    assert settings.credentials_key is None


def test_destinations_come_from_the_environment_and_a_bad_entry_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEWAY_RTSP_ALLOWED_DESTINATIONS", '["127.0.0.1", "10.0.0.0/8:554"]')
    assert RtspSettings().rtsp_allowed_destinations == ["127.0.0.1", "10.0.0.0/8:554"]
    monkeypatch.setenv("EDGEWAY_RTSP_ALLOWED_DESTINATIONS", '["*:554", "10.0.0.1/8"]')
    with pytest.raises(ValidationError, match=r"10\.0\.0\.1/8.*host bits"):
        RtspSettings()


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_outside_development_the_key_is_required_and_must_be_a_fernet_key(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", environment)
    with pytest.raises(ValidationError, match="EDGEWAY_CREDENTIALS_KEY must be set") as caught:
        RtspSettings()
    assert "Fernet.generate_key()" in str(caught.value)  # it says how to make one
    monkeypatch.setenv("EDGEWAY_CREDENTIALS_KEY", "not-a-key")
    with pytest.raises(ValidationError, match="not a Fernet key"):
        RtspSettings()
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("EDGEWAY_CREDENTIALS_KEY", key)
    settings = RtspSettings()
    assert settings.credentials_key is not None
    assert settings.credentials_key.get_secret_value() == key
    assert key not in repr(settings)
