"""Predictive compression, rule by rule: what the logger sends and what the server rebuilds."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgeway.common.telemetry.predictor import (
    FIELDS,
    PREDICTOR_VERSION,
    Decoded,
    Decoder,
    Encoder,
    OutOfOrderError,
    Packet,
    PredictorConfig,
    PredictorState,
    Sample,
    angular_difference,
    quantize_float,
    quantize_heading,
)

T0 = 1_731_790_000_000  # 2024-11-16, ms


def sample(at_ms: int = 0, **values: float) -> Sample:
    base = {"speed": 30.0, "battery": 80.0, "power": 10.0, "odometer": 1000.0, "heading": 90.0}
    base.update(values)
    return Sample(timestamp_ms=T0 + at_ms, **base)


DEFAULT = PredictorConfig()


def run(samples: list[Sample], config: PredictorConfig = DEFAULT) -> list[Packet]:
    encoder = Encoder(config)
    return [encoder.encode(s) for s in samples]


def decode_all(packets: list[Packet], config: PredictorConfig = DEFAULT) -> list[Decoded]:
    decoder = Decoder(config)
    return [decoder.decode(p) for p in packets]


def as_legacy(packet: Packet) -> Packet:
    return dataclasses.replace(packet, sequence=None, predictor_version=None)


def drifting(count: int, *, step_ms: int = 1000) -> list[Sample]:
    """A drive whose every field moves a little each second, so fields are skipped and sent."""
    return [
        sample(
            i * step_ms,
            speed=30.0 + 0.7 * i,
            battery=80.0 - 0.1 * i,
            power=10.0 + 4.0 * (i % 3),
            odometer=1000.0 + 0.01 * i,
            heading=(350.0 + 2.1 * i) % 360.0,
        )
        for i in range(count)
    ]


def test_the_first_packet_is_a_resync_with_every_field() -> None:
    first = Encoder().encode(sample(speed=31.3, battery=79.1, power=-12.5, heading=359.6))
    assert first == Packet(
        timestamp_ms=T0,
        odometer=1000.0,
        speed=quantize_float(31.3),
        battery=quantize_float(79.1),
        power=-12.5,
        heading=0,  # 359.6 rounds to 360, which is 0
        is_resync=True,
        sequence=1,
        predictor_version=PREDICTOR_VERSION,
    )
    decoded = Decoder().decode(first)
    assert decoded == Decoded(
        sample=Sample(T0, quantize_float(31.3), quantize_float(79.1), -12.5, 1000.0, 0.0),
        reconstructed=frozenset(),
        uncertain=False,
        gap=0,
    )


def test_a_field_within_its_band_is_skipped_and_one_outside_is_sent() -> None:
    packets = run(
        [
            sample(0, speed=30.0),
            sample(300, speed=31.5),  # 1.5 from the prediction 30: skipped
            sample(600, speed=32.0),  # exactly the band (2.0): still skipped
            sample(900, speed=32.5),  # 2.5: sent
        ]
    )
    assert [p.speed for p in packets] == [30.0, None, None, 32.5]
    # The other fields did not move: skipped after the resync.
    assert all(p.battery is None and p.power is None and p.heading is None for p in packets[1:])
    decoded = decode_all(packets)
    assert [d.sample.speed for d in decoded] == [30.0, 30.0, 30.0, 32.5]
    assert [d.reconstructed for d in decoded] == [
        frozenset(),
        frozenset(FIELDS),
        frozenset(FIELDS),
        frozenset({"battery", "power", "heading"}),
    ]
    # Sent: the prediction moves alpha of the way, on float32 numbers.
    assert Decoder().state.speed is None
    encoder = Encoder()
    for s in [sample(0, speed=30.0), sample(900, speed=32.5)]:
        encoder.encode(s)
    assert encoder.state.speed == quantize_float(30.0 + 0.3 * 2.5)


def test_skipping_uses_the_prediction_the_decoder_has_not_the_actual_value() -> None:
    """The seed's drift: a slow ramp in steps under the band must still be sent in time."""
    samples = [sample(i * 300, speed=30.0 + 0.5 * i) for i in range(12)]
    packets = run(samples)
    decoded = decode_all(packets)
    sent = [i for i, p in enumerate(packets) if p.speed is not None]
    assert sent[0] == 0
    assert len(sent) > 2, "a ramp of 5.5 mph must be sent more than once with a 2 mph band"
    for s, d in zip(samples, decoded, strict=True):
        assert abs(d.sample.speed - s.speed) <= 2.0


def test_heading_359_to_1_is_a_change_of_2_degrees() -> None:
    assert angular_difference(359.0, 1.0) == 2.0
    assert angular_difference(1.0, 359.0) == -2.0
    assert angular_difference(0.0, 180.0) == 180.0
    assert angular_difference(180.0, 0.0) == 180.0  # (-180, 180]
    assert angular_difference(10.0, 10.0) == 0.0

    skipped = run([sample(0, heading=359.0), sample(300, heading=1.0)])
    assert skipped[1].heading is None  # 2 degrees, within the 5 degree band
    assert decode_all(skipped)[1].sample.heading == 359.0

    narrow = PredictorConfig(heading_band=1.5)
    encoder = Encoder(narrow)
    packets = [encoder.encode(s) for s in [sample(0, heading=359.0), sample(300, heading=1.0)]]
    assert packets[1].heading == 1
    # The prediction moved 0.3 * 2 degrees forward across north, not 0.3 * 358 backwards.
    assert encoder.state.heading == quantize_float(359.6)
    packets.append(encoder.encode(sample(600, heading=3.0)))
    assert packets[2].heading == 3
    wrapped = encoder.state.heading
    assert wrapped is not None
    assert 0.0 <= wrapped < 1.0  # 359.6 + 0.3 * 3.4 = 360.62, which is 0.62
    assert wrapped == pytest.approx(0.62, abs=1e-4)
    assert Decoder(narrow).state != encoder.state
    decoder = Decoder(narrow)
    for p in packets:
        decoder.decode(p)
    assert decoder.state == encoder.state


def test_heading_is_quantized_to_whole_degrees_below_360() -> None:
    assert [quantize_heading(h) for h in (0.4, 0.5, 359.4, 359.5, 360.0, 720.2, -1.0)] == [
        0,
        1,
        359,
        0,
        0,
        0,
        359,
    ]


def test_a_resync_every_30_s_of_record_time() -> None:
    packets = run([sample(t) for t in range(0, 65_000, 1000)])
    resyncs = [p.timestamp_ms - T0 for p in packets if p.is_resync]
    assert resyncs == [0, 30_000, 60_000]
    for p in packets:
        present = [p.speed, p.battery, p.power, p.heading]
        assert (None not in present) if p.is_resync else (present == [None] * 4)
        assert p.predictor_version == (PREDICTOR_VERSION if p.is_resync else None)

    # Irregular records: the interval counts from the last resync, on the records' own clock.
    irregular = run([sample(t) for t in (0, 29_999, 30_001, 45_000, 60_000, 60_001, 90_001)])
    assert [p.is_resync for p in irregular] == [True, False, True, False, False, True, True]

    # A record clock that jumps back resyncs at once instead of waiting for it to catch up.
    back = run([sample(t) for t in (0, 10_000, -3_600_000, -3_599_000)])
    assert [p.is_resync for p in back] == [True, False, True, False]


def test_a_resync_sets_both_predictions_to_the_sent_values() -> None:
    config = PredictorConfig(resync_interval_ms=1000)
    encoder = Encoder(config)
    encoder.encode(sample(0, speed=30.0))
    encoder.encode(sample(500, speed=40.0))  # sent; prediction 33
    assert encoder.state.speed == 33.0
    packet = encoder.encode(sample(1000, speed=41.0))
    assert packet.is_resync
    assert encoder.state.speed == 41.0  # set, not smoothed


def test_packets_are_numbered_from_1() -> None:
    assert [p.sequence for p in run(drifting(50))] == list(range(1, 51))


def test_a_gap_makes_records_uncertain_until_the_next_resync() -> None:
    packets = run(drifting(70))
    reference = decode_all(packets)
    lost = {5, 6, 40}
    decoder = Decoder()
    decoded = {i: decoder.decode(p) for i, p in enumerate(packets) if i not in lost}

    assert decoded[4] == reference[4]
    assert decoded[7].gap == 2
    assert decoded[41].gap == 1
    assert all(d.gap == 0 for i, d in decoded.items() if i not in (7, 41))
    assert [i for i, d in decoded.items() if d.uncertain] == [*range(7, 30), *range(41, 60)]
    assert packets[30].is_resync
    assert packets[60].is_resync
    # Recovery is exact at the resync; before it, the losses show in the rebuilt values.
    for i in [*range(30, 40), *range(60, 70)]:
        assert decoded[i] == reference[i]
    assert any(decoded[i].sample != reference[i].sample for i in range(7, 30))


def test_a_gap_before_a_resync_is_reported_and_the_resync_is_certain() -> None:
    packets = run(drifting(35))
    decoder = Decoder()
    for p in packets[:29]:
        decoder.decode(p)
    resync = decoder.decode(packets[30])
    assert resync.gap == 1
    assert not resync.uncertain


def test_a_packet_at_or_before_the_last_one_is_refused_and_changes_nothing() -> None:
    packets = run(drifting(5))
    decoder = Decoder()
    for p in packets[:3]:
        decoder.decode(p)
    before = decoder.state
    with pytest.raises(OutOfOrderError):
        decoder.decode(packets[2])  # a redelivery
    with pytest.raises(OutOfOrderError):
        decoder.decode(packets[1])  # a late one
    assert decoder.state == before
    assert decoder.decode(packets[3]).gap == 0


def test_an_encoder_restart_numbers_from_1_again_and_decodes() -> None:
    """The logger's clear_data restarts its encoder; the server's decoder carries on."""
    first = run(drifting(10))
    decoder = Decoder()
    for p in first:
        decoder.decode(p)
    later = [dataclasses.replace(s, timestamp_ms=s.timestamp_ms + 60_000) for s in drifting(10)]
    second = run(later)
    assert second[0].sequence == 1
    assert second[0].is_resync
    results = [decoder.decode(p) for p in second]
    assert results == decode_all(second)

    # The same restart whose resync was lost: reported as a gap, uncertain until the next resync.
    decoder = Decoder()
    for p in first:
        decoder.decode(p)
    after_loss = decoder.decode(second[1])
    assert after_loss.gap == 1
    assert after_loss.uncertain


def test_a_decoder_that_starts_mid_stream_is_uncertain_until_a_resync() -> None:
    packets = run(drifting(35))
    decoder = Decoder()
    joined = decoder.decode(packets[3])
    assert joined.gap == 3
    assert joined.uncertain
    nothing_to_predict = [f for f in FIELDS if getattr(packets[3], f) is None]
    assert nothing_to_predict, "the example needs a skipped field"
    for name in nothing_to_predict:
        assert getattr(joined.sample, name) == 0.0
    assert joined.reconstructed == frozenset(nothing_to_predict)
    resync = decoder.decode(packets[30])
    assert resync.gap == 26
    assert dataclasses.replace(resync, gap=0) == decode_all(packets)[30]


def test_legacy_packets_are_never_flagged() -> None:
    """Without a sequence number a loss cannot be seen: decoded best-effort, in arrival order."""
    packets = [as_legacy(p) for p in run(drifting(40))]
    decoder = Decoder()
    decoded = [decoder.decode(p) for i, p in enumerate(packets) if i not in (5, 6)]
    assert all(not d.uncertain and d.gap == 0 for d in decoded)
    assert decoder.state.last_sequence is None
    # Arrival order is the order: an older legacy packet is decoded, not refused.
    older = decoder.decode(packets[6])
    assert not older.uncertain
    assert decoder.state.last_timestamp_ms == packets[6].timestamp_ms


def test_an_uncompressed_reading_is_a_resync() -> None:
    reading = Packet(T0, 1000.0, 30.0, 80.0, 10.0, 360, True, sequence=None, predictor_version=None)
    decoded = Decoder().decode(reading)
    assert decoded.sample == Sample(T0, 30.0, 80.0, 10.0, 1000.0, 0.0)
    assert not decoded.uncertain
    assert decoded.reconstructed == frozenset()


def _restored(state: PredictorState) -> PredictorState:
    """`state` after a trip through JSON text, as a service would store it."""
    restored = PredictorState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored == state
    return restored


def test_a_stored_encoder_state_carries_on_exactly() -> None:
    samples = drifting(80)
    original = Encoder()
    for s in samples[:37]:
        original.encode(s)
    restored = Encoder(state=_restored(original.state))
    for s in samples[37:]:
        assert restored.encode(s) == original.encode(s)
    assert restored.state == original.state


def test_a_stored_decoder_state_carries_on_exactly() -> None:
    packets = run(drifting(80))
    original = Decoder()
    for p in packets[:37]:
        original.decode(p)
    restored = Decoder(state=_restored(original.state))
    for p in packets[37:]:
        assert restored.decode(p) == original.decode(p)
    assert restored.state == original.state


def test_a_state_from_another_version_or_malformed_is_refused() -> None:
    good = Encoder().state.to_json()
    with pytest.raises(ValueError, match="version"):
        PredictorState.from_json({**good, "predictor_version": PREDICTOR_VERSION + 1})
    with pytest.raises(ValueError, match="malformed"):
        PredictorState.from_json({"predictor_version": PREDICTOR_VERSION})
    with pytest.raises(ValueError, match="speed"):
        PredictorState.from_json({**good, "predictions": {**good["predictions"], "speed": "1"}})
    with pytest.raises(ValueError, match="last_sequence"):
        PredictorState.from_json({**good, "last_sequence": 1.5})


def test_values_a_float32_cannot_carry_are_refused() -> None:
    for bad, message in ((float("nan"), "finite"), (float("inf"), "finite"), (1e39, "float32")):
        with pytest.raises(ValueError, match=message):
            Encoder().encode(sample(speed=bad))
    with pytest.raises(ValueError, match="finite heading"):
        Encoder().encode(sample(heading=float("nan")))


def test_packets_the_decoder_cannot_read_are_refused() -> None:
    first = run(drifting(1))[0]
    with pytest.raises(ValueError, match="version"):
        Decoder().decode(dataclasses.replace(first, predictor_version=PREDICTOR_VERSION + 1))
    with pytest.raises(ValueError, match="resync"):
        Decoder().decode(dataclasses.replace(first, power=None))
    with pytest.raises(ValueError, match="start at 1"):
        Decoder().decode(dataclasses.replace(first, sequence=0))


@pytest.mark.parametrize(
    "changes",
    [
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"speed_band": 0.0},
        {"heading_band": float("nan")},
        {"resync_interval_ms": 0},
    ],
)
def test_a_config_out_of_range_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        PredictorConfig(**changes)  # type: ignore[arg-type]
