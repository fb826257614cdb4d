"""RTSP capture jobs: whose requests they are, how many one caller may run, what a failure says.

`CaptureJobs` as the service runs it, on a real database (SQLite, and PostgreSQL when
connected) and the local object store, capturing from real TCP listeners on loopback
(`edgeway.common.testing.listener`), which loopback-only settings allow.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.objects import LocalStore
from edgeway.common.rtsp.credentials import CredentialCipher
from edgeway.common.schemas.ingest import (
    URL_REFUSED,
    Caller,
    CaptureMode,
    IngestReply,
    RequestStatus,
    RtspIngestionRequest,
    StartCapture,
)
from edgeway.common.testing import DIALECTS, migrated_database
from edgeway.common.testing.listener import RecordingListener
from edgeway.common.testing.processes import free_port
from edgeway.ingestion import store
from edgeway.ingestion.domain import CAPTURE_FAILED
from edgeway.ingestion.images import ImageLimits, ImageSanitizer
from edgeway.ingestion.jobs import URL_NOT_ALLOWED, CaptureJobs
from edgeway.ingestion.settings import IngestionSettings
from edgeway.ingestion.status import status_reader

ALICE, BOB = Caller(subject="alice"), Caller(subject="bob")
OPERATOR = Caller(subject="ops", operator=True)
PER_CALLER = 2


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return migrated_database(request, tmp_path, service="ingestion", migrations=store.MIGRATIONS)


Respond = Callable[[str, Caller], Awaitable[IngestReply]]


@pytest.fixture
async def objects(tmp_path: Path) -> LocalStore:
    local = LocalStore(tmp_path / "objects", "frames")
    await local.ensure_bucket()
    return local


@pytest.fixture
def respond(sessions: async_sessionmaker[AsyncSession], objects: LocalStore) -> Respond:
    """The service's status reader: a request as a caller may see it."""
    return status_reader(sessions, objects, timedelta(hours=1))


@pytest.fixture
async def jobs(
    sessions: async_sessionmaker[AsyncSession],
    objects: LocalStore,
    respond: Respond,
    tmp_path: Path,
) -> AsyncIterator[CaptureJobs]:
    settings = IngestionSettings(
        data_dir=tmp_path,
        credentials_key=Fernet.generate_key().decode(),
        max_streams_per_principal=PER_CALLER,
        rtsp_allowed_destinations=["127.0.0.1"],
        open_timeout_s=1.0,
        stall_timeout_s=1.0,
        reconnect_attempts=2,
        backoff_initial_s=0.1,
    )
    running = CaptureJobs(
        settings=settings,
        sessions=sessions,
        objects=objects,
        sanitizer=ImageSanitizer(ImageLimits()),
        cipher=CredentialCipher(Fernet.generate_key()),
        replica_id="replica-test",
        committed=lambda: None,
        respond=respond,
    )
    yield running
    await running.stop_all("the test ended")


@pytest.fixture
def silent_camera() -> Iterator[RecordingListener]:
    """A camera that accepts and never answers: its captures stay in progress for a while."""
    with RecordingListener() as listener:
        yield listener


def start(url: str, caller: Caller) -> StartCapture:
    return StartCapture(
        request_id=str(uuid.uuid4()),
        caller=caller,
        request=RtspIngestionRequest(
            rtsp_url=url,
            camera_id="cam-1",
            capture_mode=CaptureMode.CONTINUOUS,
            capture_duration=60,
        ),
    )


async def final(respond: Respond, request_id: str) -> IngestReply:
    deadline = time.monotonic() + 15
    while True:
        reply = await respond(request_id, OPERATOR)
        assert reply.response is not None
        if reply.response.status.final or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.1)


async def test_one_caller_is_held_to_its_own_cap_while_others_still_start(
    jobs: CaptureJobs, silent_camera: RecordingListener
) -> None:
    url = f"rtsp://127.0.0.1:{silent_camera.port}/cam"
    for _ in range(PER_CALLER):
        assert (await jobs.start(start(url, ALICE))).ok
    refused = await jobs.start(start(url, ALICE))
    assert (refused.ok, refused.error) == (False, "stream_limit")
    assert refused.message is not None
    assert f"the limit per caller is {PER_CALLER}" in refused.message
    assert (await jobs.start(start(url, BOB))).ok  # the global cap (10) is far


async def test_status_and_cancel_are_for_the_requester_and_operators_only(
    jobs: CaptureJobs, respond: Respond, silent_camera: RecordingListener
) -> None:
    url = f"rtsp://127.0.0.1:{silent_camera.port}/cam"
    started = await jobs.start(start(url, ALICE))
    assert started.response is not None
    request_id = started.response.request_id

    # To another caller the request does not exist: the answer for an unknown id.
    unknown_id = str(uuid.uuid4())
    unknown = await respond(unknown_id, BOB)
    assert (unknown.error, unknown.message) == ("not_found", f"no request {unknown_id}")
    for reply in (await respond(request_id, BOB), await jobs.cancel(request_id, BOB)):
        assert (reply.ok, reply.error, reply.response) == (False, "not_found", None)
        assert reply.message == f"no request {request_id}"
    still = await respond(request_id, ALICE)
    assert still.response is not None
    assert still.response.status is RequestStatus.IN_PROGRESS

    # An operator sees and cancels anyone's.
    seen = await respond(request_id, OPERATOR)
    assert seen.response is not None
    assert seen.response.request_id == request_id
    cancelled = await jobs.cancel(request_id, OPERATOR)
    assert cancelled.response is not None
    assert cancelled.response.status is RequestStatus.CANCELLED

    other = await jobs.start(start(url, ALICE))
    assert other.response is not None
    mine = await jobs.cancel(other.response.request_id, ALICE)
    assert mine.response is not None
    assert mine.response.status is RequestStatus.CANCELLED


async def test_every_failed_capture_tells_the_caller_the_same(
    jobs: CaptureJobs,
    respond: Respond,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A closed port, a port where something else answers, a name that does not resolve:
    nothing tells them apart but the service's log."""
    with RecordingListener(lambda _: b"SSH-2.0-OpenSSH_9.6\r\n") as other_service:
        urls = {
            "closed": f"rtsp://127.0.0.1:{free_port()}/cam",
            "open": f"rtsp://127.0.0.1:{other_service.port}/cam",
            "name": "rtsp://no-such-camera.invalid/cam",
        }
        replies = {
            name: await jobs.start(start(url, Caller(subject=name))) for name, url in urls.items()
        }
        ended = {}
        for name, reply in replies.items():
            assert reply.response is not None, reply
            ended[name] = await final(respond, reply.response.request_id)
    messages = {name: reply.response.message for name, reply in ended.items() if reply.response}
    assert messages == dict.fromkeys(urls, CAPTURE_FAILED)
    assert all(
        reply.response and reply.response.status is RequestStatus.FAILED for reply in ended.values()
    )
    logged = capsys.readouterr().out + caplog.text
    assert "Connection refused" in logged
    assert "Invalid data" in logged
    assert "does not resolve" in logged


async def test_a_destination_outside_the_allowlist_is_refused_at_admission(
    jobs: CaptureJobs, sessions: async_sessionmaker[AsyncSession]
) -> None:
    with RecordingListener() as listener:
        for url in (
            "rtsp://10.0.0.7/cam",
            "rtsp://[::1]:8554/cam",
            f"rtsp://127.0.0.2:{listener.port}/cam",
        ):
            reply = await jobs.start(start(url, ALICE))
            assert (reply.ok, reply.error, reply.message) == (False, URL_REFUSED, URL_NOT_ALLOWED)
        await asyncio.sleep(0.2)
        assert listener.received == []
    async with sessions() as session:
        count = select(func.count(store.IngestionRequest.id))
        assert (await session.execute(count)).scalar_one() == 0
