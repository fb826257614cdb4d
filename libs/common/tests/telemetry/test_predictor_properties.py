"""The predictor's promises over random drives and random settings.

Without loss: the decoder holds the encoder's state after every packet, a skipped field comes back
within its band, a sent one exactly. With loss: from the first resync after the last lost packet
on, the output is the loss-free output again, and until then every record is flagged uncertain.
Every packet goes through the wire (encode, parse) on the way, as it would in service.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeway.common.telemetry.predictor import (
    FIELDS,
    Decoded,
    Decoder,
    Encoder,
    Packet,
    PredictorConfig,
    Sample,
    angular_difference,
    quantize_float,
    quantize_heading,
)
from edgeway.common.telemetry.wire import encode_packet, parse_upload

T0 = 1_731_790_000_000
EXAMPLES = settings(max_examples=150, deadline=None)


@dataclass(frozen=True)
class Drive:
    samples: list[Sample]
    config: PredictorConfig


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


@st.composite
def drives(draw: st.DrawFn) -> Drive:
    """Random walks in each field with random step sizes; heading wraps through 0/360."""
    count = draw(st.integers(min_value=1, max_value=120))
    scale = {
        "speed": draw(st.floats(0.0, 15.0)),
        "battery": draw(st.floats(0.0, 2.0)),
        "power": draw(st.floats(0.0, 100.0)),
        "heading": draw(st.floats(0.0, 60.0)),
    }
    speed = draw(st.floats(0.0, 300.0))
    battery = draw(st.floats(0.0, 100.0))
    power = draw(st.floats(-1000.0, 1500.0))
    odometer = draw(st.floats(0.0, 1_000_000.0))
    heading = draw(st.sampled_from([0.0, 359.5, 180.0])) + draw(st.floats(-3.0, 3.0))
    timestamp = T0 + draw(st.integers(0, 10**9))
    unit = st.floats(-1.0, 1.0)
    samples = []
    for _ in range(count):
        samples.append(Sample(timestamp, speed, battery, power, odometer, heading % 360.0))
        timestamp += draw(st.integers(1, 5_000))
        speed = _clamp(speed + scale["speed"] * draw(unit), 0.0, 300.0)
        battery = _clamp(battery + scale["battery"] * draw(unit), 0.0, 100.0)
        power = _clamp(power + scale["power"] * draw(unit), -1000.0, 1500.0)
        odometer += draw(st.floats(0.0, 0.1))
        heading += scale["heading"] * draw(unit)
    band = st.floats(min_value=0.001, max_value=50.0)
    config = PredictorConfig(
        alpha=draw(st.floats(min_value=0.0, max_value=1.0, exclude_min=True)),
        speed_band=draw(band),
        power_band=draw(band),
        battery_band=draw(band),
        heading_band=draw(st.floats(min_value=0.001, max_value=200.0)),
        resync_interval_ms=draw(st.integers(1, 60_000)),
    )
    return Drive(samples, config)


def through_the_wire(packet: Packet) -> Packet:
    [parsed] = parse_upload(encode_packet(packet), compressed=True, batch=False)
    assert parsed == packet
    return parsed


def truth(sample: Sample, name: str) -> float:
    """What the wire can carry of the actual value."""
    value: float = getattr(sample, name)
    return float(quantize_heading(value)) if name == "heading" else quantize_float(value)


def loss_free(drive: Drive) -> tuple[list[Packet], list[Decoded]]:
    encoder, decoder = Encoder(drive.config), Decoder(drive.config)
    packets, decoded = [], []
    for sample in drive.samples:
        packet = through_the_wire(encoder.encode(sample))
        packets.append(packet)
        decoded.append(decoder.decode(packet))
        assert decoder.state == encoder.state
    return packets, decoded


@EXAMPLES
@given(drives())
def test_without_loss_both_sides_agree_and_every_field_is_within_its_band(drive: Drive) -> None:
    packets, decoded = loss_free(drive)
    assert packets[0].is_resync
    for sample, packet, result in zip(drive.samples, packets, decoded, strict=True):
        assert not result.uncertain
        assert result.gap == 0
        assert result.sample.timestamp_ms == sample.timestamp_ms
        assert result.sample.odometer == quantize_float(sample.odometer)
        for name in FIELDS:
            actual, rebuilt = truth(sample, name), getattr(result.sample, name)
            if getattr(packet, name) is not None:
                assert name not in result.reconstructed
                assert rebuilt == actual
            else:
                assert name in result.reconstructed
                assert not packet.is_resync
                band = drive.config.band(name)
                if name == "heading":
                    assert 0.0 <= rebuilt < 360.0
                    assert abs(angular_difference(rebuilt, actual)) <= band
                else:
                    assert abs(rebuilt - actual) <= band
                assert math.isfinite(rebuilt)


@EXAMPLES
@given(drives(), st.data())
def test_after_a_loss_the_next_resync_restores_the_loss_free_output(
    drive: Drive, data: st.DataObject
) -> None:
    packets, reference = loss_free(drive)
    count = len(packets)
    lost = data.draw(st.sets(st.integers(0, count - 1), max_size=count - 1), label="lost")
    encoder = Encoder(drive.config)
    for sample in drive.samples:
        encoder.encode(sample)  # the encoder's final state, for comparison

    decoder = Decoder(drive.config)
    first_loss = min(lost, default=count)
    last_loss = max(lost, default=-1)
    recovery = next((i for i in range(last_loss + 1, count) if packets[i].is_resync), count)
    missing = 0
    for i, packet in enumerate(packets):
        if i in lost:
            missing += 1
            continue
        result = decoder.decode(packet)
        assert result.gap == missing
        missing = 0
        if i < first_loss:
            assert result == reference[i]
        elif i >= recovery or _resynced_since_loss(packets, lost, i):
            # The resync may itself report the gap just before it; the rest is the loss-free output.
            assert dataclasses.replace(result, gap=0) == reference[i]
        else:
            assert result.uncertain
    if recovery < count:
        assert decoder.state == encoder.state


def _resynced_since_loss(packets: list[Packet], lost: set[int], index: int) -> bool:
    """Whether a resync was decoded after the latest loss before `index` (up to `index`)."""
    latest_loss = max(i for i in lost if i < index)
    return any(packets[i].is_resync for i in range(latest_loss + 1, index + 1))
