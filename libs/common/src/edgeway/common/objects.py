"""Object storage for any service: any S3 API through the `minio` client, or a local directory
by default, with signed, expiring URLs the service serves itself for the local store.

Keys are always made by the service that stores, never taken from a client. The minio client
is synchronous (urllib3): every call runs in a worker thread, off the event loop.

It needs the `objects` extra of edgeway-common (minio, certifi, urllib3).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import io
import mimetypes
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlencode

import certifi
import orjson
import urllib3
from faststream.asgi import AsgiResponse
from faststream.asgi.types import ASGIApp, Receive, Scope, Send
from minio import Minio
from minio.error import S3Error, ServerError
from pydantic import SecretStr, model_validator

from edgeway.common.errors import ErrorObject, code_for
from edgeway.common.logging import get_logger
from edgeway.common.settings import CommonSettings

# Object requests in flight at once, per process (the minio client's connection pool is sized
# to match in make_store).
STORAGE_THREADS = 16
T = TypeVar("T")

# Pauses between tries of a put that failed on the way (connection, 5xx, throttling).
PUT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)

log = get_logger("edgeway.common.objects")

DEFAULT_STORAGE_KEY = "minioadmin"  # MinIO's default, refused outside development


def _transient(exc: S3Error) -> bool:
    return exc.code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout")


@dataclass(frozen=True)
class StoredObject:
    key: str
    last_modified: datetime


class ObjectStore(Protocol):
    bucket: str

    async def ensure_bucket(self) -> None: ...

    async def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str]
    ) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove `key`; a key that is not there is not an error."""
        ...

    async def list(self, prefix: str) -> list[StoredObject]: ...

    def url(self, key: str, *, expires: timedelta) -> str | None:
        """A URL a client can GET the object from for `expires`, or None when there is none."""
        ...

    async def urls(self, keys: Sequence[str], *, expires: timedelta) -> Sequence[str | None]:
        """`url` of each key, made off the event loop (a status page presigns many)."""
        ...


class S3Store:
    """A bucket on an S3-compatible server (MinIO, any S3 API)."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        retry_delays: tuple[float, ...] = PUT_RETRY_DELAYS,
        threads: int = STORAGE_THREADS,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.retry_delays = retry_delays
        # Requests to the server wait on the network, not the CPU: more of them may be in flight
        # than asyncio's default pool allows (cores + 4), which capped uploads at 6 puts at once.
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="edgeway-s3")

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._threads, functools.partial(function, *args, **kwargs)
        )

    async def ensure_bucket(self) -> None:
        def ensure() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:  # another replica made it first
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await self._call(ensure)

    async def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        # A storage hiccup is waited out here (the file stays unacked meanwhile), rather than
        # spending the message's delivery limit on it; a longer outage fails the delivery.
        for attempt, delay in enumerate((*self.retry_delays, None)):
            try:
                await self._call(
                    self.client.put_object,
                    self.bucket,
                    key,
                    io.BytesIO(data),
                    len(data),
                    content_type=content_type,
                    metadata=dict(metadata),
                )
                return
            except (urllib3.exceptions.HTTPError, S3Error, ServerError) as exc:
                if delay is None or (isinstance(exc, S3Error) and not _transient(exc)):
                    raise
                log.warning(
                    "object put failed, retrying", key=key, attempt=attempt + 1, error=repr(exc)
                )
                await asyncio.sleep(delay)

    async def get(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await self._call(read)

    async def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return False
                raise
            return True

        return await self._call(stat)

    async def delete(self, key: str) -> None:
        await self._call(self.client.remove_object, self.bucket, key)

    async def list(self, prefix: str) -> list[StoredObject]:
        def listing() -> list[StoredObject]:
            return [
                StoredObject(item.object_name, item.last_modified or datetime.now(UTC))
                for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if item.object_name is not None
            ]

        return await self._call(listing)

    def url(self, key: str, *, expires: timedelta) -> str | None:
        # Signing is computation (HMAC-SHA256 several times a key), except the first time when
        # no region is configured: the client asks the server for the bucket's. Blocking, then:
        # the status uses `urls`, in the store's threads.
        return self.client.presigned_get_object(self.bucket, key, expires=expires)

    async def urls(self, keys: Sequence[str], *, expires: timedelta) -> Sequence[str | None]:
        if not keys:
            return []
        return await self._call(lambda: [self.url(key, expires=expires) for key in keys])


# The path a service serves its local store's objects on (`local_objects`), at the URLs
# LocalUrls signs.
OBJECTS_PATH = "/objects"


class LocalUrls:
    """Signed, expiring URLs for the local store's objects, served by the service's own HTTP
    port (`GET /objects?key=...&expires=...&signature=...`): what a presigned S3 URL is to a
    bucket. The signature is an HMAC-SHA256 of the bucket, key and expiry time, so a URL cannot
    be changed to reach another object or to last longer."""

    def __init__(
        self, base_url: str, secret: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secret = secret
        self._clock = clock

    def _signature(self, bucket: str, key: str, expires: int) -> str:
        message = f"{bucket}\n{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, bucket: str, key: str, *, expires: timedelta) -> str:
        until = int(self._clock() + expires.total_seconds())
        query = urlencode(
            {"key": key, "expires": until, "signature": self._signature(bucket, key, until)}
        )
        return f"{self.base_url}{OBJECTS_PATH}?{query}"

    def refusal(self, bucket: str, key: str, expires: str, signature: str) -> str | None:
        """None when the URL's parts are ones `sign` made and it has not expired; else why not."""
        try:
            until = int(expires)
        except ValueError:
            return "expires must be a Unix time"
        if not hmac.compare_digest(self._signature(bucket, key, until), signature):
            return "the signature does not match the key and expiry"
        if until < self._clock():
            return "the URL has expired: read the request's status again for a fresh one"
        return None


class LocalStore:
    """The embedded default: objects as files under `<root>/<bucket>/<key>`, with signed URLs
    the service serves when `urls` is given (none otherwise)."""

    def __init__(self, root: Path, bucket: str, *, urls: LocalUrls | None = None) -> None:
        self.root = root / bucket
        self.bucket = bucket
        self.urls_signer = urls

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys are the service's own; this only guards against a bug producing '..'.
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    async def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        def write() -> None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Whole or absent: written beside, then renamed over.
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".put-")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise

        await asyncio.to_thread(write)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._path(key).read_bytes)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def list(self, prefix: str) -> list[StoredObject]:
        def listing() -> list[StoredObject]:
            found = []
            # Walk only the folder the prefix names (keys are "/"-separated, like S3's).
            base = self.root / prefix.rpartition("/")[0]
            for path in base.rglob("*") if base.is_dir() else ():
                key = path.relative_to(self.root).as_posix()
                if path.is_file() and not path.name.startswith(".put-") and key.startswith(prefix):
                    modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    found.append(StoredObject(key, modified))
            return found

        return await asyncio.to_thread(listing)

    def url(self, key: str, *, expires: timedelta) -> str | None:
        if self.urls_signer is None:
            return None
        self._path(key)  # the same refusal as get() for a key leaving the store
        return self.urls_signer.sign(self.bucket, key, expires=expires)

    async def urls(self, keys: Sequence[str], *, expires: timedelta) -> Sequence[str | None]:
        return [self.url(key, expires=expires) for key in keys]


class ObjectStoreSettings(CommonSettings):
    """The object store's settings (`EDGEWAY_STORAGE_*`), for a service's settings to derive from.

    No endpoint: a local directory under the data directory (the embedded default, for `make
    run`); otherwise any S3 API through the `minio` client."""

    storage_endpoint: str | None = None  # host:port, e.g. minio:9000
    # MinIO's own defaults, so a development stack talks to a fresh MinIO; refused elsewhere.
    storage_access_key: str = DEFAULT_STORAGE_KEY
    storage_secret_key: SecretStr = SecretStr(DEFAULT_STORAGE_KEY)
    storage_secure: bool = False
    storage_region: str | None = None
    storage_bucket: str = "edgeway-objects"  # a service names its own
    # Without an endpoint the service serves the local store's objects itself, on its HTTP
    # port, at signed URLs made with this base (default: http://<http_host>:<http_port>, with
    # 127.0.0.1 for a wildcard host). Set it where clients reach the service by another name.
    storage_public_url: str | None = None

    @property
    def objects_base_url(self) -> str:
        """Where clients reach the local store's signed URLs."""
        if self.storage_public_url is not None:
            return self.storage_public_url
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    @model_validator(mode="after")
    def _no_default_storage_credentials_outside_development(self) -> ObjectStoreSettings:
        secret = self.storage_secret_key.get_secret_value()
        if (
            self.storage_endpoint
            and not self.is_development
            and DEFAULT_STORAGE_KEY in (self.storage_access_key, secret)
        ):
            raise ValueError(
                "the S3 storage uses MinIO's default credentials (minioadmin), which anyone "
                "can guess: set EDGEWAY_STORAGE_ACCESS_KEY and EDGEWAY_STORAGE_SECRET_KEY"
            )
        return self


def make_store(
    settings: ObjectStoreSettings, *, url_secret: bytes | None = None, root: Path | None = None
) -> ObjectStore:
    """The S3 store when an endpoint is set, else the local one, under `root` (default
    `<data_dir>/objects`); `url_secret` signs the local store's URLs (without it, its objects
    have none)."""
    if settings.storage_endpoint is None:
        urls = None
        if url_secret is not None:
            urls = LocalUrls(settings.objects_base_url, url_secret)
        local_root = settings.data_dir / "objects" if root is None else root
        return LocalStore(local_root, settings.storage_bucket, urls=urls)
    # The minio client's own pool settings (minio/api.py), with one connection per thread.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=60, read=300),
        maxsize=STORAGE_THREADS,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    client = Minio(
        settings.storage_endpoint,
        access_key=settings.storage_access_key,
        secret_key=settings.storage_secret_key.get_secret_value(),
        secure=settings.storage_secure,
        region=settings.storage_region,
        http_client=http,
    )
    return S3Store(client, settings.storage_bucket)


def local_objects(objects: LocalStore) -> ASGIApp:
    """`GET /objects?key=&expires=&signature=`: a local store's object at a URL it signed, for
    the service to mount on its HTTP port at OBJECTS_PATH. 400 when a part is missing, 403 for a
    signature that does not match or has expired, 404 for an object that is gone."""
    signer = objects.urls_signer
    if signer is None:
        raise ValueError("the local store signs no URLs: there is nothing to serve")

    def refused(status: int, reason: str) -> AsgiResponse:
        body = orjson.dumps(ErrorObject(code=code_for(status), reason=reason).body())
        return AsgiResponse(body, status, headers={"content-type": "application/json"})

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        parts = {name: query.get(name, [""])[0] for name in ("key", "expires", "signature")}
        response: AsgiResponse
        if scope.get("method") not in ("GET", "HEAD"):
            response = refused(405, "only GET")
        elif not all(parts.values()):
            response = refused(400, "key, expires and signature are required")
        elif reason := signer.refusal(
            objects.bucket, parts["key"], parts["expires"], parts["signature"]
        ):
            response = refused(403, reason)
        else:
            try:
                data = await objects.get(parts["key"])
            except (FileNotFoundError, ValueError):
                response = refused(404, "no such object (it may have been swept)")
            else:
                kind = mimetypes.guess_type(parts["key"])[0] or "application/octet-stream"
                headers = {"content-type": kind, "cache-control": "private, max-age=60"}
                response = AsgiResponse(data, 200, headers=headers)
        await response(scope, receive, send)

    return serve
