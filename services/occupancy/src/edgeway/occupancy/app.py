"""The occupancy service's wiring: its dependencies built once (`Deps`), its subscribers
registered, its start-up work, and the operations endpoints (`/healthz`, `/readyz`, `/metrics`).

Observations go through their own AMQP link (`edgeway.common.amqp`: aio-pika and aiormq
directly, the shared confirm publisher); FastStream declares the topology and answers queries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from edgeway.common.amqp import AmqpLink
from edgeway.common.amqp import Delivery as AmqpDelivery
from edgeway.common.batching import GroupCommit
from edgeway.common.broker import declare_shared, declare_work
from edgeway.common.db import is_outage, with_db_retry
from edgeway.common.logging import get_logger
from edgeway.common.service import database_service, link_ready, service_link
from edgeway.common.topology import Topology
from edgeway.occupancy import store
from edgeway.occupancy.flows import SERVICE, Delivery, Result, broadcast, store_observations
from edgeway.occupancy.handlers import on_observation, register
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
    # Deliveries handled concurrently share one transaction (see edgeway.common.batching) and
    # their broadcasts (flows.broadcast).
    group_commit: GroupCommit[Delivery, Result]
    writer: store.Writer
    # The per-message path's own connection (its publisher is the group commit's).
    link: AmqpLink


def build_deps(
    settings: OccupancySettings,
    *,
    broker: RabbitBroker,
    url: str,
    sessions: async_sessionmaker[AsyncSession],
    registry: CollectorRegistry,
    tracer_provider: TracerProvider | None = None,
) -> Deps:
    cameras = store.camera_directory()
    writer = store.make_writer(url, sessions)
    topology = Topology(settings.exchanges)
    link = service_link(
        settings, service=SERVICE, registry=registry, tracer_provider=tracer_provider
    )
    publisher = link.publisher()

    async def commit(deliveries: Sequence[Delivery]) -> list[Result]:
        outcomes = await with_db_retry(
            lambda: store_observations(
                deliveries, writer=writer, cameras=cameras, sessions=sessions
            ),
            delays=settings.db_retry_delays,
            forever=True,
        )
        return broadcast(
            deliveries, outcomes, publisher=publisher, exchange=topology.names.broadcast
        )

    group_commit: GroupCommit[Delivery, Result] = GroupCommit(
        commit,
        max_size=settings.commit_group_size,
        # A database outage fails every item alike; anything else may be one bad observation.
        isolate=lambda exc: not is_outage(exc),
    )
    return Deps(
        settings=settings,
        topology=topology,
        broker=broker,
        sessions=sessions,
        cameras=cameras,
        metrics=Metrics.create(registry),
        group_commit=group_commit,
        writer=writer,
        link=link,
    )


def build_app(
    settings: OccupancySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The occupancy service: its subscribers, start-up work and operations endpoints."""
    base = database_service(
        settings,
        service=SERVICE,
        database_url=settings.database_url,
        tracer_provider=tracer_provider,
        registry=registry,
    )
    deps = build_deps(
        settings,
        broker=base.broker,
        url=base.url,
        sessions=base.sessions,
        registry=registry,
        tracer_provider=tracer_provider,
    )
    register(base.broker, deps)

    async def observation(message: AmqpDelivery) -> None:
        await on_observation(message, deps)

    # Observations: consumed apart from FastStream (see edgeway.occupancy.handlers.register).
    consumer = base.consumer(
        deps.link, deps.topology.occupancy_observations_queue.name, observation
    )

    async def prepare_cameras() -> None:
        async with deps.sessions.begin() as session:
            await store.seed_cameras(session=session, cameras=settings.all_cameras)
            known = await store.load_cameras(session=session)
        deps.cameras.replace(known)
        log.info("database ready", cameras=len(known))

    async def declare_topology() -> None:
        await declare_shared(base.broker, deps.topology)
        await declare_work(
            base.broker,
            deps.topology,
            deps.topology.occupancy_observations,
            deps.topology.occupancy_observations_queue,
        )

    async def start_observations() -> None:
        await deps.link.start()
        await consumer.start()

    async def stop_observations() -> None:
        await consumer.stop()  # what it holds is committed, published and acked first
        await deps.link.close()
        await deps.writer.close()

    return base.app(
        migrations=store.MIGRATIONS,
        prepare=prepare_cameras,
        declare=declare_topology,
        checks={"observations link": link_ready(deps.link)},
        start=start_observations,
        stop=stop_observations,
    )
