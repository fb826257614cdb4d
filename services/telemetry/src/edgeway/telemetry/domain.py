"""Telemetry rules, as pure functions: no I/O, so every rule is tested without a broker or database.

An upload is read with the shared wire format (`edgeway.common.telemetry.wire`), decoded per
vehicle with the shared predictor, and turned into the dashboard message of the Python Cloud
Server it replaces (docs/replaced-systems.md) with two additions: which fields were predicted, and
whether they may be off (`uncertain`). What cannot be taken becomes a `Rejection` with a code,
kept by the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple

from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import (
    FIELDS,
    RECONSTRUCTED,
    Decoded,
    DecodedRow,
    Decoder,
    OutOfOrderError,
    PacketRow,
    Sample,
)
from edgeway.common.telemetry.uploads import UPLOAD_TYPE as UPLOAD_TYPE

RECORD_TYPE = "telemetry.record.v1"  # what this service broadcasts, one per stored record

HEADER_VIN = "x-vehicle-vin"
HEADER_COMPRESSED = "x-compressed"
HEADER_BATCH = "x-batch"
# The seed's `X-Vehicle-VIN` default: an upload without the header is this car's.
DEFAULT_VIN = "5YJ3E1EA1KF000001"

# Largest sequence number the `telemetry.sequence` column (bigint) holds; the wire allows uint64.
MAX_SEQUENCE = 2**63 - 1


class RejectCode(StrEnum):
    INVALID_HEADER = "invalid_header"  # x-compressed / x-batch not "true" or "false"
    INVALID_VIN = "invalid_vin"
    INVALID_PAYLOAD = "invalid_payload"  # wire.WireError: undecodable bytes, out of range
    UNKNOWN_VEHICLE = "unknown_vehicle"
    UNDECODABLE = "undecodable"  # a packet the predictor cannot decode
    OUT_OF_ORDER = "out_of_order"  # packets that came after newer ones of their vehicle


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an upload cannot be taken; stored with its bytes, never retried."""

    code: RejectCode
    reason: str
    vin: str | None = None  # the VIN header as it came
    records: int = 0  # packets in the upload, when the body could be read


@dataclass(frozen=True, slots=True)
class Upload:
    """An upload whose body and headers passed the wire's checks."""

    vin: str
    packets: list[PacketRow]  # each a plain tuple of a `Packet`'s fields, in order
    compressed: bool


# Where a packet's time and sequence number are in its `PacketRow` (`Packet`'s field order).
ROW_TIMESTAMP: Final = 0
ROW_SEQUENCE: Final = 7


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _flag(headers: Mapping[str, Any], name: str) -> bool:
    """A "true"/"false" header (absent: false); ValueError for anything else."""
    value = headers.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = _header(headers, name) or ""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    raise ValueError(f"header {name} is {text!r}; it must be 'true' or 'false'")


def read_upload(body: bytes, headers: Mapping[str, Any]) -> Upload | Rejection:
    """Check an upload's headers and decode its body with the wire format."""
    raw_vin = _header(headers, HEADER_VIN)
    try:
        compressed = _flag(headers, HEADER_COMPRESSED)
        batch = _flag(headers, HEADER_BATCH)
    except ValueError as exc:
        return Rejection(RejectCode.INVALID_HEADER, str(exc), raw_vin)
    try:
        vin = wire.check_vin(DEFAULT_VIN if raw_vin is None else raw_vin)
    except wire.WireError as exc:
        return Rejection(RejectCode.INVALID_VIN, exc.reason, raw_vin)
    try:
        packets = wire.parse_rows(body, compressed=compressed, batch=batch)
    except wire.WireError as exc:
        return Rejection(RejectCode.INVALID_PAYLOAD, exc.reason, raw_vin)
    for index, packet in enumerate(packets):
        sequence = packet[ROW_SEQUENCE]
        if sequence is not None and sequence > MAX_SEQUENCE:
            where = f"records[{index}]." if batch else ""
            return Rejection(
                RejectCode.INVALID_PAYLOAD,
                f"{where}sequence = {sequence} is above {MAX_SEQUENCE}",
                raw_vin,
                len(packets),
            )
    return Upload(vin=vin, packets=packets, compressed=compressed)


def undecodable(upload: Upload, reason: str) -> Rejection:
    """An upload the vehicle's decoder could not read (`UndecodableError`): none of it stored."""
    return Rejection(RejectCode.UNDECODABLE, reason, upload.vin, len(upload.packets))


def unknown_vehicle(upload: Upload) -> Rejection:
    return Rejection(
        RejectCode.UNKNOWN_VEHICLE,
        f"vehicle {upload.vin} is not registered",
        upload.vin,
        len(upload.packets),
    )


# --- decoding -------------------------------------------------------------------------------------


class UndecodableError(ValueError):
    """A packet of an upload that the predictor refuses; the decoder is as before the upload."""


@dataclass(frozen=True, slots=True)
class DecodedUpload:
    """An upload's packets that were decoded and what they decoded to, side by side (plain
    tuples: `Decoder.decode_row`), and those behind the decoder."""

    packets: list[PacketRow]
    decoded: list[DecodedRow]
    # Packets at or before the vehicle's last record: a replay or a redelivery of stored ones,
    # or (if the table does not have them) packets that came after newer ones.
    behind: list[PacketRow]


def decode_upload(decoder: Decoder, packets: Sequence[PacketRow]) -> DecodedUpload:
    """Decode one upload's packets in order, setting aside what is behind the decoder.

    A packet at or before the vehicle's last record time was decoded (and stored) before, as a
    rule, and decoding it again would move the predictions twice. All or nothing: if one packet
    cannot be decoded, the decoder is left as it was before the upload.
    """
    before = decoder.state
    sent: list[PacketRow] = []
    decoded: list[DecodedRow] = []
    behind: list[PacketRow] = []
    decode = decoder.decode_row
    for packet in packets:
        last = decoder.last_timestamp_ms
        if last is not None and packet[ROW_TIMESTAMP] <= last:
            behind.append(packet)
            continue
        try:
            decoded.append(decode(packet))
        except OutOfOrderError:
            behind.append(packet)
            continue
        except ValueError as exc:
            decoder.state = before
            raise UndecodableError(str(exc)) from exc
        sent.append(packet)
    return DecodedUpload(sent, decoded, behind)


def out_of_order(upload: Upload, late: Sequence[PacketRow]) -> Rejection:
    """Packets behind their vehicle's state that were never stored: too late to decode.

    Their predictions are gone (the decoder has moved on), so they are kept as a rejection with
    the upload's bytes rather than stored with guessed values or dropped as duplicates.
    """
    times = ", ".join(str(packet[ROW_TIMESTAMP]) for packet in late[:5])
    more = f" and {len(late) - 5} more" if len(late) > 5 else ""
    return Rejection(
        RejectCode.OUT_OF_ORDER,
        f"{len(late)} packet(s) of {upload.vin} came after newer ones and were not stored: "
        f"timestamps {times}{more}",
        upload.vin,
        len(late),
    )


# The bitmask of each set of reconstructed fields `Decoder.decode` returns.
RECONSTRUCTED_MASKS: Final = {fields: mask for mask, fields in enumerate(RECONSTRUCTED)}
# How many fields each bitmask names (what a record adds to the skipped fields' count).
SKIPPED_FIELDS: Final = tuple(len(fields) for fields in RECONSTRUCTED)


def reconstructed_mask(fields: Iterable[str]) -> int:
    """The `telemetry.reconstructed` bitmask: bit i for FIELDS[i] (speed 1, battery 2, ...)."""
    known = RECONSTRUCTED_MASKS.get(fields) if isinstance(fields, frozenset) else None
    if known is not None:  # what Decoder.decode returns: one of its 16 sets
        return known
    names = set(fields)
    return sum(1 << index for index, name in enumerate(FIELDS) if name in names)


def reconstructed_fields(mask: int) -> list[str]:
    """The fields a bitmask names, in FIELDS order."""
    return [name for index, name in enumerate(FIELDS) if mask & (1 << index)]


MS_PER_DAY: Final = 86_400_000  # a UTC day: record times of one day share timestamp_ms // this


def record_day(timestamp_ms: int) -> date:
    """The UTC day of a record time: what its compression statistics count toward."""
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).date()


# --- compression statistics -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatsCounts:
    """Packets, and predicted fields sent and skipped (FIELDS: four per packet)."""

    packets: int = 0
    transmitted: int = 0
    skipped: int = 0

    @classmethod
    def of(cls, decoded: Decoded) -> StatsCounts:
        skipped = len(decoded.reconstructed)
        return cls(1, len(FIELDS) - skipped, skipped)

    def __add__(self, other: StatsCounts) -> StatsCounts:
        return StatsCounts(
            self.packets + other.packets,
            self.transmitted + other.transmitted,
            self.skipped + other.skipped,
        )

    def __sub__(self, other: StatsCounts) -> StatsCounts:
        return StatsCounts(
            self.packets - other.packets,
            self.transmitted - other.transmitted,
            self.skipped - other.skipped,
        )

    @property
    def saved_percent(self) -> float:
        """The share of fields not sent, in percent, unrounded (0 when nothing was counted)."""
        fields = self.transmitted + self.skipped
        return self.skipped * 100 / fields if fields else 0.0

    def client_view(self) -> dict[str, Any]:
        """The seed's `compression_stats` object: readings are fields."""
        return {
            "total_readings": self.transmitted + self.skipped,
            "transmitted_readings": self.transmitted,
            "skipped_readings": self.skipped,
            "compression_ratio": round(self.saved_percent, 2),
        }


# --- offline sessions -----------------------------------------------------------------------------


def late_before(received_at: datetime, *, offline_after_s: float) -> float:
    """Record times (ms since the epoch) before which a record that reached the gateway at
    `received_at` came so long after its own time that it was buffered (`is_late`)."""
    return received_at.timestamp() * 1000 - offline_after_s * 1000


def is_late(timestamp_ms: int, *, received_at: datetime, offline_after_s: float) -> bool:
    """Whether a record reached the gateway so long after its own time that it was buffered."""
    return timestamp_ms < late_before(received_at, offline_after_s=offline_after_s)


class SessionRecord(NamedTuple):
    """What session tracking needs to know of one decoded record, in decode order (a plain tuple
    of these values will do: `plan_sessions` reads them by position)."""

    timestamp_ms: int
    late: bool
    gap: int  # packets missing just before it (sequence numbers)
    stored: bool
    received_at: datetime  # at the gateway


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """More records for a stored open session, and its end if a live record came."""

    id: int
    buffered: int
    uploaded: int
    ended_at: datetime | None


@dataclass(slots=True)
class NewSession:
    vehicle_id: int
    started_at: datetime
    ended_at: datetime | None = None  # None: still open
    buffered: int = 0
    uploaded: int = 0
    arrived_at: datetime | None = None  # when its first record reached the gateway


@dataclass(slots=True)
class SessionPlan:
    """What one group does to a vehicle's offline sessions."""

    update: SessionUpdate | None = None
    new: list[NewSession] = field(default_factory=list)
    # Whether the stored open session is still open afterwards, or else the last new one is.
    keeps_open: bool = False
    opens_new: bool = False


def _at(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC)


def plan_sessions(
    *,
    vehicle_id: int,
    open_session: int | None,
    records: Sequence[tuple[int, bool, int, bool, datetime]],  # SessionRecord's fields
) -> SessionPlan:
    """Offline sessions of one vehicle after `records`.

    A run of late records is one session (a logger replaying what it buffered while offline):
    it starts at the first late record's time and ends at the time of the first live record
    after it; it arrived when that first late record reached the gateway. `records_buffered`
    counts what the logger numbered in the session (stored records plus those missing per
    sequence gaps), `records_uploaded` what was stored.
    """
    plan = SessionPlan()
    buffered = uploaded = 0
    ended_at: datetime | None = None
    stored_open = open_session is not None  # the stored session, until a live record ends it
    current: NewSession | None = None
    for timestamp_ms, late, gap, stored, received_at in records:
        if late:
            if stored_open:
                buffered += 1 + gap
                uploaded += stored
                continue
            if current is None:
                current = NewSession(vehicle_id, _at(timestamp_ms), arrived_at=received_at)
                plan.new.append(current)
            current.buffered += 1 + gap
            current.uploaded += stored
        elif stored_open:
            stored_open = False
            ended_at = _at(timestamp_ms)
        elif current is not None:
            current.ended_at = _at(timestamp_ms)
            current = None
    if open_session is not None and (buffered or uploaded or ended_at is not None):
        plan.update = SessionUpdate(open_session, buffered, uploaded, ended_at)
    plan.keeps_open = stored_open
    plan.opens_new = current is not None
    return plan


# --- what clients see -----------------------------------------------------------------------------


def received_text(received_at: datetime) -> str:
    """ISO 8601 in UTC with microseconds, the same shape every time."""
    return received_at.astimezone(UTC).isoformat(timespec="microseconds")


def data_object(sample: Sample, *, received_at: datetime) -> dict[str, Any]:
    """The seed's record object (`data` of its WS message, items of `history`)."""
    return {
        "timestamp": sample.timestamp_ms,
        "speed": sample.speed,
        "battery": sample.battery,
        "power": sample.power,
        "odometer": sample.odometer,
        "heading": float(sample.heading),
        "received_at": received_text(received_at),
    }


def vehicle_tag(vin: str) -> str:
    """The seed's `vehicle_vin`: the last six characters. Kept for the seed's dashboards; every
    message that carries it carries the full VIN beside it (`vin`), which `?vin=` takes."""
    return vin[-6:]


def client_message(
    *,
    vin: str,
    decoded: Decoded,
    received_at: datetime,
    stats: StatsCounts,
) -> dict[str, Any]:
    """The seed's per-record dashboard message, plus `reconstructed` and `uncertain`."""
    sample = decoded.sample
    return record_message(
        (
            sample.timestamp_ms,
            sample.speed,
            sample.battery,
            sample.power,
            sample.odometer,
            sample.heading,
        ),
        reconstructed_mask(decoded.reconstructed),
        decoded.uncertain,
        vin=vin,
        vehicle=vehicle_tag(vin),
        received=received_text(received_at),
        stats=stats,
    )


def record_message(
    reading: tuple[int, float, float, float, float, float],
    reconstructed: int,
    uncertain: bool,
    *,
    vin: str,
    vehicle: str,
    received: str,
    stats: StatsCounts,
) -> dict[str, Any]:
    """`client_message` of a record as it is stored (its `Sample`'s values in order, and the
    bitmask of its reconstructed fields), from what every record of an upload shares, worked
    out once: the vehicle's VIN and tag and the `received_at` text."""
    timestamp_ms, speed, battery, power, odometer, heading = reading
    return {
        "type": "telemetry",
        "data": {
            "timestamp": timestamp_ms,
            "speed": speed,
            "battery": battery,
            "power": power,
            "odometer": odometer,
            "heading": float(heading),
            "received_at": received,
        },
        "vehicle_vin": vehicle,
        "vin": vin,
        "compression_stats": stats.client_view(),
        "reconstructed": reconstructed_fields(reconstructed),
        "uncertain": uncertain,
    }
