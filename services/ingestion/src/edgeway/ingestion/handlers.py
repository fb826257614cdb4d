"""FastStream subscribers of the ingestion service.

- `on_command` (request/reply from the gateway): open an upload, start or cancel an RTSP
  capture, read a request's status (one page of frames, `limit` after `cursor`, with URLs made
  now: `status`). Each names its caller; status and cancel are answered only to the request's
  requester or an operator.
- `on_file` (a durable work queue, one message per file): check, store, commit
  (`uploads.UploadIntake`; a commit waits out a database outage, holding its delivery).
- `on_control` (a fanout every replica hears): the replica running a cancelled capture stops it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from faststream import AckPolicy
from faststream.exceptions import RejectMessage
from faststream.rabbit import Channel, RabbitBroker
from faststream.rabbit.message import RabbitMessage
from pydantic import TypeAdapter, ValidationError

from edgeway.common.broker import answer_requests, whole_message
from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger
from edgeway.common.schemas.ingest import (
    UPLOAD_FILE_TYPE,
    URL_REFUSED,
    CancelRequest,
    CreateUpload,
    GetStatus,
    IngestCommand,
    IngestReply,
    StartCapture,
)
from edgeway.ingestion import domain

if TYPE_CHECKING:
    from faststream.rabbit.subscriber import RabbitSubscriber

    from edgeway.ingestion.app import Deps

COMMANDS: TypeAdapter[CreateUpload | StartCapture | GetStatus | CancelRequest] = TypeAdapter(
    IngestCommand
)

log = get_logger("edgeway.ingestion")


async def on_command(body: bytes, deps: Deps) -> bytes:
    """A command from the gateway, answered with an `IngestReply`."""
    try:
        command = COMMANDS.validate_json(body)
    except ValidationError as exc:
        unsafe = any(error["type"] == URL_REFUSED for error in exc.errors())
        error = URL_REFUSED if unsafe else "invalid"
        reply = IngestReply(ok=False, error=error, message=_first_error(exc))
        return reply.model_dump_json().encode()
    if isinstance(command, CreateUpload):
        refused = await deps.uploads.open(command)
        reply = refused or await deps.respond(command.request_id, command.caller)
    elif isinstance(command, StartCapture):
        reply = await deps.jobs.start(command)
    elif isinstance(command, CancelRequest):
        reply = await deps.jobs.cancel(command.request_id, command.caller)
        if reply.ok:
            # Whichever replica runs it stops it (this one did already, if it was here).
            await deps.broker.publish(
                orjson.dumps({"request_id": command.request_id}),
                exchange=deps.topology.ingest_control,
                persist=False,
            )
    else:
        reply = await deps.respond(
            command.request_id, command.caller, limit=command.limit, cursor=command.cursor
        )
    return reply.model_dump_json().encode()


async def on_file(message: RabbitMessage, deps: Deps) -> None:
    """One file of an upload (an image) or a phone's CSV file: checked, stored, committed."""
    try:
        file = domain.read_file_message(message.headers or {})
    except domain.BadFileMessageError as exc:
        log.error("unusable file message dead-lettered", reason=str(exc))
        raise RejectMessage() from exc
    envelope = Envelope.from_message(message, type=UPLOAD_FILE_TYPE)
    await deps.uploads.store(file, message.body, received=envelope.received_datetime())


async def on_control(message: RabbitMessage, deps: Deps) -> None:
    """A cancelled capture: stopped if it runs on this replica."""
    try:
        request_id = orjson.loads(message.body)["request_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.warning("unusable control message ignored")
        return
    deps.jobs.stop_local(str(request_id))


def register(broker: RabbitBroker, deps: Deps) -> RabbitSubscriber:
    """Every subscriber of the ingestion service, on `broker`, with `deps`; the files'
    subscriber, which shutdown stops first."""
    topology = deps.topology
    answer_requests(broker, topology.ingest_requests_queue, lambda body: on_command(body, deps))

    files = broker.subscriber(
        topology.ingest_uploads_queue,
        topology.ingest_uploads,
        channel=Channel(prefetch_count=deps.settings.upload_prefetch),
        # Acked once committed. A database outage is waited out inside the commit (the
        # deliveries stay unacked meanwhile: the prefetch stops more from coming); anything
        # else unexpected (storage down, a bug) is retried up to the queue's delivery limit,
        # then dead-lettered.
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=whole_message,
        no_reply=True,
    )

    @files
    async def file(message: RabbitMessage) -> None:
        await on_file(message, deps)

    @broker.subscriber(
        topology.ingest_control_queue(deps.replica_id),
        topology.ingest_control,
        ack_policy=AckPolicy.ACK_FIRST,
        decoder=whole_message,
        no_reply=True,
    )
    async def control(message: RabbitMessage) -> None:
        await on_control(message, deps)

    return files


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg"))
