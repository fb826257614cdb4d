"""Object storage: the same behaviour from the local directory store and from a real S3 server
(moto's, spoken to by the `minio` client as MinIO would be), the local store's signed URLs and
the route that serves them."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import urllib3
from minio import Minio

from edgeway.common.objects import (
    LocalStore,
    LocalUrls,
    ObjectStore,
    ObjectStoreSettings,
    S3Store,
    local_objects,
    make_store,
)
from edgeway.common.testing import free_port
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server

JPEG = "image/jpeg"
DAY = "frames/2025/11/21/"
# Clocks of the test and the store (a file's mtime, the S3 server's Last-Modified, which has
# whole seconds) may differ by this much.
CLOCK_SLACK = timedelta(seconds=2)


def settings_for(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, env: dict[str, str]
) -> ObjectStoreSettings:
    """Settings as a service reads them: from its environment variables."""
    monkeypatch.setenv("EDGEWAY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("EDGEWAY_STORAGE_BUCKET", f"frames-{uuid.uuid4().hex[:12]}")
    monkeypatch.delenv("EDGEWAY_STORAGE_ENDPOINT", raising=False)
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", "development")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ObjectStoreSettings()


@pytest.fixture(params=["local", "s3"])
async def objects(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> ObjectStore:
    """An empty store with its bucket made: a directory, or a fresh bucket on the S3 server."""
    env = {} if request.param == "local" else request.getfixturevalue("s3_server").env
    store = make_store(settings_for(monkeypatch, tmp_path, env))
    await store.ensure_bucket()
    return store


def files_under(root: Path) -> list[str]:
    return [path.name for path in root.rglob("*") if path.is_file()]


async def put(objects: ObjectStore, key: str, data: bytes) -> None:
    await objects.put(key, data, content_type=JPEG, metadata={"camera_id": "cam-1"})


# --- the same behaviour from both ---------------------------------------------------------------


def test_the_settings_pick_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    local = make_store(settings_for(monkeypatch, tmp_path, {}))
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path / "objects" / local.bucket
    assert local.urls_signer is None
    elsewhere = make_store(settings_for(monkeypatch, tmp_path, {}), root=tmp_path / "videos")
    assert isinstance(elsewhere, LocalStore)
    assert elsewhere.root == tmp_path / "videos" / elsewhere.bucket
    remote = make_store(
        settings_for(monkeypatch, tmp_path, {"EDGEWAY_STORAGE_ENDPOINT": "s3:9000"})
    )
    assert isinstance(remote, S3Store)


async def test_making_the_bucket_twice_is_fine(objects: ObjectStore) -> None:
    await objects.ensure_bucket()
    await put(objects, f"{DAY}cam-1/a.jpg", b"kept")
    await objects.ensure_bucket()
    assert await objects.get(f"{DAY}cam-1/a.jpg") == b"kept"


async def test_an_object_is_put_read_and_deleted(objects: ObjectStore) -> None:
    key = f"{DAY}cam-1/{uuid.uuid4()}.jpg"
    assert not await objects.exists(key)
    await put(objects, key, b"\xff\xd8 first")
    assert await objects.exists(key)
    assert await objects.get(key) == b"\xff\xd8 first"
    # A redelivered file has the same key: the second put replaces the first.
    await put(objects, key, b"\xff\xd8 second")
    assert await objects.get(key) == b"\xff\xd8 second"
    await objects.delete(key)
    assert not await objects.exists(key)
    await objects.delete(key)  # gone already: not an error
    await objects.delete(f"{DAY}cam-1/never-there.jpg")


async def test_puts_of_many_objects_at_once_all_land(objects: ObjectStore) -> None:
    keys = [f"{DAY}cam-{n % 3}/{n}.jpg" for n in range(24)]
    await asyncio.gather(*(put(objects, key, key.encode()) for key in keys))
    assert sorted(item.key for item in await objects.list(DAY)) == sorted(keys)
    assert [await objects.get(key) for key in keys] == [key.encode() for key in keys]


async def test_listing_returns_only_the_prefix_with_its_time(objects: ObjectStore) -> None:
    before = datetime.now(UTC)
    wanted = [f"{DAY}cam-a/1.jpg", f"{DAY}cam-b/deeper/2.jpg"]
    for key in [*wanted, "frames/2025/11/22/cam-a/3.jpg", "files/2025/11/21/phone/4.csv"]:
        await put(objects, key, b"x")
    after = datetime.now(UTC)

    listed = await objects.list(DAY)
    assert sorted(item.key for item in listed) == wanted
    for item in listed:
        assert item.last_modified.tzinfo is not None
        assert before - CLOCK_SLACK <= item.last_modified <= after + CLOCK_SLACK
    # A prefix that ends mid-name matches like S3's.
    assert sorted(item.key for item in await objects.list("frames/2025/11/2")) == [
        *wanted,
        "frames/2025/11/22/cam-a/3.jpg",
    ]
    assert [item.key for item in await objects.list("frames/2025/11/21/cam-a")] == [wanted[0]]
    assert await objects.list("frames/2024/") == []


# --- S3 only --------------------------------------------------------------------------------------


@pytest.fixture
async def s3_objects(s3_server: S3Server) -> S3Store:
    """A fresh bucket on the S3 server, made through the store."""
    client = Minio(
        s3_server.endpoint,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        secure=False,
        region="us-east-1",
    )
    objects = S3Store(client, f"frames-{uuid.uuid4().hex[:12]}")
    assert not client.bucket_exists(objects.bucket)
    await objects.ensure_bucket()
    return objects


async def test_an_s3_url_is_presigned_and_serves_the_object(s3_objects: S3Store) -> None:
    key = f"{DAY}cam-1/{uuid.uuid4()}.jpg"
    await put(s3_objects, key, b"\xff\xd8 frame bytes")
    url = s3_objects.url(key, expires=timedelta(hours=1))
    assert url is not None
    assert "X-Amz-Signature=" in url
    assert "X-Amz-Expires=3600" in url
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        assert response.status_code == 200
        assert response.content == b"\xff\xd8 frame bytes"
        assert response.headers["content-type"] == JPEG
        # Without the signature the object is not public.
        assert (await client.get(url.split("?")[0])).status_code == 403


async def test_s3_urls_are_presigned_in_the_stores_threads_not_on_the_event_loop(
    s3_objects: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"{DAY}cam-1/{uuid.uuid4()}.jpg" for _ in range(3)]
    for key in keys:
        await put(s3_objects, key, key.encode())
    signing_threads: set[str] = set()
    presign = s3_objects.client.presigned_get_object

    def recorded(*args: Any, **kwargs: Any) -> str:
        signing_threads.add(threading.current_thread().name)
        return presign(*args, **kwargs)

    monkeypatch.setattr(s3_objects.client, "presigned_get_object", recorded)
    urls = await s3_objects.urls(keys, expires=timedelta(minutes=5))
    assert signing_threads
    assert threading.current_thread().name not in signing_threads
    assert all(name.startswith("edgeway-s3") for name in signing_threads)
    async with httpx.AsyncClient() as client:
        for key, url in zip(keys, urls, strict=True):
            assert url is not None
            assert (await client.get(url)).content == key.encode()
    assert await s3_objects.urls([], expires=timedelta(minutes=5)) == []


async def test_an_s3_object_keeps_its_content_type_and_metadata(s3_objects: S3Store) -> None:
    assert s3_objects.client.bucket_exists(s3_objects.bucket)
    await put(s3_objects, f"{DAY}cam-1/a.jpg", b"x")
    stat = s3_objects.client.stat_object(s3_objects.bucket, f"{DAY}cam-1/a.jpg")
    assert stat.content_type == JPEG
    assert stat.metadata is not None
    assert stat.metadata["x-amz-meta-camera_id"] == "cam-1"


# --- the local store ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escape.jpg", "frames/../../escape.jpg", "/etc/passwd"])
async def test_the_local_store_refuses_a_key_leaving_its_root(tmp_path: Path, key: str) -> None:
    objects = LocalStore(tmp_path / "objects", "frames")
    await objects.ensure_bucket()
    with pytest.raises(ValueError, match="leaves the store"):
        await put(objects, key, b"x")
    with pytest.raises(ValueError, match="leaves the store"):
        await objects.get(key)
    with pytest.raises(ValueError, match="leaves the store"):
        await objects.delete(key)
    assert files_under(tmp_path) == []


async def test_the_local_store_has_no_url_without_a_signer(tmp_path: Path) -> None:
    # Nothing serves its files: the status shows no URL rather than a dead one.
    objects = LocalStore(tmp_path, "frames")
    assert objects.url(f"{DAY}cam-1/a.jpg", expires=timedelta(hours=1)) is None
    keys = [f"{DAY}cam-1/a.jpg", f"{DAY}cam-1/b.jpg"]
    assert list(await objects.urls(keys, expires=timedelta(hours=1))) == [None, None]


def test_a_local_url_is_signed_for_its_key_and_expires() -> None:
    now = [1_800_000_000.0]
    urls = LocalUrls("http://127.0.0.1:8084/", b"k" * 32, clock=lambda: now[0])
    url = urls.sign("frames", f"{DAY}cam-1/a.jpg", expires=timedelta(hours=1))
    assert url.startswith("http://127.0.0.1:8084/objects?key=")
    parts = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
    assert parts["key"] == f"{DAY}cam-1/a.jpg"
    assert parts["expires"] == "1800003600"
    assert urls.refusal("frames", parts["key"], parts["expires"], parts["signature"]) is None
    # Another key, a longer life, another bucket or another secret: refused.
    assert urls.refusal("frames", f"{DAY}cam-1/b.jpg", parts["expires"], parts["signature"])
    assert urls.refusal("frames", parts["key"], "1800007200", parts["signature"])
    assert urls.refusal("other", parts["key"], parts["expires"], parts["signature"])
    stranger = LocalUrls("http://127.0.0.1:8084", b"x" * 32, clock=lambda: now[0])
    assert stranger.refusal("frames", parts["key"], parts["expires"], parts["signature"])
    assert urls.refusal("frames", parts["key"], "soon", parts["signature"]) == (
        "expires must be a Unix time"
    )
    now[0] += 3601
    reason = urls.refusal("frames", parts["key"], parts["expires"], parts["signature"])
    assert reason is not None
    assert "expired" in reason


async def test_the_local_store_signs_urls_for_its_own_keys_only(tmp_path: Path) -> None:
    objects = LocalStore(tmp_path, "frames", urls=LocalUrls("http://h:1", b"k" * 32))
    keys = [f"{DAY}cam-1/a.jpg", f"{DAY}cam-1/b.jpg"]
    signed = list(await objects.urls(keys, expires=timedelta(hours=1)))
    assert all(url is not None and url.startswith("http://h:1/objects?") for url in signed)
    with pytest.raises(ValueError, match="leaves the store"):
        objects.url("../escape.jpg", expires=timedelta(hours=1))


async def test_the_local_store_lists_no_half_written_file(tmp_path: Path) -> None:
    objects = LocalStore(tmp_path, "frames")
    await put(objects, f"{DAY}cam-1/a.jpg", b"whole")
    # What a put leaves when the process dies before its rename.
    (objects.root / DAY / "cam-1" / ".put-k2j3h4").write_bytes(b"half")
    assert [item.key for item in await objects.list(DAY)] == [f"{DAY}cam-1/a.jpg"]


def impatient_client(endpoint: str, access_key: str, secret_key: str) -> Minio:
    """A client that does not retry by itself (urllib3), so only the store's retries count."""
    http = urllib3.PoolManager(retries=urllib3.Retry(total=0), timeout=2)
    return Minio(
        endpoint, access_key=access_key, secret_key=secret_key, secure=False, http_client=http
    )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def test_a_put_waits_out_a_storage_server_that_is_down(s3_server: S3Server) -> None:
    """The storage is unreachable when the put starts and back a moment later: the put lands.

    The store talks to a port where nothing listens yet; then a plain TCP forwarder to the real
    S3 server opens there (the bucket already exists, so the first put that connects succeeds).
    """
    bucket = f"retried-{uuid.uuid4().hex[:8]}"
    direct = Minio(s3_server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
    direct.make_bucket(bucket)
    port = free_port()
    store = S3Store(
        impatient_client(f"127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY),
        bucket,
        retry_delays=(0.3, 0.5, 1.0, 2.0, 4.0),
    )
    put_task = asyncio.create_task(
        store.put("frames/a.jpg", b"payload", content_type="image/jpeg", metadata={})
    )
    await asyncio.sleep(0.6)  # the first tries fail: connection refused
    assert not put_task.done()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", s3_server.port
        )
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    forwarder = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        await asyncio.wait_for(put_task, 15)
    finally:
        forwarder.close()
    response = direct.get_object(bucket, "frames/a.jpg")
    assert response.read() == b"payload"
    response.close()


async def test_a_put_gives_up_when_the_storage_stays_down() -> None:
    store = S3Store(
        impatient_client(f"127.0.0.1:{free_port()}", "a", "b"), "nowhere", retry_delays=(0.2, 0.2)
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        await store.put("k", b"x", content_type="text/plain", metadata={})
    assert asyncio.get_running_loop().time() - started >= 0.4


# --- the local store's route ------------------------------------------------------------------


SERVED_KEY = "frames/2026/12/06/cam-1/a.jpg"


async def test_objects_are_served_at_signed_urls_and_refusals_are_the_error_object(
    tmp_path: Path,
) -> None:
    urls = LocalUrls("http://ingestion", b"k" * 32)
    objects = LocalStore(tmp_path, "frames", urls=urls)
    await objects.put(SERVED_KEY, b"\xff\xd8jpeg", content_type="image/jpeg", metadata={})
    signed = urlsplit(urls.sign("frames", SERVED_KEY, expires=timedelta(minutes=5)))
    transport = httpx.ASGITransport(app=local_objects(objects))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingestion") as http:
        served = await http.get(f"{signed.path}?{signed.query}")
        assert (served.status_code, served.content) == (200, b"\xff\xd8jpeg")
        gone = urlsplit(urls.sign("frames", SERVED_KEY + ".swept", expires=timedelta(minutes=5)))
        cases = [
            (await http.get(f"{gone.path}?{gone.query}"), 404, "not_found"),
            (await http.get("/objects?key=x"), 400, "bad_request"),
            (
                await http.get(f"/objects?{signed.query.replace('signature=', 'signature=0')}"),
                403,
                "forbidden",
            ),
            (await http.post(f"/objects?{signed.query}"), 405, "method_not_allowed"),
        ]
    for response, status, code in cases:
        assert response.status_code == status
        body = response.json()
        assert (body["type"], body["code"]) == ("error", code), body
        assert body["reason"]


def test_a_local_store_that_signs_nothing_has_nothing_to_serve(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="signs no URLs"):
        local_objects(LocalStore(tmp_path, "frames"))
