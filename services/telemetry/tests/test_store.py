"""The telemetry database, on the embedded SQLite file and on PostgreSQL (COPY) alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from edgeway.common.db import make_engine, make_sessionmaker
from edgeway.common.settings import async_database_url
from edgeway.common.testing import DIALECTS, migrated_database, schema_differences
from edgeway.telemetry import bulk, domain, store, tables
from edgeway.telemetry.settings import DEMO_VINS, SEED_VIN

RECEIVED = datetime(2025, 11, 21, 12, 0, 0, 250000, tzinfo=UTC)
T0 = 1_763_726_400_000  # 2025-11-21T12:00:00Z in ms


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty telemetry database migrated to head (`engine` and `sessions` build on it)."""
    return migrated_database(request, tmp_path, service="telemetry", migrations=tables.MIGRATIONS)


@pytest.fixture
async def vehicles(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with sessions.begin() as session:
        await store.seed_vehicles(session=session, vins=[SEED_VIN, *DEMO_VINS])
        return await store.load_vehicles(session=session)


def row(
    vehicle_id: int,
    offset_ms: int = 0,
    *,
    speed: float = 65.5,
    reconstructed: int = 0,
    sequence: int | None = 1,
    uncertain: bool = False,
) -> tables.RecordRow:
    return tables.RecordRow(
        vehicle_id=vehicle_id,
        timestamp_ms=T0 + offset_ms,
        speed=speed,
        battery=80.25,
        power=-12.5,
        odometer=12345.5,
        heading=359.0,
        reconstructed=reconstructed,
        uncertain=uncertain,
        sequence=sequence,
        predictor_version=1 if sequence else None,
        compressed=sequence is not None,
        received_at=RECEIVED,
    )


async def store_rows(
    sessions: async_sessionmaker[AsyncSession], rows: list[tables.RecordRow]
) -> list[bool]:
    async with sessions.begin() as session:
        return await bulk.insert_records(session=session, rows=rows)


async def count(sessions: async_sessionmaker[AsyncSession], entity: Any) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(entity)) or 0)


# --- schema ---------------------------------------------------------------------------------------


async def test_migrations_reach_head_in_their_own_version_table(
    database_url: str, engine: AsyncEngine
) -> None:
    assert await tables.MIGRATIONS.at_head(database_url)
    assert tables.MIGRATIONS.current(database_url) == tables.MIGRATIONS.head() == "0004"

    # The models and the migration describe the same schema, recorded in the service's own table.
    differences = await schema_differences(
        engine, tables.Base.metadata, version_table="alembic_version_telemetry"
    )
    assert differences == []


async def test_migrating_twice_changes_nothing(database_url: str) -> None:
    tables.MIGRATIONS.upgrade(database_url)
    assert tables.MIGRATIONS.current(database_url) == "0004"


# --- vehicles -------------------------------------------------------------------------------------


async def test_seeding_vehicles_is_idempotent_and_keeps_ids(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert set(vehicles) == {SEED_VIN, *DEMO_VINS}
    async with sessions.begin() as session:
        await store.seed_vehicles(session=session, vins=[DEMO_VINS[0], "5YJ3E1EA1KF000009"])
        again = await store.load_vehicles(session=session)
        vins = await store.vehicle_vins(session=session)
    assert {vin: again[vin] for vin in vehicles} == vehicles
    assert vins[-1] == "5YJ3E1EA1KF000009"
    assert sorted(vins) == sorted([SEED_VIN, *DEMO_VINS, "5YJ3E1EA1KF000009"])


async def test_the_id_cache_finds_a_vehicle_added_after_start(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    cache = store.vehicle_id_cache(vehicles, ttl=5.0)
    async with sessions.begin() as session:
        added = await session.scalar(
            insert(tables.Vehicle).values(vin="1HGCM82633A004352").returning(tables.Vehicle.id)
        )
    async with sessions() as session:
        assert await cache.lookup("1HGCM82633A004352", session=session) == added
        assert await cache.lookup("1HGCM82633A004353", session=session) is None
        assert await cache.lookup(SEED_VIN, session=session) == vehicles[SEED_VIN]


async def test_a_vehicle_is_registered_retired_and_reactivated_with_its_id_and_records(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    new_vin = "1HGCM82633A004352"
    async with sessions.begin() as session:
        created = await store.register_vehicle(session=session, vin=new_vin)
        again = await store.register_vehicle(session=session, vin=new_vin)
        seeded = await store.register_vehicle(session=session, vin=SEED_VIN)
    vehicle_id = created[0]
    assert created == (vehicle_id, store.Registration.CREATED)
    assert again == (vehicle_id, store.Registration.EXISTING)
    assert seeded == (vehicles[SEED_VIN], store.Registration.EXISTING)
    assert await store_rows(sessions, [row(vehicle_id), row(vehicle_id, 300)]) == [True, True]

    retired_at = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    async with sessions.begin() as session:
        assert await store.retire_vehicle(session=session, vin=new_vin, at=retired_at)
        assert not await store.retire_vehicle(session=session, vin=new_vin, at=retired_at)
        assert not await store.retire_vehicle(
            session=session, vin="1HGCM82633A004353", at=retired_at
        )
    async with sessions() as session:
        assert new_vin not in await store.load_vehicles(session=session)
        assert new_vin not in await store.vehicle_vins(session=session)
        kept = await session.get(tables.Vehicle, vehicle_id)
        assert kept is not None
        assert kept.retired_at == retired_at
    assert await count(sessions, tables.TelemetryRecord) == 2  # what was accepted stays

    # Seeding (a restart with the VIN in the setting) does not undo a retirement ...
    async with sessions.begin() as session:
        await store.seed_vehicles(session=session, vins=[new_vin])
        assert new_vin not in await store.load_vehicles(session=session)
    # ... registering it again does, on the same row.
    async with sessions.begin() as session:
        back = await store.register_vehicle(session=session, vin=new_vin)
    assert back == (vehicle_id, store.Registration.REACTIVATED)
    async with sessions() as session:
        assert (await store.load_vehicles(session=session))[new_vin] == vehicle_id
        assert (await store.vehicle_vins(session=session))[-1] == new_vin


async def test_the_id_cache_reads_an_entry_again_after_its_time_so_a_retirement_elsewhere_counts(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Another replica (or an operator) retires a vehicle in the table: this replica's cached
    entry is trusted for `ttl` seconds at most, then read again."""
    now = [100.0]
    cache = store.vehicle_id_cache(vehicles, ttl=5.0, clock=lambda: now[0])
    retired_at = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    async with sessions.begin() as session:
        assert await store.retire_vehicle(session=session, vin=SEED_VIN, at=retired_at)
    async with sessions() as session:
        now[0] += 4.9
        assert await cache.lookup(SEED_VIN, session=session) == vehicles[SEED_VIN]
        now[0] += 0.2  # past the entry's time
        assert await cache.lookup(SEED_VIN, session=session) is None
        # A vehicle never cached and then retired is not found either.
        assert await cache.lookup(DEMO_VINS[0], session=session) == vehicles[DEMO_VINS[0]]
    async with sessions.begin() as session:
        await store.register_vehicle(session=session, vin=SEED_VIN)
    async with sessions() as session:
        # A miss is always read: registered again, it is taken at once.
        assert await cache.lookup(SEED_VIN, session=session) == vehicles[SEED_VIN]
        cache.forget(DEMO_VINS[0])  # what a replica that retires it does at once
        async with sessions.begin() as other:
            await store.retire_vehicle(session=other, vin=DEMO_VINS[0], at=retired_at)
        assert await cache.lookup(DEMO_VINS[0], session=session) is None


@pytest.fixture(params=DIALECTS)
def database_at_0002(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A telemetry database as the previous release left it: migrated to 0002."""
    configured = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    url = async_database_url(configured, service="telemetry", data_dir=tmp_path)
    command.upgrade(tables.MIGRATIONS.config(url), "0002")
    return url


async def test_vehicles_from_before_retirement_existed_stay_active_and_0003_goes_down(
    database_at_0002: str,
) -> None:
    url = database_at_0002
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:  # a row written by the 0002 schema
            await connection.execute(
                text("INSERT INTO vehicles (vin) VALUES (:vin)"), {"vin": SEED_VIN}
            )
        await tables.MIGRATIONS.upgrade_async(url)
        assert tables.MIGRATIONS.current(url) == "0004"
        async with make_sessionmaker(engine)() as session:
            assert list(await store.load_vehicles(session=session)) == [SEED_VIN]
    finally:
        await engine.dispose()
    await asyncio.to_thread(command.downgrade, tables.MIGRATIONS.config(url), "0002")
    assert tables.MIGRATIONS.current(url) == "0002"


@pytest.fixture(params=DIALECTS)
def database_at_0003(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A telemetry database as the previous release left it: migrated to 0003."""
    configured = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    url = async_database_url(configured, service="telemetry", data_dir=tmp_path)
    command.upgrade(tables.MIGRATIONS.config(url), "0003")
    return url


async def test_0004_finds_when_each_stored_session_arrived_and_goes_down(
    database_at_0003: str,
) -> None:
    """A session from before 0004 gets the arrival of its first record; one whose first record
    is not stored stays without."""
    url = database_at_0003
    engine = make_engine(url)
    started = datetime.fromtimestamp((T0 + 300) / 1000, UTC)
    try:
        async with engine.begin() as connection:  # rows written by the 0003 schema
            await connection.execute(insert(tables.VEHICLES).values(vin=SEED_VIN))
            await connection.execute(
                insert(tables.TELEMETRY).values(row(1, 300)._asdict() | {"received_at": RECEIVED})
            )
            for at in (started, started + timedelta(hours=1)):
                await connection.execute(
                    insert(tables.SESSIONS).values(
                        vehicle_id=1,
                        started_at=at,
                        records_buffered=1,
                        records_uploaded=1,
                        status=tables.SESSION_SYNCING,
                    )
                )
        await tables.MIGRATIONS.upgrade_async(url)
        assert tables.MIGRATIONS.current(url) == "0004"
        async with make_sessionmaker(engine)() as session:
            found = await store.offline_sessions(session=session, vehicle_id=1, limit=10)
        assert [(s.started_at, s.arrived_at) for s in found] == [
            (started + timedelta(hours=1), None),
            (started, RECEIVED),
        ]
    finally:
        await engine.dispose()
    await asyncio.to_thread(command.downgrade, tables.MIGRATIONS.config(url), "0003")
    assert tables.MIGRATIONS.current(url) == "0003"


# --- records --------------------------------------------------------------------------------------


async def test_records_are_stored_once_per_vehicle_and_timestamp(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car, other = vehicles[SEED_VIN], vehicles[DEMO_VINS[0]]
    assert await store_rows(sessions, [row(car, 0), row(car, 300), row(other, 0)]) == [True] * 3
    # A replay of stored records, the same record twice in one group, and one new record.
    fresh = await store_rows(
        sessions, [row(car, 300, speed=1.0), row(car, 600), row(car, 600), row(other, 300)]
    )
    assert fresh == [False, True, False, True]
    assert await count(sessions, tables.TelemetryRecord) == 5
    async with sessions() as session:
        speed = await session.scalar(
            select(tables.TelemetryRecord.speed).where(
                tables.TelemetryRecord.vehicle_id == car,
                tables.TelemetryRecord.timestamp_ms == T0 + 300,
            )
        )
    assert speed == 65.5  # the first copy stays
    # Nothing stored yet but the same record twice (on PostgreSQL, the direct COPY's case).
    assert await store_rows(sessions, [row(car, 900), row(car, 900, speed=1.0)]) == [True, False]
    assert await count(sessions, tables.TelemetryRecord) == 6


async def test_a_large_group_with_stored_records_keeps_only_the_new_ones(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    """From bulk.COPY_FROM_ROWS rows PostgreSQL COPYs them; a stored one among them sends the
    group through the temporary table instead."""
    car = vehicles[SEED_VIN]
    size = bulk.COPY_FROM_ROWS * 2
    first = [row(car, 300 * i) for i in range(size)]
    assert await store_rows(sessions, first) == [True] * size
    # The second half again (stored), then as many new ones, one of them twice.
    again = first[size // 2 :]
    new = [row(car, 300 * (size + i), speed=1.0) for i in range(size // 2)]
    fresh = await store_rows(sessions, [*again, *new, new[0]])
    assert fresh == [False] * len(again) + [True] * len(new) + [False]
    assert await count(sessions, tables.TelemetryRecord) == size + len(new)


async def test_a_record_keeps_every_value_exactly(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car = vehicles[SEED_VIN]
    mask = domain.reconstructed_mask(["speed", "heading"])
    float32_speed = 65.30000305175781  # 65.3 as a float32 carries it
    stored = row(car, speed=float32_speed, reconstructed=mask, sequence=2**63 - 1, uncertain=True)
    legacy = row(car, 300, sequence=None)
    assert await store_rows(sessions, [stored, legacy]) == [True, True]
    async with sessions() as session:
        rows = (
            await session.scalars(
                select(tables.TelemetryRecord).order_by(tables.TelemetryRecord.timestamp_ms)
            )
        ).all()
    first, second = rows
    assert (first.speed, first.battery, first.power) == (float32_speed, 80.25, -12.5)
    assert (first.odometer, first.heading) == (12345.5, 359.0)
    assert first.reconstructed == 9
    assert domain.reconstructed_fields(first.reconstructed) == ["speed", "heading"]
    assert (first.uncertain, first.sequence, first.predictor_version) == (True, 2**63 - 1, 1)
    assert (first.compressed, first.received_at) == (True, RECEIVED)
    assert (second.sequence, second.predictor_version, second.compressed) == (None, None, False)


async def test_floats_and_times_keep_every_digit_in_records_and_state(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    """On PostgreSQL a small group and the state go in as JSON text: a float must read back as
    the same float, a time as the same instant whatever its offset, a predictor as it was."""
    car = vehicles[SEED_VIN]
    india = timezone(timedelta(hours=5, minutes=30))
    received = datetime(2025, 11, 21, 17, 30, 0, 123456, tzinfo=india)
    written = row(car, speed=0.1 + 0.2)._replace(
        battery=1e-7, power=-1234.5678901234567, odometer=2.0**53 + 2, received_at=received
    )
    assert await store_rows(sessions, [written]) == [True]
    predictor = {"predictions": {"speed": 0.1 + 0.2, "heading": None}, "gaps": [1, 2.5]}
    state = bulk.StateWrite(car, 0, predictor, None, written)
    async with sessions.begin() as session:
        await bulk.save_states(session=session, writes=[state])
    async with sessions() as session:
        stored = (await session.scalars(select(tables.TelemetryRecord))).one()
        saved = (await session.scalars(select(tables.VehicleState))).one()
    assert tables.RecordRow(*(getattr(stored, name) for name in tables.RecordRow._fields)) == (
        written
    )
    assert stored.received_at.utcoffset() == timedelta(0)  # the same instant, read back in UTC
    assert (saved.speed, saved.battery, saved.odometer) == (0.1 + 0.2, 1e-7, 2.0**53 + 2)
    assert (saved.received_at, saved.predictor) == (received, predictor)


async def test_a_large_group_keeps_its_order_and_a_rollback_stores_nothing(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car = vehicles[SEED_VIN]
    rows = [row(car, 300 * i, speed=float(i % 300)) for i in range(3000)]

    async def crash() -> None:
        async with sessions.begin() as session:
            await bulk.insert_records(session=session, rows=rows)
            raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError, match="crash"):
        await crash()
    assert await count(sessions, tables.TelemetryRecord) == 0
    # Stored in the order given (ids), whatever the group's size; reversed input, reversed ids.
    assert await store_rows(sessions, rows[::-1]) == [True] * 3000
    async with sessions() as session:
        times = list(
            await session.scalars(
                select(tables.TelemetryRecord.timestamp_ms).order_by(tables.TelemetryRecord.id)
            )
        )
    assert times == [r.timestamp_ms for r in rows[::-1]]
    async with sessions() as session:
        last = await store.last_records(session=session, limit=3)
    # The last three stored, oldest first: the last three of the reversed group.
    assert [r.timestamp_ms for r in last] == [T0 + 600, T0 + 300, T0]
    assert last[0].received_at == RECEIVED
    assert {r.vin for r in last} == {SEED_VIN}


async def test_a_small_group_keeps_its_order_and_its_second_copy_is_not_new(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    # Under COPY_FROM_ROWS: one INSERT of arrays on PostgreSQL, multi-row VALUES on SQLite.
    car = vehicles[SEED_VIN]
    rows = [row(car, 300 * i, sequence=None if i % 2 else i) for i in range(40)][::-1]
    assert len(rows) < bulk.COPY_FROM_ROWS
    assert await store_rows(sessions, [*rows, rows[3]]) == [True] * 40 + [False]
    async with sessions() as session:
        stored = list(
            await session.scalars(
                select(tables.TelemetryRecord).order_by(tables.TelemetryRecord.id)
            )
        )
    assert [(r.timestamp_ms, r.sequence) for r in stored] == [
        (r.timestamp_ms, r.sequence) for r in rows
    ]
    assert stored[0].received_at == RECEIVED
    assert stored[0].heading == 359.0


# --- state ----------------------------------------------------------------------------------------


def state_write(vehicle_id: int, revision: int, *, offset_ms: int) -> bulk.StateWrite:
    return bulk.StateWrite(
        vehicle_id=vehicle_id,
        revision=revision,
        predictor={"predictions": {"speed": 65.5}, "last_timestamp_ms": T0 + offset_ms},
        offline_session_id=None,
        last=row(vehicle_id, offset_ms),
    )


async def test_state_moves_on_only_from_the_revision_that_was_read(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car, other = vehicles[SEED_VIN], vehicles[DEMO_VINS[0]]
    async with sessions.begin() as session:
        await bulk.save_states(
            session=session,
            writes=[state_write(car, 0, offset_ms=0), state_write(other, 0, offset_ms=0)],
        )
    async with sessions.begin() as session:
        await bulk.save_states(session=session, writes=[state_write(car, 1, offset_ms=300)])
    # A writer that read revision 1 of `car` (now at 2) or thinks `other` is new: refused, whole.
    for stale in (state_write(car, 1, offset_ms=600), state_write(other, 0, offset_ms=600)):
        with pytest.raises(bulk.StaleStateError):
            async with sessions.begin() as session:
                await bulk.save_states(
                    session=session,
                    writes=[state_write(vehicles[DEMO_VINS[1]], 0, offset_ms=0), stale],
                )
    async with sessions() as session:
        states = await store.load_states(session=session, vehicle_ids=vehicles.values())
    assert set(states) == {car, other}
    assert states[car].revision == 2
    assert states[car].timestamp_ms == T0 + 300
    assert states[car].predictor == {"predictions": {"speed": 65.5}, "last_timestamp_ms": T0 + 300}
    assert (states[other].revision, states[other].sequence) == (1, 1)


# --- compression statistics -----------------------------------------------------------------------


async def test_stats_add_up_per_vehicle_and_day(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car, other = vehicles[SEED_VIN], vehicles[DEMO_VINS[0]]
    today, yesterday = date(2025, 11, 21), date(2025, 11, 20)
    async with sessions.begin() as session:
        first = await bulk.add_stats(
            session=session,
            increments={
                bulk.StatsKey(car, today): domain.StatsCounts(2, 5, 3),
                bulk.StatsKey(other, today): domain.StatsCounts(1, 4, 0),
            },
        )
    async with sessions.begin() as session:
        second = await bulk.add_stats(
            session=session,
            increments={
                bulk.StatsKey(car, today): domain.StatsCounts(3, 2, 10),
                bulk.StatsKey(car, yesterday): domain.StatsCounts(1, 1, 3),
            },
        )
    assert first[bulk.StatsKey(car, today)] == domain.StatsCounts(2, 5, 3)
    assert second == {
        bulk.StatsKey(car, today): domain.StatsCounts(5, 7, 13),
        bulk.StatsKey(car, yesterday): domain.StatsCounts(1, 1, 3),
    }
    async with sessions() as session:
        rows = {
            (r.vehicle_id, r.day): r for r in await session.scalars(select(tables.CompressionStats))
        }
        fleet = await store.fleet_stats(session=session, day=today)
        nothing = await store.fleet_stats(session=session, day=date(2025, 1, 1))
        total = await store.total_records(session=session)
    mine = rows[(car, today)]
    assert (mine.total_packets, mine.transmitted_fields, mine.skipped_fields) == (5, 7, 13)
    assert mine.bandwidth_saved_percent == pytest.approx(65.0)
    assert rows[(car, yesterday)].bandwidth_saved_percent == pytest.approx(75.0)
    assert rows[(other, today)].bandwidth_saved_percent == 0.0
    assert fleet == domain.StatsCounts(6, 11, 13)
    assert nothing == domain.StatsCounts(0, 0, 0)
    assert total == 7


# --- offline sessions -----------------------------------------------------------------------------


async def test_an_offline_session_grows_and_is_closed(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car = vehicles[SEED_VIN]
    started = RECEIVED - timedelta(minutes=5)
    async with sessions.begin() as session:
        open_id = await store.add_session(
            session=session, new=domain.NewSession(car, started, None, 3, 2)
        )
        closed_id = await store.add_session(
            session=session,
            new=domain.NewSession(car, started - timedelta(hours=1), started, 1, 1),
        )
    async with sessions.begin() as session:
        await store.update_session(
            session=session, change=domain.SessionUpdate(open_id, 4, 4, None)
        )
    async with sessions() as session:
        opened = await session.get(tables.OfflineSession, open_id)
        assert opened is not None
        assert (opened.records_buffered, opened.records_uploaded) == (7, 6)
        assert (opened.started_at, opened.ended_at, opened.status) == (started, None, "syncing")
        done = await session.get(tables.OfflineSession, closed_id)
        assert done is not None
        assert (done.ended_at, done.status) == (started, "synced")
    async with sessions.begin() as session:
        await store.update_session(
            session=session, change=domain.SessionUpdate(open_id, 0, 0, RECEIVED)
        )
    async with sessions() as session:
        opened = await session.get(tables.OfflineSession, open_id)
        assert opened is not None
        assert (opened.records_buffered, opened.ended_at, opened.status) == (7, RECEIVED, "synced")


async def test_a_vehicles_sessions_come_newest_first_bounded_by_limit_and_time(
    vehicles: dict[str, int], sessions: async_sessionmaker[AsyncSession]
) -> None:
    car, other = vehicles[SEED_VIN], vehicles[DEMO_VINS[0]]
    hour = timedelta(hours=1)
    starts = [RECEIVED - 3 * hour, RECEIVED - 2 * hour, RECEIVED - hour]
    async with sessions.begin() as session:
        ids = [
            await store.add_session(
                session=session,
                new=domain.NewSession(car, at, at + timedelta(minutes=10), 5, 4, at + 2 * hour),
            )
            for at in starts
        ]
        still_open = await store.add_session(
            session=session, new=domain.NewSession(car, RECEIVED, None, 2, 2, RECEIVED)
        )
        await store.add_session(session=session, new=domain.NewSession(other, RECEIVED, None))
        await store.retire_vehicle(session=session, vin=SEED_VIN, at=RECEIVED)

    async with sessions() as session:
        assert await store.vehicle_id_of(session=session, vin=SEED_VIN) == car  # retired too
        assert await store.vehicle_id_of(session=session, vin="1HGCM82633A004352") is None

        async def found(limit: int = 10, **span: datetime) -> list[int]:
            stored = await store.offline_sessions(
                session=session, vehicle_id=car, limit=limit, **span
            )
            return [s.id for s in stored]

        assert await found() == [still_open, *ids[::-1]]
        assert await found(limit=2) == [still_open, ids[2]]
        # Overlapping the span: the one that ended within it, and the open one.
        assert await found(since=starts[2] + timedelta(minutes=5)) == [still_open, ids[2]]
        assert await found(until=starts[1]) == [ids[0]]
        assert await found(since=starts[1], until=starts[2]) == [ids[1]]
        first = (await store.offline_sessions(session=session, vehicle_id=car, limit=1))[0]
    assert first == store.StoredSession(still_open, RECEIVED, None, RECEIVED, 2, 2, "syncing")


# --- rejections -----------------------------------------------------------------------------------


async def test_a_rejection_keeps_the_bytes_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payload = b"\x08\x96\x01\x00\xff garbage"

    async def reject() -> bool:
        async with sessions.begin() as session:
            return await store.record_rejection(
                session=session,
                message_id="r-1",
                vin="X" * 100,
                code="invalid_payload",
                reason="body is not a VehicleData protobuf message",
                payload=payload,
                received_at=RECEIVED,
            )

    assert await reject()
    assert not await reject()
    async with sessions() as session:
        rejected = (await session.scalars(select(tables.RejectedUpload))).one()
    assert (rejected.message_id, rejected.code, rejected.payload) == (
        "r-1",
        "invalid_payload",
        payload,
    )
    assert rejected.vehicle_vin == "X" * 64
    assert rejected.received_at == RECEIVED
