"""The tracker's Prometheus metrics, built on a registry (tests run several trackers)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgeway.common.schemas.tracking import TaskStatus

DETECTION_OUTCOMES = ("tracked", "late", "rejected", "not_tracking")
VIDEO_OUTCOMES = ("ready", "rejected", "duplicate")
# Frames of a live task's relay and rtsp cameras: tracked, dropped (a newer one of its camera
# came before it was), ignored (another device's), rejected (no device or size header, not a
# JPEG). Frames of another size than the camera's are scaled to it and counted apart.
CAMERA_SOURCES = ("relay", "rtsp")
CAMERA_OUTCOMES = ("tracked", "dropped", "ignored", "rejected")


@dataclass(frozen=True, slots=True)
class Metrics:
    tasks_running: Gauge
    tasks_finished: Counter
    tasks_resumed: Counter
    frames: Counter
    observations: Counter
    step_seconds: Histogram
    edge_frames: Counter
    videos: Counter
    camera_frames: Counter
    camera_frames_scaled: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls(
            tasks_running=Gauge(
                "edgeway_tracker_tasks_running", "Tasks this replica runs now", registry=registry
            ),
            tasks_finished=Counter(
                "edgeway_tracker_tasks_finished_total",
                "Tasks that ended here, by final status",
                ["status"],
                registry=registry,
            ),
            tasks_resumed=Counter(
                "edgeway_tracker_tasks_resumed_total",
                "Tasks taken up from a checkpoint another run left (a crash, a restart)",
                registry=registry,
            ),
            frames=Counter(
                "edgeway_tracker_frames_total",
                "Global frame indexes tracked (one step of every camera)",
                registry=registry,
            ),
            observations=Counter(
                "edgeway_tracker_observations_total",
                "Track observations committed",
                registry=registry,
            ),
            step_seconds=Histogram(
                "edgeway_tracker_step_seconds",
                "One step: read, detect and track every camera's frame",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            edge_frames=Counter(
                "edgeway_tracker_edge_frames_total",
                "Edge detection frames, by outcome",
                ["outcome"],
                registry=registry,
            ),
            videos=Counter(
                "edgeway_tracker_videos_total",
                "Uploaded videos, by outcome",
                ["outcome"],
                registry=registry,
            ),
            camera_frames=Counter(
                "edgeway_tracker_camera_frames_total",
                "Frames of live tasks' relay and rtsp cameras, by source and outcome",
                ["source", "outcome"],
                registry=registry,
            ),
            camera_frames_scaled=Counter(
                "edgeway_tracker_camera_frames_scaled_total",
                "Frames of live tasks' relay and rtsp cameras scaled to the camera's declared size",
                ["source"],
                registry=registry,
            ),
        )
        for status in TaskStatus:
            if status.terminal:
                metrics.tasks_finished.labels(status.value)
        for outcome in DETECTION_OUTCOMES:
            metrics.edge_frames.labels(outcome)
        for outcome in VIDEO_OUTCOMES:
            metrics.videos.labels(outcome)
        for source in CAMERA_SOURCES:
            metrics.camera_frames_scaled.labels(source)
            for outcome in CAMERA_OUTCOMES:
                metrics.camera_frames.labels(source, outcome)
        return metrics
