"""Ordering one phone's IMU samples: sorted, unique, late ones counted, memory bounded."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeway.common.video.imu import ImuOrderer

MS = 1_000_000
WINDOW = 50 * MS


def sample(timestamp: int, x: float = 0.0) -> dict[str, Any]:
    return {
        "type": "imu_data",
        "timestamp": timestamp,
        "accelerometer": {"x": x, "y": 0.0, "z": 9.81},
        "gyroscope": {"x": 0.0, "y": 0.0, "z": 0.0},
    }


def stamps(samples: list[dict[str, Any]]) -> list[int]:
    return [s["timestamp"] for s in samples]


@settings(max_examples=200, deadline=None)
@given(
    timestamps=st.lists(st.integers(0, 200).map(lambda t: t * MS), max_size=150),
    shuffle_seed=st.integers(),
    flush_every=st.integers(1, 20),
)
def test_shuffled_and_repeated_samples_come_out_sorted_and_once(
    timestamps: list[int], shuffle_seed: int, flush_every: int
) -> None:
    """Samples arrive shuffled (and repeated); whatever comes out is strictly increasing, and
    every sample is emitted, counted as a duplicate, or counted as late: none is lost silently."""
    arrivals = list(timestamps)
    random.Random(shuffle_seed).shuffle(arrivals)
    orderer = ImuOrderer(window_ns=WINDOW)
    out: list[int] = []
    now = 0
    for i, timestamp in enumerate(arrivals):
        now += MS
        orderer.add(sample(timestamp), now_ns=now)
        if i % flush_every == 0:
            out += stamps(orderer.due(now_ns=now))
        assert orderer.pending <= len(set(timestamps))
    out += stamps(orderer.due(now_ns=now + WINDOW))
    assert out == sorted(set(out))
    assert set(out) <= set(timestamps)
    assert len(out) + orderer.duplicates + orderer.late == len(arrivals)
    assert orderer.pending == 0
    assert orderer.dropped == 0
    if orderer.late == 0:  # then nothing but repeats was held back
        assert out == sorted(set(timestamps))


def test_out_of_order_within_the_window_is_put_in_order() -> None:
    orderer = ImuOrderer(window_ns=WINDOW)
    for t in (30, 10, 20, 50):
        orderer.add(sample(t * MS), now_ns=0)
    assert orderer.due(now_ns=0) == []  # newest 50 ms: nothing is a window older yet
    orderer.add(sample(75 * MS), now_ns=1)
    assert stamps(orderer.due(now_ns=1)) == [10 * MS, 20 * MS]  # <= 75 - 50
    orderer.add(sample(40 * MS), now_ns=2)  # later than the last emitted: still in time
    orderer.add(sample(100 * MS), now_ns=2)
    assert stamps(orderer.due(now_ns=2)) == [30 * MS, 40 * MS, 50 * MS]
    assert orderer.late == 0


def test_a_sample_older_than_the_last_emitted_is_late() -> None:
    orderer = ImuOrderer(window_ns=WINDOW)
    orderer.add(sample(10 * MS), now_ns=0)
    orderer.add(sample(100 * MS), now_ns=0)
    assert stamps(orderer.due(now_ns=0)) == [10 * MS]
    orderer.add(sample(5 * MS), now_ns=1)
    orderer.add(sample(9 * MS), now_ns=1)
    assert orderer.late == 2
    assert orderer.pending == 1
    assert stamps(orderer.due(now_ns=WINDOW + 1)) == [100 * MS]


def test_duplicates_pending_or_just_emitted_are_dropped() -> None:
    orderer = ImuOrderer(window_ns=WINDOW)
    orderer.add(sample(10 * MS, x=1.0), now_ns=0)
    orderer.add(sample(10 * MS, x=2.0), now_ns=0)  # same timestamp while pending
    orderer.add(sample(70 * MS), now_ns=0)
    first = orderer.due(now_ns=0)
    assert first == [sample(10 * MS, x=1.0)]  # the first one wins, unchanged
    orderer.add(sample(10 * MS), now_ns=1)  # the one just emitted
    orderer.add(sample(70 * MS), now_ns=1)  # the one pending
    assert orderer.duplicates == 3
    assert orderer.late == 0


def test_a_sample_without_an_integer_timestamp_is_dropped() -> None:
    orderer = ImuOrderer()
    for bad in (
        {"type": "imu_data"},
        sample(0) | {"timestamp": "12"},
        sample(0) | {"timestamp": 1.5},
        sample(0) | {"timestamp": True},
    ):
        orderer.add(bad, now_ns=0)
    assert orderer.dropped == 4
    assert orderer.pending == 0
    assert orderer.due(now_ns=10 * WINDOW) == []


def test_a_paused_stream_is_flushed_after_a_window_of_real_time() -> None:
    """The newest sample is never a window older than itself: without the caller's clock the
    last samples before a pause would wait for the next one, however long that takes."""
    orderer = ImuOrderer(window_ns=WINDOW)
    now = 1_000 * MS
    orderer.add(sample(20 * MS), now_ns=now)
    orderer.add(sample(10 * MS), now_ns=now + 10 * MS)
    assert orderer.due(now_ns=now + WINDOW - 1) == []
    assert stamps(orderer.due(now_ns=now + WINDOW)) == [10 * MS, 20 * MS]


def test_phone_clock_stuck_still_flushes() -> None:
    """Samples that do not move the newest timestamp forward still leave within a window."""
    orderer = ImuOrderer(window_ns=WINDOW)
    for i in range(10):
        orderer.add(sample(i), now_ns=i * 10 * MS)
    # At 60 ms the samples that arrived by 10 ms have waited a window: they (and all older) go.
    assert stamps(orderer.due(now_ns=60 * MS)) == [0, 1]
    assert stamps(orderer.due(now_ns=200 * MS)) == list(range(2, 10))


def test_more_than_max_pending_waiting_flushes_everything() -> None:
    orderer = ImuOrderer(window_ns=10**18, max_pending=100)
    for t in range(100, 0, -1):
        orderer.add(sample(t), now_ns=0)
    assert orderer.due(now_ns=0) == []  # exactly max_pending: still waiting
    orderer.add(sample(0), now_ns=0)
    assert stamps(orderer.due(now_ns=0)) == list(range(101))
    assert orderer.pending == 0


def test_memory_stays_with_what_is_pending() -> None:
    """A long stream (5 minutes at 500 Hz, in shuffled batches) leaves only the pending
    samples and the last emitted timestamp behind, however many came through."""
    orderer = ImuOrderer(window_ns=WINDOW, max_pending=1_000)
    rng = random.Random(11)
    period = 2 * MS
    now = 0
    emitted = 0
    for batch_start in range(0, 150_000, 25):
        batch = [sample((batch_start + i) * period) for i in range(25)]
        rng.shuffle(batch)
        for item in batch + batch[:3]:
            orderer.add(item, now_ns=now)
        now += 50 * MS
        emitted += len(orderer.due(now_ns=now))
        assert orderer.pending <= 50
        assert len(orderer._heap) == len(orderer._pending) == orderer.pending
        assert len(orderer._arrivals) <= orderer.pending
    assert emitted + orderer.pending == 150_000
    assert orderer.duplicates == 3 * 6_000
