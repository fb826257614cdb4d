"""FastStream subscribers of the ingestion service, and the background work it runs.

- Requests from the gateway (request/reply): open an upload, start or cancel an RTSP capture,
  read a request's status (one page of frames, `limit` after `cursor`, with presigned URLs made
  now in the store's threads, never stored). Each names its caller; status and cancel are
  answered only to the request's requester or an operator.
- Files (a durable work queue, one message per file): check, store, commit (`uploads.Uploads`;
  a commit waits out a database outage, holding its delivery).
- Cancellations (a fanout every replica hears): the replica running the capture stops it.
- Background: the outbox relay (events committed with their rows), RTSP jobs, the sweeper.
- With the local store (no S3 endpoint): `GET /objects` on the HTTP port serves its objects at
  the signed, expiring URLs the status gives (`storage.LocalUrls`), as S3 serves presigned ones.
"""

from __future__ import annotations

import mimetypes
import uuid
from datetime import timedelta
from typing import Protocol
from urllib.parse import parse_qs

import orjson
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse
from faststream.asgi.types import ASGIApp, Receive, Scope, Send
from faststream.exceptions import RejectMessage
from faststream.rabbit import Channel
from faststream.rabbit.message import RabbitMessage
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.broker import (
    answer_requests,
    declare_shared,
    declare_work,
    make_broker,
    whole_message,
)
from edgeway.common.db import make_engine, make_sessionmaker
from edgeway.common.envelope import Envelope
from edgeway.common.errors import ErrorObject, code_for
from edgeway.common.logging import get_logger
from edgeway.common.schemas.ingest import (
    FRAMES_PAGE_DEFAULT,
    UPLOAD_FILE_TYPE,
    URL_REFUSED,
    Caller,
    CancelRequest,
    CreateUpload,
    FileKind,
    GetStatus,
    IngestCommand,
    IngestReply,
    StartCapture,
)
from edgeway.common.service import database_service_app
from edgeway.common.settings import async_database_url
from edgeway.common.topology import Topology
from edgeway.ingestion import domain, store
from edgeway.ingestion.credentials import load_cipher, object_url_secret
from edgeway.ingestion.images import ImageLimits, ImageSanitizer
from edgeway.ingestion.jobs import CaptureJobs, JobMetrics
from edgeway.ingestion.outbox import OutboxRelay
from edgeway.ingestion.settings import IngestionSettings
from edgeway.ingestion.storage import OBJECTS_PATH, LocalStore, ObjectStore, make_store
from edgeway.ingestion.sweeper import Sweeper
from edgeway.ingestion.uploads import Uploads

SERVICE = "ingestion"
COMMANDS: TypeAdapter[CreateUpload | StartCapture | GetStatus | CancelRequest] = TypeAdapter(
    IngestCommand
)

log = get_logger("edgeway.ingestion")


def build_app(
    settings: IngestionSettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The ingestion service: its subscribers, background jobs and operations endpoints."""
    topology = Topology(settings.exchanges)
    replica_id = uuid.uuid4().hex[:12]
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=tracer_provider, registry=registry
    )
    url = async_database_url(settings.database_url, service=SERVICE, data_dir=settings.data_dir)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    objects = make_store(settings, url_secret=object_url_secret(settings))
    sanitizer = ImageSanitizer(
        ImageLimits(
            max_pixels=settings.max_pixels,
            decode_timeout_s=settings.decode_timeout_s,
            workers=settings.decode_workers,
            jpeg_quality=settings.jpeg_quality,
        )
    )
    presign_for = timedelta(seconds=settings.presign_expiry_s)

    files = Counter(
        "edgeway_ingestion_files_total",
        "Files taken from the uploads queue, by kind (image, csv) and outcome (stored, "
        "duplicate: a redelivery; rejected: refused by the full check; dropped: no open request)",
        ["kind", "outcome"],
        registry=registry,
    )
    frames = Counter(
        "edgeway_ingestion_frames_total",
        "Frames stored, by source (the seed's ingestion_frames_total, which it never counted)",
        ["source_type"],
        registry=registry,
    )
    reconnects = Counter(
        "edgeway_ingestion_capture_reconnects_total",
        "RTSP reconnections after a failed or stalled stream",
        registry=registry,
    )
    dropped = Counter(
        "edgeway_ingestion_capture_dropped_frames_total",
        "Captured frames dropped because storing fell behind (the oldest waiting go first)",
        registry=registry,
    )
    published = Counter(
        "edgeway_ingestion_events_published_total",
        "Outbox events the broker confirmed",
        registry=registry,
    )

    relay = OutboxRelay(
        sessions=sessions,
        broker=broker,
        exchanges={store.TO_BROADCAST: topology.broadcast, store.TO_FRAMES: topology.ingest_frames},
        producer=f"edgeway-{SERVICE}",
        on_published=published.inc,
    )

    def counted(kind: str, outcome: str) -> None:
        files.labels(kind, outcome).inc()
        if kind == FileKind.IMAGE.value and outcome == "stored":
            frames.labels("upload").inc()

    respond = status_reader(sessions, objects, presign_for)

    jobs = CaptureJobs(
        settings=settings,
        sessions=sessions,
        objects=objects,
        sanitizer=sanitizer,
        cipher=load_cipher(settings),
        replica_id=replica_id,
        committed=relay.nudge,
        respond=respond,
        metrics=JobMetrics(
            frame_stored=frames.labels("rtsp").inc,
            reconnected=reconnects.inc,
            dropped=dropped.inc,
        ),
    )
    Gauge(
        "edgeway_ingestion_captures_running",
        "RTSP captures this replica is running",
        registry=registry,
    ).set_function(lambda: jobs.running)
    sweeper = Sweeper(settings=settings, sessions=sessions, objects=objects, committed=relay.nudge)
    uploads = Uploads(
        sessions=sessions,
        objects=objects,
        sanitizer=sanitizer,
        max_file_bytes=settings.max_file_bytes,
        committed=relay.nudge,
        counted=counted,
        # A commit rides out a database outage, however long (see uploads.py); the sweeper
        # hears of it, so it does not fail the uploads whose files waited it out.
        retry_delays=settings.db_retry_delays,
        database_lost=sweeper.database_lost,
    )

    async def answer(body: bytes) -> bytes:
        try:
            command = COMMANDS.validate_json(body)
        except ValidationError as exc:
            unsafe = any(error["type"] == URL_REFUSED for error in exc.errors())
            error = URL_REFUSED if unsafe else "invalid"
            reply = IngestReply(ok=False, error=error, message=_first_error(exc))
            return reply.model_dump_json().encode()
        if isinstance(command, CreateUpload):
            refused = await uploads.open(command)
            reply = refused or await respond(command.request_id, command.caller)
        elif isinstance(command, StartCapture):
            reply = await jobs.start(command)
        elif isinstance(command, CancelRequest):
            reply = await jobs.cancel(command.request_id, command.caller)
            if reply.ok:
                # Whichever replica runs it stops it (this one did already, if it was here).
                await broker.publish(
                    orjson.dumps({"request_id": command.request_id}),
                    exchange=topology.ingest_control,
                    persist=False,
                )
        else:
            reply = await respond(
                command.request_id, command.caller, limit=command.limit, cursor=command.cursor
            )
        return reply.model_dump_json().encode()

    answer_requests(broker, topology.ingest_requests_queue, answer)

    file_queue = topology.ingest_uploads_queue
    file_subscriber = broker.subscriber(
        file_queue,
        topology.ingest_uploads,
        channel=Channel(prefetch_count=settings.upload_prefetch),
        # Acked once committed. A database outage is waited out inside the commit (the
        # deliveries stay unacked meanwhile: the prefetch stops more from coming); anything
        # else unexpected (storage down, a bug) is retried up to the queue's delivery limit,
        # then dead-lettered.
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=whole_message,
        no_reply=True,
    )

    @file_subscriber
    async def on_file(message: RabbitMessage) -> None:
        try:
            file = domain.read_file_message(message.headers or {})
        except domain.BadFileMessageError as exc:
            log.error("unusable file message dead-lettered", reason=str(exc))
            raise RejectMessage() from exc
        envelope = Envelope.from_message(message, type=UPLOAD_FILE_TYPE)
        await uploads.store(file, message.body, received=envelope.received_datetime())

    control = broker.subscriber(
        topology.ingest_control_queue(replica_id),
        topology.ingest_control,
        ack_policy=AckPolicy.ACK_FIRST,
        decoder=whole_message,
        no_reply=True,
    )

    @control
    async def on_control(message: RabbitMessage) -> None:
        try:
            request_id = orjson.loads(message.body)["request_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("unusable control message ignored")
            return
        jobs.stop_local(str(request_id))

    async def prepare() -> None:
        await objects.ensure_bucket()

    async def declare_topology() -> None:
        await declare_shared(broker, topology)
        await declare_work(broker, topology, topology.ingest_uploads, file_queue)
        await broker.declare_exchange(topology.ingest_frames)
        await broker.declare_exchange(topology.ingest_control)

    async def storage_reachable() -> None:
        await objects.ensure_bucket()

    app = database_service_app(
        broker,
        engine=engine,
        url=url,
        migrations=store.MIGRATIONS,
        prepare=prepare,
        declare=declare_topology,
        checks={"storage": storage_reachable},
        registry=registry,
    )

    async def start_background() -> None:
        relay.start()
        sweeper.start()

    async def stop_background() -> None:
        # Within the grace period: no new files, captures stopped (their requests fail with
        # a reason), then what they committed is published.
        await file_subscriber.stop()
        await sweeper.stop()
        await jobs.stop_all("stopped: the ingestion service shut down during the capture")
        try:
            await relay.publish_pending()
        except Exception as exc:  # noqa: BLE001 - the events stay in the outbox for next time
            log.warning("outbox not drained at shutdown", error=repr(exc))
        await relay.stop()

    app.after_startup(start_background)
    app.on_shutdown(stop_background)
    if isinstance(objects, LocalStore) and objects.urls_signer is not None:
        app.mount(OBJECTS_PATH, local_objects(objects))
    return app


def local_objects(objects: LocalStore) -> ASGIApp:
    """`GET /objects?key=&expires=&signature=`: a local store's object at a URL it signed.
    400 when a part is missing, 403 for a signature that does not match or has expired, 404
    for an object that is gone (swept after its retention)."""
    signer = objects.urls_signer
    assert signer is not None

    def refused(status: int, reason: str) -> AsgiResponse:
        body = orjson.dumps(ErrorObject(code=code_for(status), reason=reason).body())
        return AsgiResponse(body, status, headers={"content-type": "application/json"})

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        parts = {name: query.get(name, [""])[0] for name in ("key", "expires", "signature")}
        response: AsgiResponse
        if scope.get("method") not in ("GET", "HEAD"):
            response = refused(405, "only GET")
        elif not all(parts.values()):
            response = refused(400, "key, expires and signature are required")
        elif reason := signer.refusal(
            objects.bucket, parts["key"], parts["expires"], parts["signature"]
        ):
            response = refused(403, reason)
        else:
            try:
                data = await objects.get(parts["key"])
            except (FileNotFoundError, ValueError):
                response = refused(404, "no such object (it may have been swept)")
            else:
                kind = mimetypes.guess_type(parts["key"])[0] or "application/octet-stream"
                headers = {"content-type": kind, "cache-control": "private, max-age=60"}
                response = AsgiResponse(data, 200, headers=headers)
        await response(scope, receive, send)

    return serve


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
    page of its frames: `limit` after `cursor`, each with a URL made now, off the event loop."""

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


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg"))
