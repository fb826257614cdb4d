"""The handlers called in the test's own process: no service process and no broker, FastStream's
in-memory broker for the file handler and a real database on both dialects.

Routing, acks and redeliveries on a real broker, and the whole service, are
`tests/test_ingest_e2e.py`'s.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from faststream.rabbit import RabbitBroker, TestRabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from PIL import Image
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.broker import make_broker
from edgeway.common.envelope import Envelope
from edgeway.common.objects import LocalStore, local_objects
from edgeway.common.schemas.ingest import (
    HEADER_CAMERA_ID,
    HEADER_FILE_ID,
    HEADER_FILE_NAME,
    HEADER_KIND,
    HEADER_REQUEST_ID,
    UPLOAD_FILE_TYPE,
    URL_REFUSED,
    AcceptedFile,
    Caller,
    CancelRequest,
    CreateUpload,
    FileKind,
    GetStatus,
    IngestReply,
    RequestStatus,
)
from edgeway.common.testing import DIALECTS, migrated_database
from edgeway.ingestion import store
from edgeway.ingestion.app import SERVICE, Deps, build_deps
from edgeway.ingestion.handlers import on_command, register
from edgeway.ingestion.settings import IngestionSettings

ALICE = Caller(subject="alice")
BOB = Caller(subject="bob")


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return migrated_database(request, tmp_path, service="ingestion", migrations=store.MIGRATIONS)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def deps(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path, registry: CollectorRegistry
) -> Deps:
    settings = IngestionSettings(environment="development", data_dir=tmp_path)
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=TracerProvider(), registry=registry
    )
    built = build_deps(settings, broker=broker, sessions=sessions, registry=registry)
    await built.objects.ensure_bucket()
    return built


@pytest.fixture
async def broker(deps: Deps) -> AsyncIterator[RabbitBroker]:
    register(deps.broker, deps)
    async with TestRabbitBroker(deps.broker) as broker:
        yield broker


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.effect_noise((48, 32), 80).convert("RGB").save(out, "JPEG")
    return out.getvalue()


async def ask(deps: Deps, command: CreateUpload | GetStatus | CancelRequest) -> IngestReply:
    return IngestReply.model_validate_json(
        await on_command(command.model_dump_json().encode(), deps)
    )


async def publish_image(broker: RabbitBroker, deps: Deps, request_id: str, data: bytes) -> str:
    """A file message as the gateway publishes it; its id."""
    file_id = str(uuid.uuid4())
    kwargs = Envelope(type=UPLOAD_FILE_TYPE, producer="gateway").publish_kwargs()
    kwargs["headers"] |= {
        HEADER_KIND: FileKind.IMAGE.value,
        HEADER_FILE_ID: file_id,
        HEADER_FILE_NAME: "gate.jpg",
        HEADER_REQUEST_ID: request_id,
        HEADER_CAMERA_ID: "cam-1",
    }
    await broker.publish(data, exchange=deps.topology.ingest_uploads, **kwargs)
    return file_id


async def test_an_upload_is_opened_stored_and_read_through_the_handlers(
    broker: RabbitBroker, deps: Deps, registry: CollectorRegistry
) -> None:
    request_id = str(uuid.uuid4())
    image = jpeg()
    opened = await ask(
        deps,
        CreateUpload(
            request_id=request_id,
            caller=ALICE,
            camera_id="cam-1",
            files=[AcceptedFile(file_id="f", filename="gate.jpg", size_bytes=len(image))],
        ),
    )
    assert opened.ok, opened
    assert opened.response is not None
    assert opened.response.status is RequestStatus.IN_PROGRESS

    file_id = await publish_image(broker, deps, request_id, image)

    done = await ask(deps, GetStatus(request_id=request_id, caller=ALICE))
    assert done.response is not None
    assert done.response.status is RequestStatus.COMPLETED
    (frame,) = done.response.frames
    assert frame.frame_id == file_id
    assert (frame.width, frame.height) == (48, 32)
    counted = {"kind": FileKind.IMAGE.value, "outcome": "stored"}
    assert registry.get_sample_value("edgeway_ingestion_files_total", counted) == 1
    assert registry.get_sample_value("edgeway_ingestion_frames_total", {"source_type": "upload"})
    # The local store's URL serves the stored frame (the route the app mounts).
    assert frame.storage_url is not None
    assert isinstance(deps.objects, LocalStore)
    url = urlsplit(frame.storage_url)
    transport = httpx.ASGITransport(app=local_objects(deps.objects))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingestion") as http:
        served = await http.get(f"{url.path}?{url.query}")
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/jpeg"
    # Someone else is told there is no such request.
    hidden = await ask(deps, GetStatus(request_id=request_id, caller=BOB))
    assert (hidden.ok, hidden.error) == (False, "not_found")


async def test_a_file_message_without_its_identity_is_refused_and_stores_nothing(
    broker: RabbitBroker, deps: Deps
) -> None:
    kwargs = Envelope(type=UPLOAD_FILE_TYPE, producer="gateway").publish_kwargs()
    kwargs["headers"] |= {HEADER_KIND: FileKind.IMAGE.value, HEADER_FILE_ID: "not-a-uuid"}
    # Rejected (dead-lettered, not retried): any other exception would reach this publish, as
    # the in-memory broker raises what a handler raised.
    await broker.publish(jpeg(), exchange=deps.topology.ingest_uploads, **kwargs)
    async with deps.sessions() as session:
        frames = await session.scalar(select(func.count()).select_from(store.StoredFrame))
    assert frames == 0


async def test_commands_that_are_not_valid_are_answered_with_why(deps: Deps) -> None:
    unknown = IngestReply.model_validate_json(await on_command(b'{"op": "delete"}', deps))
    assert (unknown.ok, unknown.error) == (False, "invalid")
    assert unknown.message
    # A URL that could end a line of the RTSP request it becomes: refused as unsafe.
    start = {
        "op": "start_capture",
        "request_id": str(uuid.uuid4()),
        "caller": {"subject": "alice"},
        "request": {"camera_id": "cam-1", "rtsp_url": "rtsp://cam/a\r\nInjected: 1"},
    }
    unsafe = IngestReply.model_validate_json(await on_command(orjson.dumps(start), deps))
    assert (unsafe.ok, unsafe.error) == (False, URL_REFUSED)


async def test_only_rtsp_captures_can_be_cancelled(deps: Deps) -> None:
    request_id = str(uuid.uuid4())
    files = [AcceptedFile(file_id="f", filename="a.jpg", size_bytes=1)]
    await ask(deps, CreateUpload(request_id=request_id, caller=ALICE, camera_id="c", files=files))
    refused = await ask(deps, CancelRequest(request_id=request_id, caller=ALICE))
    assert (refused.ok, refused.error) == (False, "conflict")
    missing = await ask(deps, CancelRequest(request_id=str(uuid.uuid4()), caller=ALICE))
    assert (missing.ok, missing.error) == (False, "not_found")
