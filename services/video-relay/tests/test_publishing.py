"""The per-device publisher: packets published in order, started only when the shared confirm
window has room, dropped to the next keyframe when too many wait. The window itself and the
order on a real broker: libs/common/tests/test_amqp.py; the relay end to end:
tests/test_video_e2e.py."""

from __future__ import annotations

import asyncio
import random

from edgeway.common.envelope import Envelope
from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.video_relay.publishing import DevicePublisher
from edgeway.video_relay.stream import Relayed

ENVELOPE = Envelope(type="video.chunk.v1", producer="gateway")


def item(seq: int, kind: PacketType = PacketType.FRAME) -> Relayed:
    return Relayed(seq, VideoPacket(kind, seq, b"\x00\x00\x00\x01" + bytes([seq % 256])), 0, 0)


class Broker:
    """Stands in for the shared confirm window: confirms take a random time, so they come back
    out of order unless the device publisher keeps the order itself; `window` places."""

    def __init__(self, window: int = 64) -> None:
        self.sent: list[int] = []  # in the order the publishes started (the channel's order)
        self.confirmed: list[int] = []
        self.window = window
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail: set[int] = set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.room = asyncio.Event()
        self.room.set()

    async def wait_room(self) -> None:
        while self.in_flight >= self.window:
            self.room.clear()
            await self.room.wait()

    def packet(self, device: str, relayed: Relayed, envelope: Envelope) -> asyncio.Task[None]:
        assert device == "phone"
        self.sent.append(relayed.seq)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return asyncio.create_task(self._confirm(relayed))

    async def _confirm(self, relayed: Relayed) -> None:
        try:
            await self.gate.wait()
            await asyncio.sleep(random.random() / 1000)
            if relayed.seq in self.fail:
                raise ConnectionError("channel closed")
            self.confirmed.append(relayed.seq)
        finally:
            self.in_flight -= 1
            self.room.set()


async def drained(broker: Broker, count: int) -> None:
    for _ in range(2000):
        if len(broker.confirmed) >= count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"only {len(broker.confirmed)} of {count} confirmed")


async def test_packets_go_out_in_order_with_many_confirms_in_flight() -> None:
    broker = Broker(window=8)
    ready = asyncio.Event()
    drops: list[tuple[str, int]] = []
    publisher = DevicePublisher(
        "phone", broker, backlog=1_000, ready=ready, on_drop=lambda *drop: drops.append(drop)
    )
    task = asyncio.create_task(publisher.run())
    publisher.put([item(seq) for seq in range(1, 301)], ENVELOPE)
    await asyncio.sleep(0.01)
    assert broker.sent == []  # nothing is published before the exchanges are declared
    ready.set()
    await drained(broker, 300)
    task.cancel()
    assert broker.sent == list(range(1, 301))
    assert 1 < broker.most_in_flight <= 8
    assert drops == []


async def test_a_backlog_past_its_bound_is_dropped_and_resumes_at_a_keyframe() -> None:
    broker = Broker(window=2)
    broker.gate.clear()  # the broker stalls
    ready = asyncio.Event()
    ready.set()
    drops: list[tuple[str, int]] = []
    publisher = DevicePublisher(
        "phone", broker, backlog=10, ready=ready, on_drop=lambda *drop: drops.append(drop)
    )
    task = asyncio.create_task(publisher.run())
    publisher.put([item(seq) for seq in range(1, 9)], ENVELOPE)
    await asyncio.sleep(0.01)  # two went out (the window), six wait
    assert len(publisher) == 6
    publisher.put([item(seq) for seq in range(9, 14)], ENVELOPE)  # 6 + 5 > 10
    assert len(publisher) == 0  # what waited is gone; frames without their keyframe are skipped
    publisher.put([item(14, PacketType.KEYFRAME), item(15)], ENVELOPE)
    broker.gate.set()
    await drained(broker, 4)
    task.cancel()
    assert broker.sent == [1, 2, 14, 15]
    assert sum(count for reason, count in drops if reason == "publish_behind") == 11


async def test_a_failed_publish_is_counted_and_the_next_ones_go_out() -> None:
    broker = Broker()
    broker.fail = {3}
    ready = asyncio.Event()
    ready.set()
    drops: list[tuple[str, int]] = []
    publisher = DevicePublisher(
        "phone", broker, backlog=100, ready=ready, on_drop=lambda *d: drops.append(d)
    )
    task = asyncio.create_task(publisher.run())
    publisher.put([item(seq) for seq in range(1, 6)], ENVELOPE)
    await drained(broker, 4)
    for _ in range(1000):
        if drops:
            break
        await asyncio.sleep(0.001)
    task.cancel()
    assert broker.sent == [1, 2, 3, 4, 5]
    assert sorted(broker.confirmed) == [1, 2, 4, 5]
    assert drops == [("publish_failed", 1)]
