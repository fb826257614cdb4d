"""The ingestion database: requests, stored frames, refused files, phone files, the outbox.

Functions take the session as a keyword and never commit: the caller's transaction holds an
object's row and its outbox events together (what the rows and events say is decided in
`domain` and `events`). Every change to a request locks its row first
(`SELECT ... FOR UPDATE` on PostgreSQL; SQLite writes one transaction at a time), so two files of
one upload finishing at once both count, and exactly one of them completes it (on SQLite, by
taking its write lock first: `lock_request`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    delete,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeway.common.db import (
    BigId,
    JSONDocument,
    Migrations,
    UTCDateTime,
    dialect_insert,
    dialect_of,
)
from edgeway.common.schemas.ingest import (
    FRAMES_PAGE_DEFAULT,
    Caller,
    CaptureMode,
    FrameInfo,
    IngestionResponse,
    RejectedFile,
    RequestStatus,
    SourceType,
)
from edgeway.ingestion import domain, events
from edgeway.ingestion.domain import ACTIVE, NewFrame

MIGRATIONS = Migrations(
    Path(__file__).with_name("migrations"), version_table="alembic_version_ingestion"
)

UUID_LENGTH = 36
CAMERA_ID_LENGTH = 100


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s",
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        }
    )


class IngestionRequest(Base):
    """One upload or RTSP capture: the seed's `ingestion_requests`, plus lease and counts."""

    __tablename__ = "ingestion_requests"
    __table_args__ = (
        Index(None, "camera_id", "created_at"),
        Index(None, "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    camera_id: Mapped[str] = mapped_column(String(CAMERA_ID_LENGTH))
    source_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    # Who opened it (the token's subject, from the gateway): only they, or an operator, may read
    # or cancel it. None on requests from before owners were kept: operators only.
    requester: Mapped[str | None] = mapped_column(Text)
    # RTSP: the URL with its credentials masked, and the whole URL sealed (credentials.py).
    rtsp_url: Mapped[str | None] = mapped_column(Text)
    rtsp_url_sealed: Mapped[str | None] = mapped_column(Text)
    capture_mode: Mapped[str | None] = mapped_column(String(16))
    capture_duration: Mapped[float | None] = mapped_column(Double)
    fps: Mapped[float | None] = mapped_column(Double)
    frame_timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime)
    meta_info: Mapped[Any] = mapped_column(JSONDocument, nullable=True)
    message: Mapped[str | None] = mapped_column(Text)
    error_details: Mapped[Any] = mapped_column(JSONDocument, nullable=True)
    # Uploads: files the gateway accepted and published; the request completes when each has
    # been stored or refused.
    files_expected: Mapped[int | None] = mapped_column(Integer)
    frames_stored: Mapped[int] = mapped_column(Integer, default=0)
    files_rejected: Mapped[int] = mapped_column(Integer, default=0)
    # RTSP: the replica running the capture, and until when it has promised to be alive.
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class StoredFrame(Base):
    """A stored image: the seed's `frames`, without a stored (staling) presigned URL."""

    __tablename__ = "frames"
    __table_args__ = (
        Index(None, "camera_id", "capture_timestamp"),
        # A request's frames in the order a status pages through them (migration 0003).
        Index(None, "request_id", "capture_timestamp", "created_at", "id"),
        Index(None, "created_at"),
    )

    id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("ingestion_requests.id"))
    camera_id: Mapped[str] = mapped_column(String(CAMERA_ID_LENGTH))
    source_type: Mapped[str] = mapped_column(String(16))
    storage_path: Mapped[str] = mapped_column(String(512), unique=True)
    storage_bucket: Mapped[str] = mapped_column(String(63))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(8))
    content_type: Mapped[str] = mapped_column(String(64))
    capture_timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    exposure: Mapped[float | None] = mapped_column(Double)
    sensor_info: Mapped[Any] = mapped_column(JSONDocument, nullable=True)
    meta_info: Mapped[Any] = mapped_column(JSONDocument, nullable=True)
    original_name: Mapped[str | None] = mapped_column(String(255))  # display only
    change_score: Mapped[float | None] = mapped_column(Double)  # event_driven captures
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class FileRejection(Base):
    """A file of an upload that was not stored: refused at the edge, or by the full check here."""

    __tablename__ = "rejected_files"
    __table_args__ = (Index(None, "request_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("ingestion_requests.id"))
    # Files refused here have the id the gateway gave them (a redelivery is not counted twice);
    # files refused at the edge never got one.
    file_id: Mapped[str | None] = mapped_column(String(UUID_LENGTH), unique=True)
    filename: Mapped[str] = mapped_column(String(255))
    code: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PhoneFile(Base):
    """A CSV file a phone uploaded on `/ws/phone` (the WorldSystem seed wrote it to ./uploads)."""

    __tablename__ = "phone_files"
    __table_args__ = (Index(None, "device", "created_at"),)

    id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    device: Mapped[str] = mapped_column(String(64))
    original_name: Mapped[str] = mapped_column(String(255))  # display only, never a path
    storage_path: Mapped[str] = mapped_column(String(512), unique=True)
    storage_bucket: Mapped[str] = mapped_column(String(63))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OutboxEvent(Base):
    """An event committed with the change it announces, published afterwards by the relay."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    target: Mapped[str] = mapped_column(String(16))  # events.TO_BROADCAST or TO_FRAMES
    routing_key: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # JSON
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- requests -------------------------------------------------------------------------------


async def lock_request(*, session: AsyncSession, request_id: str) -> IngestionRequest | None:
    """The request's row, locked until the transaction ends. Must come first in a transaction.

    PostgreSQL locks the row (`FOR UPDATE`). SQLite ignores that and begins transactions lazily,
    so two transactions could both read the same counts and both write theirs back: a write
    comes first instead, which takes SQLite's single write lock before anything is read.
    """
    if dialect_of(session) == "sqlite":
        await session.execute(
            update(IngestionRequest)
            .where(IngestionRequest.id == request_id)
            .values(id=IngestionRequest.id)
        )
    statement = select(IngestionRequest).where(IngestionRequest.id == request_id).with_for_update()
    return (await session.execute(statement)).scalar_one_or_none()


async def add_request(*, session: AsyncSession, request: IngestionRequest) -> None:
    session.add(request)
    await session.flush()


async def add_rejections(
    *,
    session: AsyncSession,
    request_id: str,
    rejected: Iterable[RejectedFile],
    now: datetime,
) -> None:
    session.add_all(
        FileRejection(
            request_id=request_id,
            filename=item.filename[:255],
            code=item.code[:32],
            reason=item.reason,
            created_at=now,
        )
        for item in rejected
    )
    await session.flush()


async def active_captures(
    *, session: AsyncSession, now: datetime, requester: str | None = None
) -> int:
    """RTSP captures running somewhere: active, with a lease that has not run out; only those
    `requester` opened, if given."""
    statement = select(func.count()).where(
        IngestionRequest.source_type == SourceType.RTSP.value,
        IngestionRequest.status.in_(ACTIVE),
        IngestionRequest.lease_expires_at > now,
    )
    if requester is not None:
        statement = statement.where(IngestionRequest.requester == requester)
    return int((await session.execute(statement)).scalar_one())


async def add_frame(
    *, session: AsyncSession, request: IngestionRequest, frame: NewFrame, now: datetime
) -> bool:
    """Store a frame's row and announce it; False if it was stored before (a redelivery)."""
    insert = dialect_insert(session, StoredFrame.__table__)  # type: ignore[arg-type]
    statement = (
        insert.values(
            id=frame.id,
            request_id=frame.request_id,
            camera_id=frame.camera_id,
            source_type=frame.source_type.value,
            storage_path=frame.storage_path,
            storage_bucket=frame.storage_bucket,
            width=frame.width,
            height=frame.height,
            size_bytes=frame.size_bytes,
            format=frame.format,
            content_type=frame.content_type,
            capture_timestamp=frame.capture_timestamp,
            exposure=(frame.meta or {}).get("exposure"),
            sensor_info=(frame.meta or {}).get("sensor_info"),
            meta_info=frame.meta,
            original_name=frame.original_name,
            change_score=frame.change_score,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(StoredFrame.id)
    )
    if (await session.execute(statement)).scalar_one_or_none() is None:
        return False
    request.frames_stored += 1
    request.updated_at = now
    add_event(session=session, event=events.frame_stored(frame), now=now)
    return True


async def add_file_rejection(
    *,
    session: AsyncSession,
    request: IngestionRequest,
    file_id: str,
    rejected: RejectedFile,
    now: datetime,
) -> bool:
    """Record a file refused by the full check; False if it was recorded before."""
    insert = dialect_insert(session, FileRejection.__table__)  # type: ignore[arg-type]
    statement = (
        insert.values(
            request_id=request.id,
            file_id=file_id,
            filename=rejected.filename[:255],
            code=rejected.code[:32],
            reason=rejected.reason,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["file_id"])
        .returning(FileRejection.id)
    )
    if (await session.execute(statement)).scalar_one_or_none() is None:
        return False
    request.files_rejected += 1
    request.updated_at = now
    return True


async def file_recorded(*, session: AsyncSession, file_id: str) -> bool:
    """Whether an upload's file was committed before: stored as a frame, or refused."""
    stored = select(StoredFrame.id).where(StoredFrame.id == file_id)
    refused = select(FileRejection.id).where(FileRejection.file_id == file_id)
    for statement in (stored, refused):
        if (await session.execute(statement.limit(1))).first() is not None:
            return True
    return False


def finish(
    *,
    session: AsyncSession,
    request: IngestionRequest,
    status: RequestStatus,
    now: datetime,
    message: str | None = None,
    details: Any = None,
) -> bool:
    """Move an active request to a final status and announce it; False if it already was final."""
    if not domain.may_end(request.status):
        return False
    request.status = status.value
    request.completed_at = now
    request.updated_at = now
    request.lease_expires_at = None
    if message is not None:
        request.message = message
    if details is not None:
        request.error_details = details
    announce(session=session, request=request, now=now)
    return True


def announce(
    *, session: AsyncSession, request: IngestionRequest, now: datetime, frame_id: str | None = None
) -> None:
    """A progress event on `ingest.request.<id>`, committed with the change it reports."""
    add_event(session=session, event=events.progress(request, frame_id=frame_id), now=now)


def add_event(*, session: AsyncSession, event: events.Event, now: datetime) -> None:
    session.add(
        OutboxEvent(
            target=event.target,
            routing_key=event.routing_key,
            type=event.type,
            body=orjson.dumps(event.body).decode(),
            created_at=now,
        )
    )


async def renew_lease(
    *, session: AsyncSession, request_id: str, owner: str, until: datetime
) -> RequestStatus | None:
    """Extend a running capture's lease; its status now (cancelled: stop), None if not ours."""
    statement = (
        update(IngestionRequest)
        .where(IngestionRequest.id == request_id, IngestionRequest.owner == owner)
        .values(lease_expires_at=until)
        .returning(IngestionRequest.status)
    )
    status = (await session.execute(statement)).scalar_one_or_none()
    return None if status is None else RequestStatus(status)


async def expired_captures(*, session: AsyncSession, now: datetime) -> Sequence[IngestionRequest]:
    """Active captures whose replica stopped renewing its lease: it died mid-job."""
    statement = (
        select(IngestionRequest)
        .where(
            IngestionRequest.source_type == SourceType.RTSP.value,
            IngestionRequest.status.in_(ACTIVE),
            IngestionRequest.lease_expires_at < now,
        )
        .with_for_update(skip_locked=True)
    )
    return (await session.execute(statement)).scalars().all()


async def stale_uploads(*, session: AsyncSession, before: datetime) -> Sequence[IngestionRequest]:
    """Uploads still waiting for files, with no progress since `before`: some never arrived."""
    statement = (
        select(IngestionRequest)
        .where(
            IngestionRequest.source_type == SourceType.UPLOAD.value,
            IngestionRequest.status.in_(ACTIVE),
            # Progress, not age: a long queue backlog is not a lost file.
            IngestionRequest.updated_at < before,
        )
        .with_for_update(skip_locked=True)
    )
    return (await session.execute(statement)).scalars().all()


# --- reading --------------------------------------------------------------------------------


async def response(
    *,
    session: AsyncSession,
    request_id: str,
    caller: Caller,
    limit: int = FRAMES_PAGE_DEFAULT,
    after: domain.FramePosition | None = None,
) -> IngestionResponse | None:
    """The request as the status endpoint shows it to `caller` (None if there is none, or none
    it may see), with one page of its frames: the first `limit` after `after`, in capture
    order. Frames have no URL yet: the caller presigns the page's keys (off the event loop)."""
    request = await session.get(IngestionRequest, request_id)
    if request is None or not domain.may_see(caller, request.requester):
        return None
    order = (StoredFrame.capture_timestamp, StoredFrame.created_at, StoredFrame.id)
    page = (
        select(
            StoredFrame.id,
            StoredFrame.storage_path,
            StoredFrame.capture_timestamp,
            StoredFrame.created_at,
            StoredFrame.width,
            StoredFrame.height,
            StoredFrame.size_bytes,
            StoredFrame.format,
        )
        .where(StoredFrame.request_id == request_id)
        .order_by(*order)
        .limit(limit + 1)  # one more: whether there is a next page
    )
    if after is not None:
        # A row comparison: both PostgreSQL and SQLite seek to it in the (request_id,
        # capture_timestamp, created_at, id) index, so every page costs the same.
        position = (after.captured, after.created, after.frame_id)
        bound = (literal(value, column.type) for value, column in zip(position, order, strict=True))
        page = page.where(tuple_(*order) > tuple_(*bound))
    rows = (await session.execute(page)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    total = (
        await session.execute(
            select(func.count())
            .select_from(StoredFrame)
            .where(StoredFrame.request_id == request_id)
        )
    ).scalar_one()
    rejected = (
        await session.execute(
            select(FileRejection)
            .where(FileRejection.request_id == request_id)
            .order_by(FileRejection.id)
        )
    ).scalars()
    last = rows[-1] if more else None
    return IngestionResponse(
        request_id=request.id,
        status=RequestStatus(request.status),
        camera_id=request.camera_id,
        source_type=SourceType(request.source_type),
        frames=[
            FrameInfo(
                frame_id=row.id,
                storage_path=row.storage_path,
                timestamp=row.capture_timestamp,
                width=row.width,
                height=row.height,
                size_bytes=row.size_bytes,
                format=row.format,
            )
            for row in rows
        ],
        frames_total=total,
        next_cursor=(
            None
            if last is None
            else domain.FramePosition(last.capture_timestamp, last.created_at, last.id).cursor()
        ),
        message=request.message,
        created_at=request.created_at,
        completed_at=request.completed_at,
        capture_mode=CaptureMode(request.capture_mode) if request.capture_mode else None,
        files_expected=request.files_expected,
        rejected=[
            RejectedFile(filename=item.filename, code=item.code, reason=item.reason)
            for item in rejected
        ],
    )


# --- phone files ----------------------------------------------------------------------------


async def add_phone_file(*, session: AsyncSession, file: PhoneFile) -> bool:
    insert = dialect_insert(session, PhoneFile.__table__)  # type: ignore[arg-type]
    values = {column.name: getattr(file, column.name) for column in PhoneFile.__table__.columns}
    statement = (
        insert.values(**values)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(PhoneFile.id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None


# --- housekeeping ---------------------------------------------------------------------------


async def known_keys(*, session: AsyncSession, keys: Sequence[str]) -> set[str]:
    """Which of these object keys a row refers to (the rest are orphans)."""
    known: set[str] = set()
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        for model in (StoredFrame, PhoneFile):
            rows = await session.execute(
                select(model.storage_path).where(model.storage_path.in_(chunk))
            )
            known.update(rows.scalars())
    return known


# A table whose rows name stored objects (retention deletes from both).
ObjectTable = type[StoredFrame] | type[PhoneFile]


async def expired_objects(
    *, session: AsyncSession, table: ObjectTable, before: datetime, limit: int
) -> Sequence[tuple[str, str]]:
    """(id, key) of `table`'s rows stored before `before`, oldest first."""
    rows = await session.execute(
        select(table.id, table.storage_path)
        .where(table.created_at < before)
        .order_by(table.created_at)
        .limit(limit)
    )
    return [(row[0], row[1]) for row in rows]


async def delete_rows(*, session: AsyncSession, table: ObjectTable, ids: Sequence[str]) -> None:
    await session.execute(delete(table).where(table.id.in_(ids)))


async def delete_finished_requests(*, session: AsyncSession, before: datetime) -> int:
    """Final requests that ended before `before` and have no frame left."""
    has_frames = (
        select(StoredFrame.id).where(StoredFrame.request_id == IngestionRequest.id).exists()
    )
    old = select(IngestionRequest.id).where(
        IngestionRequest.status.notin_(ACTIVE),
        IngestionRequest.completed_at < before,
        ~has_frames,
    )
    ids = list((await session.execute(old)).scalars())
    if not ids:
        return 0
    await session.execute(delete(FileRejection).where(FileRejection.request_id.in_(ids)))
    await session.execute(delete(IngestionRequest).where(IngestionRequest.id.in_(ids)))
    return len(ids)


async def pending_events(*, session: AsyncSession, limit: int) -> Sequence[OutboxEvent]:
    statement = (
        select(OutboxEvent).order_by(OutboxEvent.id).limit(limit).with_for_update(skip_locked=True)
    )
    return (await session.execute(statement)).scalars().all()


async def delete_events(*, session: AsyncSession, ids: Sequence[int]) -> None:
    await session.execute(delete(OutboxEvent).where(OutboxEvent.id.in_(ids)))
