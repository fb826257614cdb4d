"""The occupancy service's wiring: its dependencies built once (`Deps`), its subscribers
registered, its start-up work, and the operations endpoints (`/healthz`, `/readyz`, `/metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.batching import GroupCommit
from edgeway.common.broker import declare_shared, declare_work, make_broker
from edgeway.common.db import is_outage, make_engine, make_sessionmaker, with_db_retry
from edgeway.common.logging import get_logger
from edgeway.common.service import database_service_app
from edgeway.common.settings import async_database_url
from edgeway.common.topology import Topology
from edgeway.occupancy import store
from edgeway.occupancy.flows import SERVICE, Delivery, Outcome, store_observations
from edgeway.occupancy.handlers import register
from edgeway.occupancy.metrics import Metrics
from edgeway.occupancy.settings import OccupancySettings

log = get_logger("edgeway.occupancy")


@dataclass(frozen=True, slots=True)
class Deps:
    """Everything a handler needs, built once per process."""

    settings: OccupancySettings
    topology: Topology
    broker: RabbitBroker
    sessions: async_sessionmaker[AsyncSession]
    cameras: store.CameraDirectory
    metrics: Metrics
    # Deliveries handled concurrently share one transaction (see edgeway.common.batching).
    group_commit: GroupCommit[Delivery, Outcome]


def build_deps(
    settings: OccupancySettings,
    *,
    broker: RabbitBroker,
    sessions: async_sessionmaker[AsyncSession],
    registry: CollectorRegistry,
) -> Deps:
    cameras = store.CameraDirectory()
    group_commit: GroupCommit[Delivery, Outcome] = GroupCommit(
        lambda deliveries: with_db_retry(
            lambda: store_observations(deliveries, sessions=sessions, cameras=cameras),
            delays=settings.db_retry_delays,
            forever=True,
        ),
        max_size=settings.commit_group_size,
        # A database outage fails every item alike; anything else may be one bad observation.
        isolate=lambda exc: not is_outage(exc),
    )
    return Deps(
        settings=settings,
        topology=Topology(settings.exchanges),
        broker=broker,
        sessions=sessions,
        cameras=cameras,
        metrics=Metrics.create(registry),
        group_commit=group_commit,
    )


def build_app(
    settings: OccupancySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The occupancy service: its subscribers, start-up work and operations endpoints."""
    broker = make_broker(
        settings, service=SERVICE, tracer_provider=tracer_provider, registry=registry
    )
    url = async_database_url(settings.database_url, service=SERVICE, data_dir=settings.data_dir)
    engine = make_engine(url)
    deps = build_deps(
        settings, broker=broker, sessions=make_sessionmaker(engine), registry=registry
    )
    register(broker, deps)

    async def prepare_cameras() -> None:
        async with deps.sessions.begin() as session:
            await store.seed_cameras(session=session, cameras=settings.all_cameras)
            known = await store.load_cameras(session=session)
        deps.cameras.replace(known)
        log.info("database ready", cameras=len(known))

    async def declare_topology() -> None:
        await declare_shared(broker, deps.topology)
        await declare_work(
            broker,
            deps.topology,
            deps.topology.occupancy_observations,
            deps.topology.occupancy_observations_queue,
        )

    return database_service_app(
        broker,
        engine=engine,
        url=url,
        migrations=store.MIGRATIONS,
        prepare=prepare_cameras,
        declare=declare_topology,
        registry=registry,
    )
