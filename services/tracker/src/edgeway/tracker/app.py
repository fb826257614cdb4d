"""The tracker's wiring: its dependencies built once (`Deps`), its subscribers registered, its
start-up and shutdown work, and the operations endpoints (`/healthz`, `/readyz`, `/metrics`)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.broker import declare_shared, declare_work
from edgeway.common.logging import get_logger
from edgeway.common.objects import LocalStore, ObjectStore, make_store
from edgeway.common.rtsp.credentials import CredentialCipher, credentials_key
from edgeway.common.rtsp.destinations import DestinationPolicy
from edgeway.common.service import database_service
from edgeway.common.topology import Topology
from edgeway.tracker import store
from edgeway.tracker.flows import SERVICE, Inference, LiveRouter, TaskRuns
from edgeway.tracker.handlers import register
from edgeway.tracker.media import VideoStore
from edgeway.tracker.metrics import Metrics
from edgeway.tracker.settings import TrackerSettings

log = get_logger("edgeway.tracker")

# Development's credentials key, made once in the data directory (EDGEWAY_CREDENTIALS_KEY
# elsewhere).
KEY_FILE = "tracker-credentials.key"


@dataclass(frozen=True, slots=True)
class Deps:
    """Everything a handler or a run needs, built once per process."""

    settings: TrackerSettings
    topology: Topology
    broker: RabbitBroker
    sessions: async_sessionmaker[AsyncSession]
    metrics: Metrics
    objects: VideoStore
    inference: Inference
    runs: TaskRuns
    live: LiveRouter
    cipher: CredentialCipher  # rtsp URLs at rest
    destinations: DestinationPolicy  # where rtsp cameras may be


def video_store(settings: TrackerSettings) -> VideoStore:
    """The videos' object store: an S3 bucket when `EDGEWAY_STORAGE_ENDPOINT` is set, else a
    directory (`EDGEWAY_OBJECTS_DIR`, default `<data_dir>/objects/<bucket>`)."""
    objects: ObjectStore
    if settings.storage_endpoint is None and settings.objects_dir is not None:
        directory = settings.objects_dir
        objects = LocalStore(directory.parent, directory.name)
    else:
        objects = make_store(settings)
    return VideoStore(objects, scratch=settings.data_dir / "tracker-scratch")


def build_deps(
    settings: TrackerSettings,
    *,
    broker: RabbitBroker,
    sessions: async_sessionmaker[AsyncSession],
    registry: CollectorRegistry,
) -> Deps:
    live = LiveRouter()
    topology = Topology(settings.exchanges)

    async def bind(environment_id: str, on: bool) -> None:
        queue = await broker.declare_queue(topology.tracking_detections_queue(settings.replica_id))
        exchange = await broker.declare_exchange(topology.tracking_detections)
        key = f"{environment_id}.*"
        if on:
            await queue.bind(exchange, routing_key=key)
        else:
            await queue.unbind(exchange, routing_key=key)

    live.connect(bind)
    return Deps(
        settings=settings,
        topology=topology,
        broker=broker,
        sessions=sessions,
        metrics=Metrics.create(registry),
        objects=video_store(settings),
        inference=Inference.create(settings),
        runs=TaskRuns(),
        live=live,
        cipher=CredentialCipher(
            credentials_key(settings.credentials_key, settings.data_dir / KEY_FILE)
        ),
        destinations=DestinationPolicy.parse(settings.rtsp_allowed_destinations),
    )


async def sweep_forever(deps: Deps) -> None:
    """Retention: delete tasks (and their observations) finished `retention_days` ago."""
    while True:
        cutoff = datetime.now(UTC) - timedelta(days=deps.settings.retention_days)
        try:
            while True:
                async with deps.sessions.begin() as session:
                    gone, unused = await store.delete_finished_before(
                        session=session, cutoff=cutoff
                    )
                for key in unused:  # videos that only these tasks still served
                    await deps.objects.delete(key)
                if gone:
                    log.info("old tasks deleted", tasks=len(gone), videos=len(unused))
                if len(gone) < 100:
                    break
        except SQLAlchemyError as exc:
            log.warning("retention sweep failed", error=repr(exc))
        await asyncio.sleep(deps.settings.retention_sweep_s)


def build_app(
    settings: TrackerSettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    base = database_service(
        settings,
        service=SERVICE,
        database_url=settings.database_url,
        tracer_provider=tracer_provider,
        registry=registry,
    )
    deps = build_deps(settings, broker=base.broker, sessions=base.sessions, registry=registry)
    register(base.broker, deps)
    broker, topology = base.broker, deps.topology

    async def prepare() -> None:
        await deps.objects.prepare()
        log.info("database and object store ready", bucket=deps.objects.objects.bucket)

    async def declare() -> None:
        await declare_shared(broker, topology)
        await declare_work(
            broker, topology, topology.tracking_commands, topology.tracking_commands_queue
        )
        await declare_work(
            broker, topology, topology.tracking_videos, topology.tracking_videos_queue
        )
        await broker.declare_exchange(topology.tracking_detections)

    app = base.app(migrations=store.MIGRATIONS, prepare=prepare, declare=declare)
    sweeper: list[asyncio.Task[None]] = []

    async def start_sweeper() -> None:
        sweeper.append(asyncio.create_task(sweep_forever(deps)))

    async def hand_back() -> None:
        # Before the broker drains its handlers: each run ends and hands its task back.
        await deps.runs.release_all(grace=settings.graceful_timeout)
        for task in sweeper:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        deps.inference.pool.shutdown(wait=False, cancel_futures=True)

    app.after_startup(start_sweeper)
    app.on_shutdown(hand_back)
    return app
