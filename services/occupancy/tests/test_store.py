"""The occupancy database, on the embedded SQLite file and on PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from edgeway.common.testing import DIALECTS, migrated_database, schema_differences
from edgeway.occupancy import domain, store
from edgeway.occupancy.settings import OMEGA_PLACES

CAPTURED = datetime(2025, 11, 16, 19, 26, 40, tzinfo=UTC)


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty occupancy database migrated to head (`engine` and `sessions` build on it)."""
    return migrated_database(request, tmp_path, service="occupancy", migrations=store.MIGRATIONS)


@pytest.fixture
async def seeded(sessions: async_sessionmaker[AsyncSession]) -> dict[str, store.CameraLocation]:
    async with sessions.begin() as session:
        await store.seed_cameras(session=session, cameras=OMEGA_PLACES)
        return await store.load_cameras(session=session)


def reading(
    *,
    camera: str = "Flint_1",
    timestamp: float | int | str = 1763321200.5,
    people: int = 5,
    free: tuple[str, ...] = ("T1", "T2", "T3"),
    occupied: tuple[str, ...] = ("T4",),
) -> domain.Reading:
    body = {
        "camera": camera,
        "timestamp": timestamp,
        "summary": {"total_people": people, "free": list(free), "occupied": list(occupied)},
        "segments": [{"index": 0, "name": "T1", "capacity": 2, "count": 1, "status": "free"}],
    }
    result = domain.read_observation(orjson.dumps(body))
    assert isinstance(result, domain.Reading)
    return result


def observation_record(
    location: store.CameraLocation, observation: domain.Reading, *, message_id: str
) -> store.ObservationRecord:
    update = domain.client_update(observation, location_name=location.location_name)
    return store.ObservationRecord(
        message_id=message_id,
        location=location,
        reading=observation,
        received_at=CAPTURED + timedelta(seconds=1),
        timestamp_raw=orjson.dumps(observation.frame.timestamp).decode(),
        client_update=orjson.dumps(update.model_dump()).decode(),
    )


async def write(
    sessions: async_sessionmaker[AsyncSession],
    observations: list[store.ObservationRecord],
    rejections: list[store.RejectionRecord] = [],  # noqa: B006 - never changed
) -> tuple[list[bool], list[bool]]:
    """One commit group through the service's write path for this database (on PostgreSQL
    its one-statement writer, on SQLite its session writer)."""
    engine = sessions.kw["bind"]
    writer = store.make_writer(engine.url.render_as_string(hide_password=False), sessions)
    try:
        return await writer.write(observations, rejections)
    finally:
        await writer.close()


async def record(
    sessions: async_sessionmaker[AsyncSession],
    location: store.CameraLocation,
    observation: domain.Reading,
    *,
    message_id: str,
) -> bool:
    [fresh], _ = await write(
        sessions, [observation_record(location, observation, message_id=message_id)]
    )
    return fresh


async def count(sessions: async_sessionmaker[AsyncSession], entity: Any) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(entity)) or 0)


async def latest(sessions: async_sessionmaker[AsyncSession]) -> list[Any]:
    async with sessions() as session:
        return [orjson.loads(update) for update in await store.latest_updates(session=session)]


# --- schema ---------------------------------------------------------------------------------------


async def test_migrations_reach_head_in_their_own_version_table(
    database_url: str, engine: AsyncEngine
) -> None:
    assert await store.MIGRATIONS.at_head(database_url)
    assert store.MIGRATIONS.current(database_url) == store.MIGRATIONS.head() == "0001"

    # The models and the migration describe the same schema, recorded in the service's own table.
    differences = await schema_differences(
        engine, store.Base.metadata, version_table="alembic_version_occupancy"
    )
    assert differences == []


async def test_migrating_twice_changes_nothing(database_url: str) -> None:
    store.MIGRATIONS.upgrade(database_url)
    assert store.MIGRATIONS.current(database_url) == "0001"


# --- cameras and locations ------------------------------------------------------------------------


async def test_seeding_maps_omegas_cameras_to_their_places(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert {camera: where.location_name for camera, where in seeded.items()} == OMEGA_PLACES
    assert len({where.location_id for where in seeded.values()}) == 7
    assert await count(sessions, store.Location) == 7


async def test_reseeding_remaps_cameras_and_keeps_what_an_operator_added(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with sessions.begin() as session:
        library = await session.scalar(
            insert(store.Location).values(name="Library").returning(store.Location.id)
        )
        await session.execute(insert(store.Camera).values(id="Lib_1", location_id=library))
    async with sessions.begin() as session:
        await store.seed_cameras(
            session=session, cameras={**OMEGA_PLACES, "SU_1": "New Hall", "Tims_2": "Tim Hortons"}
        )
        cameras = await store.load_cameras(session=session)
    assert cameras["SU_1"].location_name == "New Hall"
    assert cameras["Tims_2"] == cameras["Tims_1"] == seeded["Tims_1"]
    assert cameras["Flint_1"] == seeded["Flint_1"]  # ids are stable across restarts
    assert cameras["Lib_1"] == store.CameraLocation(library or 0, "Library")
    # "Student Union 1" keeps its id (and its history) though no camera points at it now.
    assert await count(sessions, store.Location) == 9


async def test_camera_directory_finds_a_camera_added_after_start(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    directory = store.camera_directory(seeded)
    async with sessions.begin() as session:
        await session.execute(
            insert(store.Camera).values(id="OW_2", location_id=seeded["OW_1"].location_id)
        )
    async with sessions() as session:
        found = await directory.lookup("OW_2", session=session)
        missing = await directory.lookup("Nowhere_9", session=session)
    assert found == seeded["OW_1"]
    assert missing is None


# --- observations ---------------------------------------------------------------------------------


async def test_an_observation_is_stored_with_what_rebuilds_the_client_message(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    flint = seeded["Flint_1"]
    assert await record(sessions, flint, reading(), message_id="m-1")
    async with sessions() as session:
        row = (await session.scalars(select(store.Observation))).one()
    assert (row.message_id, row.camera_id, row.location_id) == ("m-1", "Flint_1", flint.location_id)
    assert row.captured_at == datetime(2025, 11, 16, 19, 26, 40, 500000, tzinfo=UTC)
    assert row.received_at == CAPTURED + timedelta(seconds=1)
    assert (row.total_people, row.free_zones, row.occupied_zones) == (5, 3, 1)
    assert row.occupancy_percent == 25.0
    assert row.timestamp_raw == "1763321200.5"
    assert row.zones == {"free": ["T1", "T2", "T3"], "occupied": ["T4"]}
    assert row.segments == [{"index": 0, "name": "T1", "capacity": 2, "count": 1, "status": "free"}]
    assert await latest(sessions) == [
        {
            "location_name": "Flint Loop",
            "timestamp": 1763321200.5,
            "people_detected": 5,
            "occupancy_percent": 25.0,
        }
    ]


async def test_a_redelivered_observation_is_not_stored_twice(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert await record(sessions, seeded["Flint_1"], reading(), message_id="m-1")
    assert not await record(sessions, seeded["Flint_1"], reading(people=9), message_id="m-1")
    assert await count(sessions, store.Observation) == 1
    assert (await latest(sessions))[0]["people_detected"] == 5


async def test_state_moves_forward_in_capture_time_only(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    ow = seeded["OW_1"]
    assert await record(
        sessions, ow, reading(camera="OW_1", timestamp=2000, people=2), message_id="new"
    )
    # Arrives later but was captured earlier: stored as history, not shown as the latest.
    assert await record(
        sessions, ow, reading(camera="OW_1", timestamp=1000, people=1), message_id="old"
    )
    assert [update["people_detected"] for update in await latest(sessions)] == [2]
    # The same capture time again (a second camera on the place): the newer arrival wins.
    assert await record(
        sessions, ow, reading(camera="OW_1", timestamp=2000, people=3), message_id="tie"
    )
    assert [update["people_detected"] for update in await latest(sessions)] == [3]
    # An ISO timestamp with an offset compares by the instant it names.
    later = "1970-01-01T02:33:21+02:00"  # 2001 s after the epoch
    assert await record(
        sessions, ow, reading(camera="OW_1", timestamp=later, people=4), message_id="iso"
    )
    assert await latest(sessions) == [
        {
            "location_name": "One World",
            "timestamp": later,
            "people_detected": 4,
            "occupancy_percent": 25.0,
        }
    ]
    assert await count(sessions, store.Observation) == 4


async def test_a_group_is_stored_at_once_with_the_same_rules_as_one_by_one(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    ow, flint = seeded["OW_1"], seeded["Flint_1"]
    assert await record(sessions, flint, reading(camera="Flint_1", people=7), message_id="old")
    group = [
        observation_record(ow, reading(camera="OW_1", timestamp=3000, people=3), message_id="a"),
        observation_record(ow, reading(camera="OW_1", timestamp=1000, people=1), message_id="b"),
        observation_record(ow, reading(camera="OW_1", timestamp=3000, people=4), message_id="c"),
        observation_record(flint, reading(camera="Flint_1", people=8), message_id="old"),
        observation_record(ow, reading(camera="OW_1", timestamp=9000, people=9), message_id="a"),
    ]
    fresh, _ = await write(sessions, group)
    # "old" was stored before; the second "a" repeats the first within the group.
    assert fresh == [True, True, True, False, False]
    assert await count(sessions, store.Observation) == 4
    # Latest capture time wins, ties to the later arrival; repeats change nothing.
    people = {u["location_name"]: u["people_detected"] for u in await latest(sessions)}
    assert people == {"One World": 4, "Flint Loop": 7}


async def test_latest_lists_every_location_with_state_in_id_order(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert await latest(sessions) == []
    await record(sessions, seeded["Tims_1"], reading(camera="Tims_1"), message_id="a")
    await record(sessions, seeded["SU_2"], reading(camera="SU_2", timestamp=5), message_id="b")
    names = [update["location_name"] for update in await latest(sessions)]
    if seeded["Tims_1"].location_id < seeded["SU_2"].location_id:
        assert names == ["Tim Hortons", "Student Union 2"]
    else:
        assert names == ["Student Union 2", "Tim Hortons"]


async def test_history_lists_what_was_captured_since_by_location_and_time(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    start = CAPTURED.timestamp()
    await record(
        sessions, seeded["Tims_1"], reading(camera="Tims_1", timestamp=start + 20), message_id="a"
    )
    await record(
        sessions,
        seeded["Tims_1"],
        reading(camera="Tims_1", timestamp=start + 10, people=8),
        message_id="b",
    )
    await record(
        sessions, seeded["OW_1"], reading(camera="OW_1", timestamp=start + 15), message_id="c"
    )
    await record(
        sessions, seeded["OW_1"], reading(camera="OW_1", timestamp=start - 60), message_id="old"
    )
    async with sessions() as session:
        rows = await store.history(session=session, since=CAPTURED)
    by_place: dict[str, list[tuple[float, int]]] = {}
    for row in rows:
        by_place.setdefault(row.location_name, []).append((row.captured_at.timestamp(), row.people))
    assert by_place == {
        "Tim Hortons": [(start + 10, 8), (start + 20, 5)],  # oldest first, whatever the arrival
        "One World": [(start + 15, 5)],
    }
    assert all(row.occupancy_percent == 25.0 for row in rows)


# --- rejections -----------------------------------------------------------------------------------


async def test_a_rejection_keeps_the_payload_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    payload = b'{"camera": "Nowhere_9", "note": "caf\xc3\xa9 \x00 \xff"}'

    async def reject() -> bool:
        rejection = store.RejectionRecord(
            message_id="r-1",
            code="unknown_camera",
            reason="camera 'Nowhere_9' is not mapped to a location",
            payload=payload,
            received_at=CAPTURED,
        )
        _, [fresh] = await write(sessions, [], [rejection])
        return fresh

    assert await reject()
    assert not await reject()
    async with sessions() as session:
        row = (await session.scalars(select(store.RejectedMessage))).one()
    assert (row.message_id, row.code, row.received_at) == ("r-1", "unknown_camera", CAPTURED)
    # Readable text even when the bytes were not: NUL and invalid UTF-8 become U+FFFD.
    assert row.payload == '{"camera": "Nowhere_9", "note": "café \ufffd \ufffd"}'


async def test_a_group_with_rejections_is_one_transaction(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    flint = seeded["Flint_1"]
    refused = store.RejectionRecord("r-1", "unknown_camera", "not mapped", b"{}", CAPTURED)
    group = [observation_record(flint, reading(), message_id="m-1")]
    assert await write(sessions, group, [refused]) == ([True], [True])
    # Redelivered together: neither is new, nothing is stored twice.
    assert await write(sessions, group, [refused]) == ([False], [False])
    assert await count(sessions, store.Observation) == 1
    assert await count(sessions, store.RejectedMessage) == 1


async def test_an_observation_without_segments_stores_null(
    seeded: dict[str, store.CameraLocation], sessions: async_sessionmaker[AsyncSession]
) -> None:
    body = {
        "camera": "Flint_1",
        "timestamp": 1763321200.5,
        "summary": {"total_people": 1, "free": ["T1"], "occupied": []},
    }
    observation = domain.read_observation(orjson.dumps(body))
    assert isinstance(observation, domain.Reading)
    assert await record(sessions, seeded["Flint_1"], observation, message_id="m-1")
    async with sessions() as session:
        row = (await session.scalars(select(store.Observation))).one()
    assert row.segments is None
    assert row.zones == {"free": ["T1"], "occupied": []}
