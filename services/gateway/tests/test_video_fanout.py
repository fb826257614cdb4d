"""Video consumers' queues: skip to the next keyframe when behind, GOP first for late joiners."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from edgeway.gateway.fanout import (
    BEHIND_TO_KEYFRAME,
    ClientQueue,
    Hub,
    Message,
    Packet,
    Policy,
    VideoQueue,
)
from edgeway.gateway.metrics import Metrics

# The metrics these tests read, on a registry of their own.
METRICS = Metrics.create(CollectorRegistry())


class Recorder:
    """A socket: records what it is sent; blocks while `gate` is clear (a client not reading)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, message: Message) -> None:
        await self.gate.wait()
        self.sent.append(message)


class Stream:
    """One device's packets as the relay numbers them: SPS, PPS, then GOPs of `gop` packets."""

    def __init__(self, gop: int = 5) -> None:
        self.gop = gop
        self.seq = 0
        self.frames = 0

    def packet(self, kind: str) -> Packet:
        self.seq += 1
        return Packet(f"{kind}-{self.seq}".encode(), kind=kind, seq=self.seq)

    def start(self) -> list[Packet]:
        return [self.packet("sps"), self.packet("pps")]

    def next(self) -> Packet:
        kind = "keyframe" if self.frames % self.gop == 0 else "frame"
        self.frames += 1
        return self.packet(kind)


def dropped(endpoint: str) -> float:
    return METRICS.dropped.labels(endpoint, BEHIND_TO_KEYFRAME)._value.get()


def packets(sent: list[Message]) -> list[Packet]:
    return [m for m in sent if isinstance(m, Packet)]


def assert_decodable(sent: list[Packet]) -> None:
    """What an H.264 decoder needs: SPS and PPS before the first keyframe, which comes before
    any frame, and after that no frame missing until the next keyframe (each frame refers to
    the one before it)."""
    kinds = [p.kind for p in sent]
    first_key = kinds.index("keyframe")
    assert "sps" in kinds[:first_key], kinds
    assert "pps" in kinds[:first_key], kinds
    assert "frame" not in kinds[:first_key], kinds
    previous = sent[first_key]
    for packet in sent[first_key + 1 :]:
        if packet.kind == "frame":
            assert packet.seq == previous.seq + 1, (previous.seq, packet.seq)
            previous = packet
        elif packet.kind == "keyframe":
            previous = packet


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_stalled_consumer_resumes_at_a_keyframe_and_others_are_not_delayed() -> None:
    async def bind(_: str) -> None:
        return None

    hub = Hub(bind=bind, unbind=bind, metrics=METRICS)
    slow_socket, fast_socket = Recorder(), Recorder()
    slow = VideoQueue(slow_socket, size=8, endpoint="t-skip", metrics=METRICS)
    fast = VideoQueue(fast_socket, size=8, endpoint="t-skip", metrics=METRICS)
    for client in (slow, fast):
        await hub.subscribe("video.stream.d1", client)
    writers = [asyncio.create_task(client.run()) for client in (slow, fast)]
    before = dropped("t-skip")
    stream = Stream(gop=5)

    def publish(packet: Packet) -> None:
        hub.deliver("video.stream.d1", packet, kind="video")

    for packet in stream.start():
        publish(packet)
    for _ in range(3):
        publish(stream.next())
    await settle()
    assert len(slow_socket.sent) == 5  # SPS, PPS, keyframe, 2 frames

    slow_socket.gate.clear()  # the slow consumer stops reading
    stalled_at = stream.seq
    for _ in range(23):  # more than its queue holds
        publish(stream.next())
        await settle()
        # The fast consumer has everything published so far, while the slow one is stuck.
        assert packets(fast_socket.sent)[-1].seq == stream.seq
    assert len(slow) <= slow.size
    assert dropped("t-skip") > before

    slow_socket.gate.set()  # it reads again
    for _ in range(6):
        publish(stream.next())
        await settle()

    got = packets(slow_socket.sent)
    assert_decodable(got)
    assert [p.seq for p in packets(fast_socket.sent)] == list(range(1, stream.seq + 1))
    # The packet the slow consumer was stuck sending went out; then it skipped ahead: the
    # stream's SPS and PPS again, a keyframe, that keyframe's frames, and it is live again.
    stuck = [p.seq for p in got].index(stalled_at + 1)
    after = got[stuck + 1 :]
    assert [p.kind for p in after[:3]] == ["sps", "pps", "keyframe"]
    assert [p.seq for p in after[:2]] == [1, 2]
    assert after[2].seq > stuck + 1
    assert after[-1].seq == stream.seq
    assert len({p.seq for p in got}) < stream.seq  # what it skipped is gone for it
    for client in (slow, fast):
        client.close()
    await asyncio.wait_for(asyncio.gather(*writers), 1)


async def test_a_full_queue_drops_everything_queued_and_counts_it() -> None:
    socket = Recorder()
    socket.gate.clear()
    client = VideoQueue(socket, size=4, endpoint="t-count", metrics=METRICS)
    stream = Stream(gop=100)
    before = dropped("t-count")
    for packet in [*stream.start(), stream.next(), stream.next()]:  # SPS PPS K F: full
        client.offer(packet)
    assert len(client) == 4
    client.offer(stream.next())  # a frame into a full queue: all 4 go, and it too
    assert len(client) == 0
    assert client.skipping
    client.offer(stream.next())  # still no keyframe
    assert dropped("t-count") - before == 6
    client.offer("pong")  # text is not H.264: it is not held back
    assert list(client._queue) == ["pong"]
    key = Packet(b"k", kind="keyframe", seq=99)
    client.offer(key)
    assert [m.kind for m in packets(list(client._queue))] == ["sps", "pps", "keyframe"]
    assert not client.skipping


async def test_a_late_joiner_gets_the_gop_then_only_newer_live_packets() -> None:
    socket = Recorder()
    client = VideoQueue(socket, size=64, endpoint="t-gop", metrics=METRICS)
    # Live packets that arrived while the GOP was being fetched: 9 and 10 are in the GOP too.
    for seq in (9, 10, 11):
        client.offer(Packet(f"live-{seq}".encode(), kind="frame", seq=seq))
    gop = [
        Packet(b"sps", kind="sps"),
        Packet(b"pps", kind="pps"),
        Packet(b"key-7", kind="keyframe"),
        Packet(b"frame-8", kind="frame"),
        Packet(b"frame-9", kind="frame"),
        Packet(b"frame-10", kind="frame"),
    ]
    client.start(gop, last_seq=10)
    client.offer(Packet(b"live-10", kind="frame", seq=10))  # a live copy arriving late
    client.offer(Packet(b"live-12", kind="frame", seq=12))
    writer = asyncio.create_task(client.run())
    await settle()
    assert [p.payload for p in packets(socket.sent)] == [
        b"sps",
        b"pps",
        b"key-7",
        b"frame-8",
        b"frame-9",
        b"frame-10",
        b"live-11",
        b"live-12",
    ]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_without_a_gop_a_consumer_starts_at_the_next_keyframe() -> None:
    socket = Recorder()
    client = VideoQueue(socket, size=64, endpoint="t-nogop", metrics=METRICS)
    client.offer(Packet(b"frame-5", kind="frame", seq=5))  # mid-GOP: undecodable alone
    client.start([Packet(b"sps", kind="sps"), Packet(b"pps", kind="pps")], last_seq=4)
    client.offer(Packet(b"frame-6", kind="frame", seq=6))
    client.offer(Packet(b"key-7", kind="keyframe", seq=7))
    client.offer(Packet(b"frame-8", kind="frame", seq=8))
    writer = asyncio.create_task(client.run())
    await settle()
    assert [p.payload for p in packets(socket.sent)] == [b"sps", b"pps", b"key-7", b"frame-8"]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_other_policies_are_unchanged_by_packets() -> None:
    """A text client never sees a packet; a drop-oldest queue still drops the oldest."""
    socket = Recorder()
    socket.gate.clear()
    client = ClientQueue(
        socket, size=2, policy=Policy.DROP_OLDEST, endpoint="t-plain", metrics=METRICS
    )
    for message in ("a", "b", "c"):
        client.offer(message)
    assert list(client._queue) == ["b", "c"]
