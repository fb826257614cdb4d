"""Ingestion end to end: clients → gateway → RabbitMQ → ingestion service → S3 and PostgreSQL,
with a real S3-protocol server (moto, its own process) and a real RTSP camera (GStreamer).

What a TrackShift user would notice: the seed's API shapes, uploads and captures that are real
jobs (202, then status and progress), hostile files refused with reasons and nothing stored,
captures that honour their duration and mode, survive a camera restart, stop at the stream caps
and on cancel, and a service crash that leaves neither a half-written request nor an orphan.
And what the penetration test tried: RTSP URLs that inject request lines or reach hosts they
may not, failures that tell an open port from a closed one, and one caller reading, cancelling
or crowding out another's requests.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import psycopg
import pytest
import websockets
from faststream.rabbit import RabbitBroker
from minio import Minio
from PIL import Image
from psycopg import sql

from edgeway.common.broker import publish
from edgeway.common.envelope import Envelope
from edgeway.common.schemas.ingest import (
    HEADER_CAMERA_ID,
    HEADER_FILE_ID,
    HEADER_FILE_NAME,
    HEADER_KIND,
    HEADER_REQUEST_ID,
    UPLOAD_FILE_TYPE,
    AcceptedFile,
    Caller,
    CreateUpload,
    FileKind,
    IngestReply,
)
from edgeway.common.testing import (
    POSTGRES_ADMIN_URL,
    bearer,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    make_token,
)
from edgeway.common.testing.listener import RecordingListener
from edgeway.common.testing.processes import free_port
from edgeway.common.testing.rtsp import RtspServer
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server
from edgeway.common.topology import Topology
from edgeway.ingestion.domain import CAPTURE_FAILED
from tests.stack import Stack

pytestmark = [pytest.mark.connected, pytest.mark.slow]

BUCKET = "e2e-frames"
MAX_FILE = 400_000
SERVICE_MAX_FILE = 350_000  # the service's own cap, below the gateway's here
MAX_FILES = 3
MAX_BODY = 2_000_000
STREAM_CAP = 3
PER_CALLER = 2
LEASE_S = 1.5
RTSP_USER, RTSP_PASSWORD = "operator", "s3cret-pa55"
FINAL = {"completed", "failed", "cancelled"}
WRITER = bearer("ingest:write", "ingest:read")
READER = bearer("ingest:read")
# Subjects: WRITER and READER are "test" (make_token's); ownership and caps tests use others.
WRITE_READ = ("ingest:write", "ingest:read")


OPERATOR = bearer(*WRITE_READ, "ingest:admin", subject="operator")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def camera() -> Iterator[RtspServer]:
    with RtspServer(user=RTSP_USER, password=RTSP_PASSWORD, fps=10) as server:
        yield server


@pytest.fixture(scope="module")
def stack(amqp_url: str, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    occupancy_db = create_postgres_database()
    ingestion_db = create_postgres_database("edgeway_ingestion")
    stack = Stack(
        amqp_url,
        occupancy_db,
        tmp_path_factory.mktemp("ingest-stack"),
        extra_env={
            "EDGEWAY_INGEST_MAX_FILE_BYTES": str(MAX_FILE),
            "EDGEWAY_INGEST_MAX_FILES": str(MAX_FILES),
            "EDGEWAY_INGEST_MAX_BODY_BYTES": str(MAX_BODY),
            "EDGEWAY_INGEST_MAX_PIXELS": "25000000",
        },
        ingestion_env={
            **s3.env,
            "EDGEWAY_INGESTION_DATABASE_URL": ingestion_db,
            "EDGEWAY_STORAGE_BUCKET": BUCKET,
            "EDGEWAY_MAX_FILE_BYTES": str(SERVICE_MAX_FILE),
            "EDGEWAY_MAX_CONCURRENT_STREAMS": str(STREAM_CAP),
            "EDGEWAY_MAX_STREAMS_PER_PRINCIPAL": str(PER_CALLER),
            # The test cameras and listeners are on loopback, closed by default.
            "EDGEWAY_RTSP_ALLOWED_DESTINATIONS": '["127.0.0.1"]',
            "EDGEWAY_JOB_LEASE_S": str(LEASE_S),
            "EDGEWAY_SWEEP_INTERVAL_S": "0.5",
            "EDGEWAY_ORPHAN_GRACE_S": "3",
            "EDGEWAY_BACKOFF_INITIAL_S": "0.3",
            "EDGEWAY_STALL_TIMEOUT_S": "2",
            "EDGEWAY_OPEN_TIMEOUT_S": "3",
            # Quick tries while the database is away: a delivery given up on after them would
            # burn the delivery limit in about a second (the outage test).
            "EDGEWAY_DB_RETRY_DELAYS": "[0.2]",
        },
    ).start()
    stack.ingestion_db = ingestion_db  # type: ignore[attr-defined]
    yield stack
    stack.stop()
    drop_postgres_database(ingestion_db)
    drop_postgres_database(occupancy_db)


@pytest.fixture(scope="module")
def bucket(s3: S3Server, stack: Stack) -> Minio:
    return Minio(s3.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)


# --- helpers --------------------------------------------------------------------------------


def jpeg(width: int = 320, height: int = 240, *, noise: bool = False, exif: bool = False) -> bytes:
    image = Image.effect_noise((width, height), 80).convert("RGB") if noise else None
    image = image or Image.new("RGB", (width, height), (30, 120, 200))
    out = io.BytesIO()
    if exif:
        tags = Image.Exif()
        tags[0x010F] = "SpyCam Inc."  # Make
        tags.get_ifd(0x8825)[2] = (51.0, 30.0, 0.0)  # GPSLatitude
        image.save(out, "JPEG", exif=tags.tobytes(), comment=b"secret comment")
    else:
        image.save(out, "JPEG")
    return out.getvalue()


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 200, 0, 128)).save(out, "PNG")
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, "GIF")
    return out.getvalue()


def png_bomb(side: int = 30_000) -> bytes:
    """A small PNG declaring side x side 1-bit pixels (~112 MB once inflated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    row = b"\x00" + bytes(side // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * 200, 9))  # the rest is "missing": never decoded
        + chunk(b"IEND", b"")
    )


def upload(
    stack: Stack,
    files: list[tuple[str, bytes]],
    *,
    camera_id: str = "cam-1",
    meta: dict[str, Any] | None = None,
    headers: dict[str, str] = WRITER,
) -> httpx.Response:
    return httpx.post(
        stack.gateway.url + "/api/v1/ingest/upload",
        data={"camera_id": camera_id, **({"meta": json.dumps(meta)} if meta else {})},
        files=[("files", (name, content, "image/jpeg")) for name, content in files],
        headers=headers,
        timeout=30,
    )


def status(stack: Stack, request_id: str, headers: dict[str, str] = READER) -> dict[str, Any]:
    response = httpx.get(
        stack.gateway.url + f"/api/v1/ingest/status/{request_id}", headers=headers, timeout=10
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_final(
    stack: Stack, request_id: str, timeout: float = 30, headers: dict[str, str] = READER
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = status(stack, request_id, headers)
        if body["status"] in FINAL or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def capture(
    stack: Stack, url: str, *, headers: dict[str, str] = WRITER, **fields: Any
) -> httpx.Response:
    return httpx.post(
        stack.gateway.url + "/api/v1/ingest/rtsp",
        json={"rtsp_url": url, "camera_id": "rtsp-cam", **fields},
        headers=headers,
        timeout=10,
    )


def cancel(stack: Stack, request_id: str, headers: dict[str, str] = WRITER) -> httpx.Response:
    return httpx.post(
        stack.gateway.url + f"/api/v1/ingest/rtsp/{request_id}/cancel",
        headers=headers,
        timeout=10,
    )


def database(stack: Stack, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.ingestion_db) as connection:  # type: ignore[attr-defined]
        return connection.execute(query, args).fetchall()


def objects(bucket: Minio, prefix: str = "") -> set[str]:
    return {
        item.object_name
        for item in bucket.list_objects(BUCKET, prefix=prefix, recursive=True)
        if item.object_name
    }


def counts(stack: Stack, bucket: Minio) -> tuple[int, int, int]:
    requests = database(stack, "SELECT count(*) FROM ingestion_requests")[0][0]
    frames = database(stack, "SELECT count(*) FROM frames")[0][0]
    return requests, frames, len(objects(bucket))


UPLOADS_EXCHANGE = "edgeway.ingest.uploads"
CSV = "t,ax,ay,az\n1,0.1,9.8,0.2\n2,0.1,9.7,0.3\n"


def frame_objects_exist(stack: Stack, bucket: Minio, request_id: str) -> bool:
    """Whether every frame row of the request names an object that is in the store."""
    keys = {
        key
        for (key,) in database(
            stack, "SELECT storage_path FROM frames WHERE request_id = %s", request_id
        )
    }
    missing = keys - objects(bucket, "frames/")
    assert not missing, f"frame rows whose object is gone: {missing}"
    return bool(keys)


async def file_messages_of(
    queue: aio_pika.abc.AbstractQueue, request_id: str, *, count: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The next `count` file messages of `request_id` on `queue` (others are skipped)."""
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + 10
    while len(found) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} file messages seen"
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
        elif (message.headers or {}).get("x-request-id") == request_id:
            found.append(message)
    return found


def again(message: aio_pika.abc.AbstractIncomingMessage) -> aio_pika.Message:
    """The same message as it would be delivered again: same body, id and headers."""
    return aio_pika.Message(
        message.body,
        headers=message.headers,
        content_type=message.content_type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def files_handled(stack: Stack) -> float:
    """Image files the ingestion service has finished with, whatever the outcome."""
    assert stack.ingestion is not None
    text = httpx.get(stack.ingestion.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith('edgeway_ingestion_files_total{kind="image"'):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_handled(stack: Stack, count: float, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while (seen := await asyncio.to_thread(files_handled, stack)) < count:
        assert time.monotonic() < deadline, f"{seen} files handled, waiting for {count}"
        await asyncio.sleep(0.1)


# --- uploads --------------------------------------------------------------------------------


async def test_an_upload_is_a_job_whose_frames_are_stored_reencoded_and_announced(
    stack: Stack, bucket: Minio, amqp_url: str
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        announcements = await channel.declare_queue(exclusive=True)
        await announcements.bind("edgeway.ingest.frames", routing_key="")

        original = jpeg(exif=True)
        response = await asyncio.to_thread(
            upload,
            stack,
            [("holiday.jpg", original), ("../../etc/passwd", png()), ("clip.gif", gif())],
            meta={"session": "s-1", "location": "pit lane", "exposure": 0.01},
        )
        assert response.status_code == 202, response.text
        accepted = response.json()
        request_id = accepted["request_id"]
        assert accepted["status"] == "in_progress"
        assert accepted["files_expected"] == 2
        assert accepted["status_url"] == f"/api/v1/ingest/status/{request_id}"
        assert [(item["filename"], item["code"]) for item in accepted["rejected"]] == [
            ("clip.gif", "wrong_type")
        ]

        # The progress socket: the status now, then events until the upload completes.
        ws_url = stack.ws(f"/ws/ingest/{request_id}", "ingest:read")
        async with websockets.connect(ws_url) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert first["type"] == "ingest_status"
            assert first["request_id"] == request_id
            seen = first["status"]
            while seen != "completed":
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event["request_id"] == request_id
                seen = event["status"]

        final = await asyncio.to_thread(status, stack, request_id)
        assert final["status"] == "completed"
        assert final["source_type"] == "upload"
        assert final["completed_at"] is not None
        frames = final["frames"]
        assert sorted(frame["format"] for frame in frames) == ["jpeg", "png"]
        today = datetime.now(UTC)
        for frame in frames:
            extension = "jpg" if frame["format"] == "jpeg" else "png"
            key = f"frames/{today:%Y/%m/%d}/cam-1/{frame['frame_id']}.{extension}"
            assert frame["storage_path"] == key
            # The presigned URL is made now and works.
            stored = await asyncio.to_thread(httpx.get, frame["storage_url"], timeout=10)
            assert stored.status_code == 200
            assert len(stored.content) == frame["size_bytes"]
            reread = Image.open(io.BytesIO(stored.content))
            assert (reread.width, reread.height) == (frame["width"], frame["height"])
            if frame["format"] == "jpeg":
                # Re-encoded from pixels: no EXIF (GPS, maker) and no comment survive.
                assert not reread.getexif()
                assert b"SpyCam" not in stored.content
                assert b"secret comment" not in stored.content
        assert {frame["storage_path"] for frame in frames} <= objects(bucket)
        stored_meta = database(
            stack, "SELECT meta_info, exposure FROM frames WHERE request_id = %s", request_id
        )
        assert {(row[0]["location"], row[1]) for row in stored_meta} == {("pit lane", 0.01)}

        announced = []
        for _ in frames:
            message = await announcements.get(timeout=5, fail=False)
            for _ in range(50):
                if message is not None:
                    break
                await asyncio.sleep(0.1)
                message = await announcements.get(timeout=5, fail=False)
            assert message is not None
            announced.append(json.loads(message.body))
        assert {item["frame_id"] for item in announced} == {f["frame_id"] for f in frames}
        assert all(item["storage_bucket"] == BUCKET for item in announced)


def test_hostile_uploads_are_refused_with_a_reason_and_nothing_is_stored(
    stack: Stack, bucket: Minio
) -> None:
    before = counts(stack, bucket)
    cases = {
        "too_large": [("big.jpg", jpeg(1200, 900, noise=True))],
        "wrong_type": [("photo.jpg", b"<html><script>alert(1)</script></html>")],
        "decompression_bomb": [("bomb.png", png_bomb())],
    }
    assert len(cases["too_large"][0][1]) > MAX_FILE
    for code, files in cases.items():
        response = upload(stack, files)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "no_file_accepted"
        assert [item["code"] for item in body["details"]["rejected"]] == [code]
        assert body["details"]["rejected"][0]["reason"]

    for camera_id in ("../etc", "a/b", "..", "cam\\x", "", "x" * 101):
        response = upload(stack, [("a.jpg", jpeg())], camera_id=camera_id)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_camera_id")

    over = httpx.post(
        stack.gateway.url + "/api/v1/ingest/upload",
        data={"camera_id": "cam-1"},
        files=[("files", ("huge.jpg", b"\xff\xd8\xff" + bytes(MAX_BODY), "image/jpeg"))],
        headers=WRITER,
        timeout=30,
    )
    assert (over.status_code, over.json()["error"]) == (413, "too_large")

    # A client that stops halfway through its body.
    boundary = "edgeway-truncated"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="camera_id"\r\n\r\ncam-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + jpeg()[:500]
    response = httpx.post(
        stack.gateway.url + "/api/v1/ingest/upload",
        content=head,
        headers={**WRITER, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=10,
    )
    assert (response.status_code, response.json()["message"]) == (400, "truncated multipart body")

    assert counts(stack, bucket) == before


def test_too_many_files_keeps_the_first_and_a_file_that_fails_to_decode_is_reported(
    stack: Stack, bucket: Minio
) -> None:
    truncated = jpeg(640, 480, noise=True)[:3000]  # a valid header, then nothing
    files = [
        ("ok-1.jpg", jpeg()),
        ("cut.jpg", truncated),
        ("ok-2.jpg", png()),
        ("late.jpg", jpeg()),
    ]
    response = upload(stack, files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["files_expected"] == MAX_FILES
    assert [(item["filename"], item["code"]) for item in body["rejected"]] == [
        ("late.jpg", "batch_limit")
    ]
    final = wait_final(stack, body["request_id"])
    assert final["status"] == "completed"
    assert len(final["frames"]) == 2
    refused = {item["filename"]: item["code"] for item in final["rejected"]}
    assert refused == {"late.jpg": "batch_limit", "cut.jpg": "corrupt"}
    # The refused file left no object behind.
    assert objects(bucket, f"frames/{datetime.now(UTC):%Y/%m/%d}/cam-1/") >= {
        frame["storage_path"] for frame in final["frames"]
    }
    rows = database(stack, "SELECT count(*) FROM frames WHERE request_id = %s", body["request_id"])
    assert rows == [(2,)]


def test_a_file_over_the_services_own_size_cap_fails_alone_with_its_reason(
    stack: Stack, bucket: Minio
) -> None:
    # The gateway lets it through (a gateway with a larger cap, or of another version).
    padded = jpeg() + bytes(SERVICE_MAX_FILE + 10_000 - len(jpeg()))
    assert SERVICE_MAX_FILE < len(padded) < MAX_FILE
    response = upload(stack, [("ok.jpg", jpeg()), ("big.jpg", padded)])
    assert response.status_code == 202, response.text
    assert response.json()["files_expected"] == 2
    final = wait_final(stack, response.json()["request_id"])
    assert final["status"] == "completed", final
    assert [frame["size_bytes"] < SERVICE_MAX_FILE for frame in final["frames"]] == [True]
    ((name, code, reason),) = [
        (item["filename"], item["code"], item["reason"]) for item in final["rejected"]
    ]
    assert (name, code) == ("big.jpg", "too_large")
    assert f"{len(padded)} bytes" in reason
    assert f"{SERVICE_MAX_FILE} bytes" in reason
    assert {frame["storage_path"] for frame in final["frames"]} <= objects(bucket)


def test_status_of_unknown_requests_and_scopes(stack: Stack) -> None:
    missing = httpx.get(
        stack.gateway.url + f"/api/v1/ingest/status/{uuid.uuid4()}", headers=READER, timeout=10
    )
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    garbage = httpx.get(stack.gateway.url + "/api/v1/ingest/status/../../x", headers=READER)
    assert garbage.status_code == 404
    refused = httpx.post(
        stack.gateway.url + "/api/v1/ingest/upload",
        files=[("files", ("a.jpg", jpeg(), "image/jpeg"))],
        data={"camera_id": "cam-1"},
        headers=READER,
    )
    assert refused.status_code == 403
    anonymous = httpx.get(stack.gateway.url + f"/api/v1/ingest/status/{uuid.uuid4()}")
    assert anonymous.status_code == 401


MANY = 5_000  # a one-hour capture at 30 fps is 108,000
PAGE = 100  # the status's default page of frames
MAX_PAGE = 1_000


def add_capture_with_frames(stack: Stack, request_id: str, count: int) -> list[str]:
    """A finished capture of `count` frames, written straight into the database (no objects:
    a status only presigns their keys). Three frames share each capture time."""
    now = datetime.now(UTC)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(stack.ingestion_db) as connection:  # type: ignore[attr-defined]
        connection.execute(
            "INSERT INTO ingestion_requests (id, camera_id, source_type, status, requester,"
            " capture_mode, frames_stored, files_rejected, created_at, updated_at, completed_at)"
            " VALUES (%s, 'many-cam', 'rtsp', 'completed', 'test', 'continuous', %s, 0,"
            " %s, %s, %s)",
            (request_id, count, now, now, now),
        )
        columns = (
            "id, request_id, camera_id, source_type, storage_path, storage_bucket, width,"
            " height, size_bytes, format, content_type, capture_timestamp, created_at"
        )
        with connection.cursor().copy(f"COPY frames ({columns}) FROM STDIN") as copy:
            for index, frame_id in enumerate(ids):
                copy.write_row(
                    (
                        frame_id,
                        request_id,
                        "many-cam",
                        "rtsp",
                        f"frames/{now:%Y/%m/%d}/many-cam/{frame_id}.jpg",
                        BUCKET,
                        320,
                        240,
                        10_000,
                        "jpeg",
                        "image/jpeg",
                        now + timedelta(milliseconds=index // 3),
                        now,
                    )
                )
    return ids


async def test_a_status_with_many_frames_comes_in_pages_that_a_cursor_walks(
    stack: Stack,
) -> None:
    request_id = str(uuid.uuid4())
    ids = await asyncio.to_thread(add_capture_with_frames, stack, request_id, MANY)
    url = stack.gateway.url + f"/api/v1/ingest/status/{request_id}"
    try:
        async with httpx.AsyncClient(headers=READER, timeout=30) as http:
            started = time.monotonic()
            first = await http.get(url)
            answered_in = time.monotonic() - started
            assert first.status_code == 200, first.text
            body = first.json()
            assert answered_in < 2.0, f"the first page took {answered_in:.2f} s"
            assert len(body["frames"]) == PAGE
            assert body["frames_total"] == MANY
            assert body["next_cursor"]
            assert all("X-Amz-Signature=" in frame["storage_url"] for frame in body["frames"])

            seen: list[dict[str, Any]] = []
            cursor: str | None = None
            pages = 0
            while True:
                params: dict[str, Any] = {"limit": MAX_PAGE}
                if cursor is not None:
                    params["cursor"] = cursor
                page = await http.get(url, params=params)
                assert page.status_code == 200, page.text
                answer = page.json()
                assert answer["frames_total"] == MANY
                assert len(answer["frames"]) <= MAX_PAGE
                seen.extend(answer["frames"])
                pages += 1
                cursor = answer["next_cursor"]
                if cursor is None:
                    break
            walked = [frame["frame_id"] for frame in seen]
            assert len(walked) == MANY  # every frame once...
            assert set(walked) == set(ids)  # ...and no other
            stamps = [datetime.fromisoformat(frame["timestamp"]) for frame in seen]
            assert stamps == sorted(stamps)  # in capture order, across pages
            assert pages == MANY // MAX_PAGE  # the last full page says there is no more

            # The first page of the default size, then the rest from its cursor.
            rest = await http.get(url, params={"cursor": body["next_cursor"], "limit": MAX_PAGE})
            assert [f["frame_id"] for f in rest.json()["frames"]] == walked[PAGE : PAGE + MAX_PAGE]

            for params in ({"limit": 0}, {"limit": MAX_PAGE + 1}, {"limit": "ten"}):
                refused = await http.get(url, params=params)
                assert (refused.status_code, refused.json()["error"]) == (400, "validation_error")
            for cursor in ("not-a-cursor", "x" * 2000):
                refused = await http.get(url, params={"cursor": cursor})
                assert refused.status_code == 400, refused.text

        # The progress socket's first message is the same bounded page.
        async with websockets.connect(stack.ws(f"/ws/ingest/{request_id}", "ingest:read")) as ws:
            status_now = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert status_now["type"] == "ingest_status"
        assert len(status_now["frames"]) == PAGE
        assert status_now["frames_total"] == MANY
        assert status_now["next_cursor"]
    finally:
        database(stack, "DELETE FROM frames WHERE request_id = %s RETURNING id", request_id)
        database(stack, "DELETE FROM ingestion_requests WHERE id = %s RETURNING id", request_id)


async def test_a_phone_csv_file_is_stored_through_the_ingestion_service(
    stack: Stack, bucket: Minio
) -> None:
    text = "t,ax,ay,az\n1,0.1,9.8,0.2\n2,0.1,9.7,0.3\n"
    url = stack.ws("/ws/phone", "video:publish", device="phone-7")
    async with websockets.connect(url) as ws:
        await ws.send(
            json.dumps({"type": "file_upload", "fileName": "../imu.csv", "fileContent": text})
        )
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert ack["type"] == "file_upload_ack"
    for _ in range(50):
        rows = database(
            stack,
            "SELECT storage_path, original_name, size_bytes FROM phone_files WHERE id = %s",
            ack["file_id"],
        )
        if rows:
            break
        await asyncio.sleep(0.1)
    key, name, size = rows[0]
    assert key == f"files/{datetime.now(UTC):%Y/%m/%d}/phone-7/{ack['file_id']}.csv"
    assert (name, size) == ("../imu.csv", len(text))
    response = bucket.get_object(BUCKET, key)
    assert response.read() == text.encode()
    response.close()


# --- RTSP captures --------------------------------------------------------------------------


def test_single_frame_capture(stack: Stack, camera: RtspServer) -> None:
    response = capture(stack, camera.url("moving"))
    assert response.status_code == 202, response.text
    started = response.json()
    assert (started["source_type"], started["capture_mode"]) == ("rtsp", "single_frame")
    final = wait_final(stack, started["request_id"])
    assert final["status"] == "completed", final
    assert len(final["frames"]) == 1
    assert (final["frames"][0]["width"], final["frames"][0]["height"]) == (320, 240)


def test_continuous_capture_honours_fps_and_a_duration_past_the_seeds_5_s_cut(
    stack: Stack, camera: RtspServer
) -> None:
    response = capture(
        stack, camera.url("moving"), capture_mode="continuous", fps=2, capture_duration=6
    )
    assert response.status_code == 202, response.text
    final = wait_final(stack, response.json()["request_id"])
    assert final["status"] == "completed", final
    stamps = [datetime.fromisoformat(frame["timestamp"]) for frame in final["frames"]]
    assert 11 <= len(stamps) <= 13  # 6 s at 2 fps
    span = (stamps[-1] - stamps[0]).total_seconds()
    assert 5.0 <= span <= 6.5, span
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    assert all(0.3 <= gap <= 0.8 for gap in gaps), gaps


def test_event_driven_keeps_only_frames_whose_scene_changed(
    stack: Stack, camera: RtspServer
) -> None:
    fields: dict[str, Any] = {"capture_mode": "event_driven", "fps": 4, "capture_duration": 3}
    static = capture(stack, camera.url("static"), **fields)
    moving = capture(stack, camera.url("moving"), **fields)
    assert (static.status_code, moving.status_code) == (202, 202)
    still = wait_final(stack, static.json()["request_id"])
    busy = wait_final(stack, moving.json()["request_id"])
    assert len(still["frames"]) == 1  # the first frame, then nothing changed
    assert len(busy["frames"]) >= 8  # nearly every examined frame (4 fps for 3 s)
    scores = database(
        stack,
        "SELECT change_score FROM frames WHERE request_id = %s AND change_score IS NOT NULL",
        moving.json()["request_id"],
    )
    assert scores
    assert all(score >= 0.08 for (score,) in scores)


def test_rtsp_credentials_are_masked_and_sealed_at_rest(stack: Stack, camera: RtspServer) -> None:
    response = capture(stack, camera.url("static"))
    request_id = response.json()["request_id"]
    wait_final(stack, request_id)
    ((masked, sealed),) = database(
        stack, "SELECT rtsp_url, rtsp_url_sealed FROM ingestion_requests WHERE id = %s", request_id
    )
    assert masked == f"rtsp://***@127.0.0.1:{camera.port}/static"
    assert RTSP_PASSWORD not in sealed
    assert RTSP_USER not in sealed
    for log in (stack.gateway.log_text(), stack.ingestion.log_text()):  # type: ignore[union-attr]
        assert RTSP_PASSWORD not in log

    wrong = capture(stack, camera.url("static").replace(RTSP_PASSWORD, "wrong"))
    failed = wait_final(stack, wrong.json()["request_id"])
    assert failed["status"] == "failed"
    # The caller is told the capture failed; the service's log says why.
    assert failed["message"] == CAPTURE_FAILED
    assert "401" in stack.ingestion.log_text()  # type: ignore[union-attr]
    assert "wrong" not in stack.ingestion.log_text()  # type: ignore[union-attr]


def test_invalid_capture_requests_get_400_with_a_reason(stack: Stack) -> None:
    cases = [
        {"rtsp_url": "http://example/x", "camera_id": "c"},
        {"rtsp_url": "rtsp://h/x", "camera_id": "../c"},
        {"rtsp_url": "rtsp://h/x", "camera_id": "c", "fps": 31},
        {"rtsp_url": "rtsp://h/x", "camera_id": "c", "capture_duration": 3601},
        {"rtsp_url": "rtsp://h/x", "camera_id": "c", "capture_mode": "forever"},
    ]
    for body in cases:
        response = httpx.post(
            stack.gateway.url + "/api/v1/ingest/rtsp", json=body, headers=WRITER, timeout=10
        )
        assert (response.status_code, response.json()["error"]) == (400, "validation_error")
        assert response.json()["message"]


def test_a_camera_that_restarts_is_reconnected_and_the_capture_ends_on_time(
    stack: Stack,
) -> None:
    with RtspServer(user=RTSP_USER, password=RTSP_PASSWORD) as flaky:
        response = capture(
            stack, flaky.url("moving"), capture_mode="continuous", fps=2, capture_duration=8
        )
        request_id = response.json()["request_id"]
        time.sleep(2.5)
        flaky.kill()
        down_at = datetime.now(UTC)
        time.sleep(1.0)
        flaky.restart()
        final = wait_final(stack, request_id)
    assert final["status"] == "completed", final
    stamps = [datetime.fromisoformat(frame["timestamp"]) for frame in final["frames"]]
    assert any(stamp < down_at for stamp in stamps)
    assert any(stamp > down_at for stamp in stamps)  # frames again after the restart
    created = datetime.fromisoformat(final["created_at"])
    assert (datetime.fromisoformat(final["completed_at"]) - created).total_seconds() < 14


LONG = {"capture_mode": "continuous", "fps": 1, "capture_duration": 120}


def test_the_stream_cap_refuses_with_a_reason_and_cancel_frees_a_slot(
    stack: Stack, camera: RtspServer
) -> None:
    # One caller each: the per-caller cap is not what this fills.
    callers = [
        bearer(*WRITE_READ, subject=f"camera-operator-{index}") for index in range(STREAM_CAP)
    ]
    running = [capture(stack, camera.url("static"), headers=headers, **LONG) for headers in callers]
    assert [response.status_code for response in running] == [202] * STREAM_CAP
    over = capture(
        stack, camera.url("static"), headers=bearer(*WRITE_READ, subject="latecomer"), **LONG
    )
    assert over.status_code == 429
    assert over.json()["error"] == "stream_limit"
    assert f"limit is {STREAM_CAP}" in over.json()["message"]

    started = time.monotonic()
    ids = [response.json()["request_id"] for response in running]
    cancelled = cancel(stack, ids[0], callers[0])
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    again = capture(stack, camera.url("static"), headers=callers[0], **LONG)
    assert again.status_code == 202, again.text
    ids.append(again.json()["request_id"])
    for request_id, headers in zip(ids[1:], [*callers[1:], callers[0]], strict=True):
        cancel(stack, request_id, headers)
    # The captures really stopped: no frame is added after the cancellation settles.
    time.sleep(1.5)
    stopped = [status(stack, request_id, OPERATOR) for request_id in ids]
    assert [s["status"] for s in stopped] == ["cancelled"] * len(ids)
    frames = [len(s["frames"]) for s in stopped]
    time.sleep(1.5)
    assert [len(status(stack, request_id, OPERATOR)["frames"]) for request_id in ids] == frames
    assert time.monotonic() - started < 10


def test_one_caller_cannot_take_every_stream(stack: Stack, camera: RtspServer) -> None:
    greedy, other = bearer(*WRITE_READ, subject="greedy"), bearer(*WRITE_READ, subject="patient")
    mine = [capture(stack, camera.url("static"), headers=greedy, **LONG) for _ in range(PER_CALLER)]
    assert [response.status_code for response in mine] == [202] * PER_CALLER
    refused = capture(stack, camera.url("static"), headers=greedy, **LONG)
    assert refused.status_code == 429
    assert refused.json()["error"] == "stream_limit"
    assert f"the limit per caller is {PER_CALLER}" in refused.json()["message"]
    theirs = capture(stack, camera.url("static"), headers=other, **LONG)
    assert theirs.status_code == 202, theirs.text  # below the global cap, still room
    for response, headers in [*((r, greedy) for r in mine), (theirs, other)]:
        assert cancel(stack, response.json()["request_id"], headers).status_code == 200


# --- what the penetration test tried -------------------------------------------------------


def test_a_url_that_writes_its_own_rtsp_lines_is_refused_and_reaches_nothing(stack: Stack) -> None:
    with RecordingListener() as listener:
        url = f"rtsp://127.0.0.1:{listener.port}/cam"
        for injected in ("\r\nSET x y\r\nX:", "\nSET_PARAMETER x", "\rx", "\tx", " x"):
            response = capture(stack, url + injected)
            assert response.status_code == 422, response.text
            body = response.json()
            assert body["error"] == "url_refused"
            assert "rtsp_url contains" in body["message"]
            assert "percent-encoded" in body["message"]
        time.sleep(1.5)
        assert listener.received == []
        # Written safely, the same host and port is reached: the listener was there to hear.
        safe = capture(stack, url)
        assert safe.status_code == 202, safe.text
        (request,) = listener.wait_for(1)
        assert request.startswith(b"OPTIONS rtsp://")
        assert b"SET" not in request
        cancel(stack, safe.json()["request_id"])


def test_a_destination_outside_the_allowlist_is_refused_before_any_connection(
    stack: Stack,
) -> None:
    # The stack allows 127.0.0.1 only: the metadata address, private and IPv6 loopback are not.
    for url in ("rtsp://169.254.169.254:80/latest", "rtsp://10.0.0.7/cam", "rtsp://[::1]/cam"):
        response = capture(stack, url)
        assert (response.status_code, response.json()["error"]) == (422, "url_refused"), url
        assert "may not connect" in response.json()["message"]


def test_a_failed_capture_says_the_same_whether_the_port_was_open_or_closed(
    stack: Stack,
) -> None:
    with RecordingListener(lambda _: b"SSH-2.0-OpenSSH_9.6\r\n") as other_service:
        closed = capture(stack, f"rtsp://127.0.0.1:{free_port()}/cam")
        opened = capture(stack, f"rtsp://127.0.0.1:{other_service.port}/cam")
        ended = [wait_final(stack, response.json()["request_id"]) for response in (closed, opened)]
    assert [body["status"] for body in ended] == ["failed", "failed"]
    assert [body["message"] for body in ended] == [CAPTURE_FAILED, CAPTURE_FAILED]
    log = stack.ingestion.log_text()  # type: ignore[union-attr]
    assert "Connection refused" in log
    assert "Invalid data found" in log


def test_another_callers_requests_do_not_exist_for_it_but_an_operator_sees_them(
    stack: Stack, camera: RtspServer
) -> None:
    alice, bob = bearer(*WRITE_READ, subject="alice"), bearer(*WRITE_READ, subject="bob")
    uploaded = upload(stack, [("a.jpg", jpeg())], headers=alice)
    started = capture(stack, camera.url("static"), headers=alice, **LONG)
    assert (uploaded.status_code, started.status_code) == (202, 202)
    ids = [uploaded.json()["request_id"], started.json()["request_id"]]
    capture_id = ids[1]

    # To bob they answer exactly as ids that were never used.
    for request_id in [*ids, str(uuid.uuid4())]:
        seen = httpx.get(
            stack.gateway.url + f"/api/v1/ingest/status/{request_id}", headers=bob, timeout=10
        )
        assert seen.status_code == 404
        assert (seen.json()["error"], seen.json()["message"]) == (
            "not_found",
            f"no request {request_id}",
        )
    refused = cancel(stack, capture_id, bob)
    assert (refused.status_code, refused.json()["error"]) == (404, "not_found")
    assert status(stack, capture_id, alice)["status"] == "in_progress"  # bob stopped nothing

    # An operator reads and cancels anyone's.
    assert {status(stack, request_id, OPERATOR)["request_id"] for request_id in ids} == set(ids)
    stopped = cancel(stack, capture_id, OPERATOR)
    assert (stopped.status_code, stopped.json()["status"]) == (200, "cancelled")
    assert status(stack, capture_id, alice)["status"] == "cancelled"


async def test_the_progress_socket_of_another_callers_request_tells_nothing(
    stack: Stack,
) -> None:
    response = await asyncio.to_thread(
        upload, stack, [("a.jpg", jpeg())], headers=bearer(*WRITE_READ, subject="alice")
    )
    request_id = response.json()["request_id"]
    base = stack.gateway.url.replace("http", "ws") + f"/ws/ingest/{request_id}?token="

    async with websockets.connect(base + make_token("ingest:read", subject="bob")) as ws:
        refused = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert (refused["type"], refused["code"]) == ("error", "not_found")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)  # closed: no event of alice's request follows
    assert ws.close_code == 1008

    for subject, scopes in (("alice", ["ingest:read"]), ("ops", ["ingest:read", "ingest:admin"])):
        async with websockets.connect(base + make_token(*scopes, subject=subject)) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert (first["type"], first["request_id"]) == ("ingest_status", request_id)


def test_a_crash_mid_capture_leaves_no_half_written_request_and_no_orphan(
    stack: Stack, camera: RtspServer, bucket: Minio
) -> None:
    assert stack.ingestion is not None
    response = capture(
        stack, camera.url("moving"), capture_mode="continuous", fps=5, capture_duration=60
    )
    request_id = response.json()["request_id"]
    time.sleep(2.5)
    stack.ingestion.kill()  # SIGKILL: no shutdown, no cleanup, the lease just stops
    # An object whose row never came (a crash between put and commit).
    orphan = f"frames/{datetime.now(UTC):%Y/%m/%d}/rtsp-cam/{uuid.uuid4()}.jpg"
    bucket.put_object(BUCKET, orphan, io.BytesIO(b"x"), 1, content_type="image/jpeg")
    stack.ingestion.start()

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        final = status(stack, request_id)
        if final["status"] in FINAL and orphan not in objects(bucket):
            break
        time.sleep(0.3)
    assert final["status"] == "failed"
    assert "stopped" in final["message"]
    assert final["frames"], "frames stored before the crash are kept"
    keys = {key for (key,) in database(stack, "SELECT storage_path FROM frames")}
    stored = objects(bucket, "frames/")
    assert keys <= stored, "every row's object exists"
    assert stored <= keys, f"orphans left: {stored - keys}"
    active = database(
        stack, "SELECT count(*) FROM ingestion_requests WHERE status IN ('pending', 'in_progress')"
    )
    assert active == [(0,)]


async def test_a_crash_while_files_are_stored_loses_and_duplicates_nothing(
    stack: Stack, bucket: Minio, amqp_url: str
) -> None:
    assert stack.ingestion is not None
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        # A copy of each file message the gateway publishes: what RabbitMQ delivers again
        # when the service dies between a file's commit and its ack.
        copies = await channel.declare_queue(exclusive=True)
        await copies.bind(UPLOADS_EXCHANGE, routing_key="")
        files = [(f"{i}.jpg", jpeg(800, 600, noise=True)) for i in range(3)]
        response = await asyncio.to_thread(upload, stack, files)
        assert response.status_code == 202, response.text
        request_id = response.json()["request_id"]
        # Killed while the files are being checked and stored: whatever was not acked comes back.
        stack.ingestion.kill()
        await asyncio.to_thread(stack.ingestion.start)
        final = await asyncio.to_thread(wait_final, stack, request_id)
        assert final["status"] == "completed", final
        assert len(final["frames"]) == 3
        assert len({frame["storage_path"] for frame in final["frames"]}) == 3
        assert database(stack, "SELECT count(*) FROM frames WHERE request_id = %s", request_id) == [
            (3,)
        ]
        assert frame_objects_exist(stack, bucket, request_id)

        # The crash came after the commits but before the acks: each file is delivered again
        # to a request that is complete. Its frame row stays, and so does the object it names.
        redelivered = await file_messages_of(copies, request_id, count=3)
        await copies.unbind(UPLOADS_EXCHANGE, routing_key="")
        handled = files_handled(stack)
        exchange = await channel.get_exchange(UPLOADS_EXCHANGE)
        for message in redelivered:
            await exchange.publish(again(message), routing_key="")
        await wait_handled(stack, handled + 3)
    assert frame_objects_exist(stack, bucket, request_id)
    assert database(stack, "SELECT count(*) FROM frames WHERE request_id = %s", request_id) == [
        (3,)
    ]
    assert status(stack, request_id)["status"] == "completed"


def ingestion_database_connections(stack: Stack, *, allowed: bool) -> None:
    """Open or close the ingestion database to new connections; closing ends the open ones."""
    name = stack.ingestion_db.rsplit("/", 1)[1]  # type: ignore[attr-defined]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("true" if allowed else "false")
            )
        )
        if not allowed:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


async def dead_lettered(channel: aio_pika.abc.AbstractChannel, request_id: str, device: str) -> int:
    """Dead letters of this request's files or this device's files (the queue is drained: the
    declare-ok's count of a quorum queue is not to be trusted on RabbitMQ 3.10)."""
    queue = await channel.declare_queue(f"{UPLOADS_EXCHANGE}.dead", passive=True)
    found = 0
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        headers = message.headers or {}
        if headers.get("x-request-id") == request_id or headers.get("x-device") == device:
            found += 1
    return found


async def test_a_database_outage_longer_than_the_delivery_limit_loses_no_file(
    stack: Stack, bucket: Minio, amqp_url: str
) -> None:
    assert stack.ingestion is not None
    topology = Topology()
    broker = RabbitBroker(amqp_url)
    await broker.start()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        # The gateway's side: the upload is opened while the database is there...
        request_id = str(uuid.uuid4())
        files = {str(uuid.uuid4()): (f"{name}.jpg", jpeg(noise=True)) for name in ("a", "b", "c")}
        opened = CreateUpload(
            request_id=request_id,
            caller=Caller(subject="test"),
            camera_id="outage-cam",
            files=[
                AcceptedFile(file_id=file_id, filename=name, size_bytes=len(data))
                for file_id, (name, data) in files.items()
            ],
        )
        reply = await broker.request(
            opened.model_dump_json().encode(),
            queue=topology.ingest_requests_queue.name,
            timeout=10,
        )
        assert IngestReply.model_validate_json(reply.body).ok

        ingestion_database_connections(stack, allowed=False)
        try:
            # ...and its files are published once it has gone.
            for file_id, (name, data) in files.items():
                envelope = Envelope(
                    type=UPLOAD_FILE_TYPE,
                    producer="uploader/e2e",
                    content_type="image/jpeg",
                    headers={
                        HEADER_KIND: FileKind.IMAGE.value,
                        HEADER_FILE_ID: file_id,
                        HEADER_FILE_NAME: name,
                        HEADER_REQUEST_ID: request_id,
                        HEADER_CAMERA_ID: "outage-cam",
                    },
                )
                await publish(
                    broker, data, envelope=envelope, exchange=topology.ingest_uploads, durable=True
                )
            # A phone's CSV file through the gateway, during the outage too.
            phone = stack.ws("/ws/phone", "video:publish", device="phone-outage")
            async with websockets.connect(phone) as ws:
                await ws.send(
                    json.dumps({"type": "file_upload", "fileName": "imu.csv", "fileContent": CSV})
                )
                ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert ack["type"] == "file_upload_ack", ack
            # Far longer than the delivery limit lasts when each delivery gives up after its
            # quick tries (0.2 s here): before, every file was dead-lettered within a second.
            await asyncio.sleep(8)
            assert await dead_lettered(channel, request_id, "phone-outage") == 0
            async with httpx.AsyncClient() as http:
                readiness = await http.get(stack.ingestion.url + "/readyz", timeout=10)
            assert readiness.status_code == 503
            assert "database" in readiness.json()["failures"]
        finally:
            ingestion_database_connections(stack, allowed=True)

        final = await asyncio.to_thread(wait_final, stack, request_id)
        assert final["status"] == "completed", final
        assert sorted(frame["frame_id"] for frame in final["frames"]) == sorted(files)
        assert frame_objects_exist(stack, bucket, request_id)
        for _ in range(100):
            rows = database(stack, "SELECT id FROM phone_files WHERE id = %s", ack["file_id"])
            if rows:
                break
            await asyncio.sleep(0.1)
        assert rows == [(ack["file_id"],)]
        assert await dead_lettered(channel, request_id, "phone-outage") == 0
        async with httpx.AsyncClient() as http:
            ready = await http.get(stack.ingestion.url + "/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    finally:
        await connection.close()
        await broker.stop()


def test_the_embedded_defaults_store_frames_in_a_local_directory(tmp_path: Path) -> None:
    """`make run`'s profile: SQLite and a local object directory, no S3 server; the frames'
    URLs are the ingestion service's own, signed and expiring."""
    # A virtual host of its own: the module's stack (another ingestion service) still runs.
    vhost, amqp_url = create_vhost()
    occupancy_db = create_postgres_database()
    stack = Stack(amqp_url, occupancy_db, tmp_path, ingestion_env={}).start()
    try:
        response = upload(stack, [("local.jpg", jpeg())], camera_id="local-cam")
        assert response.status_code == 202, response.text
        final = wait_final(stack, response.json()["request_id"])
        assert final["status"] == "completed", final
        (frame,) = final["frames"]
        served = httpx.get(frame["storage_url"], timeout=10)
        tampered = httpx.get(frame["storage_url"].replace("expires=", "expires=9"), timeout=10)
    finally:
        stack.stop()
        drop_postgres_database(occupancy_db)
        drop_vhost(vhost)
    stored = tmp_path / "objects" / "trackshift-frames" / frame["storage_path"]
    assert Image.open(stored).size == (320, 240)
    assert frame["storage_url"].startswith(stack.ingestion.url + "/objects?")
    assert (served.status_code, served.headers["content-type"]) == (200, "image/jpeg")
    assert served.content == stored.read_bytes()
    assert tampered.status_code == 403
    assert (tmp_path / "ingestion.sqlite3").exists()
