"""The telemetry service's group-commit flow: uploads handled at the same time are stored in one
transaction (`edgeway.common.batching.GroupCommit`), from what the handlers read to what they
broadcast.

Per vehicle, a decoder resumed from its stored state (cached between groups) rebuilds the
records in order; the records, the decoder states, the day's statistics, offline sessions and
rejections are written together. What was stored comes back with what its broadcast needs; the
client messages are built by the publisher (`edgeway.telemetry.broadcast`), off the commit path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.telemetry.predictor import (
    FIELDS,
    Decoded,
    Decoder,
    Packet,
    PredictorConfig,
    PredictorState,
)
from edgeway.telemetry import bulk, domain, store
from edgeway.telemetry.tables import RecordRow

log = get_logger("edgeway.telemetry")

# Pauses between tries while the database is unreachable, the last one repeated until it is
# back (`forever`). A group is never given up on for an outage: a requeued upload would come
# back after newer ones of its vehicle, behind its predictor state.
DB_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 5.0)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One upload as it came off the queue, read."""

    envelope: Envelope
    body: bytes
    upload: domain.Upload | domain.Rejection


class BroadcastRecord(NamedTuple):
    """A record this group stored, with what its broadcast needs (a tuple: one per record)."""

    decoded: Decoded
    stats: domain.StatsCounts  # its vehicle's counts of the record's day, after it
    late: bool  # part of a store-and-forward replay (older than offline_after_s on arrival)


@dataclass(slots=True)
class Outcome:
    """What one upload came to, and what to broadcast about it once committed."""

    envelope: Envelope
    stored: int = 0
    duplicates: int = 0
    rejection: domain.Rejection | None = None
    new_rejection: bool = False  # False: this upload was rejected before (a redelivery)
    vin: str = ""  # the upload's vehicle, when it stored records
    broadcasts: list[BroadcastRecord] = field(default_factory=list)  # in record order


@dataclass(slots=True)
class VehicleDecoder:
    """A vehicle's decoder with what its state row held when it was read."""

    decoder: Decoder
    revision: int
    offline_session_id: int | None


class DecoderCache:
    """Each vehicle's decoder, kept between groups to save a read per group.

    The cache is only as good as the last commit: after a failed transaction it is dropped and
    every state is read again. A cached state that another replica moved on meanwhile (it held
    the queue while this one was cut off) is caught by the state's revision at the next write.
    """

    def __init__(self, config: PredictorConfig) -> None:
        self.config = config
        self._decoders: dict[int, VehicleDecoder] = {}

    def clear(self) -> None:
        self._decoders.clear()

    async def load(self, *, session: AsyncSession, vehicle_ids: set[int]) -> None:
        missing = vehicle_ids - self._decoders.keys()
        if not missing:
            return
        stored = await store.load_states(session=session, vehicle_ids=missing)
        for vehicle_id in missing:
            row = stored.get(vehicle_id)
            if row is None:
                self._decoders[vehicle_id] = VehicleDecoder(Decoder(self.config), 0, None)
                continue
            self._decoders[vehicle_id] = VehicleDecoder(
                Decoder(self.config, _predictor_state(vehicle_id, row)),
                row.revision,
                row.offline_session_id,
            )

    def __getitem__(self, vehicle_id: int) -> VehicleDecoder:
        return self._decoders[vehicle_id]


def _predictor_state(vehicle_id: int, row: store.StoredState) -> PredictorState:
    try:
        return PredictorState.from_json(row.predictor)
    except ValueError as exc:
        # Written by another predictor version: start over, but never before the stored records
        # (the next resync makes the predictions exact again; until then records are uncertain).
        log.warning("predictor state unreadable, starting over", vehicle=vehicle_id, error=str(exc))
        return PredictorState(last_timestamp_ms=row.timestamp_ms, last_sequence=row.sequence)


class _Record(NamedTuple):
    """A decoded record on its way to the database, with what its broadcast needs."""

    delivery: int  # its index in the group
    vin: str
    decoded: Decoded
    row: RecordRow
    late: bool  # reached the gateway more than offline_after_s after its own time


class UploadFlow:
    """What a group of uploads goes through, in one transaction: from the uploads as read to the
    records to broadcast (`store`)."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        vehicles: store.VehicleIdCache,
        decoders: DecoderCache,
        offline_after_s: float,
    ) -> None:
        self.sessions = sessions
        self.vehicles = vehicles
        self.decoders = decoders
        self.offline_after_s = offline_after_s

    async def store(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Store a group in one transaction; outcomes come back in the order of `deliveries`.

        A failed transaction drops the cached decoders (they moved on with it). A stale cached
        state is read again and the group tried once more.
        """
        for attempt in (1, 2):
            try:
                return await self._store(deliveries)
            except bulk.StaleStateError as exc:
                self.decoders.clear()
                if attempt == 2:
                    raise
                log.warning("vehicle state changed elsewhere, reading it again", error=str(exc))
            except BaseException:
                self.decoders.clear()
                raise
        raise AssertionError("unreachable")

    async def _store(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        outcomes = [Outcome(delivery.envelope) for delivery in deliveries]
        async with self.sessions.begin() as session:
            accepted: list[tuple[int, int, domain.Upload]] = []
            for index, delivery in enumerate(deliveries):
                upload = delivery.upload
                if isinstance(upload, domain.Upload):
                    vehicle_id = await self.vehicles.lookup(upload.vin, session=session)
                    if vehicle_id is not None:
                        accepted.append((index, vehicle_id, upload))
                        continue
                    upload = domain.unknown_vehicle(upload)
                await self._reject(session, delivery, upload, outcomes[index])

            await self.decoders.load(
                session=session, vehicle_ids={vehicle_id for _, vehicle_id, _ in accepted}
            )
            records: list[_Record] = []
            behind: list[tuple[int, int, domain.Upload, list[Packet]]] = []
            undecodable: list[tuple[int, domain.Rejection]] = []
            # Each upload's rows go to the database while the next upload is decoded.
            expected = sum(len(upload.packets) for _, _, upload in accepted)
            async with bulk.record_sink(session, expected=expected) as sink:
                for index, vehicle_id, upload in accepted:
                    try:
                        decoded = domain.decode_upload(
                            self.decoders[vehicle_id].decoder, upload.packets
                        )
                    except domain.UndecodableError as exc:
                        undecodable.append((index, domain.undecodable(upload, str(exc))))
                        continue
                    if decoded.behind:
                        behind.append((index, vehicle_id, upload, decoded.behind))
                    mine = self._records(index, vehicle_id, upload, decoded, deliveries[index])
                    records.extend(mine)
                    await sink.write([record.row for record in mine])
            fresh = sink.fresh
            for index, rejection in undecodable:  # (the sink is closed: statements may run)
                await self._reject(session, deliveries[index], rejection, outcomes[index])
            stored = [record for record, new in zip(records, fresh, strict=True) if new]
            for record, new in zip(records, fresh, strict=True):
                if new:
                    outcomes[record.delivery].stored += 1
                else:  # decoded, but its (vehicle, timestamp) was stored already
                    outcomes[record.delivery].duplicates += 1
            await self._sort_out(session, deliveries, behind, outcomes)
            running = await self._count(session, stored)
            await self._advance_vehicles(session, records, fresh)

        for record, stats in zip(stored, running, strict=True):
            outcome = outcomes[record.delivery]
            outcome.vin = record.vin
            outcome.broadcasts.append(BroadcastRecord(record.decoded, stats, record.late))
        return outcomes

    def _records(
        self,
        index: int,  # the delivery's, in the group
        vehicle_id: int,
        upload: domain.Upload,
        decoded: domain.DecodedUpload,
        delivery: Delivery,
    ) -> list[_Record]:
        received_at = delivery.envelope.received_datetime()
        late_before = domain.late_before(received_at, offline_after_s=self.offline_after_s)
        compressed, vin, masks = upload.compressed, upload.vin, domain.RECONSTRUCTED_MASKS
        records: list[_Record] = []
        for packet, decoded_record in decoded.records:
            sample = decoded_record.sample
            row = RecordRow(
                vehicle_id,
                sample.timestamp_ms,
                sample.speed,
                sample.battery,
                sample.power,
                sample.odometer,
                float(sample.heading),
                masks[decoded_record.reconstructed],
                decoded_record.uncertain,
                packet.sequence,
                packet.predictor_version,
                compressed,
                received_at,
            )
            late = sample.timestamp_ms < late_before
            records.append(_Record(index, vin, decoded_record, row, late))
        return records

    async def _reject(
        self,
        session: AsyncSession,
        delivery: Delivery,
        rejection: domain.Rejection,
        outcome: Outcome,
    ) -> None:
        outcome.rejection = rejection
        outcome.new_rejection = await store.record_rejection(
            session=session,
            message_id=delivery.envelope.message_id,
            vin=rejection.vin,
            code=rejection.code.value,
            reason=rejection.reason,
            payload=delivery.body,
            received_at=delivery.envelope.received_datetime(),
        )

    async def _sort_out(
        self,
        session: AsyncSession,
        deliveries: Sequence[Delivery],
        behind: Sequence[tuple[int, int, domain.Upload, list[Packet]]],
        outcomes: list[Outcome],
    ) -> None:
        """Duplicates are packets behind their vehicle's state that are stored (this group's
        records included); the others came too late to decode and are kept as a rejection."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for _, vehicle_id, _, packets in behind:
            wanted[vehicle_id].update(packet.timestamp_ms for packet in packets)
        stored = {
            vehicle_id: await store.stored_timestamps(
                session=session, vehicle_id=vehicle_id, timestamps=timestamps
            )
            for vehicle_id, timestamps in wanted.items()
        }
        for index, vehicle_id, upload, packets in behind:
            late = [packet for packet in packets if packet.timestamp_ms not in stored[vehicle_id]]
            outcomes[index].duplicates += len(packets) - len(late)
            if late:
                rejection = domain.out_of_order(upload, late)
                await self._reject(session, deliveries[index], rejection, outcomes[index])
                log.error("packets out of order", vin=upload.vin, reason=rejection.reason)

    async def _count(
        self, session: AsyncSession, stored: Sequence[_Record]
    ) -> list[domain.StatsCounts]:
        """Add the stored records to their day's statistics; each record's running totals."""
        fields = len(FIELDS)
        keys: list[bulk.StatsKey] = []
        skipped: list[int] = []
        added: dict[bulk.StatsKey, list[int]] = {}  # [packets, skipped] per (vehicle, day)
        days: dict[int, date] = {}  # UTC day number -> its date
        for record in stored:
            number = record.row.timestamp_ms // domain.MS_PER_DAY
            day = days.get(number)
            if day is None:
                day = days[number] = domain.record_day(record.row.timestamp_ms)
            key = bulk.StatsKey(record.row.vehicle_id, day)
            keys.append(key)
            skips = len(record.decoded.reconstructed)
            skipped.append(skips)
            counts = added.get(key)
            if counts is None:
                added[key] = [1, skips]
            else:
                counts[0] += 1
                counts[1] += skips
        totals = await bulk.add_stats(
            session=session,
            increments={
                key: domain.StatsCounts(packets, packets * fields - skips, skips)
                for key, (packets, skips) in added.items()
            },
        )
        # Walk back from the totals after the group to each record's own.
        running: dict[bulk.StatsKey, list[int]] = {
            key: [counts.packets, counts.transmitted, counts.skipped]
            for key, counts in totals.items()
        }
        after: list[domain.StatsCounts] = []
        for key, skips in zip(reversed(keys), reversed(skipped), strict=True):
            counts = running[key]
            after.append(domain.StatsCounts(*counts))
            counts[0] -= 1
            counts[1] -= fields - skips
            counts[2] -= skips
        after.reverse()
        return after

    async def _advance_vehicles(
        self, session: AsyncSession, records: Sequence[_Record], fresh: Sequence[bool]
    ) -> None:
        """Offline sessions and the decoder state of every vehicle that decoded something."""
        by_vehicle: dict[int, list[int]] = defaultdict(list)  # indexes into records
        for index, record in enumerate(records):
            by_vehicle[record.row.vehicle_id].append(index)
        writes: list[bulk.StateWrite] = []
        for vehicle_id, mine in by_vehicle.items():
            cached = self.decoders[vehicle_id]
            open_after: int | None = None
            # Live records with no session open (the common case) change no session.
            if cached.offline_session_id is not None or any(records[i].late for i in mine):
                open_after = await self._plan_sessions(
                    session, vehicle_id, cached.offline_session_id, records, fresh, mine
                )
            writes.append(
                bulk.StateWrite(
                    vehicle_id=vehicle_id,
                    revision=cached.revision,
                    predictor=cached.decoder.state.to_json(),
                    offline_session_id=open_after,
                    last=records[mine[-1]].row,
                )
            )
            cached.revision += 1
            cached.offline_session_id = open_after
        await bulk.save_states(session=session, writes=writes)

    @staticmethod
    async def _plan_sessions(
        session: AsyncSession,
        vehicle_id: int,
        open_session: int | None,
        records: Sequence[_Record],
        fresh: Sequence[bool],
        mine: Sequence[int],
    ) -> int | None:
        """Write one vehicle's offline sessions after its records `mine`; the one left open."""
        plan = domain.plan_sessions(
            vehicle_id=vehicle_id,
            open_session=open_session,
            records=[
                domain.SessionRecord(
                    records[i].row.timestamp_ms,
                    records[i].late,
                    records[i].decoded.gap,
                    fresh[i],
                    records[i].row.received_at,
                )
                for i in mine
            ],
        )
        if plan.update is not None:
            await store.update_session(session=session, change=plan.update)
        opened: int | None = None
        for new_session in plan.new:
            opened = await store.add_session(session=session, new=new_session)
        return open_session if plan.keeps_open else opened if plan.opens_new else None
