"""The gateway's Prometheus metrics, built on a registry (tests run several gateways in one
process). Labels are endpoint templates and codes, never ids."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _event_loop_tasks() -> float:
    """Tasks alive on the event loop that serves /metrics (the gateway's, on either port)."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no event loop in this thread: unknown, not a guess
        return 0.0


@dataclass(frozen=True, slots=True)
class Metrics:
    connections: Gauge
    rejected: Counter
    published: Counter
    upload_messages: Counter
    batched_uploads: Counter
    received: Counter
    delivered: Counter
    fanout_seconds: Histogram
    dropped: Counter
    auth_refused: Counter
    request_seconds: Histogram
    event_loop_tasks: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls(
            connections=Gauge(
                "edgeway_gateway_connections",
                "Open WebSocket connections",
                ["endpoint"],
                registry=registry,
            ),
            rejected=Counter(
                "edgeway_gateway_rejected_total",
                "Messages refused at the edge or by a service, by reason",
                ["endpoint", "code"],
                registry=registry,
            ),
            published=Counter(
                "edgeway_gateway_published_total",
                "Messages confirmed by the broker",
                ["endpoint"],
                registry=registry,
            ),
            upload_messages=Counter(
                "edgeway_gateway_telemetry_upload_messages_total",
                "Telemetry upload messages published: single (one upload) or batched (several)",
                ["kind"],
                registry=registry,
            ),
            batched_uploads=Counter(
                "edgeway_gateway_telemetry_batched_uploads_total",
                "Telemetry uploads published in batched messages",
                registry=registry,
            ),
            received=Counter(
                "edgeway_gateway_received_total",
                "Messages received from the broadcast exchange, each delivered to its watchers",
                ["channel_kind"],
                registry=registry,
            ),
            delivered=Counter(
                "edgeway_gateway_delivered_total",
                "Messages queued to clients",
                ["channel_kind"],
                registry=registry,
            ),
            fanout_seconds=Histogram(
                "edgeway_gateway_fanout_seconds",
                "From a broadcast message's arrival to its offer to every watcher",
                buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
                registry=registry,
            ),
            dropped=Counter(
                "edgeway_gateway_dropped_total",
                "Messages not delivered to a client, by reason",
                ["endpoint", "reason"],
                registry=registry,
            ),
            auth_refused=Counter(
                "edgeway_gateway_auth_refused_total",
                "Connections refused by auth",
                ["endpoint", "status"],
                registry=registry,
            ),
            request_seconds=Histogram(
                "edgeway_gateway_service_request_seconds",
                "Request/reply round trips to services",
                ["service", "outcome"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            # A task leak (a connection's reader or writer left running after it closed) grows
            # this; the fuzz tests (tests/fuzz) compare it before and after thousands of
            # connections.
            event_loop_tasks=Gauge(
                "edgeway_gateway_event_loop_tasks",
                "Tasks alive on the gateway's event loop",
                registry=registry,
            ),
        )
        metrics.event_loop_tasks.set_function(_event_loop_tasks)
        return metrics
