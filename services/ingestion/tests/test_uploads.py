"""Uploaded files at the service: held to `max_file_bytes` here too, whatever the gateway let
through, and each request kept with the caller that opened it; a file delivered again after its
upload completed keeps its object; a commit waits out a database outage.

A real database (SQLite, and PostgreSQL when connected) and the local object store.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.objects import LocalStore
from edgeway.common.schemas.ingest import (
    AcceptedFile,
    Caller,
    CreateUpload,
    FileKind,
    RequestStatus,
)
from edgeway.common.testing import DIALECTS, migrated_database
from edgeway.ingestion import store
from edgeway.ingestion.domain import FileMessage
from edgeway.ingestion.images import ImageLimits, ImageSanitizer
from edgeway.ingestion.uploads import UploadIntake

ALICE = Caller(subject="alice")
RECEIVED = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return migrated_database(request, tmp_path, service="ingestion", migrations=store.MIGRATIONS)


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 80).convert("RGB").save(out, "JPEG")
    return out.getvalue()


SMALL, LARGE = jpeg(32, 32), jpeg(400, 300)
LIMIT = len(SMALL)  # exactly the limit passes; LARGE is well over it


@pytest.fixture
async def objects(tmp_path: Path) -> LocalStore:
    local = LocalStore(tmp_path / "objects", "frames")
    await local.ensure_bucket()
    return local


@pytest.fixture
def uploads(sessions: async_sessionmaker[AsyncSession], objects: LocalStore) -> UploadIntake:
    return UploadIntake(
        sessions=sessions,
        objects=objects,
        sanitizer=ImageSanitizer(ImageLimits()),
        max_file_bytes=LIMIT,
        committed=lambda: None,
    )


def image_message(request_id: str, name: str) -> FileMessage:
    return FileMessage(FileKind.IMAGE, str(uuid.uuid4()), name, request_id, "cam-1")


async def test_a_file_over_the_size_limit_fails_alone_with_its_reason(
    uploads: UploadIntake, sessions: async_sessionmaker[AsyncSession], objects: LocalStore
) -> None:
    request_id = str(uuid.uuid4())
    files = {"ok.jpg": SMALL, "huge.jpg": LARGE}
    messages = [image_message(request_id, name) for name in files]
    refused = await uploads.open(
        CreateUpload(
            request_id=request_id,
            caller=ALICE,
            camera_id="cam-1",
            files=[
                AcceptedFile(
                    file_id=m.file_id, filename=m.filename, size_bytes=len(files[m.filename])
                )
                for m in messages
            ],
        )
    )
    assert refused is None
    for message in messages:
        await uploads.store(message, files[message.filename], received=RECEIVED)

    async with sessions() as session:
        request = await session.get(store.IngestionRequest, request_id)
        assert request is not None
        assert request.requester == "alice"
        assert (request.status, request.frames_stored, request.files_rejected) == (
            RequestStatus.COMPLETED.value,
            1,
            1,
        )
        (rejection,) = (await session.execute(select(store.FileRejection))).scalars()
        frames = list((await session.execute(select(store.StoredFrame))).scalars())
    assert (rejection.filename, rejection.code) == ("huge.jpg", "too_large")
    assert f"{len(LARGE)} bytes" in rejection.reason
    assert f"{LIMIT} bytes" in rejection.reason
    assert [frame.original_name for frame in frames] == ["ok.jpg"]
    stored = await objects.list("frames/")
    assert [item.key for item in stored] == [frames[0].storage_path]  # nothing of huge.jpg


async def test_a_phone_file_over_the_size_limit_is_not_stored(
    uploads: UploadIntake, sessions: async_sessionmaker[AsyncSession], objects: LocalStore
) -> None:
    big = b"t,ax\n" + b"1,0.5\n" * LIMIT
    message = FileMessage(FileKind.CSV, str(uuid.uuid4()), "imu.csv", None, "phone-7")
    await uploads.store(message, big, received=RECEIVED)
    async with sessions() as session:
        assert (await session.execute(select(func.count(store.PhoneFile.id)))).scalar_one() == 0
    assert await objects.list("files/") == []


def counting_uploads(
    sessions: async_sessionmaker[AsyncSession],
    objects: LocalStore,
    outcomes: list[str],
    **options: Any,
) -> UploadIntake:
    return UploadIntake(
        sessions=sessions,
        objects=objects,
        sanitizer=ImageSanitizer(ImageLimits()),
        max_file_bytes=LIMIT,
        committed=lambda: None,
        counted=lambda kind, outcome: outcomes.append(outcome),
        **options,
    )


async def open_upload(uploads: UploadIntake, *messages: FileMessage) -> None:
    request_id = messages[0].request_id
    assert request_id is not None
    refused = await uploads.open(
        CreateUpload(
            request_id=request_id,
            caller=ALICE,
            camera_id="cam-1",
            files=[
                AcceptedFile(file_id=m.file_id, filename=m.filename, size_bytes=len(SMALL))
                for m in messages
            ],
        )
    )
    assert refused is None


async def test_a_file_delivered_again_after_its_upload_completed_keeps_its_object(
    sessions: async_sessionmaker[AsyncSession], objects: LocalStore
) -> None:
    outcomes: list[str] = []
    uploads = counting_uploads(sessions, objects, outcomes)
    message = image_message(str(uuid.uuid4()), "only.jpg")
    await open_upload(uploads, message)
    await uploads.store(message, SMALL, received=RECEIVED)
    # The service stopped between the commit, which completed the upload, and the ack: the
    # same message comes again.
    await uploads.store(message, SMALL, received=RECEIVED)

    assert outcomes == ["stored", "duplicate"]
    async with sessions() as session:
        request = await session.get(store.IngestionRequest, message.request_id)
        (row,) = (await session.execute(select(store.StoredFrame))).scalars()
    assert request is not None
    assert (request.status, request.frames_stored) == (RequestStatus.COMPLETED.value, 1)
    assert await objects.exists(row.storage_path), "the object the frame row names is gone"


async def test_a_file_of_an_upload_that_ended_without_it_leaves_no_object(
    sessions: async_sessionmaker[AsyncSession], objects: LocalStore
) -> None:
    outcomes: list[str] = []
    uploads = counting_uploads(sessions, objects, outcomes)
    request_id = str(uuid.uuid4())
    late, lost = image_message(request_id, "late.jpg"), image_message(request_id, "lost.jpg")
    await open_upload(uploads, late, lost)
    async with sessions.begin() as session:  # the sweeper gave up waiting for its files
        request = await store.lock_request(session=session, request_id=request_id)
        assert request is not None
        store.finish(
            session=session, request=request, status=RequestStatus.FAILED, now=datetime.now(UTC)
        )
    await uploads.store(late, SMALL, received=RECEIVED)
    assert outcomes == ["dropped"]
    assert await objects.list("frames/") == []


class FlakyDatabase:
    """Sessions whose first `failures` transactions find the database unreachable."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], failures: int) -> None:
        self.sessions = sessions
        self.failures = failures

    def begin(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise OperationalError("BEGIN", {}, ConnectionRefusedError("database away"))
        return self.sessions.begin()

    def __call__(self) -> AsyncSession:
        return self.sessions()


@pytest.mark.parametrize("kind", [FileKind.IMAGE, FileKind.CSV])
async def test_a_commit_waits_out_a_database_outage_instead_of_failing_its_delivery(
    sessions: async_sessionmaker[AsyncSession], objects: LocalStore, kind: FileKind
) -> None:
    outcomes: list[str] = []
    lost: list[None] = []
    flaky = FlakyDatabase(sessions, failures=0)
    uploads = counting_uploads(
        cast(async_sessionmaker[AsyncSession], flaky),
        objects,
        outcomes,
        retry_delays=[0.01],
        database_lost=lambda: lost.append(None),
    )
    if kind is FileKind.IMAGE:
        message = image_message(str(uuid.uuid4()), "a.jpg")
        await open_upload(uploads, message)
        body = SMALL
    else:
        message = FileMessage(FileKind.CSV, str(uuid.uuid4()), "imu.csv", None, "phone-7")
        body = b"t,ax\n1,0.5\n"
    # More tries than a delivery would have had before it was dead-lettered.
    flaky.failures = 12
    await uploads.store(message, body, received=RECEIVED)
    assert outcomes == ["stored"]
    assert len(lost) == 12
    table = store.StoredFrame if kind is FileKind.IMAGE else store.PhoneFile
    async with sessions() as session:
        assert (await session.execute(select(func.count(table.id)))).scalar_one() == 1
