"""The fault suite's short run (`bench.faults`, a few seconds per fault): kill -9 of a service
and of the gateway, a broker cut and a database cut, all real processes behind fault proxies,
while the producers keep sending.

What it holds to, on every path (occupancy frames, telemetry records, ingested files): nothing
accepted is lost, nothing is stored twice, producers are told when something is not taken, and
every path comes back. How fast it comes back, and the latencies, are the benchmark's figures
(`make faults`), never asserted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults import SCENARIOS, SHORT, FaultStack, Row, run_scenario

pytestmark = [pytest.mark.connected, pytest.mark.slow]

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    running = FaultStack(tmp_path_factory.mktemp("faults")).start()
    yield running
    running.stop()


async def run(suite: FaultStack, name: str, tmp_path: Path) -> Row:
    scenario = BY_NAME[name]
    return await run_scenario(suite, scenario, SCENARIOS.index(scenario), SHORT, tmp_path)


def assert_nothing_lost_or_doubled(row: Row) -> None:
    for name, path in row.paths.items():
        assert path.accepted > 0, f"{name}: no traffic was accepted at all"
        assert path.lost == 0, f"{name}: {path.lost} accepted and never stored: {path.detail}"
        assert path.duplicated == 0, f"{name}: {path.duplicated} stored twice: {path.detail}"
    # The suite's own producers send nothing a gateway may refuse for good.
    assert row.paths["ingestion"].detail["refused"] == {}
    assert row.paths["telemetry"].detail["rejected"] == 0
    assert row.paths["ingestion"].detail["rows_without_object"] == 0
    came_back = {path: seconds is not None for path, seconds in row.recovery_by_path.items()}
    assert all(came_back.values()), f"never came back: {row.recovery_by_path}"


async def test_kill_9_of_occupancy_mid_stream_loses_and_doubles_nothing(
    suite: FaultStack, tmp_path: Path
) -> None:
    row = await run(suite, "kill -9 occupancy", tmp_path)
    assert_nothing_lost_or_doubled(row)
    # The broker held the frames while the service was down: nobody had to be told.
    assert row.paths["occupancy"].detail["error_frames"] == {}


async def test_kill_9_of_the_gateway_loses_and_doubles_nothing_it_acknowledged(
    suite: FaultStack, tmp_path: Path
) -> None:
    """The producers' own connections die with it: what they were not told was taken they
    send again (the camera on the acknowledged wire, the logger and the uploader on their 202),
    and the resends are stored once."""
    row = await run(suite, "kill -9 gateway", tmp_path)
    assert_nothing_lost_or_doubled(row)
    assert row.paths["occupancy"].detail["connections_dropped"] > 0


async def test_a_broker_cut_tells_every_producer_and_loses_nothing(
    suite: FaultStack, tmp_path: Path
) -> None:
    row = await run(suite, "broker cut: all", tmp_path)
    assert_nothing_lost_or_doubled(row)
    # What could not be confirmed was refused out loud (error frames, 503), not dropped.
    told = {name: path.told for name, path in row.paths.items()}
    assert all(count > 0 for count in told.values()), told
    assert set(row.paths["occupancy"].detail["error_frames"]) == {"unavailable"}


async def test_a_database_cut_is_waited_out_with_nothing_lost(
    suite: FaultStack, tmp_path: Path
) -> None:
    row = await run(suite, "PostgreSQL cut: all", tmp_path)
    assert_nothing_lost_or_doubled(row)
