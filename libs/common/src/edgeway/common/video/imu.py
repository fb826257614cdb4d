"""Putting one phone's IMU samples in order.

Seed message: `{"type":"imu_data","timestamp":<ns int>,"accelerometer":{"x","y","z"},
"gyroscope":{"x","y","z"}}`. The seed deduplicated with an ever-growing set per connection and
sorted only inside each 50 ms flush, so samples that crossed a flush boundary went out of order.
Here a sample waits until it is `window_ns` older than the newest timestamp seen (or, when the
stream pauses, until it has waited `window_ns` of the caller's clock), then leaves in timestamp
order; anything arriving after a later sample has left is dropped as late, so the output is
strictly increasing.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

# The seed's flush period: the default reordering window.
DEFAULT_WINDOW_NS = 50_000_000


class ImuOrderer:
    """One per device. `add` samples as they arrive and call `due` periodically.

    Counters: `duplicates` (a timestamp already pending or just emitted), `late` (older than the
    last emitted), `dropped` (no integer `timestamp`: nothing to order by). Memory holds only
    the pending samples and the last emitted timestamp; when more than `max_pending` wait,
    `due` emits them all.
    """

    def __init__(self, *, window_ns: int = DEFAULT_WINDOW_NS, max_pending: int = 10_000) -> None:
        self.window_ns = window_ns
        self.max_pending = max_pending
        self.duplicates = 0
        self.late = 0
        self.dropped = 0
        self._pending: dict[int, dict[str, Any]] = {}
        self._heap: list[int] = []  # the pending timestamps
        # (arrival on the caller's clock, timestamp) of pending samples, in arrival order.
        self._arrivals: deque[tuple[int, int]] = deque()
        self._newest: int | None = None
        self._last_emitted: int | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def last_emitted(self) -> int | None:
        return self._last_emitted

    def add(self, sample: dict[str, Any], *, now_ns: int) -> None:
        timestamp = sample.get("timestamp")
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            self.dropped += 1
            return
        last = self._last_emitted
        if last is not None and timestamp < last:
            self.late += 1
            return
        if timestamp == last or timestamp in self._pending:
            self.duplicates += 1
            return
        self._pending[timestamp] = sample
        heapq.heappush(self._heap, timestamp)
        self._arrivals.append((now_ns, timestamp))
        if self._newest is None or timestamp > self._newest:
            self._newest = timestamp

    def due(self, *, now_ns: int) -> list[dict[str, Any]]:
        """The samples ready to leave, sorted by timestamp."""
        if not self._pending:
            return []
        if len(self._pending) > self.max_pending:
            cutoff = max(self._heap)
        else:
            assert self._newest is not None  # set by the first pending sample
            cutoff = self._newest - self.window_ns
            # A sample that has waited a whole window of real time goes, and with it everything
            # older: a paused stream does not hold its last samples back.
            arrivals = self._arrivals
            while arrivals and arrivals[0][0] <= now_ns - self.window_ns:
                cutoff = max(cutoff, arrivals.popleft()[1])
        out: list[dict[str, Any]] = []
        heap = self._heap
        while heap and heap[0] <= cutoff:
            timestamp = heapq.heappop(heap)
            out.append(self._pending.pop(timestamp))
            self._last_emitted = timestamp
        if out and len(self._arrivals) > len(self._pending):
            # Forget the arrivals of samples just emitted: memory stays with what is pending.
            self._arrivals = deque(entry for entry in self._arrivals if entry[1] > timestamp)
        return out
