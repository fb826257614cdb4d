"""Telemetry rules: reading uploads, decoding per vehicle, statistics, offline sessions, and the
seed's dashboard message."""

from __future__ import annotations

from dataclasses import astuple
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest

from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import (
    PREDICTOR_VERSION,
    Decoded,
    DecodedRow,
    Decoder,
    Encoder,
    Packet,
    PacketRow,
    Sample,
)
from edgeway.telemetry import domain
from edgeway.telemetry.domain import RejectCode, SessionRecord

T0 = 1_763_726_400_000  # 2025-11-21T12:00:00Z


def sample(offset_ms: int = 0, *, speed: float = 65.0, heading: float = 90.0) -> Sample:
    return Sample(T0 + offset_ms, speed, 80.0, 20.0, 12_000.0, heading)


def packets(count: int, *, step_ms: int = 300) -> list[Packet]:
    encoder = Encoder()
    return [encoder.encode(sample(i * step_ms, speed=65.0 + (i % 3) * 0.5)) for i in range(count)]


def rows(sent: list[Packet]) -> list[PacketRow]:
    """Packets as the service reads them: plain tuples of their fields."""
    return [astuple(packet) for packet in sent]


def headers(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "x-vehicle-vin": "5YJ3E1EA1KF000001",
        "x-compressed": "true",
        "x-batch": "false",
    }
    return {**base, **{key.replace("_", "-"): value for key, value in values.items()}}


# --- reading uploads ------------------------------------------------------------------------------


def test_an_upload_is_read_with_the_contract_headers() -> None:
    sent = packets(3)
    upload = domain.read_upload(wire.encode_batch(sent), headers(x_batch="true"))
    assert upload == domain.Upload(vin="5YJ3E1EA1KF000001", packets=rows(sent), compressed=True)


def test_without_headers_an_upload_is_one_plain_reading_of_the_seeds_car() -> None:
    """The seed logger's defaults: VehicleData, `X-Vehicle-VIN` 5YJ3E1EA1KF000001."""
    body = wire.encode_sample(sample(speed=70.5))
    upload = domain.read_upload(body, {})
    assert isinstance(upload, domain.Upload)
    assert (upload.vin, upload.compressed) == ("5YJ3E1EA1KF000001", False)
    [packet] = [Packet(*row) for row in upload.packets]
    assert (packet.speed, packet.is_resync, packet.sequence) == (70.5, True, None)


def test_header_values_may_come_as_bytes_and_in_any_case() -> None:
    body = wire.encode_packet(packets(1)[0])
    upload = domain.read_upload(
        body, {"x-vehicle-vin": b" 5yj3e1ea1kf000002 ", "x-compressed": b"TRUE", "x-batch": False}
    )
    assert isinstance(upload, domain.Upload)
    assert upload.vin == "5YJ3E1EA1KF000002"


@pytest.mark.parametrize(
    ("body", "given", "code", "reason"),
    [
        (b"\xff\xff\xff", headers(), RejectCode.INVALID_PAYLOAD, "not a CompressedVehicleData"),
        (b"", headers(x_batch="true"), RejectCode.INVALID_PAYLOAD, "has no records"),
        (b"", headers(x_vehicle_vin="5YJ3E1EA1KF00000I"), RejectCode.INVALID_VIN, "17 characters"),
        (b"", headers(x_compressed="yes"), RejectCode.INVALID_HEADER, "'true' or 'false'"),
        (
            wire.encode_sample(sample(speed=301.0)),
            headers(x_compressed="false"),
            RejectCode.INVALID_PAYLOAD,
            "vehicle_speed = 301 is outside [0, 300] mph",
        ),
    ],
)
def test_what_cannot_be_read_is_rejected_with_a_reason(
    body: bytes, given: dict[str, Any], code: RejectCode, reason: str
) -> None:
    rejection = domain.read_upload(body, given)
    assert isinstance(rejection, domain.Rejection)
    assert rejection.code is code
    assert reason in rejection.reason
    assert rejection.vin == given["x-vehicle-vin"]


def test_a_sequence_the_database_cannot_hold_is_rejected() -> None:
    packet = packets(1)[0]
    body = wire.encode_batch([packet, Packet(**{**_fields(packet), "sequence": 2**63})])
    rejection = domain.read_upload(body, headers(x_batch="true"))
    assert isinstance(rejection, domain.Rejection)
    assert (rejection.code, rejection.records) == (RejectCode.INVALID_PAYLOAD, 2)
    assert rejection.reason.startswith("records[1].sequence")


def _fields(packet: Packet) -> dict[str, Any]:
    return {name: getattr(packet, name) for name in Packet.__dataclass_fields__}


def test_an_unknown_vehicle_keeps_its_record_count() -> None:
    upload = domain.read_upload(wire.encode_batch(packets(4)), headers(x_batch="true"))
    assert isinstance(upload, domain.Upload)
    rejection = domain.unknown_vehicle(upload)
    assert (rejection.code, rejection.vin, rejection.records) == (
        RejectCode.UNKNOWN_VEHICLE,
        "5YJ3E1EA1KF000001",
        4,
    )


# --- decoding -------------------------------------------------------------------------------------


def as_row(decoded: Decoded) -> DecodedRow:
    """`Decoder.decode`'s answer as `Decoder.decode_row` gives it."""
    s = decoded.sample
    mask = domain.reconstructed_mask(decoded.reconstructed)
    return (
        s.speed,
        s.battery,
        s.power,
        s.odometer,
        s.heading,
        mask,
        decoded.uncertain,
        decoded.gap,
    )


def test_packets_at_or_before_the_last_record_are_duplicates_not_decoded_again() -> None:
    sent = rows(packets(10))
    decoder = Decoder()
    first = domain.decode_upload(decoder, sent[:6])
    assert (first.packets, first.behind) == (sent[:6], [])
    state = decoder.state
    # A redelivery of the first upload, then a re-upload overlapping it.
    again = domain.decode_upload(decoder, sent[:6])
    assert (again.packets, again.decoded, again.behind, decoder.state) == ([], [], sent[:6], state)
    overlap = domain.decode_upload(decoder, sent[4:])
    assert overlap.behind == sent[4:6]
    assert overlap.packets == sent[6:]
    # The same as decoding everything once.
    fresh = Decoder()
    assert first.decoded + overlap.decoded == [as_row(fresh.decode(p)) for p in packets(10)]
    assert decoder.state == fresh.state


def test_an_undecodable_upload_leaves_the_decoder_as_it_was() -> None:
    sent = packets(5)
    decoder = Decoder()
    domain.decode_upload(decoder, rows(sent[:2]))
    before = decoder.state
    future = Packet(**{**_fields(sent[3]), "predictor_version": PREDICTOR_VERSION + 1})
    with pytest.raises(domain.UndecodableError, match="predictor version"):
        domain.decode_upload(decoder, rows([sent[2], future, sent[4]]))
    assert decoder.state == before
    assert len(domain.decode_upload(decoder, rows(sent[2:])).decoded) == 3


def test_packets_behind_the_state_that_were_never_stored_are_out_of_order() -> None:
    sent = packets(8)
    upload = domain.Upload("5YJ3E1EA1KF000001", rows(sent), compressed=True)
    rejection = domain.out_of_order(upload, rows(sent[:7]))
    assert (rejection.code, rejection.vin, rejection.records) == (
        RejectCode.OUT_OF_ORDER,
        "5YJ3E1EA1KF000001",
        7,
    )
    listed = ", ".join(str(p.timestamp_ms) for p in sent[:5])
    assert rejection.reason == (
        "7 packet(s) of 5YJ3E1EA1KF000001 came after newer ones and were not stored: "
        f"timestamps {listed} and 2 more"
    )


def test_the_reconstructed_bitmask_follows_the_fields_order() -> None:
    assert domain.reconstructed_mask([]) == 0
    assert domain.reconstructed_mask(["speed"]) == 1
    assert domain.reconstructed_mask(["battery"]) == 2
    assert domain.reconstructed_mask(["power"]) == 4
    assert domain.reconstructed_mask(["heading", "speed"]) == 9
    for mask in range(16):
        assert domain.reconstructed_mask(domain.reconstructed_fields(mask)) == mask
    assert domain.reconstructed_fields(15) == ["speed", "battery", "power", "heading"]


def test_a_record_counts_toward_its_utc_day() -> None:
    midnight = int(datetime(2025, 11, 22, tzinfo=UTC).timestamp() * 1000)
    assert domain.record_day(midnight - 1) == date(2025, 11, 21)
    assert domain.record_day(midnight) == date(2025, 11, 22)


# --- compression statistics -----------------------------------------------------------------------


def decoded(*reconstructed: str, uncertain: bool = False) -> Decoded:
    return Decoded(sample(), frozenset(reconstructed), uncertain, 0)


def test_stats_count_fields_and_report_the_seeds_ratio() -> None:
    counts = domain.StatsCounts.of(decoded("speed", "power")) + domain.StatsCounts.of(decoded())
    counts += domain.StatsCounts.of(decoded("heading"))
    assert counts == domain.StatsCounts(3, 9, 3)
    assert counts - domain.StatsCounts.of(decoded()) == domain.StatsCounts(2, 5, 3)
    assert counts.client_view() == {
        "total_readings": 12,
        "transmitted_readings": 9,
        "skipped_readings": 3,
        "compression_ratio": 25.0,
    }
    assert domain.StatsCounts(3, 10, 2).client_view()["compression_ratio"] == 16.67
    assert domain.StatsCounts().client_view()["compression_ratio"] == 0.0


# --- offline sessions -----------------------------------------------------------------------------


def at(offset_ms: int) -> datetime:
    return datetime.fromtimestamp((T0 + offset_ms) / 1000, UTC)


def late(
    offset_ms: int, *, gap: int = 0, stored: bool = True, arrived: int = 60_000
) -> SessionRecord:
    return SessionRecord(T0 + offset_ms, late=True, gap=gap, stored=stored, received_at=at(arrived))


def live(offset_ms: int) -> SessionRecord:
    return SessionRecord(T0 + offset_ms, late=False, gap=0, stored=True, received_at=at(offset_ms))


def test_a_record_is_late_when_it_reaches_the_gateway_after_offline_after_s() -> None:
    received = at(0)
    assert not domain.is_late(T0 - 5_000, received_at=received, offline_after_s=5)
    assert domain.is_late(T0 - 5_001, received_at=received, offline_after_s=5)
    assert not domain.is_late(T0 + 1_000, received_at=received, offline_after_s=5)  # clock ahead


def test_live_records_touch_no_session() -> None:
    plan = domain.plan_sessions(vehicle_id=1, open_session=None, records=[live(0), live(300)])
    assert plan == domain.SessionPlan()


def test_a_run_of_late_records_opens_one_session_and_a_live_record_ends_it() -> None:
    records = [
        live(0),
        late(300, arrived=9_000),
        late(600, gap=2, arrived=9_100),
        late(900, stored=False, arrived=9_200),
        live(1200),
    ]
    plan = domain.plan_sessions(vehicle_id=7, open_session=None, records=records)
    assert plan.update is None
    # It arrived with its first late record.
    assert plan.new == [
        domain.NewSession(7, at(300), at(1200), buffered=5, uploaded=2, arrived_at=at(9_000))
    ]
    assert (plan.keeps_open, plan.opens_new) == (False, False)


def test_a_session_can_stay_open_across_groups() -> None:
    opened = domain.plan_sessions(vehicle_id=7, open_session=None, records=[late(0), late(300)])
    assert opened.new == [
        domain.NewSession(7, at(0), None, buffered=2, uploaded=2, arrived_at=at(60_000))
    ]
    assert opened.opens_new
    more = domain.plan_sessions(vehicle_id=7, open_session=42, records=[late(600), late(900)])
    assert more.update == domain.SessionUpdate(42, buffered=2, uploaded=2, ended_at=None)
    assert (more.new, more.keeps_open) == ([], True)
    ended = domain.plan_sessions(vehicle_id=7, open_session=42, records=[live(1200), late(1500)])
    assert ended.update == domain.SessionUpdate(42, buffered=0, uploaded=0, ended_at=at(1200))
    assert ended.new == [
        domain.NewSession(7, at(1500), None, buffered=1, uploaded=1, arrived_at=at(60_000))
    ]
    assert (ended.keeps_open, ended.opens_new) == (False, True)


# --- what clients see -----------------------------------------------------------------------------


def test_the_client_message_is_the_seeds_with_two_additions() -> None:
    record = Decoded(
        Sample(T0, 65.30000305175781, 80.5, -12.25, 12_000.5, 359.0),
        frozenset({"heading", "speed"}),
        True,
        1,
    )
    received = datetime(2025, 11, 21, 12, 0, 0, tzinfo=UTC) + timedelta(microseconds=5)
    message = domain.client_message(
        vin="5YJ3E1EA1KF000001",
        decoded=record,
        received_at=received,
        stats=domain.StatsCounts(3, 9, 3),
    )
    assert orjson.dumps(message) == (
        b'{"type":"telemetry","data":{"timestamp":1763726400000,"speed":65.30000305175781,'
        b'"battery":80.5,"power":-12.25,"odometer":12000.5,"heading":359.0,'
        b'"received_at":"2025-11-21T12:00:00.000005+00:00"},"vehicle_vin":"000001",'
        b'"vin":"5YJ3E1EA1KF000001","compression_stats":{"total_readings":12,"transmitted_readings":9,'
        b'"skipped_readings":3,"compression_ratio":25.0},'
        b'"reconstructed":["speed","heading"],"uncertain":true}'
    )
