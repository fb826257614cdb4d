"""FastStream subscribers of the tracker: each decodes, calls the domain or a flow, answers.

- `on_run`: a task's run command, held for the run's whole life (`flows.TaskRuns`);
- `on_video`: an uploaded video, acked once checked, stored and recorded (`videos`);
- `on_detections`: edge frames for the live tasks this replica runs (checked, then queued);
- `on_unrouted`: edge frames no live task took: the producer is told why;
- `on_control`: stops, heard by every replica;
- requests from the gateway are answered by `answers.answer`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker
from faststream.rabbit.message import RabbitMessage
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from edgeway.common.broker import answer_requests, publish, whole_message
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.schemas.tracking import (
    DETECTIONS_TYPE,
    ERROR_TYPE,
    EdgeFrame,
    EnvironmentSpec,
    ExternalSource,
    out_of_frame,
)
from edgeway.tracker import answers, domain, store, videos
from edgeway.tracker.flows import SERVICE

if TYPE_CHECKING:
    from edgeway.tracker.app import Deps

log = get_logger("edgeway.tracker.handlers")


async def on_run(message: RabbitMessage, deps: Deps) -> None:
    await deps.runs.handle(message, deps)


async def on_video(message: RabbitMessage, deps: Deps) -> None:
    upload = videos.Upload.of(dict(message.headers or {}), message.body)
    if upload is None:
        log.warning("video without its environment, camera or id dropped")
        return
    outcome = await videos.take(upload, deps)
    deps.metrics.videos.labels(outcome).inc()


async def reject(
    deps: Deps, envelope: Envelope, code: ErrorCode, reason: str, frame: EdgeFrame | None = None
) -> None:
    """Tell the producer (on its connection's reply channel) why a frame was not taken; the
    details name the frame, so a device sending many knows which."""
    outcome = "not_tracking" if code is ErrorCode.NOT_TRACKING else "rejected"
    deps.metrics.edge_frames.labels(outcome).inc()
    log.debug("edge frame refused", code=code.value, reason=reason, producer=envelope.producer)
    if not envelope.reply_channel:
        return
    details = (
        None if frame is None else {"camera_id": frame.camera_id, "frame_index": frame.frame_index}
    )
    error = ErrorFrame(code=code, reason=reason, message_id=envelope.message_id, details=details)
    await publish(
        deps.broker,
        error.encode().encode(),
        envelope=envelope.derive(type=ERROR_TYPE, producer=SERVICE),
        exchange=deps.topology.broadcast,
        routing_key=envelope.reply_channel,
        durable=False,
    )


def misfit(frame: EdgeFrame, spec: EnvironmentSpec) -> tuple[ErrorCode, str] | None:
    """Why an edge frame does not fit its environment: its camera is not there or not an edge
    one, or a detection lies outside the camera's image. None: it fits."""
    camera = spec.camera(frame.camera_id)
    if camera is None:
        reason = f"environment {frame.environment_id} has no camera {frame.camera_id!r}"
        return ErrorCode.UNKNOWN_CAMERA, reason
    if not isinstance(camera.source, ExternalSource):
        reason = (
            f"camera {frame.camera_id} of environment {frame.environment_id} is a "
            f"{camera.source.kind} source: only external cameras take edge detections"
        )
        return ErrorCode.UNKNOWN_CAMERA, reason
    why = out_of_frame(frame, camera.width, camera.height)
    return None if why is None else (ErrorCode.OUT_OF_FRAME, why)


def _read(message: RabbitMessage) -> tuple[Envelope, EdgeFrame | str]:
    envelope = Envelope.from_message(message, type=DETECTIONS_TYPE)
    try:
        return envelope, EdgeFrame.model_validate_json(message.body)
    except ValidationError as exc:
        return envelope, domain.validation_reason(exc)


async def on_detections(message: RabbitMessage, deps: Deps) -> None:
    envelope, frame = _read(message)
    if isinstance(frame, str):
        await reject(deps, envelope, ErrorCode.INVALID_SHAPE, frame)
        return
    inbox = deps.live.inbox(frame.environment_id)
    if inbox is None:  # the task ended as the frame came: as if no one had taken it
        await on_unrouted(message, deps)
        return
    refused = misfit(frame, inbox.spec)
    if refused is not None:
        await reject(deps, envelope, *refused, frame)
        return
    inbox.put(frame)


async def on_unrouted(message: RabbitMessage, deps: Deps) -> None:
    """A frame no live task took: unknown environment or camera, or no live task running."""
    envelope, frame = _read(message)
    if isinstance(frame, str):
        await reject(deps, envelope, ErrorCode.INVALID_SHAPE, frame)
        return
    try:
        async with deps.sessions() as session:
            environment = await store.get_environment(
                session=session, environment_id=frame.environment_id
            )
    except SQLAlchemyError as exc:
        log.warning("unrouted frame not checked", error=repr(exc))
        return
    if environment is None:
        reason = f"no environment {frame.environment_id!r}"
        await reject(deps, envelope, ErrorCode.UNKNOWN_ENVIRONMENT, reason, frame)
        return
    refused = misfit(frame, EnvironmentSpec.model_validate(environment.spec))
    if refused is not None:
        await reject(deps, envelope, *refused, frame)
        return
    reason = (
        f"no live task tracks environment {frame.environment_id}: start one with POST "
        '/api/v1/processing-tasks/start {"environment_id": ..., "mode": "live"}'
    )
    await reject(deps, envelope, ErrorCode.NOT_TRACKING, reason, frame)


async def on_control(message: RabbitMessage, deps: Deps) -> None:
    task_id = answers.control_stop(message.body)
    if task_id is not None and deps.runs.stop(task_id):
        log.info("task stopped here", task_id=task_id)


def register(broker: RabbitBroker, deps: Deps) -> None:
    """Every subscriber of the tracker, on `broker`, with `deps`."""
    topology, settings = deps.topology, deps.settings
    # Every handler takes the message whole and answers no one.
    subscriber = partial(broker.subscriber, decoder=whole_message, no_reply=True)

    # MANUAL: the run acks (or hands back) its command itself when it ends. Its own channel,
    # whose prefetch is how many tasks this replica runs at once.
    @subscriber(
        topology.tracking_commands_queue,
        topology.tracking_commands,
        channel=Channel(prefetch_count=settings.tasks_per_worker),
        ack_policy=AckPolicy.MANUAL,
    )
    async def run_command(message: RabbitMessage) -> None:
        await on_run(message, deps)

    # NACK_ON_ERROR: a failure that is not the file's (the database) is tried again; a file
    # that can never be taken is dead-lettered by the queue's delivery limit.
    @subscriber(
        topology.tracking_videos_queue,
        topology.tracking_videos,
        channel=Channel(prefetch_count=2),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def video(message: RabbitMessage) -> None:
        await on_video(message, deps)

    # Live and lossy: acked when handled (never requeued); the queue is bounded (drop-head).
    @subscriber(
        topology.tracking_detections_queue(settings.replica_id),
        ack_policy=AckPolicy.ACK,
    )
    async def detections(message: RabbitMessage) -> None:
        await on_detections(message, deps)

    @subscriber(
        topology.tracking_unrouted_queue,
        topology.tracking_unrouted,
        ack_policy=AckPolicy.ACK,
    )
    async def unrouted(message: RabbitMessage) -> None:
        await on_unrouted(message, deps)

    @subscriber(
        topology.tracking_control_queue(settings.replica_id),
        topology.tracking_control,
        ack_policy=AckPolicy.ACK,
    )
    async def control(message: RabbitMessage) -> None:
        await on_control(message, deps)

    answer_requests(
        broker, topology.tracking_requests_queue, lambda body: answers.answer(body, deps)
    )
