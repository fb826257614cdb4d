"""Uploaded files at the service: held to `max_file_bytes` here too, whatever the gateway let
through, and each request kept with the caller that opened it.

A real database (SQLite, and PostgreSQL when connected) and the local object store.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

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
from edgeway.ingestion.storage import LocalStore
from edgeway.ingestion.uploads import Uploads

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
def uploads(sessions: async_sessionmaker[AsyncSession], objects: LocalStore) -> Uploads:
    return Uploads(
        sessions=sessions,
        objects=objects,
        sanitizer=ImageSanitizer(ImageLimits()),
        max_file_bytes=LIMIT,
        committed=lambda: None,
    )


def image_message(request_id: str, name: str) -> FileMessage:
    return FileMessage(FileKind.IMAGE, str(uuid.uuid4()), name, request_id, "cam-1")


async def test_a_file_over_the_size_limit_fails_alone_with_its_reason(
    uploads: Uploads, sessions: async_sessionmaker[AsyncSession], objects: LocalStore
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
        (rejection,) = (await session.execute(select(store.RejectedUpload))).scalars()
        frames = list((await session.execute(select(store.Frame))).scalars())
    assert (rejection.filename, rejection.code) == ("huge.jpg", "too_large")
    assert f"{len(LARGE)} bytes" in rejection.reason
    assert f"{LIMIT} bytes" in rejection.reason
    assert [frame.original_name for frame in frames] == ["ok.jpg"]
    stored = await objects.list("frames/")
    assert [item.key for item in stored] == [frames[0].storage_path]  # nothing of huge.jpg


async def test_a_phone_file_over_the_size_limit_is_not_stored(
    uploads: Uploads, sessions: async_sessionmaker[AsyncSession], objects: LocalStore
) -> None:
    big = b"t,ax\n" + b"1,0.5\n" * LIMIT
    message = FileMessage(FileKind.CSV, str(uuid.uuid4()), "imu.csv", None, "phone-7")
    await uploads.store(message, big, received=RECEIVED)
    async with sessions() as session:
        assert (await session.execute(select(func.count(store.PhoneFile.id)))).scalar_one() == 0
    assert await objects.list("files/") == []
