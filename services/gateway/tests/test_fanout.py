"""Fan-out: bounded per-client queues, drop and close policies, topic matching, bindings."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import CollectorRegistry
from websockets.frames import Frame, Opcode

from edgeway.gateway.fanout import (
    Batch,
    ClientQueue,
    Hub,
    Message,
    Policy,
    SnapshotEcho,
    _topic_regex,
    canonical,
    prepared_writer,
)
from edgeway.gateway.metrics import Metrics
from edgeway.gateway.server import PREPARED_FRAMES

# The metrics these tests read, on a registry of their own.
METRICS = Metrics.create(CollectorRegistry())


class Recorder:
    def __init__(self, *, block: asyncio.Event | None = None) -> None:
        self.sent: list[Message] = []
        self.block = block

    async def __call__(self, message: Message) -> None:
        if self.block is not None:
            await self.block.wait()
        self.sent.append(message)


def dropped(endpoint: str, reason: str) -> float:
    return METRICS.dropped.labels(endpoint, reason)._value.get()


async def test_messages_reach_the_socket_in_order() -> None:
    recorder = Recorder()
    client = ClientQueue(
        recorder, size=10, policy=Policy.DROP_OLDEST, endpoint="t-order", metrics=METRICS
    )
    writer = asyncio.create_task(client.run())
    for i in range(5):
        client.offer(str(i))
    await asyncio.sleep(0.01)
    assert recorder.sent == ["0", "1", "2", "3", "4"]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_a_stalled_client_loses_its_oldest_and_the_loss_is_counted() -> None:
    gate = asyncio.Event()
    recorder = Recorder(block=gate)
    client = ClientQueue(
        recorder, size=3, policy=Policy.DROP_OLDEST, endpoint="t-drop", metrics=METRICS
    )
    writer = asyncio.create_task(client.run())
    before = dropped("t-drop", "slow_client")
    client.offer("first")
    await asyncio.sleep(0.01)  # the writer took "first" and is stuck in the socket
    for i in range(10):
        client.offer(str(i))  # never blocks the caller
    assert len(client) == 3
    assert dropped("t-drop", "slow_client") - before == 7
    gate.set()
    await asyncio.sleep(0.01)
    assert recorder.sent == ["first", "7", "8", "9"]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_a_client_on_a_reliable_channel_is_closed_when_it_overflows() -> None:
    gate = asyncio.Event()
    client = ClientQueue(
        Recorder(block=gate), size=2, policy=Policy.CLOSE, endpoint="t-close", metrics=METRICS
    )
    writer = asyncio.create_task(client.run())
    client.offer("a")
    await asyncio.sleep(0.01)
    for i in range(3):
        client.offer(str(i))
    gate.set()
    await asyncio.wait_for(writer, 1)  # run() returns so the caller closes with CLOSE_TOO_SLOW
    assert client.overflowed


@pytest.mark.parametrize(
    ("pattern", "channel", "matches"),
    [
        ("occupancy.location.*", "occupancy.location.3", True),
        ("occupancy.location.*", "occupancy.location.3.extra", False),
        ("occupancy.location.*", "occupancy.locations.3", False),
        ("occupancy.#", "occupancy", True),
        ("occupancy.#", "occupancy.location.3", True),
        ("#", "anything.at.all", True),
        ("gateway.abc.*", "gateway.abc.conn1", True),
        ("gateway.abc.*", "gateway.abd.conn1", False),
    ],
)
def test_topic_patterns_match_like_amqp(pattern: str, channel: str, matches: bool) -> None:
    assert bool(_topic_regex(pattern).match(channel)) is matches


async def test_hub_binds_a_pattern_once_and_unbinds_after_the_last_watcher() -> None:
    calls: list[tuple[str, str]] = []

    async def bind(pattern: str) -> None:
        await asyncio.sleep(0.01)
        calls.append(("bind", pattern))

    async def unbind(pattern: str) -> None:
        calls.append(("unbind", pattern))

    hub = Hub(bind=bind, unbind=unbind, metrics=METRICS)
    a = ClientQueue(
        Recorder(), size=10, policy=Policy.DROP_OLDEST, endpoint="t-hub", metrics=METRICS
    )
    b = ClientQueue(
        Recorder(), size=10, policy=Policy.DROP_OLDEST, endpoint="t-hub", metrics=METRICS
    )
    await asyncio.gather(hub.subscribe("x.*", a), hub.subscribe("x.*", b))
    assert calls == [("bind", "x.*")]
    assert hub.deliver("x.1", "m", kind="x") == 2
    assert hub.deliver("y.1", "m", kind="y") == 0
    await hub.unsubscribe("x.*", a)
    assert calls == [("bind", "x.*")]
    await hub.unsubscribe("x.*", b)
    assert calls == [("bind", "x.*"), ("unbind", "x.*")]
    assert hub.deliver("x.1", "m", kind="x") == 0


class Socket:
    """A socket that takes writes at once while `open` and refuses them otherwise."""

    def __init__(self) -> None:
        self.open = True
        self.written: list[Message] = []

    def __call__(self, message: Message) -> bool:
        if self.open:
            self.written.append(message)
        return self.open


async def test_a_client_that_keeps_up_is_written_to_at_once_without_its_writer() -> None:
    recorder, socket = Recorder(), Socket()
    client = ClientQueue(
        recorder,
        write=socket,
        size=10,
        policy=Policy.DROP_OLDEST,
        endpoint="t-write",
        metrics=METRICS,
    )
    writer = asyncio.create_task(client.run())
    await asyncio.sleep(0)  # the writer is waiting
    client.offer("a")
    client.offer("b")
    assert socket.written == ["a", "b"]  # in the caller, before anything else ran
    assert recorder.sent == []
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_nothing_is_written_before_the_snapshot_in_front_went_out() -> None:
    recorder, socket = Recorder(), Socket()
    client = ClientQueue(
        recorder,
        write=socket,
        size=10,
        policy=Policy.DROP_OLDEST,
        endpoint="t-write",
        metrics=METRICS,
    )
    client.offer("live 1")  # published while the snapshot was being fetched
    client.push_front(["snapshot"])
    writer = asyncio.create_task(client.run())
    await asyncio.sleep(0.01)
    client.offer("live 2")
    await asyncio.sleep(0.01)
    assert recorder.sent == ["snapshot", "live 1"]
    assert socket.written == ["live 2"]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_what_the_socket_refuses_is_queued_and_later_messages_wait_behind_it() -> None:
    gate = asyncio.Event()
    recorder, socket = Recorder(block=gate), Socket()
    client = ClientQueue(
        recorder,
        write=socket,
        size=10,
        policy=Policy.DROP_OLDEST,
        endpoint="t-write",
        metrics=METRICS,
    )
    writer = asyncio.create_task(client.run())
    await asyncio.sleep(0)
    client.offer("1")
    socket.open = False  # the transport paused: a client that stopped reading
    client.offer("2")
    socket.open = True  # writable again, but "2" is still queued: "3" must not overtake it
    client.offer("3")
    await asyncio.sleep(0.01)
    assert socket.written == ["1"]
    gate.set()
    await asyncio.sleep(0.01)
    assert recorder.sent == ["2", "3"]
    client.offer("4")  # the queue drained: straight to the socket again
    assert socket.written == ["1", "4"]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_queued_messages_a_snapshot_holds_are_discarded_in_place() -> None:
    recorder = Recorder()
    client = ClientQueue(
        recorder, size=10, policy=Policy.DROP_OLDEST, endpoint="t-discard", metrics=METRICS
    )
    for message in ("live a", "live b", "live c"):
        client.offer(message)
    assert client.discard_queued(lambda message: message == "live b") == 1
    client.push_front(["snapshot a", "snapshot b"])
    writer = asyncio.create_task(client.run())
    await asyncio.sleep(0.01)
    assert recorder.sent == ["snapshot a", "snapshot b", "live a", "live c"]
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_a_snapshot_echo_drops_each_expected_copy_once_queued_or_live() -> None:
    def key(message: object) -> bytes | None:
        return (
            canonical(message["data"]) if isinstance(message, dict) and "data" in message else None
        )

    recorder = Recorder()
    client = ClientQueue(
        recorder, size=10, policy=Policy.DROP_OLDEST, endpoint="t-echo", metrics=METRICS
    )
    record = {"data": {"t": 1, "v": 2.5}}
    # Queued while the snapshot was read: its echo goes, a log line and another record stay.
    for message in (record, {"log": "x"}, {"data": {"t": 0}}):
        client.offer(orjson.dumps(message).decode())
    # The snapshot holds the record twice (two copies expected) and one whose echo never comes.
    SnapshotEcho(client, [canonical({"v": 2.5, "t": 1})] * 2 + [b"gone"], key).install()
    assert len(client) == 2
    client.push_front(["snapshot"])
    writer = asyncio.create_task(client.run())
    client.offer(orjson.dumps(record).decode())  # the second expected copy: dropped
    client.offer(orjson.dumps(record).decode())  # a third: not expected, so it goes
    client.offer(b"not json")
    await asyncio.sleep(0.01)
    assert recorder.sent == [
        "snapshot",
        '{"log":"x"}',
        '{"data":{"t":0}}',
        '{"data":{"t":1,"v":2.5}}',
        b"not json",
    ]
    assert client.admit is not None  # b"gone" is still expected
    client.close()
    await asyncio.wait_for(writer, 1)


async def test_a_snapshot_echo_takes_itself_off_when_done_or_expired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = ClientQueue(
        Recorder(), size=10, policy=Policy.DROP_OLDEST, endpoint="t-echo-off", metrics=METRICS
    )
    SnapshotEcho(client, [b"1"], lambda message: str(message).encode()).install()
    assert client.admit is not None
    client.offer("1")  # the echo: dropped, and nothing more is expected
    client.offer("2")
    assert client.admit is None
    assert len(client) == 1

    monkeypatch.setattr(SnapshotEcho, "EXPIRY_S", 0.0)
    SnapshotEcho(client, [b"3"], lambda message: str(message).encode()).install()
    await asyncio.sleep(0.001)
    client.offer("3")  # expired: the guard is off and the message goes through
    assert client.admit is None
    assert len(client) == 2


async def test_a_client_is_offered_only_what_its_admit_filter_lets_through() -> None:
    recorder = Recorder()
    client = ClientQueue(
        recorder, size=10, policy=Policy.DROP_OLDEST, endpoint="t-admit", metrics=METRICS
    )
    client.admit = lambda message: message != "echo"
    writer = asyncio.create_task(client.run())
    for message in ("a", "echo", "b"):
        client.offer(message)
    client.admit = None
    client.offer("echo")
    await asyncio.sleep(0.01)
    assert recorder.sent == ["a", "b", "echo"]
    client.close()
    await asyncio.wait_for(writer, 1)


class FrameSocket:
    """A WebSocket under the gateway's server, as far as `prepared_writer` sees it: each
    `write_frame` call recorded (one transport write), or refused while not `open`."""

    def __init__(self) -> None:
        self.open = True
        self.writes: list[bytes] = []
        self.scope = {"extensions": {PREPARED_FRAMES: {"write": self.write_frame}}}

    def write_frame(self, frame: bytes) -> bool:
        if self.open:
            self.writes.append(frame)
        return self.open


def text_frames(*messages: str) -> bytes:
    return b"".join(Frame(Opcode.TEXT, m.encode()).serialize(mask=False) for m in messages)


def delivered(kind: str) -> float:
    return METRICS.delivered.labels(kind)._value.get()


async def prepared_client(socket: FrameSocket, recorder: Recorder) -> ClientQueue:
    write = prepared_writer(socket, binary=False)  # type: ignore[arg-type]
    client = ClientQueue(
        recorder,
        write=write,
        size=10,
        policy=Policy.DROP_OLDEST,
        endpoint="t-many",
        metrics=METRICS,
    )
    WRITERS.add(asyncio.create_task(client.run()))
    await asyncio.sleep(0)  # its writer waits, idle
    return client


WRITERS: set[asyncio.Task[None]] = set()  # the prepared clients' writer tasks, held


async def noop(_: str) -> None:
    return None


async def test_a_batch_reaches_each_client_that_keeps_up_in_one_write_in_order() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)
    sockets = [FrameSocket() for _ in range(3)]
    recorders = [Recorder() for _ in sockets]
    clients = [await prepared_client(s, r) for s, r in zip(sockets, recorders, strict=True)]
    for client in clients:
        await hub.subscribe("occ.*", client)
    before = delivered("t-batch")
    assert hub.deliver_many("occ.1", ["a", "bb", "ccc"], kind="t-batch") == 3
    for socket in sockets:
        assert socket.writes == [text_frames("a", "bb", "ccc")]  # one write, the frames in order
    assert sockets[0].writes[0] is sockets[1].writes[0]  # serialized once for every client
    assert all(recorder.sent == [] for recorder in recorders)  # no writer task was woken
    assert delivered("t-batch") - before == 9  # counted per message
    hub.deliver_many("occ.1", ["alone"], kind="t-batch")
    assert sockets[2].writes[1:] == [text_frames("alone")]
    for client in clients:
        client.close()


async def test_a_paused_client_gets_a_batch_queued_one_by_one_behind_what_waits() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)
    gate = asyncio.Event()
    paused, behind = FrameSocket(), FrameSocket()
    paused_sent, behind_sent = Recorder(), Recorder(block=gate)
    paused_client = await prepared_client(paused, paused_sent)
    behind_client = await prepared_client(behind, behind_sent)
    await hub.subscribe("occ.1", paused_client)
    await hub.subscribe("occ.1", behind_client)
    paused.open = False  # a client that stopped reading: the transport is paused
    behind.open = False
    hub.deliver("occ.1", "first", kind="t-batch")  # behind's writer now holds it, blocked
    behind.open = True  # writable again, but "first" is not out yet: nothing may overtake it
    hub.deliver_many("occ.1", ["a", "b"], kind="t-batch")
    await asyncio.sleep(0.01)
    assert paused.writes == behind.writes == []
    assert paused_sent.sent == ["first", "a", "b"]  # each through the queue, in order
    gate.set()
    await asyncio.sleep(0.01)
    assert behind_sent.sent == ["first", "a", "b"]
    for client in (paused_client, behind_client):
        client.close()


async def test_a_batch_passes_a_new_clients_snapshot_filter_message_by_message() -> None:
    socket, recorder = FrameSocket(), Recorder()
    client = await prepared_client(socket, recorder)
    SnapshotEcho(client, [canonical({"n": 2})], lambda m: canonical(m)).install()
    client.offer_many(Batch(['{"n":1}', '{"n":2}', '{"n":3}', '{"n":2}']))
    await asyncio.sleep(0.01)
    # The snapshot's echo is dropped, once; the others go one frame a write, in order.
    assert socket.writes == [text_frames('{"n":1}'), text_frames('{"n":3}'), text_frames('{"n":2}')]
    assert recorder.sent == []
    client.close()


class Reader:
    """A client's `read` for `Hub.serve`: returns when `leave` is set (the client left)."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def __call__(self) -> None:
        await self.leave.wait()


async def test_a_served_client_has_a_writer_task_only_while_something_is_queued() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)
    gate = asyncio.Event()
    recorder, reader = Recorder(block=gate), Reader()
    client = ClientQueue(
        recorder, size=10, policy=Policy.DROP_OLDEST, endpoint="t-serve", metrics=METRICS
    )

    async def snapshot_first() -> None:
        hub.deliver("occ.1", "live", kind="t-serve")  # while the snapshot is fetched
        client.push_front(["snapshot"])

    tasks = len(asyncio.all_tasks())
    serving = asyncio.create_task(
        hub.serve(client, ("occ.*",), catch_up=snapshot_first, read=reader)
    )
    await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) == tasks + 2  # the serving task and a writer, held at the gate
    gate.set()
    await asyncio.sleep(0.01)
    assert recorder.sent == ["snapshot", "live"]
    assert len(asyncio.all_tasks()) == tasks + 1  # drained: the writer is gone, the reader stays
    hub.deliver("occ.1", "next", kind="t-serve")
    await asyncio.sleep(0.01)
    assert recorder.sent == ["snapshot", "live", "next"]
    assert len(asyncio.all_tasks()) == tasks + 1
    reader.leave.set()
    await asyncio.wait_for(serving, 1)
    assert hub.watchers("occ.*") == 0
    assert client.closed


async def test_a_served_client_that_leaves_stops_its_blocked_writer() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)
    reader = Reader()
    client = ClientQueue(
        Recorder(block=asyncio.Event()),  # a socket that never takes the message
        size=10,
        policy=Policy.DROP_OLDEST,
        endpoint="t-serve",
        metrics=METRICS,
    )
    tasks = len(asyncio.all_tasks())
    serving = asyncio.create_task(
        hub.serve(client, ("occ.*",), catch_up=noop_catch_up, read=reader)
    )
    await asyncio.sleep(0.01)
    hub.deliver("occ.1", "stuck", kind="t-serve")
    await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) == tasks + 2
    reader.leave.set()
    await asyncio.wait_for(serving, 1)
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == tasks


async def test_a_served_client_that_overflows_a_reliable_channel_is_let_go() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)
    gate = asyncio.Event()
    client = ClientQueue(
        Recorder(block=gate), size=2, policy=Policy.CLOSE, endpoint="t-serve", metrics=METRICS
    )
    serving = asyncio.create_task(
        hub.serve(client, ("occ.*",), catch_up=noop_catch_up, read=Reader())
    )
    await asyncio.sleep(0.01)
    for i in range(4):
        hub.deliver("occ.1", str(i), kind="t-serve")
    gate.set()
    await asyncio.wait_for(serving, 1)  # returns, though its reader never saw the client leave
    assert client.overflowed
    assert not serving.cancelled()


async def test_a_served_client_whose_socket_fails_is_let_go() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)

    async def broken(_: Message) -> None:
        raise RuntimeError("the socket is gone")

    client = ClientQueue(
        broken, size=10, policy=Policy.DROP_OLDEST, endpoint="t-serve", metrics=METRICS
    )
    serving = asyncio.create_task(
        hub.serve(client, ("occ.*",), catch_up=noop_catch_up, read=Reader())
    )
    await asyncio.sleep(0.01)
    hub.deliver("occ.1", "a", kind="t-serve")
    await asyncio.wait_for(serving, 1)
    assert client.closed


async def test_cancelling_a_served_client_from_outside_still_cancels_it() -> None:
    hub = Hub(bind=noop, unbind=noop, metrics=METRICS)
    client = ClientQueue(
        Recorder(), size=10, policy=Policy.DROP_OLDEST, endpoint="t-serve", metrics=METRICS
    )
    serving = asyncio.create_task(
        hub.serve(client, ("occ.*",), catch_up=noop_catch_up, read=Reader())
    )
    await asyncio.sleep(0.01)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert hub.watchers("occ.*") == 0


async def noop_catch_up() -> None:
    return None
