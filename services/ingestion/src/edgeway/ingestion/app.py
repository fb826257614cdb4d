"""The ingestion service's wiring: its dependencies built once (`Deps`), its subscribers
registered, its background work (the outbox relay, RTSP captures, the sweeper), and the
operations endpoints (`/healthz`, `/readyz`, `/metrics`), with `GET /objects` serving the local
store's objects at the signed URLs a status gives when there is no S3 endpoint."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.broker import declare_shared, declare_work
from edgeway.common.logging import get_logger
from edgeway.common.objects import OBJECTS_PATH, LocalStore, ObjectStore, local_objects, make_store
from edgeway.common.service import database_service
from edgeway.common.topology import Topology
from edgeway.ingestion import events, store
from edgeway.ingestion.handlers import register
from edgeway.ingestion.images import ImageLimits, ImageSanitizer
from edgeway.ingestion.jobs import CaptureJobs
from edgeway.ingestion.keys import load_cipher, object_url_secret
from edgeway.ingestion.metrics import Metrics
from edgeway.ingestion.outbox import OutboxRelay
from edgeway.ingestion.settings import IngestionSettings
from edgeway.ingestion.status import StatusReader, status_reader
from edgeway.ingestion.sweeper import Sweeper
from edgeway.ingestion.uploads import UploadIntake

SERVICE = "ingestion"

log = get_logger("edgeway.ingestion")


@dataclass(frozen=True, slots=True)
class Deps:
    """Everything a handler needs, built once per process."""

    settings: IngestionSettings
    topology: Topology
    broker: RabbitBroker
    sessions: async_sessionmaker[AsyncSession]
    objects: ObjectStore
    metrics: Metrics
    # Names this replica's control queue: the cancellations of captures it may be running.
    replica_id: str
    relay: OutboxRelay
    respond: StatusReader
    uploads: UploadIntake
    jobs: CaptureJobs
    sweeper: Sweeper


def build_deps(
    settings: IngestionSettings,
    *,
    broker: RabbitBroker,
    sessions: async_sessionmaker[AsyncSession],
    registry: CollectorRegistry,
) -> Deps:
    topology = Topology(settings.exchanges)
    metrics = Metrics.create(registry)
    objects = make_store(settings, url_secret=object_url_secret(settings))
    replica_id = uuid.uuid4().hex[:12]
    sanitizer = ImageSanitizer(
        ImageLimits(
            max_pixels=settings.max_pixels,
            decode_timeout_s=settings.decode_timeout_s,
            workers=settings.decode_workers,
            jpeg_quality=settings.jpeg_quality,
        )
    )
    relay = OutboxRelay(
        sessions=sessions,
        broker=broker,
        exchanges={
            events.TO_BROADCAST: topology.broadcast,
            events.TO_FRAMES: topology.ingest_frames,
        },
        producer=f"edgeway-{SERVICE}",
        on_published=metrics.events_published.inc,
    )
    respond = status_reader(sessions, objects, timedelta(seconds=settings.presign_expiry_s))
    jobs = CaptureJobs(
        settings=settings,
        sessions=sessions,
        objects=objects,
        sanitizer=sanitizer,
        cipher=load_cipher(settings),
        replica_id=replica_id,
        committed=relay.nudge,
        respond=respond,
        metrics=metrics.for_jobs(),
    )
    metrics.captures_running.set_function(lambda: jobs.running)
    sweeper = Sweeper(settings=settings, sessions=sessions, objects=objects, committed=relay.nudge)
    uploads = UploadIntake(
        sessions=sessions,
        objects=objects,
        sanitizer=sanitizer,
        max_file_bytes=settings.max_file_bytes,
        committed=relay.nudge,
        counted=metrics.file_counted,
        # A commit rides out a database outage, however long (see uploads.py); the sweeper
        # hears of it, so it does not fail the uploads whose files waited it out.
        retry_delays=settings.db_retry_delays,
        database_lost=sweeper.database_lost,
    )
    return Deps(
        settings=settings,
        topology=topology,
        broker=broker,
        sessions=sessions,
        objects=objects,
        metrics=metrics,
        replica_id=replica_id,
        relay=relay,
        respond=respond,
        uploads=uploads,
        jobs=jobs,
        sweeper=sweeper,
    )


def build_app(
    settings: IngestionSettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The ingestion service: its subscribers, background work and operations endpoints."""
    base = database_service(
        settings,
        service=SERVICE,
        database_url=settings.database_url,
        tracer_provider=tracer_provider,
        registry=registry,
    )
    deps = build_deps(settings, broker=base.broker, sessions=base.sessions, registry=registry)
    files = register(base.broker, deps)
    broker, topology = base.broker, deps.topology

    async def storage_reachable() -> None:
        await deps.objects.ensure_bucket()

    async def declare_topology() -> None:
        await declare_shared(broker, topology)
        await declare_work(broker, topology, topology.ingest_uploads, topology.ingest_uploads_queue)
        await broker.declare_exchange(topology.ingest_frames)
        await broker.declare_exchange(topology.ingest_control)

    app = base.app(
        migrations=store.MIGRATIONS,
        prepare=storage_reachable,
        declare=declare_topology,
        checks={"storage": storage_reachable},
    )

    async def start_background() -> None:
        deps.relay.start()
        deps.sweeper.start()

    async def stop_background() -> None:
        # Within the grace period: no new files, captures stopped (their requests fail with
        # a reason), then what they committed is published.
        await files.stop()
        await deps.sweeper.stop()
        await deps.jobs.stop_all("stopped: the ingestion service shut down during the capture")
        try:
            await deps.relay.publish_pending()
        except Exception as exc:  # noqa: BLE001 - the events stay in the outbox for next time
            log.warning("outbox not drained at shutdown", error=repr(exc))
        await deps.relay.stop()

    app.after_startup(start_background)
    app.on_shutdown(stop_background)
    if isinstance(deps.objects, LocalStore) and deps.objects.urls_signer is not None:
        app.mount(OBJECTS_PATH, local_objects(deps.objects))
    return app
