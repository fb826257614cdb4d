"""Upload bodies: what round-trips, what the seed's loggers send, and every reason for a 400."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeway.common.telemetry import telemetry_pb2
from edgeway.common.telemetry.predictor import (
    PREDICTOR_VERSION,
    Encoder,
    Packet,
    PacketRow,
    Sample,
)
from edgeway.common.telemetry.wire import (
    MAX_BATCH_RECORDS,
    VIN_PATTERN,
    WireError,
    _checked_compressed_row,
    _compressed_row,
    check_vin,
    encode_batch,
    encode_packet,
    encode_sample,
    parse_rows,
    parse_upload,
)

T0 = 1_731_790_000_000  # 2024-11-16, ms
SAMPLE = Sample(T0, speed=65.5, battery=79.25, power=-12.75, odometer=15_234.5, heading=271.0)


def packets(count: int) -> list[Packet]:
    encoder = Encoder()
    return [
        encoder.encode(dataclasses.replace(SAMPLE, timestamp_ms=T0 + 300 * i, speed=60.0 + i))
        for i in range(count)
    ]


def reason(body: bytes, *, compressed: bool, batch: bool = False) -> str:
    with pytest.raises(WireError) as caught:
        parse_upload(body, compressed=compressed, batch=batch)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


def plain(**fields: Any) -> bytes:
    record: dict[str, Any] = {
        "timestamp": T0,
        "vehicle_speed": 65.5,
        "battery_level": 79.25,
        "power_kw": -12.75,
        "odometer": 15_234.5,
        "heading": 271,
    }
    record.update(fields)
    data: bytes = telemetry_pb2.VehicleData(**record).SerializeToString()
    return data


def compressed(**fields: Any) -> bytes:
    record: dict[str, Any] = {"timestamp": T0, "odometer": 15_234.5, "sequence": 2}
    record.update(fields)
    data: bytes = telemetry_pb2.CompressedVehicleData(**record).SerializeToString()
    return data


def test_compressed_packets_round_trip() -> None:
    sent = packets(5)
    assert sent[0].is_resync
    assert not sent[1].is_resync
    for packet in sent:
        assert parse_upload(encode_packet(packet), compressed=True, batch=False) == [packet]
    body = encode_batch(sent, device_id="logger-7")
    assert parse_upload(body, compressed=True, batch=True) == sent
    assert telemetry_pb2.CompressedBatch.FromString(body).device_id == "logger-7"
    # The server's reading: the same packets, each as a plain tuple of its fields.
    assert parse_rows(body, compressed=True, batch=True) == [dataclasses.astuple(p) for p in sent]


def test_a_skipped_field_is_absent_on_the_wire_not_zero() -> None:
    skipped = packets(2)[1]
    assert skipped.battery is None
    message = telemetry_pb2.CompressedVehicleData.FromString(encode_packet(skipped))
    assert not message.HasField("battery_level")
    assert not message.HasField("predictor_version")  # only resyncs name the version
    assert len(encode_packet(skipped)) < len(encode_packet(packets(1)[0]))


def test_an_uncompressed_reading_is_a_resync_packet() -> None:
    expected = Packet(
        timestamp_ms=T0,
        odometer=15_234.5,
        speed=65.5,
        battery=79.25,
        power=-12.75,
        heading=271,
        is_resync=True,
        sequence=None,
        predictor_version=None,
    )
    assert parse_upload(encode_sample(SAMPLE), compressed=False, batch=False) == [expected]
    numbered = parse_upload(encode_sample(SAMPLE, sequence=42), compressed=False, batch=False)
    assert numbered == [dataclasses.replace(expected, sequence=42)]
    [row] = parse_rows(encode_sample(SAMPLE), compressed=False, batch=False)
    assert row == dataclasses.astuple(expected)


def test_a_reading_is_carried_as_float32_and_whole_degrees() -> None:
    odd = dataclasses.replace(SAMPLE, speed=65.1, heading=359.7)
    [packet] = parse_upload(encode_sample(odd), compressed=False, batch=False)
    assert packet.speed == pytest.approx(65.1, abs=1e-5)
    assert packet.speed != 65.1  # float32
    assert packet.heading == 0  # 359.7 rounds to 360, which is north


def test_an_uncompressed_batch_is_read_in_order() -> None:
    body = telemetry_pb2.TelemetryBatch(
        records=[
            telemetry_pb2.VehicleData.FromString(encode_sample(SAMPLE, sequence=i))
            for i in (1, 2, 3)
        ],
        device_id="seed",
    ).SerializeToString()
    parsed = parse_upload(body, compressed=False, batch=True)
    assert [p.sequence for p in parsed] == [1, 2, 3]
    assert all(p.is_resync for p in parsed)


def test_the_seed_loggers_messages_are_read() -> None:
    """The seed's logger knows neither sequence nor predictor_version (legacy packets)."""
    [reading] = parse_upload(plain(), compressed=False, batch=False)
    assert reading.sequence is None
    body = compressed(sequence=None, vehicle_speed=70.0, is_resync=False)
    [packet] = parse_upload(body, compressed=True, batch=False)
    assert packet == Packet(T0, 15_234.5, 70.0, None, None, None, False, None, None)


def test_heading_360_is_read_as_0() -> None:
    [reading] = parse_upload(plain(heading=360), compressed=False, batch=False)
    assert reading.heading == 0
    [packet] = parse_upload(compressed(heading=360), compressed=True, batch=False)
    assert packet.heading == 0


def test_the_range_limits_themselves_are_accepted() -> None:
    for fields in (
        {"timestamp": 946_684_800_000, "vehicle_speed": 0.0, "battery_level": 0.0},
        {"timestamp": 4_102_444_799_999, "vehicle_speed": 300.0, "battery_level": 100.0},
        {"power_kw": -1000.0, "odometer": 0.0, "heading": 0},
        {"power_kw": 1500.0, "odometer": 2_000_000.0, "heading": 359},
    ):
        assert parse_upload(plain(**fields), compressed=False, batch=False)


@pytest.mark.parametrize(
    ("compressed_body", "batch", "kind"),
    [
        (True, False, "CompressedVehicleData"),
        (True, True, "CompressedBatch"),
        (False, False, "VehicleData"),
        (False, True, "TelemetryBatch"),
    ],
)
def test_undecodable_bytes_are_refused(compressed_body: bool, batch: bool, kind: str) -> None:
    for body in (b"\xff\xff\xff\xff", plain()[:-2], b"\x0a\x05abc"):
        assert reason(body, compressed=compressed_body, batch=batch) == (
            f"body is not a {kind} protobuf message"
        )


def test_an_empty_batch_is_refused() -> None:
    assert reason(b"", compressed=True, batch=True) == "CompressedBatch has no records"
    empty = telemetry_pb2.TelemetryBatch(device_id="x").SerializeToString()
    assert reason(empty, compressed=False, batch=True) == "TelemetryBatch has no records"


def test_a_batch_over_the_limit_is_refused() -> None:
    record = telemetry_pb2.VehicleData.FromString(plain())
    at_limit = telemetry_pb2.TelemetryBatch(records=[record] * MAX_BATCH_RECORDS)
    assert len(parse_upload(at_limit.SerializeToString(), compressed=False, batch=True)) == (
        MAX_BATCH_RECORDS
    )
    over = telemetry_pb2.TelemetryBatch(records=[record] * (MAX_BATCH_RECORDS + 1))
    assert reason(over.SerializeToString(), compressed=False, batch=True) == (
        f"TelemetryBatch has {MAX_BATCH_RECORDS + 1} records; at most 10000 are accepted"
    )


def test_an_empty_body_is_a_reading_at_time_0_and_refused() -> None:
    assert reason(b"", compressed=False, batch=False).startswith("timestamp = 0 is outside")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"timestamp": 946_684_799_999},
            "timestamp = 946684799999 is outside [946684800000, 4102444800000) "
            "(ms since the epoch, 2000-01-01 to 2100-01-01)",
        ),
        ({"timestamp": 4_102_444_800_000}, "timestamp = 4102444800000 is outside"),
        ({"vehicle_speed": -0.5}, "vehicle_speed = -0.5 is outside [0, 300] mph"),
        ({"vehicle_speed": 300.5}, "vehicle_speed = 300.5 is outside [0, 300] mph"),
        ({"battery_level": -1.0}, "battery_level = -1 is outside [0, 100] %"),
        ({"battery_level": 100.5}, "battery_level = 100.5 is outside [0, 100] %"),
        ({"power_kw": -1000.5}, "power_kw = -1000.5 is outside [-1000, 1500] kW"),
        ({"power_kw": 1500.5}, "power_kw = 1500.5 is outside [-1000, 1500] kW"),
        ({"odometer": -1.0}, "odometer = -1 is outside [0, 2000000] miles"),
        ({"odometer": 2_000_001.0}, "odometer = 2000001 is outside [0, 2000000] miles"),
        ({"heading": -1}, "heading = -1 is outside [0, 360] degrees"),
        ({"heading": 361}, "heading = 361 is outside [0, 360] degrees"),
    ],
)
def test_values_out_of_range_are_refused_with_the_field_and_range(
    fields: dict[str, Any], expected: str
) -> None:
    assert reason(plain(**fields), compressed=False).startswith(expected)
    assert reason(compressed(**fields), compressed=True).startswith(expected)


@pytest.mark.parametrize("field", ["vehicle_speed", "battery_level", "power_kw", "odometer"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused(field: str, value: float) -> None:
    for text in (
        reason(plain(**{field: value}), compressed=False),
        reason(compressed(**{field: value}), compressed=True),
    ):
        assert text.startswith(f"{field} is ")
        assert "it must be a number in [" in text


def test_the_reason_names_the_record_of_a_batch() -> None:
    good = telemetry_pb2.VehicleData.FromString(plain())
    bad = telemetry_pb2.VehicleData.FromString(plain(battery_level=140.0))
    body = telemetry_pb2.TelemetryBatch(records=[good, good, bad]).SerializeToString()
    assert reason(body, compressed=False, batch=True) == (
        "records[2].battery_level = 140 is outside [0, 100] %"
    )


def test_a_resync_without_every_field_is_refused() -> None:
    body = compressed(is_resync=True, vehicle_speed=1.0, battery_level=2.0, heading=3)
    assert reason(body, compressed=True) == (
        "is_resync is true but power_kw is missing: a resync carries every field"
    )


def test_another_predictor_version_is_refused() -> None:
    assert reason(compressed(predictor_version=PREDICTOR_VERSION + 1), compressed=True) == (
        f"predictor_version = {PREDICTOR_VERSION + 1} is not supported: "
        f"this server decodes version {PREDICTOR_VERSION}"
    )


def test_sequence_0_is_refused() -> None:
    assert reason(compressed(sequence=0), compressed=True).startswith(
        "sequence = 0 is outside [1, 2^64)"
    )
    assert reason(plain(sequence=0), compressed=False).startswith("sequence = 0")


def test_vins() -> None:
    assert check_vin("5YJ3E1EA1KF000001") == "5YJ3E1EA1KF000001"  # the seed's default
    assert check_vin(" 5yj3e1ea1kf000001 ") == "5YJ3E1EA1KF000001"
    for bad in ("5YJ3E1EA1KF00000", "5YJ3E1EA1KF0000011", "5YJ3E1EA1KF00000I", "5YJ3E1EA1KF0-0001"):
        with pytest.raises(WireError, match="17 characters"):
            check_vin(bad)
    assert VIN_PATTERN.fullmatch("1HGCM82633A004352")
    assert not VIN_PATTERN.fullmatch("1HGCM82633A00435Q")


def _optional(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | values


@given(
    timestamp=st.integers(min_value=0, max_value=2**63 - 1),
    odometer=st.floats(width=32),
    speed=_optional(st.floats(width=32)),
    battery=_optional(st.floats(width=32)),
    power=_optional(st.floats(width=32)),
    heading=_optional(st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    resync=st.booleans(),
    sequence=_optional(st.integers(min_value=0, max_value=2**64 - 1)),
    version=_optional(st.integers(min_value=0, max_value=3)),
)
@settings(max_examples=400, deadline=None)
def test_the_fast_path_accepts_exactly_what_the_named_checks_accept(
    timestamp: int,
    odometer: float,
    speed: float | None,
    battery: float | None,
    power: float | None,
    heading: int | None,
    resync: bool,
    sequence: int | None,
    version: int | None,
) -> None:
    """`_compressed_row` skips the per-field checks when one expression says every value is
    in range; whatever it returns or refuses, the checks that name each problem agree."""
    record = telemetry_pb2.CompressedVehicleData(
        timestamp=timestamp,
        odometer=odometer,
        vehicle_speed=speed,
        battery_level=battery,
        power_kw=power,
        heading=heading,
        is_resync=resync,
        sequence=sequence,
        predictor_version=version,
    )
    try:
        checked: PacketRow | str = _checked_compressed_row(record, "")
    except WireError as exc:
        checked = exc.reason
    try:
        fast: PacketRow | str = _compressed_row(record, False, 0)
    except WireError as exc:
        fast = exc.reason
    assert fast == checked
