"""Settings of the telemetry service (`EDGEWAY_` environment variables)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from edgeway.common.settings import CommonSettings, database_url_field
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import PredictorConfig

# The Python Cloud Server's logger VIN (its `X-Vehicle-VIN` default), then two demo cars.
SEED_VIN = "5YJ3E1EA1KF000001"
DEMO_VINS = ("5YJ3E1EA1KF000002", "5YJYGDEE5MF000003")
DEFAULT_PREDICTOR = PredictorConfig()


def _vin(value: str) -> str:
    try:
        return wire.check_vin(value)
    except wire.WireError as exc:
        raise ValueError(exc.reason) from exc


Vin = Annotated[str, AfterValidator(_vin)]


class TelemetrySettings(CommonSettings):
    """What the telemetry service reads from its environment."""

    database_url: str | None = database_url_field("telemetry")
    http_port: int = 8082
    # Vehicles whose loggers may upload, added to the database at start (never removed).
    # `EDGEWAY_TELEMETRY_VEHICLES='["5YJ3E1EA1KF000001"]'` (JSON). No bare `vehicles` alias:
    # pydantic-settings would read an unrelated VEHICLES variable (see OccupancySettings.cameras).
    vehicles: list[Vin] = Field(
        default_factory=lambda: [SEED_VIN, *DEMO_VINS],
        validation_alias="EDGEWAY_TELEMETRY_VEHICLES",
    )
    # How long the consuming replica trusts a vehicle it looked up (store.VehicleIdCache):
    # a vehicle retired through another replica (or in the table) stops being taken within
    # this many seconds. A lookup is one indexed SELECT per vehicle per period.
    vehicle_cache_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        validation_alias="EDGEWAY_TELEMETRY_VEHICLE_CACHE_S",
    )
    # The predictor's parameters: they must be the loggers' (a decoder with another alpha
    # reconstructs other values). Defaults: the Python Cloud Server's (its predictor.py).
    predictor_alpha: float = Field(default=DEFAULT_PREDICTOR.alpha, gt=0, le=1)
    predictor_speed_band: float = Field(default=DEFAULT_PREDICTOR.speed_band, gt=0)
    predictor_power_band: float = Field(default=DEFAULT_PREDICTOR.power_band, gt=0)
    predictor_battery_band: float = Field(default=DEFAULT_PREDICTOR.battery_band, gt=0)
    predictor_heading_band: float = Field(default=DEFAULT_PREDICTOR.heading_band, gt=0)
    predictor_resync_interval_ms: int = Field(default=DEFAULT_PREDICTOR.resync_interval_ms, gt=0)
    # A record that reaches the gateway more than this long after its own timestamp was
    # buffered by its logger (store-and-forward): a run of them is one offline session.
    offline_after_s: float = Field(default=5.0, gt=0)
    # Most uploads committed in one transaction (group commit; see edgeway.common.batching).
    commit_group_size: int = Field(default=128, ge=1, le=1000)
    # How long a group that is not full waits for more uploads before it is committed: at a
    # steady rate of single-record uploads, a few per transaction instead of one or two.
    commit_linger_ms: float = Field(default=5.0, ge=0, le=1000)
    # Most stored records waiting to be broadcast (edgeway.telemetry.broadcast): past it the
    # oldest waiting ones are dropped, replays first. About a second of broadcasts, ~20 MB.
    broadcast_backlog: int = Field(
        default=20_000, ge=1, validation_alias="EDGEWAY_TELEMETRY_BROADCAST_BACKLOG"
    )
    # Most records of store-and-forward replays broadcast per second (the rest are stored, not
    # broadcast; dashboards read them as history): a replay is thousands of records per upload.
    replay_broadcast_rate: float = Field(
        default=500.0, ge=0, validation_alias="EDGEWAY_TELEMETRY_REPLAY_BROADCAST_RATE"
    )

    @property
    def predictor(self) -> PredictorConfig:
        return PredictorConfig(
            alpha=self.predictor_alpha,
            speed_band=self.predictor_speed_band,
            power_band=self.predictor_power_band,
            battery_band=self.predictor_battery_band,
            heading_band=self.predictor_heading_band,
            resync_interval_ms=self.predictor_resync_interval_ms,
        )
