"""A request's status as its caller may see it, with one page of its frames and URLs made now."""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.objects import ObjectStore
from edgeway.common.schemas.ingest import FRAMES_PAGE_DEFAULT, Caller, IngestReply
from edgeway.ingestion import domain, store


class StatusReader(Protocol):
    async def __call__(
        self,
        request_id: str,
        caller: Caller,
        *,
        limit: int = FRAMES_PAGE_DEFAULT,
        cursor: str | None = None,
    ) -> IngestReply: ...


def status_reader(
    sessions: async_sessionmaker[AsyncSession], objects: ObjectStore, presign_for: timedelta
) -> StatusReader:
    """The status of a request as `caller` may see it (`not_found` when it may not), with one
    page of its frames: `limit` after `cursor`, each with a URL made now, off the event loop
    (never stored: a stored presigned URL goes stale)."""

    async def respond(
        request_id: str,
        caller: Caller,
        *,
        limit: int = FRAMES_PAGE_DEFAULT,
        cursor: str | None = None,
    ) -> IngestReply:
        try:
            after = None if cursor is None else domain.FramePosition.from_cursor(cursor)
        except domain.BadCursorError as exc:
            return IngestReply(ok=False, error="invalid", message=str(exc))
        async with sessions() as session:
            response = await store.response(
                session=session, request_id=request_id, caller=caller, limit=limit, after=after
            )
        if response is None:
            return IngestReply(ok=False, error="not_found", message=f"no request {request_id}")
        urls = await objects.urls(
            [frame.storage_path for frame in response.frames], expires=presign_for
        )
        for frame, url in zip(response.frames, urls, strict=True):
            frame.storage_url = url
        return IngestReply(ok=True, response=response)

    return respond
