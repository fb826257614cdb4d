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
from itertools import compress
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.telemetry.predictor import (
    FIELDS,
    Decoder,
    PacketRow,
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
    """A record this group stored, with what its broadcast needs."""

    row: RecordRow
    stats: domain.StatsCounts  # its vehicle's counts of the record's day, after it
    late: bool  # part of a store-and-forward replay (older than offline_after_s on arrival)


@dataclass(slots=True)
class Broadcasts:
    """An upload's stored records, in order, as their broadcasts need them: one list per value,
    so that nothing is made per record until the broadcast queue takes it (`record`). The queue
    drops most of a replay (`edgeway.telemetry.broadcast.BroadcastQueue`)."""

    rows: list[RecordRow] = field(default_factory=list)
    late: list[bool] = field(default_factory=list)  # per row: BroadcastRecord.late
    # Per row: its vehicle's (packets, transmitted, skipped) of the record's day, after it.
    stats: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int) -> BroadcastRecord:
        return BroadcastRecord(
            self.rows[index], domain.StatsCounts(*self.stats[index]), self.late[index]
        )


@dataclass(slots=True)
class Outcome:
    """What one upload came to, and what to broadcast about it once committed."""

    envelope: Envelope
    stored: int = 0
    duplicates: int = 0
    rejection: domain.Rejection | None = None
    new_rejection: bool = False  # False: this upload was rejected before (a redelivery)
    vin: str = ""  # the upload's vehicle, when it stored records
    broadcasts: Broadcasts = field(default_factory=Broadcasts)


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


class _Decoded(NamedTuple):
    """A group's decoded records, in order, one list per value (nothing is made per record but
    its row), and which of them each upload decoded."""

    rows: list[RecordRow]
    late: list[bool]  # reached the gateway more than offline_after_s after its own time
    gaps: list[int]  # packets missing just before it (`Decoded.gap`)
    # Per upload that decoded something: (its delivery's index in the group, its vehicle,
    # where its records start and end in the lists above).
    spans: list[tuple[int, int, int, int]]


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
            group = _Decoded([], [], [], [])
            behind: list[tuple[int, int, domain.Upload, list[PacketRow]]] = []
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
                    if decoded.packets:
                        start = len(group.rows)
                        self._records(group, vehicle_id, upload, decoded, deliveries[index])
                        group.spans.append((index, vehicle_id, start, len(group.rows)))
                        await sink.write(group.rows[start:])
            fresh = sink.fresh
            for index, rejection in undecodable:  # (the sink is closed: statements may run)
                await self._reject(session, deliveries[index], rejection, outcomes[index])
            for index, _, start, end in group.spans:
                stored = fresh[start:end].count(True)
                outcomes[index].stored += stored
                # decoded, but its (vehicle, timestamp) was stored already
                outcomes[index].duplicates += end - start - stored
            await self._sort_out(session, deliveries, behind, outcomes)
            running = await self._count(session, list(compress(group.rows, fresh)))
            await self._advance_vehicles(session, group, fresh)

        # Each upload's stored records, and their counts, for their broadcasts.
        taken = 0
        for index, _, start, end in group.spans:
            new = fresh[start:end]
            stored = new.count(True)
            if not stored:
                continue
            upload = deliveries[index].upload
            assert isinstance(upload, domain.Upload)  # it decoded records
            outcome = outcomes[index]
            outcome.vin = upload.vin
            broadcasts = outcome.broadcasts
            broadcasts.rows.extend(compress(group.rows[start:end], new))
            broadcasts.late.extend(compress(group.late[start:end], new))
            broadcasts.stats.extend(running[taken : taken + stored])
            taken += stored
        return outcomes

    def _records(
        self,
        group: _Decoded,
        vehicle_id: int,
        upload: domain.Upload,
        decoded: domain.DecodedUpload,
        delivery: Delivery,
    ) -> None:
        """Add an upload's decoded records to the group's."""
        received_at = delivery.envelope.received_datetime()
        late_before = domain.late_before(received_at, offline_after_s=self.offline_after_s)
        compressed = upload.compressed
        rows, late, gaps = group.rows, group.late, group.gaps
        for packet, values in zip(decoded.packets, decoded.decoded, strict=True):
            timestamp, _, _, _, _, _, _, sequence, version = packet
            speed, battery, power, odometer, heading, mask, uncertain, gap = values
            rows.append(
                RecordRow(
                    vehicle_id,
                    timestamp,
                    speed,
                    battery,
                    power,
                    odometer,
                    heading,
                    mask,
                    uncertain,
                    sequence,
                    version,
                    compressed,
                    received_at,
                )
            )
            late.append(timestamp < late_before)
            gaps.append(gap)

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
        behind: Sequence[tuple[int, int, domain.Upload, list[PacketRow]]],
        outcomes: list[Outcome],
    ) -> None:
        """Duplicates are packets behind their vehicle's state that are stored (this group's
        records included); the others came too late to decode and are kept as a rejection."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for _, vehicle_id, _, packets in behind:
            wanted[vehicle_id].update(packet[domain.ROW_TIMESTAMP] for packet in packets)
        stored = {
            vehicle_id: await store.stored_timestamps(
                session=session, vehicle_id=vehicle_id, timestamps=timestamps
            )
            for vehicle_id, timestamps in wanted.items()
        }
        for index, vehicle_id, upload, packets in behind:
            late = [
                packet
                for packet in packets
                if packet[domain.ROW_TIMESTAMP] not in stored[vehicle_id]
            ]
            outcomes[index].duplicates += len(packets) - len(late)
            if late:
                rejection = domain.out_of_order(upload, late)
                await self._reject(session, deliveries[index], rejection, outcomes[index])
                log.error("packets out of order", vin=upload.vin, reason=rejection.reason)

    async def _count(
        self, session: AsyncSession, stored: Sequence[RecordRow]
    ) -> list[tuple[int, int, int]]:
        """Add the stored records to their day's statistics; each record's running totals
        (packets, transmitted, skipped: `domain.StatsCounts`'s fields)."""
        fields = len(FIELDS)
        skipped_of = domain.SKIPPED_FIELDS
        # Per record, its (vehicle, UTC day number): a plain tuple, the StatsKey is made once
        # per key (this loop runs for every stored record).
        keys: list[tuple[int, int]] = []
        skipped: list[int] = []
        added: dict[tuple[int, int], list[int]] = {}  # [packets, skipped] per (vehicle, day)
        for row in stored:
            key = (row.vehicle_id, row.timestamp_ms // domain.MS_PER_DAY)
            keys.append(key)
            skips = skipped_of[row.reconstructed]
            skipped.append(skips)
            counts = added.get(key)
            if counts is None:
                added[key] = [1, skips]
            else:
                counts[0] += 1
                counts[1] += skips
        stats_keys = {
            key: bulk.StatsKey(key[0], domain.record_day(key[1] * domain.MS_PER_DAY))
            for key in added
        }
        totals = await bulk.add_stats(
            session=session,
            increments={
                stats_keys[key]: domain.StatsCounts(packets, packets * fields - skips, skips)
                for key, (packets, skips) in added.items()
            },
        )
        # Walk back from the totals after the group to each record's own.
        running: dict[tuple[int, int], list[int]] = {}
        for key, stats_key in stats_keys.items():
            total = totals[stats_key]
            running[key] = [total.packets, total.transmitted, total.skipped]
        after: list[tuple[int, int, int]] = []
        for key, skips in zip(reversed(keys), reversed(skipped), strict=True):
            counts = running[key]
            packets, transmitted, skipped_fields = counts
            after.append((packets, transmitted, skipped_fields))
            counts[0] = packets - 1
            counts[1] = transmitted - (fields - skips)
            counts[2] = skipped_fields - skips
        after.reverse()
        return after

    async def _advance_vehicles(
        self, session: AsyncSession, group: _Decoded, fresh: Sequence[bool]
    ) -> None:
        """Offline sessions and the decoder state of every vehicle that decoded something."""
        by_vehicle: dict[int, list[tuple[int, int]]] = defaultdict(list)  # spans of its records
        for _, vehicle_id, start, end in group.spans:
            by_vehicle[vehicle_id].append((start, end))
        writes: list[bulk.StateWrite] = []
        for vehicle_id, spans in by_vehicle.items():
            cached = self.decoders[vehicle_id]
            open_after: int | None = None
            # Live records with no session open (the common case) change no session.
            if cached.offline_session_id is not None or any(
                True in group.late[start:end] for start, end in spans
            ):
                open_after = await self._plan_sessions(
                    session, vehicle_id, cached.offline_session_id, group, fresh, spans
                )
            writes.append(
                bulk.StateWrite(
                    vehicle_id=vehicle_id,
                    revision=cached.revision,
                    predictor=cached.decoder.state.to_json(),
                    offline_session_id=open_after,
                    last=group.rows[spans[-1][1] - 1],
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
        group: _Decoded,
        fresh: Sequence[bool],
        spans: Sequence[tuple[int, int]],
    ) -> int | None:
        """Write one vehicle's offline sessions after its records (`spans` of the group's); the
        one left open."""
        rows, late, gaps = group.rows, group.late, group.gaps
        plan = domain.plan_sessions(
            vehicle_id=vehicle_id,
            open_session=open_session,
            records=[
                (row.timestamp_ms, is_late, gap, new, row.received_at)  # a SessionRecord
                for start, end in spans
                for row, is_late, gap, new in zip(
                    rows[start:end], late[start:end], gaps[start:end], fresh[start:end], strict=True
                )
            ],
        )
        if plan.update is not None:
            await store.update_session(session=session, change=plan.update)
        opened: int | None = None
        for new_session in plan.new:
            opened = await store.add_session(session=session, new=new_session)
        return open_session if plan.keeps_open else opened if plan.opens_new else None
