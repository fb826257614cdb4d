"""The tracker database, on the embedded SQLite file and on PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from edgeway.common.schemas.tracking import TaskStatus
from edgeway.common.testing import DIALECTS, migrated_database, schema_differences
from edgeway.tracker import store
from edgeway.tracker.domain import VideoFacts

NOW = datetime(2025, 12, 1, 12, 0, tzinfo=UTC)
SPEC: dict[str, Any] = {
    "environment_id": "lab",
    "name": "Lab",
    "cameras": [{"camera_id": "c01", "width": 640, "height": 480, "source": {"kind": "external"}}],
    "overlaps": [],
}


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return migrated_database(request, tmp_path, service="tracker", migrations=store.MIGRATIONS)


async def test_the_migrations_build_the_models_schema(engine: AsyncEngine) -> None:
    differences = await schema_differences(
        engine, store.Base.metadata, version_table="alembic_version_tracker"
    )
    assert differences == []


async def new_task(
    sessions: async_sessionmaker[AsyncSession],
    task_id: str,
    *,
    mode: str = "batch",
    videos: dict[str, Any] | None = None,
) -> None:
    async with sessions.begin() as session:
        if await store.get_environment(session=session, environment_id="lab") is None:
            await store.insert_environment(session=session, spec=SPEC)
        await store.create_task(
            session=session,
            task_id=task_id,
            environment_id="lab",
            mode=mode,
            environment={"spec": SPEC, "videos": videos or {}},
            frames_total=None,
            now=NOW,
        )


def progress(frame: int, status: TaskStatus = TaskStatus.PROCESSING) -> store.Progress:
    return store.Progress(
        status=status,
        progress=0.5,
        current_step="Processing",
        details="",
        frames_done=frame + 1,
        checkpoint_frame=frame,
        checkpoint={"tracker": {"frame": frame}},
    )


def observation(frame: int, track: int = 1) -> store.ObservationRow:
    return store.ObservationRow(
        camera_id="c01",
        frame_index=frame,
        captured_at=NOW + timedelta(seconds=frame),
        track_id=track,
        global_id="00000000-0000-4000-8000-000000000001",
        bbox=(1.0, 2.0, 3.0, 4.0),
        confidence=0.9,
        map_coords=(1.0, 2.0) if track == 1 else None,
    )


async def test_a_run_that_lost_its_task_cannot_commit(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await new_task(sessions, "t1")
    async with sessions.begin() as session:
        first = await store.claim_task(session=session, task_id="t1", owner="a", now=NOW)
    assert first is not None
    assert first.generation == 1
    async with sessions.begin() as session:
        second = await store.claim_task(session=session, task_id="t1", owner="b", now=NOW)
    assert second is not None
    assert second.generation == 2
    async with sessions.begin() as session:
        assert not await store.save_progress(
            session=session, task_id="t1", generation=1, progress=progress(5), now=NOW
        )
        assert await store.save_progress(
            session=session, task_id="t1", generation=2, progress=progress(5), now=NOW
        )
    async with sessions() as session:
        task = await store.get_task(session=session, task_id="t1")
    assert task is not None
    assert (task.owner, task.checkpoint_frame, task.checkpoint) == (
        "b",
        5,
        {"tracker": {"frame": 5}},
    )


async def test_a_stopped_task_is_not_taken_up_or_written_again(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await new_task(sessions, "t1")
    async with sessions.begin() as session:
        run = await store.claim_task(session=session, task_id="t1", owner="a", now=NOW)
        assert run is not None
        stopped = await store.finish_task(
            session=session, task_id="t1", status=TaskStatus.STOPPED, details="stop", now=NOW
        )
    assert stopped is not None
    assert stopped.status == "STOPPED"
    async with sessions.begin() as session:
        assert await store.claim_task(session=session, task_id="t1", owner="b", now=NOW) is None
        assert not await store.save_progress(
            session=session, task_id="t1", generation=1, progress=progress(9), now=NOW
        )
        assert (
            await store.finish_task(
                session=session, task_id="t1", status=TaskStatus.STOPPED, details="", now=NOW
            )
            is None
        )


async def test_an_observation_is_stored_once_whatever_repeats_it(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await new_task(sessions, "t1")
    async with sessions.begin() as session:
        await store.insert_observations(
            session=session, task_id="t1", rows=[observation(0), observation(1), observation(1, 2)]
        )
    async with sessions.begin() as session:  # a resumed run tracks frame 1 again
        await store.insert_observations(session=session, task_id="t1", rows=[observation(1)])
    async with sessions() as session:
        assert await store.count_observations(session=session, task_id="t1") == 3
        page = await store.query_observations(
            session=session,
            task_id="t1",
            camera_id="c01",
            global_id=None,
            since=NOW + timedelta(seconds=1),
            until=None,
            after=0,
            limit=10,
        )
    assert [(row.frame_index, row.track_id, row.map_x) for row in page] == [
        (1, 1, 1.0),
        (1, 2, None),
    ]


async def test_one_live_task_per_environment_at_a_time(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await new_task(sessions, "live-1", mode="live")
    with pytest.raises(IntegrityError):
        await new_task(sessions, "live-2", mode="live")
    await new_task(sessions, "batch-1")  # batch tasks are not limited
    async with sessions.begin() as session:
        await store.finish_task(
            session=session, task_id="live-1", status=TaskStatus.STOPPED, details="", now=NOW
        )
    await new_task(sessions, "live-3", mode="live")


async def test_retention_deletes_finished_tasks_with_their_observations(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    for task_id in ("old", "running"):
        await new_task(sessions, task_id)
        async with sessions.begin() as session:
            await store.insert_observations(session=session, task_id=task_id, rows=[observation(0)])
    async with sessions.begin() as session:
        await store.finish_task(
            session=session, task_id="old", status=TaskStatus.COMPLETED, details="", now=NOW
        )
    async with sessions.begin() as session:
        assert await store.delete_finished_before(session=session, cutoff=NOW) == ([], [])
        gone, _ = await store.delete_finished_before(
            session=session, cutoff=NOW + timedelta(seconds=1)
        )
    assert gone == ["old"]
    async with sessions() as session:
        assert await store.get_task(session=session, task_id="old") is None
        assert await store.count_observations(session=session, task_id="old") == 0
        assert await store.count_observations(session=session, task_id="running") == 1


def video(key: str) -> dict[str, Any]:
    return {
        "video_id": key.rpartition("/")[2].split(".")[0],
        "status": "ready",
        "reason": None,
        "object_key": key,
        "size_bytes": 10,
        "frames": 5,
        "fps": 10.0,
    }


async def test_a_video_a_kept_task_read_outlives_its_replacement_until_retention(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    first, second = "videos/lab/c01/v1.mp4", "videos/lab/c01/v2.mp4"
    async with sessions.begin() as session:
        await store.insert_environment(session=session, spec=SPEC)
        await store.record_video(
            session=session,
            environment_id="lab",
            camera_id="c01",
            video=VideoFacts("v1", "ready", None, first, 10, 5, 10.0),
        )
    await new_task(sessions, "read-v1", videos={"c01": video(first)})
    async with sessions.begin() as session:  # a new upload replaces v1 as the camera's video
        replaced = await store.record_video(
            session=session,
            environment_id="lab",
            camera_id="c01",
            video=VideoFacts("v2", "ready", None, second, 10, 5, 10.0),
        )
        assert replaced == first
        # v1 stays: the task's media URL serves it; v2 is the camera's video.
        assert await store.keys_in_use(
            session=session, environment_id="lab", keys=[first, second, "videos/lab/c01/x.mp4"]
        ) == {first, second}
    async with sessions.begin() as session:
        await store.finish_task(
            session=session, task_id="read-v1", status=TaskStatus.COMPLETED, details="", now=NOW
        )
    async with sessions.begin() as session:
        gone, unused = await store.delete_finished_before(
            session=session, cutoff=NOW + timedelta(seconds=1)
        )
    assert (gone, unused) == (["read-v1"], [first])  # v2 is still the camera's
