"""Generated driving traces: what a vehicle's sensors would read, one Sample per period.

The seed's logger replayed recorded Tesla API logs every 300 ms; we have no such logs to ship,
so these generators drive a small physical model of a car instead (seeded `random.Random`, so
the same seed and arguments give the same trace, bit for bit). Power comes from the road-load
equation, the battery falls with the energy drawn (and rises a little under regen), the
odometer rises with the distance covered. Every value stays inside the ranges the wire accepts
(`edgeway.common.telemetry.wire`).

- `highway`: steady 60-75 mph with a slow drift, gentle curves, a gentle grade, steady draw.
- `city`: stop-and-go between 0 and 35 mph, frequent right-angle turns (the heading wraps
  through 0/360), regeneration (negative power) while braking, idle draw at lights.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from edgeway.common.telemetry.predictor import Sample

DEFAULT_PERIOD_MS = 300  # the seed's C++ logger replayed its logs every 300 ms
DEFAULT_START_MS = 1_717_228_800_000  # 2024-06-01T08:00:00Z: a fixed start keeps traces stable

# A Tesla Model 3 Long Range, from its published figures (curb mass ~1,850 kg, Cd 0.23, frontal
# area 2.22 m^2, ~75 kWh usable); the efficiencies, regen limit and idle draw are typical EV values.
MASS_KG = 1_930.0  # with a driver
DRAG_AREA_M2 = 0.23 * 2.22
ROLLING_RESISTANCE = 0.011
AIR_DENSITY = 1.2  # kg/m^3, sea level at 20 °C
GRAVITY = 9.81
DRIVE_EFFICIENCY = 0.90  # battery to wheel
REGEN_EFFICIENCY = 0.70  # wheel to battery
MAX_REGEN_KW = 70.0  # the rest of a hard stop goes to the friction brakes
BATTERY_KWH = 75.0
MPH = 0.44704  # m/s per mph
METRES_PER_MILE = 1_609.344


@dataclass(slots=True)
class _Car:
    """The state a trace advances: speed in m/s, heading in degrees, battery in %, miles."""

    timestamp_ms: int
    speed: float
    heading: float
    battery: float
    odometer: float

    def advance(
        self, *, dt: float, accel: float, grade: float, aux_kw: float, turn_rate: float
    ) -> float:
        """Move one step (dt seconds at `accel` m/s^2); return the battery power in kW."""
        v0 = self.speed
        v1 = max(0.0, v0 + accel * dt)
        accel = (v1 - v0) / dt  # what actually happened (a car stops at 0, it does not reverse)
        v = (v0 + v1) / 2
        force = (
            MASS_KG * accel
            + 0.5 * AIR_DENSITY * DRAG_AREA_M2 * v * v
            + (ROLLING_RESISTANCE * MASS_KG * GRAVITY if v > 0 else 0.0)
            + MASS_KG * GRAVITY * grade
        )
        wheel_kw = force * v / 1_000
        if wheel_kw >= 0:
            power = wheel_kw / DRIVE_EFFICIENCY + aux_kw
        else:
            power = max(wheel_kw * REGEN_EFFICIENCY, -MAX_REGEN_KW) + aux_kw
        self.speed = v1
        self.heading = (self.heading + turn_rate * dt) % 360.0
        self.odometer += v * dt / METRES_PER_MILE
        energy_kwh = power * dt / 3_600
        self.battery = min(100.0, max(0.0, self.battery - energy_kwh / BATTERY_KWH * 100))
        return power


def _sample(car: _Car, power: float, rng: random.Random, *, top_mph: float) -> Sample:
    """What the sensors report: the car's state with a little measurement noise."""
    speed_mph = car.speed / MPH
    if speed_mph > 0.05:
        speed_mph = min(top_mph, max(0.0, speed_mph + rng.gauss(0.0, 0.1)))
    return Sample(
        timestamp_ms=car.timestamp_ms,
        speed=round(speed_mph, 2),
        battery=round(car.battery, 3),
        power=round(power + rng.gauss(0.0, 0.3), 2),
        odometer=round(car.odometer, 3),
        heading=round(car.heading, 1) % 360.0,
    )


def _start(
    rng: random.Random,
    *,
    start_ms: int,
    speed_mph: float,
    battery: float | None,
    odometer: float | None,
) -> _Car:
    return _Car(
        timestamp_ms=start_ms,
        speed=speed_mph * MPH,
        heading=rng.uniform(0.0, 360.0),
        battery=battery if battery is not None else rng.uniform(60.0, 95.0),
        odometer=odometer if odometer is not None else rng.uniform(5_000.0, 60_000.0),
    )


@dataclass(frozen=True, slots=True)
class _Drift:
    """An Ornstein-Uhlenbeck process (a random walk pulled back towards `mean`), kept in bounds."""

    mean: float
    theta: float  # 1/s: how hard it is pulled back
    sigma: float  # spread per sqrt(s)
    low: float
    high: float

    def step(self, value: float, dt: float, rng: random.Random) -> float:
        noise = self.sigma * math.sqrt(dt) * rng.gauss(0.0, 1.0)
        return min(self.high, max(self.low, value + self.theta * (self.mean - value) * dt + noise))


_HIGHWAY_SPEED = _Drift(mean=67.5, theta=0.003, sigma=0.15, low=61.0, high=74.0)  # mph
_HIGHWAY_TURN = _Drift(mean=0.0, theta=0.05, sigma=0.15, low=-1.5, high=1.5)  # deg/s
_HIGHWAY_GRADE = _Drift(mean=0.0, theta=0.01, sigma=0.0005, low=-0.005, high=0.005)  # rise/run


def highway(
    seed: int,
    *,
    period_ms: int = DEFAULT_PERIOD_MS,
    start_ms: int = DEFAULT_START_MS,
    battery: float | None = None,
    odometer: float | None = None,
) -> Iterator[Sample]:
    """An endless highway drive: 60-75 mph, slow drift, gentle curves and grades."""
    if period_ms <= 0:
        raise ValueError("period_ms must be positive")
    rng = random.Random(seed)  # noqa: S311 (a repeatable simulation, not a secret)
    dt = period_ms / 1_000
    target = rng.uniform(63.0, 72.0)
    car = _start(rng, start_ms=start_ms, speed_mph=target, battery=battery, odometer=odometer)
    turn_rate = 0.0  # deg/s
    grade = 0.0
    power = car.advance(dt=dt, accel=0.0, grade=0.0, aux_kw=0.6, turn_rate=0.0)
    while True:
        yield _sample(car, power, rng, top_mph=75.0)
        target = _HIGHWAY_SPEED.step(target, dt, rng)
        turn_rate = _HIGHWAY_TURN.step(turn_rate, dt, rng)
        grade = _HIGHWAY_GRADE.step(grade, dt, rng)
        accel = min(0.6, max(-0.6, 0.1 * (target * MPH - car.speed)))
        power = car.advance(dt=dt, accel=accel, grade=grade, aux_kw=0.6, turn_rate=turn_rate)
        # The steering keeps the speed inside the band whatever the noise did.
        car.speed = min(75.0 * MPH, max(60.0 * MPH, car.speed))
        car.timestamp_ms += period_ms


class _Phase(Enum):
    STOPPED = "stopped"
    ACCELERATING = "accelerating"
    CRUISING = "cruising"
    BRAKING = "braking"


def city(
    seed: int,
    *,
    period_ms: int = DEFAULT_PERIOD_MS,
    start_ms: int = DEFAULT_START_MS,
    battery: float | None = None,
    odometer: float | None = None,
) -> Iterator[Sample]:
    """An endless city drive: lights, stop-and-go up to 35 mph, turns at junctions, regen."""
    if period_ms <= 0:
        raise ValueError("period_ms must be positive")
    rng = random.Random(seed)  # noqa: S311 (a repeatable simulation, not a secret)
    dt = period_ms / 1_000
    car = _start(rng, start_ms=start_ms, speed_mph=0.0, battery=battery, odometer=odometer)
    phase = _Phase.STOPPED
    phase_left = rng.uniform(2.0, 10.0)  # seconds left in a timed phase
    cruise = 0.0  # m/s
    accel = 0.0
    decel = 0.0
    brake_to = 0.0  # m/s: 0 for a light, a crawl for a junction taken without stopping
    turn_left = 0.0  # degrees of the current turn still to go (signed)
    turn_rate = 0.0
    aux_kw = rng.uniform(0.8, 1.5)  # climate and electronics, more than on the highway per mile
    power = aux_kw
    while True:
        yield _sample(car, power, rng, top_mph=35.0)
        if phase is _Phase.STOPPED:
            command = 0.0
            phase_left -= dt
            if phase_left <= 0:
                phase = _Phase.ACCELERATING
                cruise = rng.uniform(15.0, 34.0) * MPH
                accel = rng.uniform(1.2, 2.5)
                if rng.random() < 0.5:  # turn out of the junction
                    turn_left = rng.choice((-1.0, 1.0)) * rng.uniform(80.0, 100.0)
                    turn_rate = rng.uniform(15.0, 25.0)
        elif phase is _Phase.ACCELERATING:
            command = accel if car.speed < cruise else 0.0
            if car.speed >= cruise:
                phase = _Phase.CRUISING
                phase_left = rng.uniform(5.0, 30.0)
        elif phase is _Phase.CRUISING:
            command = min(0.5, max(-0.5, 0.5 * (cruise - car.speed))) + rng.gauss(0.0, 0.15)
            phase_left -= dt
            if phase_left <= 0:
                phase = _Phase.BRAKING
                decel = rng.uniform(1.5, 3.5)
                crawl = rng.random() < 0.3  # a junction taken slowly, or a light
                brake_to = rng.uniform(3.0, 6.0) if crawl else 0.0
        else:  # braking
            command = -decel
            if car.speed <= brake_to + decel * dt:
                if brake_to > 0:
                    phase = _Phase.ACCELERATING
                    cruise = rng.uniform(15.0, 34.0) * MPH
                    accel = rng.uniform(1.2, 2.5)
                    turn_left = rng.choice((-1.0, 1.0)) * rng.uniform(80.0, 100.0)
                    turn_rate = rng.uniform(15.0, 25.0)
                else:
                    command = -car.speed / dt  # come to rest exactly this step
                    phase = _Phase.STOPPED
                    phase_left = rng.uniform(5.0, 30.0)
        rate = 0.0
        if turn_left and car.speed > 0:
            step = min(abs(turn_left), turn_rate * dt)
            rate = math.copysign(step, turn_left) / dt
            turn_left -= math.copysign(step, turn_left)
        elif car.speed > 0:
            rate = rng.gauss(0.0, 0.5)  # lane keeping
        power = car.advance(dt=dt, accel=command, grade=0.0, aux_kw=aux_kw, turn_rate=rate)
        car.speed = min(35.0 * MPH, car.speed)
        car.timestamp_ms += period_ms


Trace = Callable[..., Iterator[Sample]]
TRACES: dict[str, Trace] = {"highway": highway, "city": city}
