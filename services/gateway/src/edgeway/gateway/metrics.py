"""The gateway's Prometheus metrics. Labels are endpoint templates and codes, never ids."""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("edgeway_gateway_connections", "Open WebSocket connections", ["endpoint"])
REJECTED = Counter(
    "edgeway_gateway_rejected_total",
    "Messages refused at the edge or by a service, by reason",
    ["endpoint", "code"],
)
PUBLISHED = Counter(
    "edgeway_gateway_published_total", "Messages confirmed by the broker", ["endpoint"]
)
UPLOAD_MESSAGES = Counter(
    "edgeway_gateway_telemetry_upload_messages_total",
    "Telemetry upload messages published: single (one upload) or batched (several)",
    ["kind"],
)
BATCHED_UPLOADS = Counter(
    "edgeway_gateway_telemetry_batched_uploads_total",
    "Telemetry uploads published in batched messages",
)
DELIVERED = Counter(
    "edgeway_gateway_delivered_total", "Messages queued to clients", ["channel_kind"]
)
DROPPED = Counter(
    "edgeway_gateway_dropped_total",
    "Messages not delivered to a client, by reason",
    ["endpoint", "reason"],
)
AUTH_REFUSED = Counter(
    "edgeway_gateway_auth_refused_total", "Connections refused by auth", ["endpoint", "status"]
)
REQUEST_SECONDS = Histogram(
    "edgeway_gateway_service_request_seconds",
    "Request/reply round trips to services",
    ["service", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def _event_loop_tasks() -> float:
    """Tasks alive on the event loop that serves /metrics (the gateway's, on either port)."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no event loop in this thread: unknown, not a guess
        return 0.0


# A task leak (a connection's reader or writer left running after it closed) grows this; the
# fuzz tests (tests/fuzz) compare it before and after thousands of connections.
EVENT_LOOP_TASKS = Gauge(
    "edgeway_gateway_event_loop_tasks", "Tasks alive on the gateway's event loop"
)
EVENT_LOOP_TASKS.set_function(_event_loop_tasks)
