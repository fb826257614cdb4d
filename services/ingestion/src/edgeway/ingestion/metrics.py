"""The ingestion service's Prometheus metrics, built on a registry (tests run several services)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgeway.common.schemas.ingest import FileKind
from edgeway.ingestion.flows import STORED
from edgeway.ingestion.jobs import JobMetrics


@dataclass(frozen=True, slots=True)
class Metrics:
    files: Counter
    frames: Counter
    capture_reconnects: Counter
    capture_dropped: Counter
    captures_running: Gauge
    events_published: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            files=Counter(
                "edgeway_ingestion_files_total",
                "Files taken from the uploads queue, by kind (image, csv) and outcome (stored, "
                "duplicate: a redelivery; rejected: refused by the full check; dropped: no open "
                "request)",
                ["kind", "outcome"],
                registry=registry,
            ),
            frames=Counter(
                "edgeway_ingestion_frames_total",
                "Frames stored, by source (the seed's ingestion_frames_total, which it never "
                "counted)",
                ["source_type"],
                registry=registry,
            ),
            capture_reconnects=Counter(
                "edgeway_ingestion_capture_reconnects_total",
                "RTSP reconnections after a failed or stalled stream",
                registry=registry,
            ),
            capture_dropped=Counter(
                "edgeway_ingestion_capture_dropped_frames_total",
                "Captured frames dropped because storing fell behind (the oldest waiting go first)",
                registry=registry,
            ),
            captures_running=Gauge(
                "edgeway_ingestion_captures_running",
                "RTSP captures this replica is running",
                registry=registry,
            ),
            events_published=Counter(
                "edgeway_ingestion_events_published_total",
                "Outbox events the broker confirmed",
                registry=registry,
            ),
        )

    def file_counted(self, kind: str, outcome: str) -> None:
        """A file from the uploads queue came to `outcome`; a stored image is a frame too."""
        self.files.labels(kind, outcome).inc()
        if kind == FileKind.IMAGE.value and outcome == STORED:
            self.frames.labels("upload").inc()

    def for_jobs(self) -> JobMetrics:
        """What the RTSP captures count."""
        return JobMetrics(
            frame_stored=self.frames.labels("rtsp").inc,
            reconnected=self.capture_reconnects.inc,
            dropped=self.capture_dropped.inc,
        )
