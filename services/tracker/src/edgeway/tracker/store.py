"""The tracker database: environments, their videos, tasks and every track observation.

Functions take the session as a keyword and never open or commit a transaction: the caller does.
A task's progress is fenced on its `generation`: each run that takes a task up increments it, and
a checkpoint commits only while the generation is still the one the run took (so a run that lost
the task, to a crash that was not one or to a stop, cannot write over the one that has it).
Observations are unique on (task, camera, frame, track) and inserted with ON CONFLICT DO NOTHING.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeway.common.db import BigId, JSONDocument, Migrations, UTCDateTime, dialect_insert
from edgeway.common.schemas.tracking import TaskStatus

if TYPE_CHECKING:  # the domain pulls the vision core in, which the migrations do not need
    from edgeway.tracker.domain import VideoFacts

MIGRATIONS = Migrations(
    Path(__file__).with_name("migrations"), version_table="alembic_version_tracker"
)

ID_LENGTH = 64  # edgeway.common.schemas.tracking.ID_PATTERN
UUID_LENGTH = 36
ACTIVE = tuple(status.value for status in TaskStatus if not status.terminal)
TERMINAL = tuple(status.value for status in TaskStatus if status.terminal)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s",
        }
    )


class Environment(Base):
    """A named set of cameras; `spec` is its EnvironmentSpec (homographies as points)."""

    __tablename__ = "environments"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[Any] = mapped_column(JSONDocument)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class Video(Base):
    """The video of a `file` camera: the last upload, ready (with its object) or refused."""

    __tablename__ = "videos"

    environment_id: Mapped[str] = mapped_column(
        ForeignKey("environments.id", ondelete="CASCADE"), primary_key=True
    )
    camera_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    video_id: Mapped[str] = mapped_column(String(UUID_LENGTH), unique=True)
    status: Mapped[str] = mapped_column(String(20))  # ready, rejected
    reason: Mapped[str | None] = mapped_column(Text)
    object_key: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    frames: Mapped[int] = mapped_column(Integer)
    fps: Mapped[float] = mapped_column(Double)
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class Task(Base):
    """One processing task: SpotOn's status fields, its environment as it was at the start,
    who runs it (`generation`, `owner`) and where a resumed run picks up (`checkpoint_*`)."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_environment_id", "environment_id"),
        Index("ix_tasks_status_finished", "status", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    environment_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    mode: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(20))
    progress: Mapped[float] = mapped_column(Double, default=0.0)
    current_step: Mapped[str] = mapped_column(Text)
    details: Mapped[str] = mapped_column(Text)
    # The environment (spec and videos) when the task started: later edits do not touch it.
    environment: Mapped[Any] = mapped_column(JSONDocument)
    # The environment's id while this is an active live task, else NULL: one at a time.
    live_lock: Mapped[str | None] = mapped_column(String(ID_LENGTH), unique=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(100))
    checkpoint_frame: Mapped[int] = mapped_column(BigInteger, default=-1)
    checkpoint: Mapped[Any | None] = mapped_column(JSONDocument)  # MultiCameraTracker.snapshot
    frames_total: Mapped[int | None] = mapped_column(BigInteger)
    frames_done: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Observation(Base):
    """One track in one camera at one frame of one task."""

    __tablename__ = "track_observations"
    __table_args__ = (
        UniqueConstraint("task_id", "camera_id", "frame_index", "track_id", name="uq_observation"),
        Index("ix_observations_task_global", "task_id", "global_id"),
        Index("ix_observations_task_captured", "task_id", "captured_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    camera_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    frame_index: Mapped[int] = mapped_column(BigInteger)
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime)
    track_id: Mapped[int] = mapped_column(Integer)
    global_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    x1: Mapped[float] = mapped_column(Double)
    y1: Mapped[float] = mapped_column(Double)
    x2: Mapped[float] = mapped_column(Double)
    y2: Mapped[float] = mapped_column(Double)
    confidence: Mapped[float] = mapped_column(Double)
    map_x: Mapped[float | None] = mapped_column(Double)
    map_y: Mapped[float | None] = mapped_column(Double)


# --- environments ----------------------------------------------------------------------------


async def insert_environment(*, session: AsyncSession, spec: dict[str, Any]) -> bool:
    """Store a new environment; False when one with its id exists."""
    stored = await session.scalar(
        dialect_insert(session, Environment)
        .values(id=spec["environment_id"], name=spec["name"], spec=spec)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(Environment.id)
    )
    return stored is not None


async def list_environments(*, session: AsyncSession) -> list[Environment]:
    return list(await session.scalars(select(Environment).order_by(Environment.id)))


async def get_environment(
    *, session: AsyncSession, environment_id: str, lock: bool = False
) -> Environment | None:
    """One environment; `lock` holds its row until the transaction ends (PostgreSQL)."""
    query = select(Environment).where(Environment.id == environment_id)
    if lock:
        query = query.with_for_update()
    return (await session.scalars(query)).first()


async def replace_environment(*, session: AsyncSession, spec: dict[str, Any]) -> None:
    await session.execute(
        update(Environment)
        .where(Environment.id == spec["environment_id"])
        .values(name=spec["name"], spec=spec, updated_at=func.now())
    )


async def delete_environment(*, session: AsyncSession, environment_id: str) -> None:
    await session.execute(delete(Video).where(Video.environment_id == environment_id))
    await session.execute(delete(Environment).where(Environment.id == environment_id))


async def active_tasks(*, session: AsyncSession, environment_id: str) -> list[str]:
    """Ids of the tasks not finished yet on this environment."""
    rows = await session.scalars(
        select(Task.id).where(Task.environment_id == environment_id, Task.status.in_(ACTIVE))
    )
    return list(rows)


# --- videos ----------------------------------------------------------------------------------


async def videos_of(*, session: AsyncSession, environment_id: str) -> dict[str, Video]:
    rows = await session.scalars(select(Video).where(Video.environment_id == environment_id))
    return {video.camera_id: video for video in rows}


async def all_videos(*, session: AsyncSession) -> dict[str, dict[str, Video]]:
    found: dict[str, dict[str, Video]] = {}
    for video in await session.scalars(select(Video)):
        found.setdefault(video.environment_id, {})[video.camera_id] = video
    return found


async def video_known(*, session: AsyncSession, video_id: str) -> bool:
    return (
        await session.scalar(select(Video.video_id).where(Video.video_id == video_id))
    ) is not None


async def delete_videos(
    *, session: AsyncSession, environment_id: str, keep: Sequence[str]
) -> list[str]:
    """Forget the videos of cameras not in `keep`; their object keys, to delete after commit."""
    gone = list(
        await session.scalars(
            select(Video).where(
                Video.environment_id == environment_id, Video.camera_id.not_in(list(keep))
            )
        )
    )
    for video in gone:
        await session.delete(video)
    return [video.object_key for video in gone if video.object_key]


def _task_keys(environment: Any) -> set[str]:
    videos = (environment or {}).get("videos") or {}
    return {v["object_key"] for v in videos.values() if v.get("object_key")}


async def keys_in_use(
    *, session: AsyncSession, environment_id: str, keys: Sequence[str]
) -> set[str]:
    """Which of an environment's video objects are still needed: a camera's current video, or
    one a kept task read (its media URLs serve it until retention deletes the task)."""
    if not keys:
        return set()
    used: set[str] = {
        key
        for key in await session.scalars(
            select(Video.object_key).where(
                Video.environment_id == environment_id, Video.object_key.in_(list(keys))
            )
        )
        if key is not None
    }
    for environment in await session.scalars(
        select(Task.environment).where(Task.environment_id == environment_id)
    ):
        used |= _task_keys(environment)
    return used & set(keys)


async def record_video(
    *, session: AsyncSession, environment_id: str, camera_id: str, video: VideoFacts
) -> str | None:
    """The camera's video is now this one; the object key of the one it replaces, if any."""
    old = (
        await session.scalars(
            select(Video).where(
                Video.environment_id == environment_id, Video.camera_id == camera_id
            )
        )
    ).first()
    replaced = old.object_key if old is not None else None
    if old is not None:
        await session.delete(old)
        await session.flush()
    session.add(Video(environment_id=environment_id, camera_id=camera_id, **asdict(video)))
    return replaced


# --- tasks -----------------------------------------------------------------------------------


async def create_task(
    *,
    session: AsyncSession,
    task_id: str,
    environment_id: str,
    mode: str,
    environment: dict[str, Any],
    frames_total: int | None,
    now: datetime,
) -> None:
    session.add(
        Task(
            id=task_id,
            environment_id=environment_id,
            mode=mode,
            status=TaskStatus.QUEUED.value,
            progress=0.0,
            current_step="Queued",
            details="waiting for a worker",
            environment=environment,
            live_lock=environment_id if mode == "live" else None,
            generation=0,
            checkpoint_frame=-1,
            frames_total=frames_total,
            frames_done=0,
            created_at=now,
            updated_at=now,
        )
    )


async def get_task(*, session: AsyncSession, task_id: str) -> Task | None:
    return await session.get(Task, task_id)


async def _update_active(session: AsyncSession, task_id: str, **values: Any) -> Task | None:
    """Set `values` on a task that is still unfinished; the task as it is now, or None."""
    result = await session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status.in_(ACTIVE))
        .values(**values)
        .returning(Task.id)
    )
    if result.first() is None:
        return None
    session.expire_all()
    return await session.get(Task, task_id)


async def claim_task(
    *, session: AsyncSession, task_id: str, owner: str, now: datetime
) -> Task | None:
    """Take an unfinished task up (a first run, or a resume): its generation moves on, so any
    earlier run of it can no longer commit. None when it is finished (or was never created)."""
    return await _update_active(
        session,
        task_id,
        generation=Task.generation + 1,
        owner=owner,
        started_at=func.coalesce(Task.started_at, now),
        updated_at=now,
    )


@dataclass(frozen=True, slots=True)
class Progress:
    """What a run commits at a checkpoint (and at its end)."""

    status: TaskStatus
    progress: float
    current_step: str
    details: str
    frames_done: int
    checkpoint_frame: int
    checkpoint: dict[str, Any] | None
    frames_total: int | None = None


async def save_progress(
    *, session: AsyncSession, task_id: str, generation: int, progress: Progress, now: datetime
) -> bool:
    """Commit a run's progress if the task is still its own and still active (False: not)."""
    values: dict[str, Any] = {
        "status": progress.status.value,
        "progress": progress.progress,
        "current_step": progress.current_step,
        "details": progress.details,
        "frames_done": progress.frames_done,
        "checkpoint_frame": progress.checkpoint_frame,
        "checkpoint": progress.checkpoint,
        "updated_at": now,
    }
    if progress.frames_total is not None:
        values["frames_total"] = progress.frames_total
    if progress.status.terminal:
        values["finished_at"] = now
        values["live_lock"] = None
    result = await session.execute(
        update(Task)
        .where(Task.id == task_id, Task.generation == generation, Task.status.in_(ACTIVE))
        .values(**values)
        .returning(Task.id)
    )
    return result.first() is not None


async def finish_task(
    *, session: AsyncSession, task_id: str, status: TaskStatus, details: str, now: datetime
) -> Task | None:
    """End an unfinished task from outside its run (a stop, a failure to queue it)."""
    return await _update_active(
        session,
        task_id,
        status=status.value,
        current_step=status.value.capitalize(),
        details=details,
        live_lock=None,
        finished_at=now,
        updated_at=now,
    )


async def delete_finished_before(
    *, session: AsyncSession, cutoff: datetime, limit: int = 100
) -> tuple[list[str], list[str]]:
    """Delete up to `limit` tasks that finished before `cutoff`, with their observations; the
    ids, and the video objects that only they still needed (to delete after commit)."""
    rows = (
        await session.execute(
            select(Task.id, Task.environment_id, Task.environment)
            .where(Task.status.in_(TERMINAL), Task.finished_at < cutoff)
            .order_by(Task.finished_at)
            .limit(limit)
        )
    ).all()
    ids = [row.id for row in rows]
    unused: list[str] = []
    if ids:
        # Explicitly, not by cascade: SQLite enforces it only with its foreign_keys pragma.
        await session.execute(delete(Observation).where(Observation.task_id.in_(ids)))
        await session.execute(delete(Task).where(Task.id.in_(ids)))
        by_environment: dict[str, set[str]] = {}
        for row in rows:
            by_environment.setdefault(row.environment_id, set()).update(_task_keys(row.environment))
        for environment_id, keys in by_environment.items():
            used = await keys_in_use(
                session=session, environment_id=environment_id, keys=sorted(keys)
            )
            unused.extend(sorted(keys - used))
    return ids, unused


# --- observations ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObservationRow:
    camera_id: str
    frame_index: int
    captured_at: datetime
    track_id: int
    global_id: str
    bbox: tuple[float, float, float, float]
    confidence: float
    map_coords: tuple[float, float] | None


async def insert_observations(
    *, session: AsyncSession, task_id: str, rows: Sequence[ObservationRow]
) -> None:
    """One multi-row statement per group; a row already stored is skipped (natural key)."""
    if not rows:
        return
    statement = dialect_insert(session, Observation).on_conflict_do_nothing(
        index_elements=["task_id", "camera_id", "frame_index", "track_id"]
    )
    await session.execute(
        statement,
        [
            {
                "task_id": task_id,
                "camera_id": row.camera_id,
                "frame_index": row.frame_index,
                "captured_at": row.captured_at,
                "track_id": row.track_id,
                "global_id": row.global_id,
                "x1": row.bbox[0],
                "y1": row.bbox[1],
                "x2": row.bbox[2],
                "y2": row.bbox[3],
                "confidence": row.confidence,
                "map_x": None if row.map_coords is None else row.map_coords[0],
                "map_y": None if row.map_coords is None else row.map_coords[1],
            }
            for row in rows
        ],
    )


async def query_observations(
    *,
    session: AsyncSession,
    task_id: str,
    camera_id: str | None,
    global_id: str | None,
    since: datetime | None,
    until: datetime | None,
    after: int,
    limit: int,
) -> list[Observation]:
    """A page of a task's observations in the order they were stored (frame by frame)."""
    query = select(Observation).where(Observation.task_id == task_id, Observation.id > after)
    if camera_id is not None:
        query = query.where(Observation.camera_id == camera_id)
    if global_id is not None:
        query = query.where(Observation.global_id == global_id)
    if since is not None:
        query = query.where(Observation.captured_at >= since)
    if until is not None:
        query = query.where(Observation.captured_at < until)
    return list(await session.scalars(query.order_by(Observation.id).limit(limit)))


async def count_observations(*, session: AsyncSession, task_id: str) -> int:
    count = await session.scalar(
        select(func.count()).select_from(Observation).where(Observation.task_id == task_id)
    )
    return int(count or 0)
