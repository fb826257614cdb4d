"""The telemetry service's Prometheus metrics, built on a registry (tests run several services)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgeway.telemetry.broadcast import BroadcastMetrics
from edgeway.telemetry.domain import RejectCode

RECORD_OUTCOMES = ("stored", "duplicate", "rejected")


@dataclass(frozen=True, slots=True)
class Metrics:
    records: Counter
    rejected_uploads: Counter
    broadcast_published: Counter
    broadcast_failures: Counter
    broadcast_dropped: Counter
    # Its value is read from the broadcaster (`set_function`), once there is one.
    broadcast_queued: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls(
            records=Counter(
                "edgeway_telemetry_records_total",
                "Records taken from uploads, by outcome: stored, duplicate (stored before: a "
                "replay or a redelivery), rejected (in an upload that was refused; unreadable "
                "bodies count none)",
                ["outcome"],
                registry=registry,
            ),
            rejected_uploads=Counter(
                "edgeway_telemetry_rejected_uploads_total",
                "Uploads refused and kept in the rejections table, by code",
                ["code"],
                registry=registry,
            ),
            broadcast_published=Counter(
                "edgeway_telemetry_broadcast_published_total",
                "Record broadcasts the broker confirmed",
                registry=registry,
            ),
            broadcast_failures=Counter(
                "edgeway_telemetry_broadcast_failures_total",
                "Record broadcasts the broker did not take (the records are stored)",
                registry=registry,
            ),
            broadcast_dropped=Counter(
                "edgeway_telemetry_broadcast_dropped_total",
                "Stored records never broadcast: replayed ones over the replay broadcast rate, "
                "the oldest waiting when the broadcast queue was full (replays first), or still "
                "waiting at shutdown",
                registry=registry,
            ),
            broadcast_queued=Gauge(
                "edgeway_telemetry_broadcast_queued",
                "Stored records waiting to be broadcast or awaiting their confirm",
                registry=registry,
            ),
        )
        for outcome in RECORD_OUTCOMES:
            metrics.records.labels(outcome)
        for code in RejectCode:
            metrics.rejected_uploads.labels(code.value)
        return metrics

    def broadcasts(self) -> BroadcastMetrics:
        """What the broadcaster counts, as the counters it adds to."""
        return BroadcastMetrics(
            published=self.broadcast_published.inc,
            failed=self.broadcast_failures.inc,
            dropped=self.broadcast_dropped.inc,
        )
