"""The video relay's wiring: its dependencies built once (`Deps`), its subscribers registered,
its start-up and shutdown work, and the operations endpoints (`/healthz`, `/readyz`, `/metrics`)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry

from edgeway.common.amqp import AmqpLink
from edgeway.common.broker import declare_shared
from edgeway.common.logging import get_logger
from edgeway.common.service import broker_service, link_ready, service_link
from edgeway.common.timesync import TimeSync
from edgeway.common.topology import Topology
from edgeway.video_relay.handlers import register
from edgeway.video_relay.imu import ImuRelay
from edgeway.video_relay.metrics import Metrics
from edgeway.video_relay.publishing import PUBLISH_WINDOW, SERVICE, Publisher
from edgeway.video_relay.relay import VideoRelay
from edgeway.video_relay.settings import VideoRelaySettings

log = get_logger("edgeway.video_relay")


@dataclass(frozen=True, slots=True)
class Deps:
    """Everything a handler needs, built once per process. `declared` is set once the exchanges
    exist: nothing is published before."""

    settings: VideoRelaySettings
    topology: Topology
    broker: RabbitBroker
    metrics: Metrics
    clock: TimeSync
    # Its own AMQP connection for what it publishes (edgeway.common.amqp), apart from FastStream's.
    link: AmqpLink
    publisher: Publisher
    relay: VideoRelay
    imu: ImuRelay
    declared: asyncio.Event
    # This process's name in its own (exclusive) queues.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


def build_deps(
    settings: VideoRelaySettings,
    *,
    broker: RabbitBroker,
    registry: CollectorRegistry,
    tracer_provider: TracerProvider | None = None,
) -> Deps:
    topology = Topology(settings.exchanges)
    metrics = Metrics.create(registry)
    clock = TimeSync(settings.ntp_servers)
    link = service_link(
        settings, service=SERVICE, registry=registry, tracer_provider=tracer_provider
    )
    publisher = Publisher(broker, topology, link.publisher(window=PUBLISH_WINDOW))
    declared = asyncio.Event()
    return Deps(
        settings=settings,
        topology=topology,
        broker=broker,
        metrics=metrics,
        clock=clock,
        link=link,
        publisher=publisher,
        relay=VideoRelay(
            settings, publisher=publisher, metrics=metrics, clock=clock, ready=declared
        ),
        imu=ImuRelay(
            publisher=publisher,
            metrics=metrics,
            ready=declared,
            max_devices=settings.max_streams,
            idle_s=settings.stream_idle_s,
        ),
        declared=declared,
    )


def build_app(
    settings: VideoRelaySettings,
    *,
    tracer_provider: TracerProvider,
    registry: CollectorRegistry = REGISTRY,
) -> AsgiFastStream:
    """The video relay: its subscribers, background tasks and operations endpoints."""
    base = broker_service(
        settings, service=SERVICE, tracer_provider=tracer_provider, registry=registry
    )
    broker = base.broker
    deps = build_deps(settings, broker=broker, registry=registry, tracer_provider=tracer_provider)
    register(broker, deps)
    background: list[asyncio.Task[None]] = []

    async def declare_topology() -> None:
        await declare_shared(broker, deps.topology)
        # Every WorldSystem exchange exists under its (overridable) name, also those that only
        # outside WorldSystem services use (processed_frames, ply_fanout from analysis and SLAM).
        for exchange in deps.topology.worldsystem_exchanges():
            await broker.declare_exchange(exchange)
        await deps.publisher.declare()
        await deps.link.start()
        deps.declared.set()
        background.append(asyncio.create_task(deps.relay.run_housekeeping(), name="housekeeping"))
        deps.clock.start()
        log.info(
            "video relay ready",
            h264_decoder=deps.relay.h264,
            decode_fps=settings.decode_fps,
            ntp_servers=settings.ntp_servers,
        )

    async def topology_declared() -> None:
        if not deps.declared.is_set():
            raise RuntimeError("exchanges not declared yet")

    app = base.app(
        checks={"topology": topology_declared, "publishing link": link_ready(deps.link)},
        after_startup=[declare_topology],
    )

    async def stop_tasks() -> None:
        for task in background:
            task.cancel()
        deps.relay.stop()
        deps.imu.stop()
        await deps.clock.stop()
        await deps.link.close()

    # After the broker has drained in-flight messages (on_shutdown hooks run before that).
    app.after_shutdown(stop_tasks)
    return app
