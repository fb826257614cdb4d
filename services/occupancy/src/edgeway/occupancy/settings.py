"""Settings of the occupancy service (`EDGEWAY_` environment variables)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from edgeway.common.schemas.occupancy import CameraId
from edgeway.common.settings import CommonSettings, database_url_field

LocationName = Annotated[str, Field(min_length=1, max_length=200)]

# Project Omega's hard-coded `DataHandler.places` (docs/replaced-systems.md): the seed, not the
# source of truth. Cameras an operator adds to the `cameras` table work as well.
OMEGA_PLACES: dict[str, str] = {
    "OW_1": "One World",
    "Flint_1": "Flint Loop",
    "PaulaPlaza_1": "Paula Plaza",
    "SU_1": "Student Union 1",
    "SU_2": "Student Union 2",
    "SU_3": "Student Union 3",
    "Tims_1": "Tim Hortons",
}


class OccupancySettings(CommonSettings):
    """What the occupancy service reads from its environment."""

    database_url: str | None = database_url_field("occupancy")
    http_port: int = 8081
    # Camera id -> location name, upserted into the database at start.
    # `EDGEWAY_OCCUPANCY_CAMERAS='{"Cam_1": "Library"}'` (JSON). No bare `cameras` alias: with an
    # alias pydantic-settings reads the environment variable of that name, so an unrelated
    # `CAMERAS` variable would configure the service; `OccupancySettings(cameras=...)` works
    # anyway (`populate_by_name`).
    cameras: dict[CameraId, LocationName] = Field(
        default_factory=lambda: dict(OMEGA_PLACES),
        validation_alias="EDGEWAY_OCCUPANCY_CAMERAS",
    )
    # Cameras added to `cameras` (Omega's seven unless that is set): the way to add one without
    # repeating the seven. `EDGEWAY_OCCUPANCY_EXTRA_CAMERAS='{"Lib_1": "Library"}'`; a camera
    # in both takes this location.
    extra_cameras: dict[CameraId, LocationName] = Field(
        default_factory=dict, validation_alias="EDGEWAY_OCCUPANCY_EXTRA_CAMERAS"
    )
    # Most observations committed in one transaction (group commit; see edgeway.common.batching).
    commit_group_size: int = Field(default=128, ge=1, le=1000)

    @property
    def all_cameras(self) -> dict[str, str]:
        """Every camera upserted at start: `cameras`, then `extra_cameras` over them."""
        return {**self.cameras, **self.extra_cameras}
