"""Occupancy settings: Omega's places by default, cameras from the environment as JSON."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeway.occupancy.settings import OccupancySettings


def test_defaults_are_omegas_seven_places_on_port_8081(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EDGEWAY_OCCUPANCY_CAMERAS", raising=False)
    settings = OccupancySettings()
    assert settings.http_port == 8081
    assert settings.database_url is None  # the embedded SQLite default
    assert settings.cameras == {
        "OW_1": "One World",
        "Flint_1": "Flint Loop",
        "PaulaPlaza_1": "Paula Plaza",
        "SU_1": "Student Union 1",
        "SU_2": "Student Union 2",
        "SU_3": "Student Union 3",
        "Tims_1": "Tim Hortons",
    }


def test_cameras_and_database_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWAY_OCCUPANCY_CAMERAS", '{"Lib_1": "Library", "Lib_2": "Library"}')
    monkeypatch.setenv("EDGEWAY_OCCUPANCY_DATABASE_URL", "postgresql://db/occupancy")
    settings = OccupancySettings()
    assert settings.cameras == {"Lib_1": "Library", "Lib_2": "Library"}
    assert settings.database_url == "postgresql://db/occupancy"


def test_extra_cameras_are_added_to_omegas_seven(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEWAY_OCCUPANCY_CAMERAS", raising=False)
    monkeypatch.setenv("EDGEWAY_OCCUPANCY_EXTRA_CAMERAS", '{"Lib_1": "Library", "SU_1": "Union"}')
    cameras = OccupancySettings().all_cameras
    assert len(cameras) == 8
    assert (cameras["Lib_1"], cameras["OW_1"], cameras["SU_1"]) == ("Library", "One World", "Union")


def test_an_unprefixed_cameras_variable_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEWAY_OCCUPANCY_CAMERAS", raising=False)
    monkeypatch.setenv("CAMERAS", '{"Other_1": "Someone else"}')
    assert "Other_1" not in OccupancySettings().cameras


def test_a_camera_id_clients_could_not_send_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWAY_OCCUPANCY_CAMERAS", '{"bad id": "Library"}')
    with pytest.raises(ValidationError):
        OccupancySettings()
