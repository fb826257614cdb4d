"""Uploaded files: opened as a request, then each file checked in full, stored, committed.

The gateway opens an upload (request/reply) before it publishes the files, so the request's status
exists as soon as the client has its 202. Each file then arrives as its own durable message. The
file is decoded and re-encoded here (`images.ImageSanitizer`), stored as an object under a key
made from checked parts only, and then its row, the request's counts and the announcements are
committed together. A redelivered file has the same id and key: the put overwrites the same
object, and the row insert finds it there.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.logging import get_logger
from edgeway.common.media import MediaRejected, check_csv
from edgeway.common.schemas.ingest import (
    CreateUpload,
    FileKind,
    IngestReply,
    RejectedFile,
    RequestStatus,
    SourceType,
)
from edgeway.ingestion import domain, store
from edgeway.ingestion.domain import FileMessage
from edgeway.ingestion.images import ImageSanitizer
from edgeway.ingestion.storage import ObjectStore

CSV_CONTENT_TYPE = "text/csv"

log = get_logger("edgeway.ingestion.uploads")


def _now() -> datetime:
    return datetime.now(UTC)


class Uploads:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        objects: ObjectStore,
        sanitizer: ImageSanitizer,
        committed: Callable[[], None],
        counted: Callable[[str, str], None] = lambda kind, outcome: None,
    ) -> None:
        self._sessions = sessions
        self._objects = objects
        self._sanitizer = sanitizer
        self._committed = committed
        self._counted = counted  # (kind, outcome: stored | duplicate | rejected | dropped)

    async def open(self, command: CreateUpload) -> IngestReply | None:
        """Open the request; an error reply if it cannot be, None when it was."""
        if not command.files:
            return IngestReply(ok=False, error="invalid", message="an upload needs a file")
        now = _now()
        async with self._sessions.begin() as session:
            if await session.get(store.IngestionRequest, command.request_id) is not None:
                return IngestReply(
                    ok=False, error="conflict", message=f"request {command.request_id} exists"
                )
            await store.add_request(
                session=session,
                request=store.IngestionRequest(
                    id=command.request_id,
                    camera_id=command.camera_id,
                    source_type=SourceType.UPLOAD.value,
                    status=RequestStatus.IN_PROGRESS.value,
                    meta_info=command.meta.model_dump(exclude_none=True) if command.meta else None,
                    files_expected=len(command.files),
                    frames_stored=0,
                    files_rejected=0,
                    created_at=now,
                    updated_at=now,
                ),
            )
            await store.add_rejections(
                session=session, request_id=command.request_id, rejected=command.rejected, now=now
            )
        return None

    async def store(self, file: FileMessage, body: bytes, *, received: datetime) -> None:
        if file.kind is FileKind.IMAGE:
            await self._store_image(file, body, received=received)
        else:
            await self._store_csv(file, body, received=received)

    async def _store_image(self, file: FileMessage, body: bytes, *, received: datetime) -> None:
        assert file.request_id is not None
        try:
            image = await self._sanitizer.clean(body)
        except MediaRejected as rejected:
            await self._reject(file, rejected)
            return
        key = domain.frame_key(received, file.owner, file.file_id, image.extension)
        await self._objects.put(
            key,
            image.data,
            content_type=image.content_type,
            metadata={
                "camera_id": file.owner,
                "request_id": file.request_id,
                "capture_timestamp": received.isoformat(),
            },
        )
        now = _now()
        async with self._sessions.begin() as session:
            request = await store.lock_request(session=session, request_id=file.request_id)
            if request is None or RequestStatus(request.status).final:
                # No request to belong to (or it was given up on): the object must not stay.
                outcome = "dropped"
            else:
                new = await store.add_frame(
                    session=session,
                    request=request,
                    frame=store.NewFrame(
                        id=file.file_id,
                        request_id=file.request_id,
                        camera_id=file.owner,
                        source_type=SourceType.UPLOAD,
                        storage_path=key,
                        storage_bucket=self._objects.bucket,
                        width=image.width,
                        height=image.height,
                        size_bytes=len(image.data),
                        format=image.format.value,
                        content_type=image.content_type,
                        capture_timestamp=received,
                        meta=request.meta_info,
                        original_name=file.filename,
                    ),
                    now=now,
                )
                outcome = "stored" if new else "duplicate"
                if new:
                    store.announce(session=session, request=request, now=now, frame_id=file.file_id)
                    store.finish_upload_if_done(session=session, request=request, now=now)
        if outcome == "dropped":
            await self._objects.delete(key)
            log.warning("file for no open request dropped", request_id=file.request_id)
        self._counted(file.kind.value, outcome)
        self._committed()

    async def _reject(self, file: FileMessage, rejected: MediaRejected) -> None:
        assert file.request_id is not None
        now = _now()
        async with self._sessions.begin() as session:
            request = await store.lock_request(session=session, request_id=file.request_id)
            if request is None or RequestStatus(request.status).final:
                self._counted(file.kind.value, "dropped")
                return
            new = await store.add_file_rejection(
                session=session,
                request=request,
                file_id=file.file_id,
                rejected=RejectedFile(
                    filename=file.filename, code=rejected.code, reason=rejected.reason
                ),
                now=now,
            )
            if new:
                store.announce(session=session, request=request, now=now)
                store.finish_upload_if_done(session=session, request=request, now=now)
        log.info(
            "file refused",
            request_id=file.request_id,
            file_id=file.file_id,
            code=rejected.code,
            reason=rejected.reason,
        )
        self._counted(file.kind.value, "rejected")
        self._committed()

    async def _store_csv(self, file: FileMessage, body: bytes, *, received: datetime) -> None:
        try:
            check_csv(body)
        except MediaRejected as rejected:
            # The gateway ran the same check: only a gateway of another version gets here.
            log.warning("phone file refused", device=file.owner, reason=rejected.reason)
            self._counted(file.kind.value, "rejected")
            return
        key = domain.file_key(received, file.owner, file.file_id)
        await self._objects.put(
            key,
            body,
            content_type=CSV_CONTENT_TYPE,
            metadata={"device": file.owner, "file_id": file.file_id},
        )
        async with self._sessions.begin() as session:
            new = await store.add_phone_file(
                session=session,
                file=store.PhoneFile(
                    id=file.file_id,
                    device=file.owner,
                    original_name=file.filename,
                    storage_path=key,
                    storage_bucket=self._objects.bucket,
                    size_bytes=len(body),
                    content_type=CSV_CONTENT_TYPE,
                    created_at=_now(),
                ),
            )
        self._counted(file.kind.value, "stored" if new else "duplicate")
