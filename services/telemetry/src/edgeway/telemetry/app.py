"""The telemetry service's wiring: its dependencies built once (`Deps`), its subscribers
registered, its start-up and shutdown work, and the operations endpoints (`/healthz`,
`/readyz`, `/metrics`).

Uploads and their broadcasts are the per-message paths: they run on the process's own AMQP link
(`edgeway.common.amqp`: a `Consumer` of the upload queue, the broadcasts through a
`ConfirmPublisher`), apart from FastStream, which declares the topology and answers queries.
"""

from __future__ import annotations

import asyncio
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
from edgeway.telemetry import store
from edgeway.telemetry.broadcast import PUBLISH_WINDOW, AmqpSender, Broadcaster
from edgeway.telemetry.flows import DB_RETRY_DELAYS, DecoderCache, Delivery, Outcome, UploadFlow
from edgeway.telemetry.handlers import on_upload, register
from edgeway.telemetry.metrics import Metrics
from edgeway.telemetry.settings import TelemetrySettings
from edgeway.telemetry.tables import MIGRATIONS

SERVICE = "telemetry"

log = get_logger("edgeway.telemetry")


@dataclass(frozen=True, slots=True)
class Deps:
    """Everything a handler needs, built once per process."""

    settings: TelemetrySettings
    topology: Topology
    broker: RabbitBroker
    sessions: async_sessionmaker[AsyncSession]
    vehicles: store.VehicleIdCache
    metrics: Metrics
    # The uploads' consumer and the broadcasts' publisher (the per-message paths) share it.
    link: AmqpLink
    # The stored records' broadcasts, published after the commit by one background task.
    broadcaster: Broadcaster
    # Deliveries handled concurrently share one transaction (see edgeway.common.batching).
    group_commit: GroupCommit[Delivery, Outcome]


def build_deps(
    settings: TelemetrySettings,
    *,
    broker: RabbitBroker,
    sessions: async_sessionmaker[AsyncSession],
    registry: CollectorRegistry,
    tracer_provider: TracerProvider | None = None,
) -> Deps:
    topology = Topology(settings.exchanges)
    link = service_link(
        settings, service=SERVICE, registry=registry, tracer_provider=tracer_provider
    )
    metrics = Metrics.create(registry)
    vehicles = store.vehicle_id_cache(ttl=settings.vehicle_cache_s)
    flow = UploadFlow(
        sessions=sessions,
        vehicles=vehicles,
        decoders=DecoderCache(settings.predictor),
        offline_after_s=settings.offline_after_s,
    )
    broadcaster = Broadcaster(
        AmqpSender(
            link.publisher(window=PUBLISH_WINDOW, name=f"{SERVICE}-broadcasts"),
            topology.broadcast.name,
            producer=SERVICE,
        ),
        capacity=settings.broadcast_backlog,
        window=PUBLISH_WINDOW,
        replay_rate=settings.replay_broadcast_rate,
        metrics=metrics.broadcasts(),
    )
    metrics.broadcast_queued.set_function(lambda: broadcaster.waiting + broadcaster.in_flight)

    async def flush(deliveries: Sequence[Delivery]) -> list[Outcome]:
        outcomes = await with_db_retry(
            lambda: flow.store(deliveries), delays=DB_RETRY_DELAYS, forever=True
        )
        # Committed: the uploads are acked now; their broadcasts follow from the queue.
        broadcaster.put(outcomes)
        return outcomes

    group_commit: GroupCommit[Delivery, Outcome] = GroupCommit(
        flush,
        max_size=settings.commit_group_size,
        linger=settings.commit_linger_ms / 1000,
        # A database outage fails every item alike; anything else may be one bad upload.
        isolate=lambda exc: not is_outage(exc),
    )
    return Deps(
        settings=settings,
        topology=topology,
        broker=broker,
        sessions=sessions,
        vehicles=vehicles,
        metrics=metrics,
        link=link,
        broadcaster=broadcaster,
        group_commit=group_commit,
    )


def build_app(
    settings: TelemetrySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The telemetry service: its subscribers, start-up work and operations endpoints."""
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
        sessions=base.sessions,
        registry=registry,
        tracer_provider=tracer_provider,
    )
    register(base.broker, deps)

    async def upload(message: AmqpDelivery) -> None:
        await on_upload(message, deps)

    # A single active consumer (Topology.telemetry_raw_queue): one replica at a time decodes, so
    # each vehicle's packets meet its predictor state in the order they were published. Acked
    # after the commit (not after the broadcasts); what raises is requeued, and the quorum
    # queue's delivery limit dead-letters what can never succeed.
    uploads = base.consumer(deps.link, deps.topology.telemetry_raw_queue.name, upload)

    async def prepare_vehicles() -> None:
        async with deps.sessions.begin() as session:
            await store.seed_vehicles(session=session, vins=settings.vehicles)
            known = await store.load_vehicles(session=session)
        deps.vehicles.replace(known)
        log.info("database ready", vehicles=len(known))

    async def declare_topology() -> None:
        await declare_shared(base.broker, deps.topology)
        await declare_work(
            base.broker,
            deps.topology,
            deps.topology.telemetry_raw,
            deps.topology.telemetry_raw_queue,
        )

    async def start_uploads() -> None:
        await deps.link.start()
        deps.broadcaster.start()
        await uploads.start()

    async def stop_uploads() -> None:
        # Within the grace period: first the uploads in hand (committed, so their records are
        # queued, and acked), then the broadcast queue, then the link closes.
        deadline = asyncio.get_running_loop().time() + settings.graceful_timeout
        await uploads.stop()
        await deps.broadcaster.drain(deadline)
        await deps.link.close()

    return base.app(
        migrations=MIGRATIONS,
        prepare=prepare_vehicles,
        declare=declare_topology,
        checks={"uploads link": link_ready(deps.link)},
        start=start_uploads,
        stop=stop_uploads,
    )
