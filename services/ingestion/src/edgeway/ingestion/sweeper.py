"""Housekeeping: requests whose worker died, uploads that lost files, orphaned objects, retention.

- A capture whose lease ran out was running on a replica that stopped: its request fails.
- An upload still waiting for files long after it was opened lost some (the gateway's publish
  failed halfway): it fails, keeping what was stored.
- Objects are written before their rows, so a crash between the two leaves an object no row
  names. Such an object can only be recent (it is written at once), so only today's and
  yesterday's key prefixes are listed, and only objects older than the grace period (a write in
  flight has its row a moment later) are removed.
- Both clocks assume the database is there: a file's commit waits out an outage however long
  (uploads.py), holding an object whose row comes only once the database is back, and no upload
  progresses meanwhile. So once an outage is noticed (a sweep, or a commit, found the database
  unreachable) neither runs until the database has been back for its whole period
  (`upload_timeout_s`, `orphan_grace_s`): the commits that waited get their turn first.
- Retention removes frames and phone files older than `retention_days`: the object first, then the
  row, so a crash in between leaves a row whose object is gone, which the next run removes; never
  an object no row names.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.db import is_outage
from edgeway.common.logging import get_logger
from edgeway.common.objects import ObjectStore
from edgeway.common.schemas.ingest import RequestStatus
from edgeway.ingestion import domain, store
from edgeway.ingestion.settings import IngestionSettings

RETENTION_BATCH = 500

log = get_logger("edgeway.ingestion.sweeper")


@dataclass
class SweepReport:
    expired_captures: int = 0
    stale_uploads: int = 0
    orphans_removed: list[str] = field(default_factory=list)
    expired_objects: int = 0
    requests_removed: int = 0


class Sweeper:
    def __init__(
        self,
        *,
        settings: IngestionSettings,
        sessions: async_sessionmaker[AsyncSession],
        objects: ObjectStore,
        committed: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._objects = objects
        self._committed = committed
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.last: SweepReport | None = None
        # Whether the database was found away since the last sweep that reached it, and when a
        # sweep last reached it after such an outage.
        self._outage = False
        self._database_back_at: datetime | None = None

    def database_lost(self) -> None:
        """Something here found the database unreachable (the sweeper itself, or a commit)."""
        self._outage = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingestion-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                self.last = await self.sweep()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("sweep failed", error=repr(exc))
            await asyncio.sleep(self._settings.sweep_interval_s)

    async def sweep(self) -> SweepReport:
        report = SweepReport()
        now = self._clock()
        try:
            await self._fail_abandoned(now, report)
            await self._remove_orphans(now, report)
            await self._apply_retention(now, report)
        except Exception as exc:
            if is_outage(exc):
                self.database_lost()
            raise
        if report.orphans_removed or report.expired_captures or report.stale_uploads:
            log.info(
                "swept",
                expired_captures=report.expired_captures,
                stale_uploads=report.stale_uploads,
                orphans=len(report.orphans_removed),
                expired_objects=report.expired_objects,
            )
        return report

    async def _fail_abandoned(self, now: datetime, report: SweepReport) -> None:
        async with self._sessions.begin() as session:
            for request in await store.expired_captures(session=session, now=now):
                report.expired_captures += store.finish(
                    session=session,
                    request=request,
                    status=RequestStatus.FAILED,
                    now=now,
                    message=domain.CAPTURE_INTERRUPTED,
                )
            if self._outage:  # the database answers again (this sweep just reached it)
                self._outage = False
                self._database_back_at = now
            timeout = timedelta(seconds=self._settings.upload_timeout_s)
            # No upload progressed while the database was away: their clock runs again from
            # when it came back.
            stale = (
                await store.stale_uploads(session=session, before=now - timeout)
                if self._database_settled(now, timeout)
                else []
            )
            for request in stale:
                ending = domain.lost_files_ending(request)
                report.stale_uploads += store.finish(
                    session=session,
                    request=request,
                    status=ending.status,
                    now=now,
                    message=ending.message,
                )
        if report.expired_captures or report.stale_uploads:
            self._committed()

    def _database_settled(self, now: datetime, period: timedelta) -> bool:
        """Whether the database has been there for `period`, as far as this replica knows:
        no outage noticed since the last sweep reached it, and none ended less than `period`
        ago."""
        if self._outage:
            return False
        return self._database_back_at is None or now - self._database_back_at >= period

    async def _remove_orphans(self, now: datetime, report: SweepReport) -> None:
        grace = timedelta(seconds=self._settings.orphan_grace_s)
        if not self._database_settled(now, grace):
            # An object older than the grace may be a file whose commit waited the outage
            # out and lands in a moment: it is not an orphan.
            return
        for prefix in (domain.FRAMES_PREFIX, domain.FILES_PREFIX):
            for day in (now - timedelta(days=1), now):
                listed = await self._objects.list(f"{prefix}{day:%Y/%m/%d}/")
                candidates = [item.key for item in listed if item.last_modified <= now - grace]
                if not candidates:
                    continue
                async with self._sessions() as session:
                    known = await store.known_keys(session=session, keys=candidates)
                for key in candidates:
                    if key not in known:
                        await self._objects.delete(key)
                        report.orphans_removed.append(key)

    async def _apply_retention(self, now: datetime, report: SweepReport) -> None:
        before = now - timedelta(days=self._settings.retention_days)
        for table in (store.StoredFrame, store.PhoneFile):
            while True:
                async with self._sessions() as session:
                    rows = await store.expired_objects(
                        session=session, table=table, before=before, limit=RETENTION_BATCH
                    )
                if not rows:
                    break
                for _, key in rows:
                    await self._objects.delete(key)
                async with self._sessions.begin() as session:
                    await store.delete_rows(
                        session=session, table=table, ids=[row_id for row_id, _ in rows]
                    )
                report.expired_objects += len(rows)
                if len(rows) < RETENTION_BATCH:
                    break
        async with self._sessions.begin() as session:
            report.requests_removed = await store.delete_finished_requests(
                session=session, before=before
            )
