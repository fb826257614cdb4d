"""Request/reply answers to the gateway: environments, task start, status, stop, tracks.

Each answer is a `TrackingReply`: the HTTP status the gateway gives and the body it sends. Every
request is one short transaction. A refusal says why in the client's words.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from edgeway.common.broker import encode, publish
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.tracking import (
    CONTROL_TYPE,
    TRACKING_REQUEST,
    CreateEnvironment,
    DeleteEnvironment,
    EnvironmentSpec,
    GetEnvironment,
    GetTaskStatus,
    ListEnvironments,
    PrepareVideo,
    QueryTracks,
    ReadMedia,
    ReplaceEnvironment,
    StartTask,
    StopTask,
    TaskMode,
    TaskStatus,
    TrackingReply,
)
from edgeway.common.schemas.tracking import FileSource as FileSourceModel
from edgeway.tracker import domain, store
from edgeway.tracker.domain import Refusal
from edgeway.tracker.flows import SERVICE, publish_client, queue_run

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from edgeway.tracker.app import Deps

log = get_logger("edgeway.tracker.answers")
_FACTS = tuple(field.name for field in fields(domain.VideoFacts))  # columns of store.Video too


async def answer(body: bytes, deps: Deps) -> bytes:
    """One request from the gateway, answered (never raises: a failure is a 5xx reply)."""
    try:
        request = TRACKING_REQUEST.validate_json(body)
    except ValidationError as exc:
        reply = Refusal(400, "invalid_request", domain.validation_reason(exc)).reply()
        return reply.model_dump_json().encode()
    try:
        reply = await ANSWERS[type(request)](request, deps)
    except SQLAlchemyError as exc:
        log.warning("request failed on the database", command=request.command, error=repr(exc))
        reply = Refusal(503, "unavailable", "the tracker database is unavailable").reply()
    return reply.model_dump_json().encode()


# --- environments ----------------------------------------------------------------------------


def _facts(video: store.Video) -> domain.VideoFacts:
    return domain.VideoFacts(**{name: getattr(video, name) for name in _FACTS})


def _unknown_environment(environment_id: str) -> TrackingReply:
    return Refusal(
        404, "unknown_environment", f"no environment {environment_id!r}: POST /api/v1/environments"
    ).reply()


def _busy(environment_id: str, tasks: list[str]) -> TrackingReply:
    return Refusal(
        409,
        "conflict",
        f"environment {environment_id} has unfinished tasks ({', '.join(tasks)}): stop them first",
    ).reply()


async def _view(session: AsyncSession, environment: store.Environment) -> dict[str, Any]:
    videos = await store.videos_of(session=session, environment_id=environment.id)
    spec = EnvironmentSpec.model_validate(environment.spec)
    return domain.environment_view(spec, {c: _facts(v) for c, v in videos.items()})


async def _idle_environment(
    session: AsyncSession, environment_id: str
) -> store.Environment | TrackingReply:
    """The environment, locked, while no unfinished task reads it; else the refusal (404, 409)."""
    environment = await store.get_environment(
        session=session, environment_id=environment_id, lock=True
    )
    if environment is None:
        return _unknown_environment(environment_id)
    tasks = await store.active_tasks(session=session, environment_id=environment_id)
    if tasks:
        return _busy(environment_id, tasks)
    return environment


async def _forget_videos(
    session: AsyncSession, environment_id: str, keep: Sequence[str]
) -> list[str]:
    """Forget the environment's videos but those of the cameras in `keep`; the keys of their
    objects that no kept task needs either (its media URLs serve them), to delete."""
    keys = await store.delete_videos(session=session, environment_id=environment_id, keep=keep)
    used = await store.keys_in_use(session=session, environment_id=environment_id, keys=keys)
    return [key for key in keys if key not in used]


async def create_environment(request: CreateEnvironment, deps: Deps) -> TrackingReply:
    spec = domain.normalise_environment(request.environment)
    if isinstance(spec, Refusal):
        return spec.reply()
    spec = domain.seal_rtsp(spec, deps.cipher)
    async with deps.sessions.begin() as session:
        if not await store.insert_environment(session=session, spec=spec.model_dump(mode="json")):
            return Refusal(
                409,
                "conflict",
                f"environment {spec.environment_id} exists: PUT "
                f"/api/v1/environments/{spec.environment_id} replaces it",
            ).reply()
        environment = await store.get_environment(
            session=session, environment_id=spec.environment_id
        )
        assert environment is not None
        return TrackingReply(status=201, body=await _view(session, environment))


async def list_environments(request: ListEnvironments, deps: Deps) -> TrackingReply:
    async with deps.sessions() as session:
        environments = await store.list_environments(session=session)
        videos = await store.all_videos(session=session)
    views = [
        domain.environment_view(
            EnvironmentSpec.model_validate(environment.spec),
            {c: _facts(v) for c, v in videos.get(environment.id, {}).items()},
        )
        for environment in environments
    ]
    return TrackingReply(status=200, body={"environments": views})


async def get_environment(request: GetEnvironment, deps: Deps) -> TrackingReply:
    async with deps.sessions() as session:
        environment = await store.get_environment(
            session=session, environment_id=request.environment_id
        )
        if environment is None:
            return _unknown_environment(request.environment_id)
        return TrackingReply(status=200, body=await _view(session, environment))


async def replace_environment(request: ReplaceEnvironment, deps: Deps) -> TrackingReply:
    if request.environment.environment_id != request.environment_id:
        return Refusal(
            400,
            "invalid_shape",
            f"the body's environment_id {request.environment.environment_id!r} is not the "
            f"path's {request.environment_id!r}",
        ).reply()
    spec = domain.normalise_environment(request.environment)
    if isinstance(spec, Refusal):
        return spec.reply()
    async with deps.sessions.begin() as session:
        environment = await _idle_environment(session, request.environment_id)
        if isinstance(environment, TrackingReply):
            return environment
        old = EnvironmentSpec.model_validate(environment.spec)
        spec = domain.seal_rtsp(spec, deps.cipher, old)
        stale = await _forget_videos(session, request.environment_id, domain.videos_kept(old, spec))
        await store.replace_environment(session=session, spec=spec.model_dump(mode="json"))
        await session.flush()
        session.expire_all()
        replaced = await store.get_environment(
            session=session, environment_id=request.environment_id
        )
        assert replaced is not None
        view = await _view(session, replaced)
    for key in stale:
        await deps.objects.delete(key)
    return TrackingReply(status=200, body=view)


async def delete_environment(request: DeleteEnvironment, deps: Deps) -> TrackingReply:
    async with deps.sessions.begin() as session:
        environment = await _idle_environment(session, request.environment_id)
        if isinstance(environment, TrackingReply):
            return environment
        stale = await _forget_videos(session, request.environment_id, ())
        await store.delete_environment(session=session, environment_id=request.environment_id)
    for key in stale:
        await deps.objects.delete(key)
    return TrackingReply(status=204)


async def prepare_video(request: PrepareVideo, deps: Deps) -> TrackingReply:
    """Whether the camera takes a video now, and the upload's id and size limit."""
    async with deps.sessions() as session:
        environment = await store.get_environment(
            session=session, environment_id=request.environment_id
        )
        if environment is None:
            return _unknown_environment(request.environment_id)
        spec = EnvironmentSpec.model_validate(environment.spec)
        camera = spec.camera(request.camera_id)
        if camera is None:
            return Refusal(
                404,
                "unknown_camera",
                f"environment {spec.environment_id} has no camera {request.camera_id!r}",
            ).reply()
        if not isinstance(camera.source, FileSourceModel):
            return Refusal(
                409,
                "conflict",
                f"camera {camera.camera_id} is {camera.source.kind}: only file cameras take a "
                "video",
            ).reply()
        tasks = await store.active_tasks(session=session, environment_id=spec.environment_id)
        if tasks:
            return _busy(spec.environment_id, tasks)
    return TrackingReply(
        status=200,
        body={
            "video_id": str(uuid.uuid4()),
            "max_bytes": deps.settings.max_video_bytes,
            "width": camera.width,
            "height": camera.height,
        },
    )


# --- tasks -----------------------------------------------------------------------------------


def _task_id(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _unknown_task(task_id: str) -> TrackingReply:
    return Refusal(404, "not_found", f"no task {task_id!r}").reply()


async def _find_task(value: str, deps: Deps) -> store.Task | TrackingReply:
    """The task `value` names, or the 404 for an id that is not one or names none."""
    task_id = _task_id(value)
    if task_id is None:
        return _unknown_task(value)
    async with deps.sessions() as session:
        task = await store.get_task(session=session, task_id=task_id)
    return _unknown_task(task_id) if task is None else task


async def start_task(request: StartTask, deps: Deps) -> TrackingReply:
    task_id = str(uuid.uuid4())
    try:
        async with deps.sessions.begin() as session:
            environment = await store.get_environment(
                session=session, environment_id=request.environment_id, lock=True
            )
            if environment is None:
                return _unknown_environment(request.environment_id)
            spec = EnvironmentSpec.model_validate(environment.spec)
            videos = {
                camera: _facts(video)
                for camera, video in (
                    await store.videos_of(session=session, environment_id=spec.environment_id)
                ).items()
            }
            refusals = domain.start_refusals(spec, videos, request.mode)
            if refusals:
                return Refusal(
                    400, "not_ready", f"a {request.mode} task cannot start: {'; '.join(refusals)}"
                ).reply()
            await store.create_task(
                session=session,
                task_id=task_id,
                environment_id=spec.environment_id,
                mode=request.mode.value,
                environment={"spec": environment.spec, "videos": _videos_json(videos)},
                frames_total=None,
                now=datetime.now(UTC),
            )
    except IntegrityError:  # the live lock: one live task per environment at a time
        return Refusal(
            409,
            "conflict",
            f"a live task already tracks environment {request.environment_id}: stop it first",
        ).reply()
    try:
        await queue_run(deps.broker, deps.topology, task_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the task cannot run
        log.warning("run command not queued", task_id=task_id, error=repr(exc))
        async with deps.sessions.begin() as session:
            await store.finish_task(
                session=session,
                task_id=task_id,
                status=TaskStatus.FAILED,
                details="the task could not be queued",
                now=datetime.now(UTC),
            )
        return Refusal(503, "unavailable", "the task could not be queued; start it again").reply()
    log.info("task queued", task_id=task_id, environment_id=request.environment_id)
    return TrackingReply(
        status=202,
        body={"task_id": task_id, "environment_id": request.environment_id, "mode": request.mode},
    )


def _videos_json(videos: Mapping[str, domain.VideoFacts]) -> dict[str, Any]:
    return {
        camera: {
            "video_id": facts.video_id,
            "status": facts.status,
            "reason": facts.reason,
            "object_key": facts.object_key,
            "size_bytes": facts.size_bytes,
            "frames": facts.frames,
            "fps": facts.fps,
        }
        for camera, facts in videos.items()
    }


async def task_status(request: GetTaskStatus, deps: Deps) -> TrackingReply:
    task = await _find_task(request.task_id, deps)
    if isinstance(task, TrackingReply):
        return task
    media = None
    if task.mode == TaskMode.BATCH and task.status not in domain.NO_MEDIA_YET:
        spec = EnvironmentSpec.model_validate(task.environment["spec"])
        media = domain.media_available(task.id, spec, domain.task_videos(task.environment))
    return TrackingReply(
        status=200,
        body={
            "status": domain.status_view(task),
            "message": domain.status_message(task),
            "media": media,  # a client that joins late hears of the videos as well
        },
    )


async def stop_task(request: StopTask, deps: Deps) -> TrackingReply:
    """Stop a task wherever it runs: STOPPED is committed here, the replica running it hears
    it on the control exchange and ends the run at once; clients hear it now."""
    task_id = _task_id(request.task_id)
    if task_id is None:
        return _unknown_task(request.task_id)
    async with deps.sessions.begin() as session:
        stopped = await store.finish_task(
            session=session,
            task_id=task_id,
            status=TaskStatus.STOPPED,
            details="stopped on request",
            now=datetime.now(UTC),
        )
        task = stopped or await store.get_task(session=session, task_id=task_id)
    if task is None:
        return _unknown_task(task_id)
    if stopped is not None:
        if not deps.runs.stop(task_id):
            await publish(
                deps.broker,
                encode({"stop": task_id}),
                envelope=Envelope(type=CONTROL_TYPE, producer=SERVICE),
                exchange=deps.topology.tracking_control,
                durable=False,
            )
        await publish_client(deps, task_id, domain.status_message(task))
        log.info("task stopped", task_id=task_id)
    return TrackingReply(status=200, body=domain.status_view(task))


async def query_tracks(request: QueryTracks, deps: Deps) -> TrackingReply:
    task_id = _task_id(request.task_id)
    if task_id is None:
        return _unknown_task(request.task_id)
    if request.format == "mot" and request.camera_id is None:
        return Refusal(
            400,
            "invalid_request",
            "format=mot is one camera's sequence: name it with camera_id",
        ).reply()
    async with deps.sessions() as session:
        task = await store.get_task(session=session, task_id=task_id)
        if task is None:
            return _unknown_task(task_id)
        rows = await store.query_observations(
            session=session,
            task_id=task_id,
            camera_id=request.camera_id,
            global_id=request.global_id,
            since=request.since,
            until=request.until,
            after=request.after,
            limit=request.limit,
        )
    next_after = rows[-1].id if len(rows) == request.limit else None
    if request.format == "mot":
        return TrackingReply(
            status=200, body={"text": domain.mot_text(rows), "next_after": next_after}
        )
    return TrackingReply(
        status=200,
        body={
            "task_id": task_id,
            "status": task.status,
            "tracks": [domain.observation_view(row) for row in rows],
            "next_after": next_after,
        },
    )


async def read_media(request: ReadMedia, deps: Deps) -> TrackingReply:
    """A task's video for the gateway's media route: its size and type, and the bytes asked
    for. It is the video the task read, served as long as the task is kept."""
    task = await _find_task(request.task_id, deps)
    if isinstance(task, TrackingReply):
        return task
    key = None
    if task.environment_id == request.environment_id:
        key = domain.media_key(
            domain.task_videos(task.environment),
            camera_id=request.camera_id,
            filename=request.filename,
        )
    if key is None:
        return Refusal(
            404,
            "not_found",
            f"task {task.id} has no video {request.filename!r} of camera "
            f"{request.environment_id}/{request.camera_id}",
        ).reply()
    try:
        if request.length == 0:  # the gateway's first ask: an S3 store's video is fetched there
            expires = timedelta(seconds=deps.settings.presign_expiry_s)
            redirect = await deps.objects.redirect(key, expires=expires)
            if redirect is not None:
                return TrackingReply(status=200, body={"redirect": redirect})
        size, data = await asyncio.to_thread(
            deps.objects.read, key, offset=request.offset, length=request.length
        )
    except FileNotFoundError:
        log.warning("a task's video is missing from the store", task_id=task.id, key=key)
        return Refusal(404, "not_found", f"the video {request.filename!r} is gone").reply()
    return TrackingReply(
        status=200,
        body={
            "size": size,
            "content_type": domain.content_type(request.filename),
            "offset": request.offset,
            "data": base64.b64encode(data).decode(),
        },
    )


# Each request's answer, by the request's type (`answer` looks it up).
ANSWERS: dict[type[BaseModel], Callable[[Any, Deps], Awaitable[TrackingReply]]] = {
    CreateEnvironment: create_environment,
    ListEnvironments: list_environments,
    GetEnvironment: get_environment,
    ReplaceEnvironment: replace_environment,
    DeleteEnvironment: delete_environment,
    PrepareVideo: prepare_video,
    StartTask: start_task,
    GetTaskStatus: task_status,
    StopTask: stop_task,
    QueryTracks: query_tracks,
    ReadMedia: read_media,
}


def control_stop(body: bytes) -> str | None:
    """The task a control message stops (None: not one)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    task_id = message.get("stop") if isinstance(message, dict) else None
    return task_id if isinstance(task_id, str) else None
