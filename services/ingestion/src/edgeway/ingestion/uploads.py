"""Uploaded files: opened as a request, then each file checked in full, stored, committed.

The gateway opens an upload (request/reply) before it publishes the files, so the request's status
exists as soon as the client has its 202. Each file then arrives as its own durable message. The
file is decoded and re-encoded here (`images.ImageSanitizer`), stored as an object under a key
made from checked parts only, and then its row, the request's counts and the announcements are
committed together, in one transaction with the other files checked meanwhile (a group commit,
`flows`: one progress event per request and group). A redelivered file has the same id and key:
the put overwrites the same object, and the row insert finds it there. That holds after its
request has completed too (the service died between the commit and the ack): a file the request
already recorded is a duplicate, and the object its row names stays. Only a file no row will ever
name (its request is gone, or ended without it) has its object removed.

A database outage is waited out inside the commit, however long it lasts (`with_db_retry(...,
forever=True)`, pausing `retry_delays`), as the occupancy service does: a delivery given up on
would be requeued and count toward the queue's delivery limit, so an outage longer than a few
tries dead-lettered files the gateway had accepted, and their upload later failed as if they
had never arrived. Meanwhile the deliveries stay unacked, so the prefetch stops more from coming,
and /readyz says the database is down. `database_lost` is told of each failed try.

A file over `max_file_bytes` is refused here too, whatever the gateway let through (a gateway
of another version, or with other settings): that file fails with its reason, the rest go on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.batching import GroupCommit
from edgeway.common.db import is_outage, with_db_retry
from edgeway.common.logging import get_logger
from edgeway.common.media import MediaRejected, check_csv
from edgeway.common.objects import ObjectStore
from edgeway.common.schemas.ingest import (
    CreateUpload,
    FileKind,
    IngestReply,
    RejectedFile,
    RequestStatus,
    SourceType,
)
from edgeway.ingestion import domain, flows, store
from edgeway.ingestion.domain import FileMessage, NewFrame
from edgeway.ingestion.flows import DROPPED, DUPLICATE, STORED, CheckedFile
from edgeway.ingestion.images import ImageSanitizer

CSV_CONTENT_TYPE = "text/csv"
# CommonSettings.db_retry_delays' default: pauses between tries while the database is away.
DB_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
TOO_LARGE = "too_large"  # the gateway's code for the same refusal

log = get_logger("edgeway.ingestion.uploads")
T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


class UploadIntake:
    """Uploaded files: their request opened, then each file checked, stored and committed."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        objects: ObjectStore,
        sanitizer: ImageSanitizer,
        max_file_bytes: int,
        committed: Callable[[], None],
        counted: Callable[[str, str], None] = lambda kind, outcome: None,
        retry_delays: Sequence[float] = DB_RETRY_DELAYS,
        database_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._sessions = sessions
        self._objects = objects
        self._sanitizer = sanitizer
        self._max_file_bytes = max_file_bytes
        self._counted = counted  # (kind, outcome: stored | duplicate | rejected | dropped)
        self._retry_delays = retry_delays
        self._database_lost = database_lost
        # Files checked at the same time commit together (edgeway.common.batching): one
        # transaction, one progress event per request, instead of one of each per file.
        self._group: GroupCommit[CheckedFile, str] = GroupCommit(
            lambda checked: self._through_outages(
                lambda: flows.commit_files(checked, sessions=sessions, committed=committed)
            ),
            max_size=64,
            # An outage fails every item alike (and is waited out above); anything else may
            # be one bad file.
            isolate=lambda exc: not is_outage(exc),
        )

    async def _through_outages(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work` (one transaction), tried again while the database is away, however long."""

        async def attempt() -> T:
            try:
                return await work()
            except Exception as exc:
                if is_outage(exc):
                    self._database_lost()
                raise

        return await with_db_retry(attempt, delays=self._retry_delays, forever=True)

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
                    requester=command.caller.subject,
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

    def _check_size(self, body: bytes) -> None:
        if len(body) > self._max_file_bytes:
            raise MediaRejected(
                TOO_LARGE,
                f"the file is {len(body)} bytes, over the {self._max_file_bytes} bytes a file "
                "may have",
            )

    async def _store_image(self, file: FileMessage, body: bytes, *, received: datetime) -> None:
        assert file.request_id is not None
        try:
            self._check_size(body)  # before decoding: it would be stored otherwise
            image = await self._sanitizer.clean(body)
        except MediaRejected as rejected:
            log.info(
                "file refused",
                request_id=file.request_id,
                file_id=file.file_id,
                code=rejected.code,
                reason=rejected.reason,
            )
            refusal = RejectedFile(
                filename=file.filename, code=rejected.code, reason=rejected.reason
            )
            outcome = await self._group.submit(CheckedFile(file, refusal=refusal))
            self._counted(file.kind.value, outcome)
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
        frame = NewFrame.stored(
            image,
            id=file.file_id,
            request_id=file.request_id,
            camera_id=file.owner,
            source_type=SourceType.UPLOAD,
            storage_path=key,
            storage_bucket=self._objects.bucket,
            capture_timestamp=received,
            meta=None,  # the request's, filled in at commit
            original_name=file.filename,
        )
        outcome = await self._group.submit(CheckedFile(file, frame=frame))
        if outcome == DROPPED:
            # No request to belong to, or it ended without this file: no row names the object,
            # and none ever will (a request never reopens), so it must not stay. A file its
            # request recorded before is a "duplicate" instead, and keeps its object.
            await self._objects.delete(key)
            log.warning("file for no open request dropped", request_id=file.request_id)
        self._counted(file.kind.value, outcome)

    async def _store_csv(self, file: FileMessage, body: bytes, *, received: datetime) -> None:
        try:
            self._check_size(body)
            check_csv(body)
        except MediaRejected as rejected:
            # The gateway ran the same checks: only a gateway of another version (or with a
            # larger cap) gets here.
            log.warning("phone file refused", device=file.owner, reason=rejected.reason)
            self._counted(file.kind.value, flows.REJECTED)
            return
        key = domain.file_key(received, file.owner, file.file_id)
        await self._objects.put(
            key,
            body,
            content_type=CSV_CONTENT_TYPE,
            metadata={"device": file.owner, "file_id": file.file_id},
        )
        row = store.PhoneFile(
            id=file.file_id,
            device=file.owner,
            original_name=file.filename,
            storage_path=key,
            storage_bucket=self._objects.bucket,
            size_bytes=len(body),
            content_type=CSV_CONTENT_TYPE,
            created_at=_now(),
        )

        async def commit() -> bool:
            async with self._sessions.begin() as session:
                return await store.add_phone_file(session=session, file=row)

        new = await self._through_outages(commit)
        self._counted(file.kind.value, STORED if new else DUPLICATE)
