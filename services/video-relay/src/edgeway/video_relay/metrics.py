"""The video relay's Prometheus metrics, built on a registry (tests run several relays)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

DROP_REASONS = ("publish_behind", "publish_failed", "decode_behind")
IMU_OUTCOMES = ("published", "duplicate", "late", "invalid", "publish_failed")
BRIDGE_KINDS = ("trajectory", "restart", "invalid")
CHUNK_REJECTIONS = ("invalid_device",)


@dataclass(frozen=True, slots=True)
class Metrics:
    bandwidth: Gauge
    streams: Gauge
    packets: Counter
    corrupt: Counter
    chunks_lost: Counter
    chunks_rejected: Counter
    dropped: Counter
    gop_overflows: Counter
    jpegs: Counter
    decode_errors: Counter
    imu: Counter
    bridged: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls(
            # The seed's `video_bandwidth_mbps`, per device (a label per stream held: bounded
            # by max_streams, removed when a stream is forgotten).
            bandwidth=Gauge(
                "edgeway_video_bandwidth_mbps",
                "Bytes received from a device's phone over the last 5 s window, in Mbit/s",
                ["device"],
                registry=registry,
            ),
            streams=Gauge("edgeway_video_streams", "Device streams held", registry=registry),
            packets=Counter(
                "edgeway_video_packets_total",
                "H.264 packets parsed and relayed on video.stream.<device>, by type",
                ["type"],
                registry=registry,
            ),
            corrupt=Counter(
                "edgeway_video_corrupt_packets_total",
                "Packet headers the parser rejected (it resynchronises on the next packet)",
                registry=registry,
            ),
            chunks_lost=Counter(
                "edgeway_video_chunks_lost_total",
                "Phone chunks missing from the stream (x-chunk-seq jumped)",
                registry=registry,
            ),
            chunks_rejected=Counter(
                "edgeway_video_chunks_rejected_total",
                "Chunks not taken at all, by reason",
                ["reason"],
                registry=registry,
            ),
            dropped=Counter(
                "edgeway_video_dropped_total",
                "Packets not published (publish_behind, publish_failed) or not decoded "
                "(decode_behind); the relay resumes at the next keyframe",
                ["reason"],
                registry=registry,
            ),
            gop_overflows=Counter(
                "edgeway_video_gop_overflows_total",
                "GOP caches dropped for passing gop_max_frames or gop_max_bytes",
                registry=registry,
            ),
            jpegs=Counter(
                "edgeway_video_jpegs_total",
                "Decoded frames published as JPEG to video_frames_exchange",
                registry=registry,
            ),
            decode_errors=Counter(
                "edgeway_video_decode_errors_total",
                "Packets the H.264 decoder refused",
                registry=registry,
            ),
            imu=Counter(
                "edgeway_video_imu_samples_total",
                "IMU samples by outcome",
                ["outcome"],
                registry=registry,
            ),
            bridged=Counter(
                "edgeway_video_bridged_total",
                "Trajectory and restart messages bridged to video.viewer (invalid: not JSON)",
                ["kind"],
                registry=registry,
            ),
        )
        for reason in DROP_REASONS:
            metrics.dropped.labels(reason)
        for outcome in IMU_OUTCOMES:
            metrics.imu.labels(outcome)
        for kind in BRIDGE_KINDS:
            metrics.bridged.labels(kind)
        for rejection in CHUNK_REJECTIONS:
            metrics.chunks_rejected.labels(rejection)
        for name in ("sps", "pps", "keyframe", "frame"):
            metrics.packets.labels(name)
        return metrics
