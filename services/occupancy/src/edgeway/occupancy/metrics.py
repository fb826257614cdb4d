"""The occupancy service's Prometheus metrics, built on a registry (tests run several services)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

OUTCOMES = ("stored", "duplicate", "rejected")


@dataclass(frozen=True, slots=True)
class Metrics:
    observations: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls(
            observations=Counter(
                "edgeway_occupancy_observations_total",
                "Observations taken from the work queue, by outcome (stored, duplicate, rejected)",
                ["outcome"],
                registry=registry,
            ),
        )
        for outcome in OUTCOMES:
            metrics.observations.labels(outcome)
        return metrics
