"""The ingestion service's group-commit flow: the files of uploads checked at the same time are
committed in one transaction (`edgeway.common.batching.GroupCommit`, run by `uploads`): their
rows, their requests' counts, one progress event per request and group, and the ending of each
upload whose last file it was.

Requests are locked in one order, so two groups never wait for each other crosswise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.schemas.ingest import RejectedFile
from edgeway.ingestion import domain, store
from edgeway.ingestion.domain import FileMessage, NewFrame

# What became of a file (the files metric's `outcome`): stored, refused by the full check, a
# redelivery of one recorded before, or dropped (no open request to belong to).
STORED, REJECTED, DUPLICATE, DROPPED = "stored", "rejected", "duplicate", "dropped"


@dataclass(frozen=True)
class CheckedFile:
    """A file after the full check: its frame (object already stored), or why it was refused."""

    file: FileMessage
    frame: NewFrame | None = None
    refusal: RejectedFile | None = None

    @property
    def request_id(self) -> str:
        assert self.file.request_id is not None
        return self.file.request_id


async def commit_files(
    checked: Sequence[CheckedFile],
    *,
    sessions: async_sessionmaker[AsyncSession],
    committed: Callable[[], None],
) -> list[str]:
    """One transaction for the files checked meanwhile: rows, counts, events. The outcome of
    each, in the order of `checked`; `committed` is told when there are events to publish."""
    now = datetime.now(UTC)
    outcomes: list[str] = []
    async with sessions.begin() as session:
        requests = {
            request_id: await store.lock_request(session=session, request_id=request_id)
            for request_id in sorted({item.request_id for item in checked})
        }
        changed: dict[str, store.IngestionRequest] = {}
        for item in checked:
            request = requests[item.request_id]
            if request is None or not domain.may_end(request.status):
                # A file recorded before its request ended is delivered again (the service
                # stopped between commit and ack, or this is a commit tried again whose first
                # try did commit): a duplicate, whose row and object stay.
                recorded = request is not None and await store.file_recorded(
                    session=session, file_id=item.file.file_id
                )
                outcomes.append(DUPLICATE if recorded else DROPPED)
                continue
            if item.frame is not None:
                frame = dataclasses.replace(item.frame, meta=request.meta_info)
                new = await store.add_frame(session=session, request=request, frame=frame, now=now)
                outcomes.append(STORED if new else DUPLICATE)
            else:
                assert item.refusal is not None
                new = await store.add_file_rejection(
                    session=session,
                    request=request,
                    file_id=item.file.file_id,
                    rejected=item.refusal,
                    now=now,
                )
                outcomes.append(REJECTED if new else DUPLICATE)
            if new:
                changed[request.id] = request
        # One progress event per request and group (its counts say how far it got).
        for request in changed.values():
            store.announce(session=session, request=request, now=now)
            ending = domain.upload_ending(request)
            if ending is not None:
                store.finish(
                    session=session,
                    request=request,
                    status=ending.status,
                    message=ending.message,
                    now=now,
                )
    if changed:
        committed()
    return outcomes
