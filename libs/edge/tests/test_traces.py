"""Generated traces: repeatable, physically plausible, inside the wire's checks, and the highway
compresses better than the city."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice, pairwise

import pytest

from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import (
    FIELDS,
    Decoder,
    Encoder,
    PredictorConfig,
    Sample,
    angular_difference,
)
from edgeway.edge.traces import DEFAULT_PERIOD_MS, DEFAULT_START_MS, TRACES, city, highway

FIVE_MINUTES = 5 * 60 * 1_000 // DEFAULT_PERIOD_MS


def take(trace: Iterator[Sample], count: int) -> list[Sample]:
    return list(islice(trace, count))


@pytest.mark.parametrize("name", sorted(TRACES))
def test_a_seed_gives_the_same_trace_every_time(name: str) -> None:
    make = TRACES[name]
    assert take(make(7), 500) == take(make(7), 500)
    assert take(make(7), 500) != take(make(8), 500)


@pytest.mark.parametrize("name", sorted(TRACES))
def test_readings_come_at_the_period_from_the_start(name: str) -> None:
    samples = take(TRACES[name](1, period_ms=100, start_ms=1_800_000_000_000), 50)
    assert [s.timestamp_ms for s in samples] == [1_800_000_000_000 + 100 * i for i in range(50)]
    default = take(TRACES[name](1), 3)
    assert [s.timestamp_ms for s in default] == [
        DEFAULT_START_MS + DEFAULT_PERIOD_MS * i for i in range(3)
    ]
    with pytest.raises(ValueError, match="period_ms"):
        next(TRACES[name](1, period_ms=0))


@pytest.mark.parametrize("name", sorted(TRACES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reading_passes_the_wire_checks_both_ways(name: str, seed: int) -> None:
    """An hour of driving, sent plain and compressed, is accepted as the gateway would parse it."""
    encoder = Encoder()
    for sample in take(TRACES[name](seed), 12_000):
        [plain] = wire.parse_upload(wire.encode_sample(sample), compressed=False, batch=False)
        assert plain.speed == pytest.approx(sample.speed, abs=1e-3)
        packet = encoder.encode(sample)
        assert wire.parse_upload(wire.encode_packet(packet), compressed=True, batch=False) == [
            packet
        ]


def test_highway_is_steady_fast_driving() -> None:
    samples = take(highway(3), FIVE_MINUTES * 6)
    speeds = [s.speed for s in samples]
    assert min(speeds) >= 60
    assert max(speeds) <= 75
    assert max(speeds) - min(speeds) > 2  # it drifts
    powers = [s.power for s in samples]
    assert min(powers) > 5
    assert max(powers) < 40
    steps = [abs(b.power - a.power) for a, b in pairwise(samples)]
    assert max(steps) < 5  # no jumps: a steady draw
    turns = [abs(angular_difference(a.heading, b.heading)) for a, b in pairwise(samples)]
    assert max(turns) < 2  # gentle curves only


def test_city_is_stop_and_go_with_turns_and_regeneration() -> None:
    samples = take(city(4), FIVE_MINUTES * 6)
    speeds = [s.speed for s in samples]
    assert min(speeds) == 0
    assert max(speeds) <= 35
    stops = sum(1 for a, b in pairwise(speeds) if a > 0 and b == 0)
    assert stops >= 10  # half an hour of lights
    braking = [b for a, b in pairwise(samples) if b.speed < a.speed - 1]
    assert braking
    assert sum(s.power < 0 for s in braking) > 0.8 * len(braking)  # regen when braking
    assert min(s.power for s in samples) > -100  # within the car's regen limit
    big_turns = 0
    for i in range(0, len(samples) - 40, 40):  # 12 s windows
        if abs(angular_difference(samples[i].heading, samples[i + 40].heading)) > 60:
            big_turns += 1
    assert big_turns >= 5
    # The heading goes through north (0/360) without jumping: small step, large difference.
    wraps = [
        (a.heading, b.heading) for a, b in pairwise(samples) if abs(a.heading - b.heading) > 180
    ]
    assert wraps
    for a, b in wraps:
        assert abs(angular_difference(a, b)) < 10
    assert all(0 <= s.heading < 360 for s in samples)


@pytest.mark.parametrize("name", sorted(TRACES))
def test_battery_falls_with_energy_and_odometer_rises_with_distance(name: str) -> None:
    period_ms = 300
    samples = take(TRACES[name](5, period_ms=period_ms, battery=80.0, odometer=1_000.0), 6_000)
    assert samples[0].battery == pytest.approx(80.0, abs=0.01)
    assert samples[0].odometer == pytest.approx(1_000.0, abs=0.01)
    odometers = [s.odometer for s in samples]
    assert odometers == sorted(odometers)
    # Distance is the integral of speed (mph * hours), within rounding and sensor noise.
    distance = sum(s.speed for s in samples[:-1]) * period_ms / 3_600_000
    assert odometers[-1] - odometers[0] == pytest.approx(distance, rel=0.02)
    # Energy: the mean draw over the drive, against the 75 kWh pack.
    hours = (samples[-1].timestamp_ms - samples[0].timestamp_ms) / 3_600_000
    energy_kwh = sum(s.power for s in samples[:-1]) * period_ms / 3_600_000
    used = samples[0].battery - samples[-1].battery
    assert used > 0
    assert used == pytest.approx(energy_kwh / 75 * 100, rel=0.05)
    assert hours == pytest.approx(0.5, rel=0.01)


def skipped_share(samples: list[Sample]) -> float:
    """Fields left out by the encoder, as a share of all predicted fields."""
    encoder = Encoder(PredictorConfig())
    decoder = Decoder(PredictorConfig())
    skipped = 0
    for sample in samples:
        packet = encoder.encode(sample)
        skipped += sum(
            value is None for value in (packet.speed, packet.battery, packet.power, packet.heading)
        )
        # Whatever was skipped comes back within its band: the trace is a fair test input.
        decoded = decoder.decode(packet)
        assert not decoded.uncertain
        assert abs(decoded.sample.speed - sample.speed) <= 2.0 + 1e-3
    return skipped / (len(FIELDS) * len(samples))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_highway_compresses_better_than_city(seed: int) -> None:
    highway_share = skipped_share(take(highway(seed), FIVE_MINUTES))
    city_share = skipped_share(take(city(seed), FIVE_MINUTES))
    assert highway_share > 0.9
    assert city_share < 0.9
    assert highway_share > city_share + 0.1
