"""One phone's H.264 stream as the relay keeps it: pure state, no I/O, no clock of its own.

A `DeviceStream` takes the raw WebSocket chunks of one device in the order the gateway
published them, parses them into Android packets (a fresh `PacketParser` per phone connection,
and after chunks were lost), numbers every packet it relays, and keeps the group of pictures a
late joiner needs (`Gop`), and maps the phone's packet times to the wall clock (`PhoneClock`).
Everything it holds is bounded: the parser's buffer by the largest
packet, the GOP by its frame and byte caps, the bandwidth history by its length.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from edgeway.common.video.packets import PacketParser, PacketType, VideoPacket

# The seed's bandwidth monitor: 5 s windows, a warning on the average of the last 10.
BANDWIDTH_WINDOW_S = 5.0
BANDWIDTH_HISTORY = 10
# The seed warns only after more than 5 windows (a stream that just started is not "slow").
BANDWIDTH_MIN_WINDOWS = 6

PACKET_NAMES = {
    PacketType.SPS: "sps",
    PacketType.PPS: "pps",
    PacketType.KEYFRAME: "keyframe",
    PacketType.FRAME: "frame",
}
_LAST_SEQ = struct.Struct(">Q")
_PICTURE = struct.Struct(">Qq")
# A phone whose packet times are this close before their arrival stamps Unix time (Edgeway's
# simulated phone does): its times are taken as they are.
WALL_CLOCK_SLACK_US = 10_000_000


@dataclass(frozen=True, slots=True)
class Relayed:
    """One parsed packet with its place in its device's stream."""

    seq: int  # x-packet-seq: per device, from 1, over the relay's life
    packet: VideoPacket
    received_ns: int  # wall clock (NTP-corrected) when the relay parsed it
    captured_ms: int  # when the phone captured it, Unix ms (`PhoneClock`)

    @property
    def type(self) -> PacketType:
        return self.packet.type

    @property
    def name(self) -> str:
        return PACKET_NAMES[self.packet.type]


class Gop:
    """The current SPS and PPS, the last keyframe and every frame since, within two caps.

    When the frames since the keyframe pass `max_frames` or `max_bytes`, the cached keyframe and
    frames are dropped and nothing is cached until the next keyframe: a late joiner then gets
    SPS and PPS only and waits for that keyframe, as in the seed. A new SPS or PPS (another
    resolution, a restarted encoder) or a hole in the stream drops them too: frames that no
    longer decode from the cached keyframe must not be handed out.
    """

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.sps: Relayed | None = None
        self.pps: Relayed | None = None
        self.keyframe: Relayed | None = None
        self.frames: list[Relayed] = []
        self.bytes = 0  # payload bytes of the keyframe and frames
        self.overflows = 0  # GOPs dropped for passing a cap

    def add(self, item: Relayed) -> None:
        kind = item.type
        if kind is PacketType.SPS:
            if self.sps is not None and self.sps.packet.payload != item.packet.payload:
                self.invalidate()
            self.sps = item
        elif kind is PacketType.PPS:
            if self.pps is not None and self.pps.packet.payload != item.packet.payload:
                self.invalidate()
            self.pps = item
        elif kind is PacketType.KEYFRAME:
            self.keyframe = item
            self.frames = []
            self.bytes = len(item.packet.payload)
            if self.bytes > self.max_bytes:
                self.overflows += 1
                self.invalidate()
        elif kind is PacketType.FRAME and self.keyframe is not None:
            size = len(item.packet.payload)
            if len(self.frames) + 1 > self.max_frames or self.bytes + size > self.max_bytes:
                self.overflows += 1
                self.invalidate()
            else:
                self.frames.append(item)
                self.bytes += size

    def invalidate(self) -> None:
        """Forget the keyframe and its frames; cache again from the next keyframe."""
        self.keyframe = None
        self.frames = []
        self.bytes = 0

    @property
    def has_sps_pps(self) -> bool:
        return self.sps is not None and self.pps is not None

    def __iter__(self) -> Iterator[Relayed]:
        """SPS, PPS, the keyframe and the frames since: what a decoder needs, in that order."""
        for item in (self.sps, self.pps, self.keyframe):
            if item is not None:
                yield item
        yield from self.frames

    def reply(self) -> bytes:
        """The contract's binary GOP reply: 8-byte big-endian `last_seq`, then each packet's
        Android encoding. `last_seq` is the highest x-packet-seq included (an SPS repeated after
        the keyframe is newer than the frames), so a joiner takes live packets above it."""
        items = list(self)
        last_seq = max((item.seq for item in items), default=0)
        return _LAST_SEQ.pack(last_seq) + b"".join(item.packet.encode() for item in items)


@dataclass(frozen=True, slots=True)
class Picture:
    """A decoded frame as viewers get it: its number per device (from 1, over the relay's life),
    its capture time (Unix ms) and the JPEG."""

    seq: int
    captured_ms: int
    data: bytes

    def reply(self) -> bytes:
        """The contract's binary reply to `latest_jpeg`: 8-byte big-endian `seq` and
        `captured_ms`, then the JPEG."""
        return _PICTURE.pack(self.seq, self.captured_ms) + self.data


class PhoneClock:
    """The phone's packet times (µs) on the wall clock, for a capture-to-screen delay.

    Android stamps SPS and PPS with `System.nanoTime() / 1000` and pictures with MediaCodec's
    `presentationTimeUs`, both counted from the phone's boot, not from 1970. The relay anchors
    that clock to its own NTP-corrected one: the offset is the smallest gap (arrival minus packet
    time) the connection has shown, the packet that travelled fastest, so a capture time is its
    packet time plus that offset and can only be late by that packet's transit. A phone whose
    times come at most `WALL_CLOCK_SLACK_US` before their arrival stamps Unix time already, and
    is taken at its word (its transit then counts in the delay too).
    """

    __slots__ = ("_gap_us",)

    def __init__(self) -> None:
        self._gap_us: int | None = None

    def observe(self, timestamp_us: int, received_ns: int) -> None:
        gap = received_ns // 1000 - timestamp_us
        if self._gap_us is None or gap < self._gap_us:
            self._gap_us = gap

    @property
    def offset_us(self) -> int | None:
        """What to add to a packet time for Unix µs; None before the first packet."""
        gap = self._gap_us
        if gap is None:
            return None
        return 0 if 0 <= gap <= WALL_CLOCK_SLACK_US else gap

    def captured_ms(self, timestamp_us: int) -> int:
        """Unix ms of a packet time (after at least one `observe`)."""
        return (timestamp_us + (self.offset_us or 0)) // 1000

    def reset(self) -> None:
        """A new phone connection: its clock may be another (a rebooted phone)."""
        self._gap_us = None


@dataclass(frozen=True, slots=True)
class Received:
    """What one chunk produced."""

    packets: list[Relayed]
    # The byte stream had a hole before these packets (chunks lost, a new phone connection):
    # what follows does not decode from what came before until the next keyframe.
    discontinuity: bool


@dataclass(slots=True)
class Bandwidth:
    """Bytes received per window, as the seed measured it (Mbps over 5 s windows)."""

    started: float  # monotonic seconds
    bytes: int = 0
    mbps: float = 0.0
    history: deque[float] = field(default_factory=lambda: deque(maxlen=BANDWIDTH_HISTORY))

    def roll(self, now: float) -> float:
        """Close the current window at `now`; its rate in Mbps."""
        elapsed = now - self.started
        if elapsed > 0:
            self.mbps = self.bytes * 8 / elapsed / 1e6
            self.history.append(self.mbps)
        self.bytes = 0
        self.started = now
        return self.mbps

    def low(self, threshold_mbps: float) -> bool:
        """The seed's warning: the last windows' average is below the threshold."""
        if len(self.history) < BANDWIDTH_MIN_WINDOWS:
            return False
        return sum(self.history) / len(self.history) < threshold_mbps


class DeviceStream:
    """Parser, numbering, GOP and counters of one device's stream."""

    def __init__(self, device: str, *, gop_max_frames: int, gop_max_bytes: int, now: float) -> None:
        self.device = device
        self.gop = Gop(max_frames=gop_max_frames, max_bytes=gop_max_bytes)
        self.clock = PhoneClock()
        self.bandwidth = Bandwidth(started=now)
        self.seq = 0  # the last x-packet-seq given out
        self.packets = 0  # packets relayed (CONFIG is parsed, not relayed)
        self.chunks = 0
        self.chunks_lost = 0
        self.last_packet_at: float | None = None  # wall clock, epoch seconds
        self.last_activity = now  # monotonic seconds of the last chunk
        self._parser = PacketParser()
        self._retired_corrupt = 0  # corrupt packets counted by parsers since replaced
        self._connection: str | None = None
        self._chunk_seq: int | None = None

    @property
    def corrupt(self) -> int:
        return self._retired_corrupt + self._parser.corrupt

    def receive(
        self,
        data: bytes,
        *,
        connection: str,
        chunk_seq: int | None,
        received_ns: int,
        now: float,
    ) -> Received:
        """Take one chunk (`x-connection`, `x-chunk-seq`); the packets it completed, numbered.

        `received_ns`: wall-clock nanoseconds (NTP-corrected) stamped on the packets;
        `now`: monotonic seconds, for the bandwidth window and idleness.
        """
        self.chunks += 1
        self.last_activity = now
        self.bandwidth.bytes += len(data)
        discontinuity = False
        if connection != self._connection:
            # A new phone connection is a new byte stream: nothing carries over from the last.
            discontinuity = True
            if chunk_seq is not None and chunk_seq > 1:
                self.chunks_lost += chunk_seq - 1  # its first chunks went (queue drop-head)
            self._connection = connection
            self.clock.reset()
        elif (
            chunk_seq is not None
            and self._chunk_seq is not None
            and chunk_seq != self._chunk_seq + 1
        ):
            discontinuity = True
            self.chunks_lost += max(chunk_seq - self._chunk_seq - 1, 0)
        self._chunk_seq = chunk_seq
        if discontinuity:
            self._reset_parser()
            self.gop.invalidate()

        relayed: list[Relayed] = []
        for packet in self._parser.feed(data):
            if packet.type is PacketType.CONFIG:
                continue  # defined by the client, carries nothing a decoder needs
            self.seq += 1
            self.clock.observe(packet.timestamp_us, received_ns)
            captured_ms = self.clock.captured_ms(packet.timestamp_us)
            item = Relayed(self.seq, packet, received_ns, captured_ms)
            self.gop.add(item)
            relayed.append(item)
        if relayed:
            self.packets += len(relayed)
            self.last_packet_at = received_ns / 1e9
        return Received(relayed, discontinuity)

    def _reset_parser(self) -> None:
        self._retired_corrupt += self._parser.corrupt
        self._parser = PacketParser()
