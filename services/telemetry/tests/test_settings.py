"""Telemetry settings: the seed's car and two demo cars by default, vehicles from the environment
as JSON, the predictor's parameters (the seed's by default)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import PredictorConfig
from edgeway.common.topology import Topology
from edgeway.telemetry.settings import TelemetrySettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "EDGEWAY_TELEMETRY_VEHICLES",
        "EDGEWAY_TELEMETRY_DATABASE_URL",
        "EDGEWAY_PREDICTOR_ALPHA",
        "EDGEWAY_OFFLINE_AFTER_S",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_seeds_car_and_predictor_on_port_8082() -> None:
    settings = TelemetrySettings()
    assert settings.http_port == 8082
    assert settings.database_url is None  # the embedded SQLite default
    assert settings.vehicles[0] == "5YJ3E1EA1KF000001"
    assert len(set(settings.vehicles)) == 3
    assert [wire.check_vin(vin) for vin in settings.vehicles] == settings.vehicles
    assert settings.predictor == PredictorConfig()
    assert (settings.offline_after_s, settings.commit_group_size) == (5.0, 128)


def test_vehicles_database_and_predictor_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEWAY_TELEMETRY_VEHICLES", '["1hgcm82633a004352"]')
    monkeypatch.setenv("EDGEWAY_TELEMETRY_DATABASE_URL", "postgresql://db/telemetry")
    monkeypatch.setenv("EDGEWAY_PREDICTOR_ALPHA", "0.5")
    monkeypatch.setenv("EDGEWAY_PREDICTOR_RESYNC_INTERVAL_MS", "10000")
    monkeypatch.setenv("EDGEWAY_OFFLINE_AFTER_S", "30")
    settings = TelemetrySettings()
    assert settings.vehicles == ["1HGCM82633A004352"]  # as the wire reads VINs
    assert settings.database_url == "postgresql://db/telemetry"
    assert settings.predictor == PredictorConfig(alpha=0.5, resync_interval_ms=10_000)
    assert settings.offline_after_s == 30.0


def test_an_unprefixed_vehicles_variable_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEHICLES", '["1HGCM82633A004352"]')
    assert "1HGCM82633A004352" not in TelemetrySettings().vehicles


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EDGEWAY_TELEMETRY_VEHICLES", '["5YJ3E1EA1KF00000O"]'),  # O is not a VIN character
        ("EDGEWAY_PREDICTOR_ALPHA", "0"),
        ("EDGEWAY_PREDICTOR_SPEED_BAND", "0"),
        ("EDGEWAY_OFFLINE_AFTER_S", "-1"),
    ],
)
def test_what_the_service_could_not_work_with_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        TelemetrySettings()


def test_uploads_are_consumed_by_a_single_active_consumer() -> None:
    """One replica at a time decodes, so each vehicle's packets meet its state in order."""
    arguments = Topology().telemetry_raw_queue.arguments or {}
    assert arguments.get("x-single-active-consumer") is True
