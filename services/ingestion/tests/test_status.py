"""The status as the service answers it: one page of frames, presigned off the event loop.

`status.status_reader` on a real database (SQLite, and PostgreSQL with a real S3 server when
connected): a request with more frames than a page comes in pages that a cursor walks, each
frame once, and only the page's keys are presigned.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.objects import LocalStore, ObjectStore, S3Store
from edgeway.common.schemas.ingest import (
    FRAMES_PAGE_DEFAULT,
    Caller,
    RequestStatus,
    SourceType,
)
from edgeway.common.testing import DIALECTS, migrated_database
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server
from edgeway.ingestion import store
from edgeway.ingestion.status import status_reader

ALICE = Caller(subject="alice")
NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
FRAMES = 250


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return migrated_database(request, tmp_path, service="ingestion", migrations=store.MIGRATIONS)


@pytest.fixture
async def objects(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> ObjectStore:
    """The local store beside SQLite; a bucket on the S3 server beside PostgreSQL."""
    if database_url.startswith("sqlite"):
        local = LocalStore(tmp_path / "objects", "frames")
        await local.ensure_bucket()
        return local
    server: S3Server = request.getfixturevalue("s3_server")
    client = Minio(server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
    s3 = S3Store(client, f"frames-{uuid.uuid4().hex[:12]}")
    await s3.ensure_bucket()
    return s3


async def capture_with_frames(sessions: async_sessionmaker[AsyncSession], count: int) -> str:
    request_id = str(uuid.uuid4())
    async with sessions.begin() as session:
        await session.execute(
            insert(store.IngestionRequest).values(
                id=request_id,
                camera_id="cam-1",
                source_type=SourceType.RTSP.value,
                status=RequestStatus.COMPLETED.value,
                requester=ALICE.subject,
                frames_stored=count,
                files_rejected=0,
                created_at=NOW,
                updated_at=NOW,
            )
        )
        await session.execute(
            insert(store.StoredFrame),
            [
                {
                    # Two frames share each capture time: ids (in the index's order) part them.
                    "id": str(uuid.UUID(int=index + 1)),
                    "request_id": request_id,
                    "camera_id": "cam-1",
                    "source_type": SourceType.RTSP.value,
                    "storage_path": f"frames/2025/11/21/cam-1/{index:05}.jpg",
                    "storage_bucket": "frames",
                    "width": 320,
                    "height": 240,
                    "size_bytes": 1000,
                    "format": "jpeg",
                    "content_type": "image/jpeg",
                    "capture_timestamp": NOW + timedelta(milliseconds=index // 2),
                    "created_at": NOW,
                }
                for index in range(count)
            ],
        )
    return request_id


async def test_frames_come_a_page_at_a_time_and_only_the_page_is_presigned(
    sessions: async_sessionmaker[AsyncSession],
    objects: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request_id = await capture_with_frames(sessions, FRAMES)
    presigned: list[str] = []
    loop_thread = threading.current_thread()
    url = objects.url

    def recorded(key: str, *, expires: timedelta) -> str | None:
        assert threading.current_thread() is not loop_thread or isinstance(objects, LocalStore)
        presigned.append(key)
        return url(key, expires=expires)

    monkeypatch.setattr(objects, "url", recorded)
    respond = status_reader(sessions, objects, timedelta(hours=1))

    first = await respond(request_id, ALICE)
    assert first.ok
    assert first.response is not None
    assert len(first.response.frames) == FRAMES_PAGE_DEFAULT
    assert first.response.frames_total == FRAMES
    assert first.response.next_cursor is not None
    if isinstance(objects, S3Store):
        assert presigned == [frame.storage_path for frame in first.response.frames]
        assert all(frame.storage_url for frame in first.response.frames)

    walked: list[Any] = []
    cursor: str | None = None
    while True:
        reply = await respond(request_id, ALICE, limit=60, cursor=cursor)
        assert reply.response is not None
        walked.extend(reply.response.frames)
        cursor = reply.response.next_cursor
        if cursor is None:
            break
    assert [frame.storage_path for frame in walked] == [
        f"frames/2025/11/21/cam-1/{index:05}.jpg" for index in range(FRAMES)
    ]

    refused = await respond(request_id, ALICE, cursor="not-a-cursor")
    assert (refused.ok, refused.error) == (False, "invalid")
    assert refused.message is not None
    assert "next_cursor" in refused.message
    stranger = await respond(request_id, Caller(subject="bob"))
    assert (stranger.ok, stranger.error) == (False, "not_found")
