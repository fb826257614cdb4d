"""Housekeeping: orphaned objects, captures whose replica died, uploads that lost files, retention.

Runs on SQLite with the local directory store, and on PostgreSQL with a real S3 server. Time moves
through the sweeper's clock; objects carry the real time they were written.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from minio import Minio
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.db import make_engine, make_sessionmaker
from edgeway.common.objects import LocalStore, ObjectStore, S3Store
from edgeway.common.schemas.ingest import PROGRESS_TYPE, RequestStatus, SourceType
from edgeway.common.settings import async_database_url
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server
from edgeway.common.topology import Channels
from edgeway.ingestion import domain, events, store
from edgeway.ingestion.settings import IngestionSettings
from edgeway.ingestion.sweeper import Sweeper

GRACE = timedelta(minutes=10)
UPLOAD_TIMEOUT = timedelta(minutes=10)
RETENTION = timedelta(days=30)


class Clock:
    """The sweeper's time, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Housekeeping:
    sweeper: Sweeper
    sessions: async_sessionmaker[AsyncSession]
    objects: ObjectStore
    clock: Clock
    committed: list[None]


@pytest.fixture(
    params=["sqlite-local", pytest.param("postgresql-s3", marks=pytest.mark.connected)],
)
async def housekeeping(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Housekeeping]:
    objects: ObjectStore
    if request.param == "sqlite-local":
        url = async_database_url(None, service="ingestion", data_dir=tmp_path)
        objects = LocalStore(tmp_path / "objects", "frames")
    else:
        url = async_database_url(
            request.getfixturevalue("postgres_url"), service="ingestion", data_dir=tmp_path
        )
        server: S3Server = request.getfixturevalue("s3_server")
        client = Minio(server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
        objects = S3Store(client, f"frames-{uuid.uuid4().hex[:12]}")
    await store.MIGRATIONS.upgrade_async(url)
    await objects.ensure_bucket()
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    settings = IngestionSettings(
        data_dir=tmp_path,
        orphan_grace_s=GRACE.total_seconds(),
        upload_timeout_s=UPLOAD_TIMEOUT.total_seconds(),
        retention_days=RETENTION.days,
    )
    clock = Clock(datetime.now(UTC))
    committed: list[None] = []
    sweeper = Sweeper(
        settings=settings,
        sessions=sessions,
        objects=objects,
        committed=lambda: committed.append(None),
        clock=clock,
    )
    yield Housekeeping(sweeper, sessions, objects, clock, committed)
    await engine.dispose()


def new_request(
    *,
    source: SourceType,
    created: datetime,
    status: RequestStatus = RequestStatus.IN_PROGRESS,
    files: int | None = None,
    stored: int = 0,
    lease: datetime | None = None,
    completed: datetime | None = None,
) -> store.IngestionRequest:
    return store.IngestionRequest(
        id=str(uuid.uuid4()),
        camera_id="cam-1",
        source_type=source.value,
        status=status.value,
        files_expected=files,
        frames_stored=stored,
        files_rejected=0,
        owner="replica-a" if source is SourceType.RTSP else None,
        lease_expires_at=lease,
        created_at=created,
        updated_at=created,
        completed_at=completed,
    )


def frame_row(request: store.IngestionRequest, created: datetime) -> store.StoredFrame:
    frame_id = str(uuid.uuid4())
    return store.StoredFrame(
        id=frame_id,
        request_id=request.id,
        camera_id=request.camera_id,
        source_type=request.source_type,
        storage_path=domain.frame_key(created, request.camera_id, frame_id, "jpg"),
        storage_bucket="frames",
        width=4,
        height=4,
        size_bytes=3,
        format="jpeg",
        content_type="image/jpeg",
        capture_timestamp=created,
        created_at=created,
    )


def phone_row(created: datetime) -> store.PhoneFile:
    file_id = str(uuid.uuid4())
    return store.PhoneFile(
        id=file_id,
        device="pixel_7",
        original_name="imu.csv",
        storage_path=domain.file_key(created, "pixel_7", file_id),
        storage_bucket="frames",
        size_bytes=3,
        content_type="text/csv",
        created_at=created,
    )


async def put(objects: ObjectStore, *keys: str) -> None:
    for key in keys:
        await objects.put(key, b"obj", content_type="application/octet-stream", metadata={})


async def add_rows(sessions: async_sessionmaker[AsyncSession], *rows: object) -> None:
    """Rows in one transaction; requests before their frames (the models declare no relationship
    by which the session could order them)."""
    async with sessions.begin() as session:
        session.add_all(rows)


async def stored_keys(objects: ObjectStore) -> set[str]:
    return {
        item.key
        for prefix in (domain.FRAMES_PREFIX, domain.FILES_PREFIX)
        for item in await objects.list(prefix)
    }


async def reload(
    sessions: async_sessionmaker[AsyncSession], request_id: str
) -> store.IngestionRequest | None:
    async with sessions() as session:
        return await session.get(store.IngestionRequest, request_id)


async def progress_events(sessions: async_sessionmaker[AsyncSession]) -> list[store.OutboxEvent]:
    async with sessions() as session:
        rows = await session.execute(
            select(store.OutboxEvent)
            .where(store.OutboxEvent.type == PROGRESS_TYPE)
            .order_by(store.OutboxEvent.id)
        )
        return list(rows.scalars())


# --- orphans --------------------------------------------------------------------------------------


async def test_an_object_no_row_names_is_removed_once_older_than_the_grace(
    housekeeping: Housekeeping,
) -> None:
    h = housekeeping
    start = h.clock.now
    later = start + GRACE + timedelta(minutes=1)
    request = new_request(source=SourceType.UPLOAD, created=start, files=1, stored=1)
    kept_frame, kept_file = frame_row(request, start), phone_row(start)
    await add_rows(h.sessions, request)
    await add_rows(h.sessions, kept_frame, kept_file)
    orphans = {
        domain.frame_key(start, "cam-1", str(uuid.uuid4()), "jpg"),
        # Under yesterday's prefix (from the later sweep's point of view, midnight or not).
        domain.frame_key(later - timedelta(days=1), "cam-1", str(uuid.uuid4()), "jpg"),
        domain.file_key(start, "pixel_7", str(uuid.uuid4())),
    }
    await put(h.objects, kept_frame.storage_path, kept_file.storage_path, *orphans)

    # Young: a write in flight has its row a moment later, so nothing goes yet.
    report = await h.sweeper.sweep()
    assert report.orphans_removed == []
    assert await stored_keys(h.objects) == {
        kept_frame.storage_path,
        kept_file.storage_path,
        *orphans,
    }

    h.clock.now = later
    report = await h.sweeper.sweep()
    assert set(report.orphans_removed) == orphans
    assert await stored_keys(h.objects) == {kept_frame.storage_path, kept_file.storage_path}

    # Nothing left to remove the next time round.
    assert (await h.sweeper.sweep()).orphans_removed == []


# --- abandoned requests ---------------------------------------------------------------------------


async def test_a_capture_whose_lease_ran_out_fails_and_says_so(
    housekeeping: Housekeeping,
) -> None:
    h = housekeeping
    start = h.clock.now
    dead = new_request(source=SourceType.RTSP, created=start, lease=start + timedelta(seconds=15))
    alive = new_request(source=SourceType.RTSP, created=start, lease=start + timedelta(hours=1))
    await add_rows(h.sessions, dead, alive)

    report = await h.sweeper.sweep()
    assert report.expired_captures == 0
    assert h.committed == []

    h.clock.now = start + timedelta(minutes=1)
    report = await h.sweeper.sweep()
    assert report.expired_captures == 1
    assert h.committed == [None]  # the relay is nudged to publish the failure now

    failed = await reload(h.sessions, dead.id)
    assert failed is not None
    assert failed.status == RequestStatus.FAILED.value
    assert failed.message == "interrupted: the replica running the capture stopped"
    assert failed.completed_at == h.clock.now
    assert failed.lease_expires_at is None
    running = await reload(h.sessions, alive.id)
    assert running is not None
    assert running.status == RequestStatus.IN_PROGRESS.value

    (event,) = await progress_events(h.sessions)
    assert event.target == events.TO_BROADCAST
    assert event.routing_key == Channels.ingest_request(dead.id)
    body = orjson.loads(event.body)
    assert (body["request_id"], body["status"]) == (dead.id, "failed")
    assert body["message"] == failed.message

    # Failed once: a later sweep does not announce it again.
    h.clock.now += timedelta(minutes=1)
    assert (await h.sweeper.sweep()).expired_captures == 0
    assert len(await progress_events(h.sessions)) == 1


async def test_an_upload_that_lost_files_fails_saying_how_many(
    housekeeping: Housekeeping,
) -> None:
    h = housekeeping
    start = h.clock.now
    stale = new_request(
        source=SourceType.UPLOAD, created=start - UPLOAD_TIMEOUT - timedelta(seconds=1), files=3
    )
    stale.frames_stored, stale.files_rejected = 1, 0
    recent = new_request(source=SourceType.UPLOAD, created=start - timedelta(minutes=1), files=3)
    await add_rows(h.sessions, stale, recent)

    report = await h.sweeper.sweep()
    assert report.stale_uploads == 1
    assert h.committed == [None]
    failed = await reload(h.sessions, stale.id)
    assert failed is not None
    assert failed.status == RequestStatus.FAILED.value
    assert failed.message == "2 accepted file(s) never reached the ingestion service"
    assert failed.frames_stored == 1  # what was stored stays
    waiting = await reload(h.sessions, recent.id)
    assert waiting is not None
    assert waiting.status == RequestStatus.IN_PROGRESS.value
    (event,) = await progress_events(h.sessions)
    assert orjson.loads(event.body)["status"] == "failed"


# --- retention ------------------------------------------------------------------------------------


class Switchable:
    """Sessions on a database the test takes away and brings back."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.away = False

    def _reachable(self) -> None:
        if self.away:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database away"))

    def begin(self) -> Any:
        self._reachable()
        return self.sessions.begin()

    def __call__(self) -> AsyncSession:
        self._reachable()
        return self.sessions()


async def test_uploads_and_objects_get_a_whole_period_again_once_the_database_is_back(
    housekeeping: Housekeeping, tmp_path: Path
) -> None:
    h = housekeeping
    database = Switchable(h.sessions)
    sweeper = Sweeper(
        settings=IngestionSettings(
            data_dir=tmp_path,
            orphan_grace_s=GRACE.total_seconds(),
            upload_timeout_s=UPLOAD_TIMEOUT.total_seconds(),
            retention_days=RETENTION.days,
        ),
        sessions=cast(async_sessionmaker[AsyncSession], database),
        objects=h.objects,
        committed=lambda: None,
        clock=h.clock,
    )
    waiting = new_request(
        source=SourceType.UPLOAD, created=h.clock.now - timedelta(minutes=1), files=2
    )
    await add_rows(h.sessions, waiting)
    # One of its files is stored, its commit waiting for the database; and a real orphan.
    held, orphan = frame_row(waiting, h.clock.now), frame_row(waiting, h.clock.now)
    await put(h.objects, held.storage_path, orphan.storage_path)

    # The database is away for longer than the upload timeout and the orphan grace. The
    # upload's files wait it out (held by the consumer, or queued behind those): none could
    # make progress.
    database.away = True
    with pytest.raises(OperationalError):
        await sweeper.sweep()
    h.clock.now += UPLOAD_TIMEOUT + timedelta(minutes=5)
    with pytest.raises(OperationalError):
        await sweeper.sweep()
    database.away = False
    back = h.clock.now
    report = await sweeper.sweep()
    assert (report.stale_uploads, report.orphans_removed) == (0, [])
    await add_rows(h.sessions, held)  # the held commit lands, a moment after the database
    h.clock.now = back + UPLOAD_TIMEOUT - timedelta(seconds=1)
    report = await sweeper.sweep()
    assert (report.stale_uploads, report.orphans_removed) == (0, [])
    assert (await reload(h.sessions, waiting.id)).status == RequestStatus.IN_PROGRESS.value

    # A file that really was lost still fails its upload, and an orphan still goes, one
    # period after the outage.
    h.clock.now = back + max(UPLOAD_TIMEOUT, GRACE) + timedelta(seconds=1)
    report = await sweeper.sweep()
    assert (report.stale_uploads, report.orphans_removed) == (1, [orphan.storage_path])
    failed = await reload(h.sessions, waiting.id)
    assert failed.status == RequestStatus.FAILED.value
    assert held.storage_path in await stored_keys(h.objects)


async def test_an_outage_a_commit_met_gives_uploads_a_whole_timeout_again_too(
    housekeeping: Housekeeping,
) -> None:
    h = housekeeping
    stale = new_request(
        source=SourceType.UPLOAD, created=h.clock.now - UPLOAD_TIMEOUT - timedelta(minutes=1)
    )
    stale.files_expected = 1
    await add_rows(h.sessions, stale)
    h.sweeper.database_lost()  # a file's commit found the database away, between two sweeps
    assert (await h.sweeper.sweep()).stale_uploads == 0
    h.clock.now += UPLOAD_TIMEOUT
    assert (await h.sweeper.sweep()).stale_uploads == 1


async def test_retention_removes_old_objects_and_rows_and_keeps_newer_ones(
    housekeeping: Housekeeping,
) -> None:
    h = housekeeping
    now = h.clock.now
    old, new = now - RETENTION - timedelta(hours=1), now - timedelta(days=1)

    # An old request whose only frame expires, one with an old and a new frame, a finished one
    # from yesterday without frames, and an old finished one that never stored anything.
    only_old = new_request(
        source=SourceType.UPLOAD, created=old, status=RequestStatus.COMPLETED, completed=old
    )
    mixed = new_request(
        source=SourceType.RTSP, created=old, status=RequestStatus.COMPLETED, completed=old
    )
    recent_empty = new_request(
        source=SourceType.UPLOAD, created=new, status=RequestStatus.FAILED, completed=new
    )
    old_empty = new_request(
        source=SourceType.UPLOAD, created=old, status=RequestStatus.FAILED, completed=old
    )
    old_frame, mixed_old, mixed_new = (
        frame_row(only_old, old),
        frame_row(mixed, old),
        frame_row(mixed, new),
    )
    lost_object = frame_row(mixed, old)  # a crash removed its object but not its row
    old_file, new_file = phone_row(old), phone_row(new)
    refused = store.FileRejection(
        request_id=old_empty.id, filename="x.txt", code="unsupported", reason="no", created_at=old
    )
    await add_rows(h.sessions, only_old, mixed, recent_empty, old_empty)
    await add_rows(
        h.sessions, old_frame, mixed_old, mixed_new, lost_object, old_file, new_file, refused
    )
    expired = {old_frame.storage_path, mixed_old.storage_path, old_file.storage_path}
    kept = {mixed_new.storage_path, new_file.storage_path}
    await put(h.objects, *expired, *kept)

    report = await h.sweeper.sweep()
    assert report.expired_objects == 4
    assert report.requests_removed == 2
    assert report.orphans_removed == []
    assert await stored_keys(h.objects) == kept

    async with h.sessions() as session:
        frames = set((await session.execute(select(store.StoredFrame.id))).scalars())
        files = set((await session.execute(select(store.PhoneFile.id))).scalars())
        requests = set((await session.execute(select(store.IngestionRequest.id))).scalars())
        rejected = await session.scalar(select(func.count()).select_from(store.FileRejection))
    assert frames == {mixed_new.id}
    assert files == {new_file.id}
    assert requests == {mixed.id, recent_empty.id}
    assert rejected == 0

    # Run again: nothing more is old enough.
    again = await h.sweeper.sweep()
    assert (again.expired_objects, again.requests_removed) == (0, 0)
    assert await stored_keys(h.objects) == kept


async def test_an_active_request_is_never_removed_by_retention(
    housekeeping: Housekeeping,
) -> None:
    h = housekeeping
    old = h.clock.now - RETENTION - timedelta(days=1)
    # A capture still renewing its lease after a month: it runs, it stays.
    running = new_request(
        source=SourceType.RTSP, created=old, lease=h.clock.now + timedelta(seconds=15)
    )
    await add_rows(h.sessions, running)
    report = await h.sweeper.sweep()
    assert report.requests_removed == 0
    kept = await reload(h.sessions, running.id)
    assert kept is not None
    assert kept.status == RequestStatus.IN_PROGRESS.value
