"""Telemetry uploads on the wire: protobuf bodies to `Packet`s and back, with the checks for a 400.

The server reads bodies into plain tuples instead (`parse_rows`, `PacketRow`), with the same checks:
it reads every record it stores, and a `Packet` per record costs it more than the parsing.

Everything a logger can get wrong is refused here with a `WireError` whose `reason` names the
field and what it may be, so the gateway can answer 400 with it and nothing downstream sees a
value that would poison a predictor or a database column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final, TypeVar

from google.protobuf.message import DecodeError

from edgeway.common.telemetry import telemetry_pb2
from edgeway.common.telemetry.predictor import (
    PREDICTOR_VERSION,
    Packet,
    PacketRow,
    Sample,
    quantize_heading,
)

MAX_BATCH_RECORDS: Final = 10_000

T = TypeVar("T")

# Record time: 2000-01-01T00:00:00Z <= timestamp < 2100-01-01T00:00:00Z, in ms since the epoch.
MIN_TIMESTAMP_MS: Final = 946_684_800_000
MAX_TIMESTAMP_MS: Final = 4_102_444_800_000

# Plausible ranges for a road car (the seed's units), wider than any real reading. Field names are
# the wire's, as the logger's developer knows them.
_RANGES: Final = {
    "vehicle_speed": (0.0, 300.0, "mph"),
    "battery_level": (0.0, 100.0, "%"),
    "power_kw": (-1000.0, 1500.0, "kW"),
    "odometer": (0.0, 2_000_000.0, "miles"),
}

# ISO 3779: 17 characters, digits and capitals except I, O and Q (confused with 1 and 0).
VIN_PATTERN: Final = re.compile(r"[A-HJ-NPR-Z0-9]{17}")


class WireError(ValueError):
    """An upload that cannot be accepted; `reason` is the message a 400 can carry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_vin(vin: str) -> str:
    """The VIN, trimmed and in capitals, if it is well formed (the check digit is not verified:
    the seed's default VIN 5YJ3E1EA1KF000001 fails it)."""
    normalized = vin.strip().upper()
    if not VIN_PATTERN.fullmatch(normalized):
        raise WireError(
            f"VIN {vin!r} is not 17 characters of digits and capitals other than I, O and Q"
        )
    return normalized


def parse_upload(body: bytes, *, compressed: bool, batch: bool) -> list[Packet]:
    """The packets in an upload body, in the order sent.

    `compressed`: CompressedVehicleData (else VehicleData); `batch`: CompressedBatch or
    TelemetryBatch of those (else a single message). An uncompressed reading becomes a resync
    packet with every field present."""
    return [Packet(*row) for row in parse_rows(body, compressed=compressed, batch=batch)]


def parse_rows(body: bytes, *, compressed: bool, batch: bool) -> list[PacketRow]:
    """`parse_upload`, each packet as a plain tuple of its fields (`PacketRow`)."""
    if compressed:
        compressed_records = _parse_compressed(body, batch=batch)
        return [
            _compressed_row(record, batch, index) for index, record in enumerate(compressed_records)
        ]
    plain_records = _parse_plain(body, batch=batch)
    return [_plain_row(record, _where(batch, index)) for index, record in enumerate(plain_records)]


def encode_packet(packet: Packet) -> bytes:
    """`packet` as a CompressedVehicleData body."""
    return _serialize(_compressed_message(packet))


def encode_batch(packets: Sequence[Packet], *, device_id: str = "") -> bytes:
    """`packets` as a CompressedBatch body."""
    message = telemetry_pb2.CompressedBatch(
        records=[_compressed_message(packet) for packet in packets], device_id=device_id
    )
    return _serialize(message)


def encode_sample(sample: Sample, *, sequence: int | None = None) -> bytes:
    """`sample` as an uncompressed VehicleData body (what a logger without compression sends)."""
    message = telemetry_pb2.VehicleData(
        timestamp=sample.timestamp_ms,
        vehicle_speed=sample.speed,
        battery_level=sample.battery,
        power_kw=sample.power,
        odometer=sample.odometer,
        heading=quantize_heading(sample.heading),
        sequence=sequence,
    )
    return _serialize(message)


def _serialize(
    message: telemetry_pb2.VehicleData
    | telemetry_pb2.CompressedVehicleData
    | telemetry_pb2.CompressedBatch,
) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _parse_compressed(body: bytes, *, batch: bool) -> list[telemetry_pb2.CompressedVehicleData]:
    if batch:
        compressed_batch = telemetry_pb2.CompressedBatch()
        _parse_into(compressed_batch, body)
        return _checked_count(list(compressed_batch.records), "CompressedBatch")
    record = telemetry_pb2.CompressedVehicleData()
    _parse_into(record, body)
    return [record]


def _parse_plain(body: bytes, *, batch: bool) -> list[telemetry_pb2.VehicleData]:
    if batch:
        plain_batch = telemetry_pb2.TelemetryBatch()
        _parse_into(plain_batch, body)
        return _checked_count(list(plain_batch.records), "TelemetryBatch")
    record = telemetry_pb2.VehicleData()
    _parse_into(record, body)
    return [record]


def _parse_into(
    message: telemetry_pb2.VehicleData
    | telemetry_pb2.CompressedVehicleData
    | telemetry_pb2.TelemetryBatch
    | telemetry_pb2.CompressedBatch,
    body: bytes,
) -> None:
    try:
        message.ParseFromString(body)
    except DecodeError:
        raise WireError(f"body is not a {type(message).__name__} protobuf message") from None


def _checked_count(records: list[T], kind: str) -> list[T]:
    if not records:
        raise WireError(f"{kind} has no records")
    if len(records) > MAX_BATCH_RECORDS:
        raise WireError(
            f"{kind} has {len(records)} records; at most {MAX_BATCH_RECORDS} are accepted"
        )
    return records


def _where(batch: bool, index: int) -> str:
    return f"records[{index}]." if batch else ""


def _compressed_message(packet: Packet) -> telemetry_pb2.CompressedVehicleData:
    return telemetry_pb2.CompressedVehicleData(
        timestamp=packet.timestamp_ms,
        vehicle_speed=packet.speed,
        battery_level=packet.battery,
        power_kw=packet.power,
        odometer=packet.odometer,
        heading=packet.heading,
        is_resync=packet.is_resync,
        sequence=packet.sequence,
        predictor_version=packet.predictor_version,
    )


def _plain_row(record: telemetry_pb2.VehicleData, where: str) -> PacketRow:
    return (
        _timestamp(record.timestamp, where),
        _value(record.odometer, "odometer", where),
        _value(record.vehicle_speed, "vehicle_speed", where),
        _value(record.battery_level, "battery_level", where),
        _value(record.power_kw, "power_kw", where),
        _heading(record.heading, where),
        True,  # is_resync: a full reading
        _sequence(record.sequence, where) if record.HasField("sequence") else None,
        None,  # predictor_version
    )


_SPEED_LOW, _SPEED_HIGH, _ = _RANGES["vehicle_speed"]
_BATTERY_LOW, _BATTERY_HIGH, _ = _RANGES["battery_level"]
_POWER_LOW, _POWER_HIGH, _ = _RANGES["power_kw"]
_ODOMETER_LOW, _ODOMETER_HIGH, _ = _RANGES["odometer"]


def _compressed_row(
    record: telemetry_pb2.CompressedVehicleData, batch: bool, index: int
) -> PacketRow:
    """The packet of a record whose every value is in range; anything else goes to
    `_checked_compressed_row`, which names what is wrong. (Every record of every upload
    comes through here, so the common case makes as few calls as it can.)"""
    has = record.HasField
    timestamp, odometer, resync = record.timestamp, record.odometer, record.is_resync
    speed = record.vehicle_speed if has("vehicle_speed") else None
    battery = record.battery_level if has("battery_level") else None
    power = record.power_kw if has("power_kw") else None
    heading = record.heading if has("heading") else None
    sequence = record.sequence if has("sequence") else None
    version = record.predictor_version if has("predictor_version") else None
    # Comparisons are False for NaN, and every range is finite: a value in range is a number.
    if not (
        MIN_TIMESTAMP_MS <= timestamp < MAX_TIMESTAMP_MS
        and _ODOMETER_LOW <= odometer <= _ODOMETER_HIGH
        and (speed is None or _SPEED_LOW <= speed <= _SPEED_HIGH)
        and (battery is None or _BATTERY_LOW <= battery <= _BATTERY_HIGH)
        and (power is None or _POWER_LOW <= power <= _POWER_HIGH)
        and (heading is None or 0 <= heading <= 360)
        and (sequence is None or sequence >= 1)
        and (version is None or version == PREDICTOR_VERSION)
        and not (resync and (speed is None or battery is None or power is None or heading is None))
    ):
        return _checked_compressed_row(record, _where(batch, index))
    return (
        timestamp,
        odometer,
        speed,
        battery,
        power,
        None if heading is None else heading % 360,  # 360 is north, as 0 is
        resync,
        sequence,
        version,
    )


def _checked_compressed_row(record: telemetry_pb2.CompressedVehicleData, where: str) -> PacketRow:
    def optional(name: str) -> float | None:
        return _value(getattr(record, name), name, where) if record.HasField(name) else None

    if record.is_resync:
        missing = [
            name
            for name in ("vehicle_speed", "battery_level", "power_kw", "heading")
            if not record.HasField(name)
        ]
        if missing:
            raise WireError(
                f"{where}is_resync is true but {', '.join(missing)} is missing: "
                "a resync carries every field"
            )
    version = record.predictor_version if record.HasField("predictor_version") else None
    if version is not None and version != PREDICTOR_VERSION:
        raise WireError(
            f"{where}predictor_version = {version} is not supported: this server decodes "
            f"version {PREDICTOR_VERSION}"
        )
    return (
        _timestamp(record.timestamp, where),
        _value(record.odometer, "odometer", where),
        optional("vehicle_speed"),
        optional("battery_level"),
        optional("power_kw"),
        _heading(record.heading, where) if record.HasField("heading") else None,
        record.is_resync,
        _sequence(record.sequence, where) if record.HasField("sequence") else None,
        version,
    )


def _timestamp(value: int, where: str) -> int:
    if not MIN_TIMESTAMP_MS <= value < MAX_TIMESTAMP_MS:
        raise WireError(
            f"{where}timestamp = {value} is outside [{MIN_TIMESTAMP_MS}, {MAX_TIMESTAMP_MS}) "
            "(ms since the epoch, 2000-01-01 to 2100-01-01)"
        )
    return value


def _value(value: float, name: str, where: str) -> float:
    low, high, unit = _RANGES[name]
    if not math.isfinite(value):
        raise WireError(
            f"{where}{name} is {value}; it must be a number in [{low:.7g}, {high:.7g}] {unit}"
        )
    if not low <= value <= high:
        raise WireError(f"{where}{name} = {value:.7g} is outside [{low:.7g}, {high:.7g}] {unit}")
    return value


def _heading(value: int, where: str) -> int:
    if not 0 <= value <= 360:
        raise WireError(f"{where}heading = {value} is outside [0, 360] degrees")
    return value % 360  # 360 is north, as 0 is


def _sequence(value: int, where: str) -> int:
    if value < 1:
        raise WireError(
            f"{where}sequence = {value} is outside [1, 2^64): packets are numbered from 1"
        )
    return value
