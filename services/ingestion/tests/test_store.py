"""The ingestion database, on the embedded SQLite file and on PostgreSQL alike."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from alembic import command
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from edgeway.common.db import make_engine, make_sessionmaker
from edgeway.common.schemas.ingest import (
    FRAME_STORED_TYPE,
    PROGRESS_TYPE,
    Caller,
    CaptureMode,
    IngestionResponse,
    RejectedFile,
    RequestStatus,
    SourceType,
)
from edgeway.common.settings import async_database_url
from edgeway.common.testing import DIALECTS, migrated_database, schema_differences
from edgeway.common.topology import Channels
from edgeway.ingestion import domain, store
from edgeway.ingestion.events import TO_BROADCAST, TO_FRAMES

NOW = datetime(2025, 11, 21, 12, 0, 0, 250000, tzinfo=UTC)
BUCKET = "trackshift-frames"
ALICE = Caller(subject="alice")  # the requester of the requests below
OPERATOR = Caller(subject="ops", operator=True)


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ingestion database migrated to head (`engine` and `sessions` build on it)."""
    return migrated_database(request, tmp_path, service="ingestion", migrations=store.MIGRATIONS)


def upload(*, files: int, request_id: str | None = None) -> store.IngestionRequest:
    return store.IngestionRequest(
        id=request_id or str(uuid.uuid4()),
        camera_id="cam-1",
        source_type=SourceType.UPLOAD.value,
        status=RequestStatus.IN_PROGRESS.value,
        requester=ALICE.subject,
        meta_info={"location": "north gate"},
        files_expected=files,
        frames_stored=0,
        files_rejected=0,
        created_at=NOW,
        updated_at=NOW,
    )


def capture(
    *,
    status: RequestStatus = RequestStatus.IN_PROGRESS,
    lease: datetime | None = NOW + timedelta(seconds=15),
    owner: str = "replica-a",
    requester: str = ALICE.subject,
) -> store.IngestionRequest:
    return store.IngestionRequest(
        id=str(uuid.uuid4()),
        camera_id="cam-2",
        source_type=SourceType.RTSP.value,
        status=status.value,
        requester=requester,
        rtsp_url="rtsp://***@10.0.0.7/stream",
        rtsp_url_sealed="sealed",
        capture_mode=CaptureMode.CONTINUOUS.value,
        capture_duration=30.0,
        fps=1.0,
        frames_stored=0,
        files_rejected=0,
        owner=owner,
        lease_expires_at=lease,
        created_at=NOW,
        updated_at=NOW,
    )


def frame(
    request: store.IngestionRequest, *, taken: datetime = NOW, **changes: Any
) -> domain.NewFrame:
    frame_id = changes.pop("id", None) or str(uuid.uuid4())
    values: dict[str, Any] = {
        "id": frame_id,
        "request_id": request.id,
        "camera_id": request.camera_id,
        "source_type": SourceType(request.source_type),
        "storage_path": f"frames/{taken:%Y/%m/%d}/{request.camera_id}/{frame_id}.jpg",
        "storage_bucket": BUCKET,
        "width": 640,
        "height": 480,
        "size_bytes": 12_345,
        "format": "jpeg",
        "content_type": "image/jpeg",
        "capture_timestamp": taken,
        "meta": {"exposure": 0.01, "sensor_info": {"iso": 100}, "location": "north gate"},
        "original_name": "gate.jpg",
    }
    values.update(changes)
    return domain.NewFrame(**values)


async def add(
    sessions: async_sessionmaker[AsyncSession], *requests: store.IngestionRequest
) -> None:
    async with sessions.begin() as session:
        for request in requests:
            await store.add_request(session=session, request=request)


async def reload(
    sessions: async_sessionmaker[AsyncSession], request_id: str
) -> store.IngestionRequest:
    async with sessions() as session:
        request = await session.get(store.IngestionRequest, request_id)
    assert request is not None
    return request


def finish_if_done(
    session: AsyncSession, request: store.IngestionRequest, *, now: datetime
) -> None:
    """What a group commit does once a request's files are in: end the upload if it is done."""
    ending = domain.upload_ending(request)
    if ending is not None:
        store.finish(
            session=session, request=request, status=ending.status, message=ending.message, now=now
        )


async def store_frame(
    sessions: async_sessionmaker[AsyncSession], new: domain.NewFrame, *, now: datetime = NOW
) -> bool:
    """What a file's handler does: lock its request, add the frame, finish when it was the last."""
    async with sessions.begin() as session:
        request = await store.lock_request(session=session, request_id=new.request_id)
        assert request is not None
        added = await store.add_frame(session=session, request=request, frame=new, now=now)
        finish_if_done(session, request, now=now)
    return added


async def reject_file(
    sessions: async_sessionmaker[AsyncSession], request_id: str, file_id: str
) -> bool:
    async with sessions.begin() as session:
        request = await store.lock_request(session=session, request_id=request_id)
        assert request is not None
        added = await store.add_file_rejection(
            session=session,
            request=request,
            file_id=file_id,
            rejected=RejectedFile(filename="bad.jpg", code="undecodable", reason="not an image"),
            now=NOW,
        )
        finish_if_done(session, request, now=NOW)
    return added


async def events(sessions: async_sessionmaker[AsyncSession]) -> list[store.OutboxEvent]:
    async with sessions() as session:
        rows = await session.execute(select(store.OutboxEvent).order_by(store.OutboxEvent.id))
        return list(rows.scalars())


async def count(sessions: async_sessionmaker[AsyncSession], entity: Any) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(entity)) or 0)


# --- schema ---------------------------------------------------------------------------------------


async def test_migrations_produce_exactly_the_models_schema(
    database_url: str, engine: AsyncEngine
) -> None:
    assert await store.MIGRATIONS.at_head(database_url)
    assert store.MIGRATIONS.current(database_url) == store.MIGRATIONS.head() == "0003"
    differences = await schema_differences(
        engine, store.Base.metadata, version_table="alembic_version_ingestion"
    )
    assert differences == []


async def test_migrating_twice_changes_nothing(database_url: str, engine: AsyncEngine) -> None:
    await store.MIGRATIONS.upgrade_async(database_url)
    assert store.MIGRATIONS.current(database_url) == "0003"


@pytest.fixture(params=DIALECTS)
def database_at_0001(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An ingestion database as the first release left it: migrated to 0001 only."""
    configured = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    url = async_database_url(configured, service="ingestion", data_dir=tmp_path)
    command.upgrade(store.MIGRATIONS.config(url), "0001")
    return url


async def test_requests_from_before_requesters_were_kept_are_shown_to_operators_only(
    database_at_0001: str,
) -> None:
    url = database_at_0001
    engine = make_engine(url)
    try:
        request_id = str(uuid.uuid4())
        async with engine.begin() as connection:  # a row written by the 0001 schema
            await connection.execute(
                insert(store.IngestionRequest).values(
                    id=request_id,
                    camera_id="cam-1",
                    source_type=SourceType.UPLOAD.value,
                    status=RequestStatus.COMPLETED.value,
                    frames_stored=0,
                    files_rejected=0,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
        await store.MIGRATIONS.upgrade_async(url)
        assert store.MIGRATIONS.current(url) == "0003"
        async with make_sessionmaker(engine)() as session:
            kept = await session.get(store.IngestionRequest, request_id)
            assert kept is not None
            assert kept.requester is None
            for caller, shown in ((ALICE, False), (OPERATOR, True)):
                response = await store.response(
                    session=session, request_id=request_id, caller=caller
                )
                assert (response is not None) is shown
    finally:
        await engine.dispose()
    # And back: 0003 and 0002 go down cleanly on both dialects.
    await asyncio.to_thread(command.downgrade, store.MIGRATIONS.config(url), "0001")
    assert store.MIGRATIONS.current(url) == "0001"


# --- frames ---------------------------------------------------------------------------------------


async def test_a_redelivered_frame_is_stored_counted_and_announced_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=3)
    await add(sessions, request)
    new = frame(request)

    assert await store_frame(sessions, new) is True
    assert await store_frame(sessions, new) is False

    assert (await reload(sessions, request.id)).frames_stored == 1
    assert await count(sessions, store.StoredFrame) == 1
    announced = [event for event in await events(sessions) if event.type == FRAME_STORED_TYPE]
    assert len(announced) == 1
    assert announced[0].target == TO_FRAMES
    body = orjson.loads(announced[0].body)
    assert body["frame_id"] == new.id
    assert body["storage_path"] == new.storage_path
    assert body["storage_bucket"] == BUCKET
    assert (body["width"], body["height"]) == (640, 480)
    assert datetime.fromisoformat(body["capture_timestamp"]) == NOW


async def test_a_frames_metadata_keeps_exposure_and_sensor_info(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=1)
    await add(sessions, request)
    new = frame(request)
    await store_frame(sessions, new)
    async with sessions() as session:
        row = await session.get(store.StoredFrame, new.id)
    assert row is not None
    assert row.exposure == 0.01
    assert row.sensor_info == {"iso": 100}
    assert row.meta_info == new.meta
    assert row.capture_timestamp == NOW


async def test_a_redelivered_rejection_is_counted_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=3)
    await add(sessions, request)
    file_id = str(uuid.uuid4())
    assert await reject_file(sessions, request.id, file_id) is True
    assert await reject_file(sessions, request.id, file_id) is False
    assert (await reload(sessions, request.id)).files_rejected == 1
    assert await count(sessions, store.FileRejection) == 1


# --- finishing ------------------------------------------------------------------------------------


async def test_an_upload_completes_when_every_file_was_stored_or_refused(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=3)
    await add(sessions, request)
    await store_frame(sessions, frame(request))
    await reject_file(sessions, request.id, str(uuid.uuid4()))
    assert (await reload(sessions, request.id)).status == RequestStatus.IN_PROGRESS.value

    later = NOW + timedelta(seconds=3)
    await store_frame(sessions, frame(request), now=later)
    done = await reload(sessions, request.id)
    assert done.status == RequestStatus.COMPLETED.value
    assert done.completed_at == later
    assert (done.frames_stored, done.files_rejected) == (2, 1)

    progress = [event for event in await events(sessions) if event.type == PROGRESS_TYPE]
    assert len(progress) == 1  # the completion (this test announces nothing else)
    assert progress[0].target == TO_BROADCAST
    assert progress[0].routing_key == Channels.ingest_request(request.id)
    assert orjson.loads(progress[0].body)["status"] == "completed"


async def test_an_upload_of_only_refused_files_fails_saying_so(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=2)
    await add(sessions, request)
    await reject_file(sessions, request.id, str(uuid.uuid4()))
    await reject_file(sessions, request.id, str(uuid.uuid4()))
    failed = await reload(sessions, request.id)
    assert failed.status == RequestStatus.FAILED.value
    assert failed.message == "no file of the upload could be stored"
    (event,) = await events(sessions)
    assert orjson.loads(event.body)["message"] == "no file of the upload could be stored"


async def test_finishing_a_final_request_changes_and_announces_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = capture()
    await add(sessions, request)
    async with sessions.begin() as session:
        locked = await store.lock_request(session=session, request_id=request.id)
        assert locked is not None
        assert store.finish(
            session=session,
            request=locked,
            status=RequestStatus.CANCELLED,
            now=NOW,
            message="cancelled by request",
        )
    async with sessions.begin() as session:
        locked = await store.lock_request(session=session, request_id=request.id)
        assert locked is not None
        assert not store.finish(
            session=session,
            request=locked,
            status=RequestStatus.FAILED,
            now=NOW + timedelta(minutes=1),
            message="interrupted",
        )
    ended = await reload(sessions, request.id)
    assert (ended.status, ended.message) == ("cancelled", "cancelled by request")
    assert ended.completed_at == NOW
    assert ended.lease_expires_at is None
    assert len(await events(sessions)) == 1


# --- captures -------------------------------------------------------------------------------------


async def test_only_active_captures_with_a_live_lease_count_against_the_limit(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await add(
        sessions,
        capture(),
        capture(status=RequestStatus.PENDING),
        capture(lease=NOW - timedelta(seconds=1)),  # its replica died
        capture(status=RequestStatus.COMPLETED),
        capture(status=RequestStatus.CANCELLED),
        upload(files=4),
    )
    async with sessions() as session:
        assert await store.active_captures(session=session, now=NOW) == 2
        # Once the leases run out nobody is capturing any more.
        later = NOW + timedelta(minutes=1)
        assert await store.active_captures(session=session, now=later) == 0


async def test_active_captures_are_counted_per_requester_too(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await add(
        sessions,
        capture(),
        capture(),
        capture(status=RequestStatus.COMPLETED),
        capture(requester="bob"),
        capture(requester="bob", lease=NOW - timedelta(seconds=1)),
    )
    async with sessions() as session:
        counted = {
            requester: await store.active_captures(session=session, now=NOW, requester=requester)
            for requester in ("alice", "bob", "carol")
        }
        assert counted == {"alice": 2, "bob": 1, "carol": 0}
        assert await store.active_captures(session=session, now=NOW) == 3


async def test_a_status_is_shown_to_its_requester_and_operators_only(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = capture()
    await add(sessions, request)
    callers = {
        ALICE: True,
        OPERATOR: True,
        Caller(subject="bob"): False,
        Caller(subject="Alice"): False,  # subjects are compared exactly
    }
    async with sessions() as session:
        for caller, shown in callers.items():
            response = await store.response(session=session, request_id=request.id, caller=caller)
            assert (response is not None) is shown, caller


async def test_a_lease_is_renewed_only_by_its_owner(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    running, cancelled = capture(), capture()
    await add(sessions, running, cancelled)
    until = NOW + timedelta(seconds=30)
    async with sessions.begin() as session:
        assert (
            await store.renew_lease(
                session=session, request_id=running.id, owner="replica-a", until=until
            )
            is RequestStatus.IN_PROGRESS
        )
        assert (
            await store.renew_lease(
                session=session, request_id=running.id, owner="replica-b", until=NOW
            )
            is None
        )
        missing = str(uuid.uuid4())
        assert (
            await store.renew_lease(
                session=session, request_id=missing, owner="replica-a", until=until
            )
            is None
        )
    assert (await reload(sessions, running.id)).lease_expires_at == until

    # A capture cancelled elsewhere learns it at its next renewal.
    async with sessions.begin() as session:
        locked = await store.lock_request(session=session, request_id=cancelled.id)
        assert locked is not None
        store.finish(session=session, request=locked, status=RequestStatus.CANCELLED, now=NOW)
    async with sessions.begin() as session:
        status = await store.renew_lease(
            session=session, request_id=cancelled.id, owner="replica-a", until=until
        )
    assert status is RequestStatus.CANCELLED


# --- the status -----------------------------------------------------------------------------------


async def test_the_status_lists_frames_in_capture_order(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=3)  # the files the gateway accepted; it refused one more itself
    await add(sessions, request)
    async with sessions.begin() as session:
        await store.add_rejections(
            session=session,
            request_id=request.id,
            rejected=[
                RejectedFile(filename="notes.txt", code="unsupported", reason="not an image")
            ],
            now=NOW,
        )
    late, early, middle = (frame(request, taken=NOW + timedelta(seconds=s)) for s in (20, 0, 10))
    for new in (late, early, middle):
        await store_frame(sessions, new)

    async with sessions() as session:
        response = await store.response(session=session, request_id=request.id, caller=ALICE)
    assert response is not None
    assert response.request_id == request.id
    assert response.status is RequestStatus.COMPLETED
    assert response.source_type is SourceType.UPLOAD
    assert response.camera_id == "cam-1"
    assert response.files_expected == 3
    assert response.capture_mode is None
    assert response.created_at == NOW
    assert [item.frame_id for item in response.frames] == [early.id, middle.id, late.id]
    assert (response.frames_total, response.next_cursor) == (3, None)  # one page holds them
    # URLs are made by the status reader, for the page only (handlers.status_reader).
    assert [item.storage_path for item in response.frames] == [
        new.storage_path for new in (early, middle, late)
    ]
    assert all(item.storage_url is None for item in response.frames)
    first = response.frames[0]
    assert (first.width, first.height, first.size_bytes, first.format) == (640, 480, 12_345, "jpeg")
    assert first.timestamp == NOW
    assert [item.filename for item in response.rejected] == ["notes.txt"]


async def test_the_status_of_a_capture_shows_its_mode_and_an_unknown_request_is_none(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = capture()
    await add(sessions, request)
    async with sessions() as session:
        response = await store.response(session=session, request_id=request.id, caller=ALICE)
        missing = await store.response(
            session=session, request_id=str(uuid.uuid4()), caller=OPERATOR
        )
    assert response is not None
    assert response.capture_mode is CaptureMode.CONTINUOUS
    assert response.source_type is SourceType.RTSP
    assert response.frames == []
    assert missing is None


async def test_a_cursor_walks_every_frame_once_in_capture_order_through_ties(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = capture()
    await add(sessions, request)
    stored: list[domain.NewFrame] = []
    async with sessions.begin() as session:
        locked = await store.lock_request(session=session, request_id=request.id)
        assert locked is not None
        for index in range(23):
            # Three frames share each capture time, stored at two different times: only the
            # id tells some apart.
            new = frame(request, taken=NOW + timedelta(seconds=index // 3))
            later = NOW + timedelta(milliseconds=index % 2)
            await store.add_frame(session=session, request=locked, frame=new, now=later)
            stored.append(new)

    async def page(limit: int, cursor: str | None) -> IngestionResponse:
        after = None if cursor is None else domain.FramePosition.from_cursor(cursor)
        async with sessions() as session:
            response = await store.response(
                session=session, request_id=request.id, caller=ALICE, limit=limit, after=after
            )
        assert response is not None
        return response

    whole = await page(1000, None)
    assert (len(whole.frames), whole.frames_total, whole.next_cursor) == (23, 23, None)
    walked: list[str] = []
    cursor: str | None = None
    sizes = []
    while True:
        response = await page(4, cursor)
        assert response.frames_total == 23
        walked.extend(item.frame_id for item in response.frames)
        sizes.append(len(response.frames))
        cursor = response.next_cursor
        if cursor is None:
            break
    assert sizes == [4, 4, 4, 4, 4, 3]
    assert walked == [item.frame_id for item in whole.frames]  # the same order, page by page
    assert sorted(walked) == sorted(new.id for new in stored)  # each frame once
    stamps = [item.timestamp for item in whole.frames]
    assert stamps == sorted(stamps)

    # Exactly a page's worth left: the page before the last says there is more, the last not.
    assert (await page(20, None)).next_cursor is not None
    last = await page(3, (await page(20, None)).next_cursor)
    assert (len(last.frames), last.next_cursor) == (3, None)


async def test_a_file_recorded_before_is_known_by_its_id(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    request = upload(files=3)
    await add(sessions, request)
    stored, refused, unknown = (str(uuid.uuid4()) for _ in range(3))
    await store_frame(sessions, frame(request, id=stored))
    await reject_file(sessions, request.id, refused)
    async with sessions() as session:
        for file_id, recorded in ((stored, True), (refused, True), (unknown, False)):
            assert await store.file_recorded(session=session, file_id=file_id) is recorded


# --- phone files and housekeeping queries ---------------------------------------------------------


async def test_a_phone_file_is_recorded_once_and_its_key_is_known(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    file_id = str(uuid.uuid4())
    key = f"files/2025/11/21/pixel_7/{file_id}.csv"

    def phone_file() -> store.PhoneFile:
        return store.PhoneFile(
            id=file_id,
            device="pixel_7",
            original_name="imu.csv",
            storage_path=key,
            storage_bucket=BUCKET,
            size_bytes=42,
            content_type="text/csv",
            created_at=NOW,
        )

    async with sessions.begin() as session:
        assert await store.add_phone_file(session=session, file=phone_file())
    async with sessions.begin() as session:
        assert not await store.add_phone_file(session=session, file=phone_file())
    assert await count(sessions, store.PhoneFile) == 1

    request = upload(files=1)
    await add(sessions, request)
    new = frame(request)
    await store_frame(sessions, new)
    orphan = "frames/2025/11/21/cam-1/orphan.jpg"
    async with sessions() as session:
        known = await store.known_keys(session=session, keys=[key, new.storage_path, orphan])
    assert known == {key, new.storage_path}


async def test_files_of_one_upload_stored_at_once_all_count(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A replica checks several files of an upload at once (`upload_prefetch`): every one counts,
    and the last one completes the upload."""
    request = upload(files=8)
    await add(sessions, request)
    results = await asyncio.gather(*(store_frame(sessions, frame(request)) for _ in range(8)))
    assert results == [True] * 8
    assert await count(sessions, store.StoredFrame) == 8
    done = await reload(sessions, request.id)
    assert done.frames_stored == 8
    assert done.status == RequestStatus.COMPLETED.value
