"""Object storage: any S3 API through the `minio` client, or a local directory by default.

Keys are always made by the service (`domain.object_key`), never taken from a client. The minio
client is synchronous (urllib3): every call runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

from edgeway.common.logging import get_logger
from edgeway.ingestion.settings import IngestionSettings

# Pauses between tries of a put that failed on the way (connection, 5xx, throttling).
PUT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)

log = get_logger("edgeway.ingestion.storage")


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


class S3Store:
    """A bucket on an S3-compatible server (MinIO, any S3 API)."""

    def __init__(
        self, client: Minio, bucket: str, *, retry_delays: tuple[float, ...] = PUT_RETRY_DELAYS
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.retry_delays = retry_delays

    async def ensure_bucket(self) -> None:
        def ensure() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:  # another replica made it first
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await asyncio.to_thread(ensure)

    async def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        # A storage hiccup is waited out here (the file stays unacked meanwhile), rather than
        # spending the message's delivery limit on it; a longer outage fails the delivery.
        for attempt, delay in enumerate((*self.retry_delays, None)):
            try:
                await asyncio.to_thread(
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

        return await asyncio.to_thread(read)

    async def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return False
                raise
            return True

        return await asyncio.to_thread(stat)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.remove_object, self.bucket, key)

    async def list(self, prefix: str) -> list[StoredObject]:
        def listing() -> list[StoredObject]:
            return [
                StoredObject(item.object_name, item.last_modified or datetime.now(UTC))
                for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if item.object_name is not None
            ]

        return await asyncio.to_thread(listing)

    def url(self, key: str, *, expires: timedelta) -> str | None:
        # Signing is local computation: no request to the server.
        return self.client.presigned_get_object(self.bucket, key, expires=expires)


class LocalStore:
    """The embedded default: objects as files under `<root>/<bucket>/<key>`."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.root = root / bucket
        self.bucket = bucket

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
        return None


def make_store(settings: IngestionSettings) -> ObjectStore:
    if settings.storage_endpoint is None:
        return LocalStore(settings.data_dir / "objects", settings.storage_bucket)
    client = Minio(
        settings.storage_endpoint,
        access_key=settings.storage_access_key,
        secret_key=settings.storage_secret_key.get_secret_value(),
        secure=settings.storage_secure,
        region=settings.storage_region,
    )
    return S3Store(client, settings.storage_bucket)
