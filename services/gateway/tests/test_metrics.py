"""The gateway's metrics: the event-loop task gauge the fuzz tests read to find leaked tasks
(tests/fuzz)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from edgeway.gateway.metrics import Metrics

REGISTRY = CollectorRegistry()
Metrics.create(REGISTRY)


def scraped() -> float:
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("edgeway_gateway_event_loop_tasks "):
            return float(line.split()[1])
    raise AssertionError("edgeway_gateway_event_loop_tasks is not exported")


async def test_the_gauge_counts_the_tasks_of_the_loop_that_serves_metrics() -> None:
    before = scraped()
    assert before >= 1  # this test's own task
    release = asyncio.Event()
    waiting = [asyncio.create_task(release.wait()) for _ in range(5)]
    await asyncio.sleep(0)
    assert scraped() == before + 5
    release.set()
    await asyncio.gather(*waiting)
    assert scraped() == before


def test_without_an_event_loop_the_gauge_reads_zero_not_a_guess() -> None:
    assert scraped() == 0
