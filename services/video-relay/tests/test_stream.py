"""A device's stream state: numbering, GOP for late joiners, resets, bounds. No I/O."""

from __future__ import annotations

import struct

import pytest

from edgeway.common.video.packets import PacketParser, PacketType, VideoPacket
from edgeway.video_relay.stream import (
    WALL_CLOCK_SLACK_US,
    Bandwidth,
    DeviceStream,
    Gop,
    PhoneClock,
    Relayed,
)

START = b"\x00\x00\x00\x01"
SPS = VideoPacket(PacketType.SPS, 1_000, START + b"\x67\x42\xc0\x1e\xda")
PPS = VideoPacket(PacketType.PPS, 1_000, START + b"\x68\xce\x0f\xc8")
CONFIG = VideoPacket(PacketType.CONFIG, 1_000, b"")


def keyframe(ts: int, size: int = 100) -> VideoPacket:
    return VideoPacket(PacketType.KEYFRAME, ts, START + b"\x65" + bytes(size), flags=1)


def frame(ts: int, size: int = 20) -> VideoPacket:
    return VideoPacket(PacketType.FRAME, ts, START + b"\x41" + bytes([ts % 256]) * size)


def new_stream(*, max_frames: int = 100, max_bytes: int = 1 << 20) -> DeviceStream:
    return DeviceStream("phone", gop_max_frames=max_frames, gop_max_bytes=max_bytes, now=0.0)


def send(
    stream: DeviceStream,
    data: bytes,
    *,
    connection: str = "c1",
    chunk_seq: int | None = None,
) -> list[Relayed]:
    return stream.receive(
        data, connection=connection, chunk_seq=chunk_seq, received_ns=5, now=1.0
    ).packets


def wire(*packets: VideoPacket) -> bytes:
    return b"".join(packet.encode() for packet in packets)


def parse_reply(reply: bytes) -> tuple[int, list[VideoPacket]]:
    (last_seq,) = struct.unpack(">Q", reply[:8])
    return last_seq, PacketParser().feed(reply[8:])


GOP_START = (SPS, PPS, keyframe(2_000), frame(2_033), frame(2_066))


def test_packets_are_numbered_per_device_from_one_however_the_bytes_are_cut() -> None:
    data = wire(SPS, PPS, CONFIG, keyframe(2_000), frame(2_033), frame(2_066))
    stream = new_stream()
    relayed: list[Relayed] = []
    # 7-byte chunks: every header is split somewhere.
    for seq, cut in enumerate(range(0, len(data), 7), start=1):
        relayed += send(stream, data[cut : cut + 7], chunk_seq=seq)
    # CONFIG is parsed but neither relayed nor numbered.
    assert [item.seq for item in relayed] == [1, 2, 3, 4, 5]
    assert [item.name for item in relayed] == ["sps", "pps", "keyframe", "frame", "frame"]
    assert [item.packet for item in relayed] == [
        SPS,
        PPS,
        keyframe(2_000),
        frame(2_033),
        frame(2_066),
    ]
    assert stream.packets == 5
    assert stream.chunks_lost == 0
    assert stream.last_packet_at == 5e-9


def test_the_gop_reply_is_sps_pps_the_last_keyframe_and_every_frame_since() -> None:
    stream = new_stream()
    send(stream, wire(*GOP_START))
    last_seq, packets = parse_reply(stream.gop.reply())
    assert (last_seq, packets) == (5, list(GOP_START))

    # A new keyframe starts a new GOP; the parameter sets stay.
    send(stream, wire(keyframe(3_000), frame(3_033)))
    last_seq, packets = parse_reply(stream.gop.reply())
    assert (last_seq, packets) == (7, [SPS, PPS, keyframe(3_000), frame(3_033)])


def test_a_repeated_sps_keeps_the_gop_and_its_newer_seq_is_the_last_seq() -> None:
    stream = new_stream()
    send(stream, wire(*GOP_START, SPS, PPS))
    last_seq, packets = parse_reply(stream.gop.reply())
    assert last_seq == 7  # the repeated PPS: live packets above it are what the joiner lacks
    assert packets == list(GOP_START)


def test_new_parameter_sets_drop_the_gop_until_the_next_keyframe() -> None:
    stream = new_stream()
    send(stream, wire(*GOP_START))
    other_sps = VideoPacket(PacketType.SPS, 9_000, START + b"\x67\x64\x00\x28")
    send(stream, wire(other_sps, frame(9_033)))
    _, packets = parse_reply(stream.gop.reply())
    assert packets == [other_sps, PPS]  # no keyframe to decode the old frames from
    send(stream, wire(keyframe(9_100), frame(9_133)))
    _, packets = parse_reply(stream.gop.reply())
    assert packets == [other_sps, PPS, keyframe(9_100), frame(9_133)]


def test_frames_before_any_keyframe_are_relayed_but_not_cached() -> None:
    stream = new_stream()
    relayed = send(stream, wire(SPS, PPS, frame(1_033), frame(1_066)))
    assert len(relayed) == 4
    assert parse_reply(stream.gop.reply()) == (2, [SPS, PPS])


def test_a_gop_past_its_frame_cap_is_dropped_and_the_live_stream_goes_on() -> None:
    stream = new_stream(max_frames=3)
    relayed = send(stream, wire(SPS, PPS, keyframe(0), *(frame(ts) for ts in range(1, 5))))
    assert len(relayed) == 7  # every packet still goes out live
    assert stream.gop.overflows == 1
    assert parse_reply(stream.gop.reply()) == (2, [SPS, PPS])
    send(stream, wire(frame(5)))  # still no keyframe: nothing cached
    assert stream.gop.keyframe is None
    assert stream.gop.frames == []
    send(stream, wire(keyframe(6), frame(7)))
    assert parse_reply(stream.gop.reply())[1] == [SPS, PPS, keyframe(6), frame(7)]


def test_a_gop_past_its_byte_cap_is_dropped() -> None:
    stream = new_stream(max_bytes=1_000)
    send(stream, wire(SPS, PPS, keyframe(0, size=600), frame(1, size=300)))
    assert stream.gop.bytes == 605 + 305
    send(stream, wire(frame(2, size=300)))
    assert stream.gop.overflows == 1
    assert stream.gop.keyframe is None
    assert stream.gop.bytes == 0
    # A keyframe larger than the cap alone is never cached.
    send(stream, wire(keyframe(3, size=2_000)))
    assert stream.gop.keyframe is None
    assert stream.gop.overflows == 2


def test_a_chunk_seq_jump_counts_lost_chunks_and_starts_a_fresh_parser() -> None:
    stream = new_stream()
    send(stream, wire(*GOP_START), chunk_seq=1)
    half = wire(frame(3_000, size=200))[:100]
    assert send(stream, half, chunk_seq=2) == []  # a frame cut in two: waits for the rest
    # Chunks 3 and 4 are lost; the bytes that remained of the cut frame must not be glued to
    # what comes next, and the GOP (which lacks the lost frames) must not be handed out.
    received = stream.receive(
        wire(SPS, PPS, keyframe(4_000)), connection="c1", chunk_seq=5, received_ns=9, now=2.0
    )
    assert received.discontinuity
    assert [item.packet for item in received.packets] == [SPS, PPS, keyframe(4_000)]
    assert stream.chunks_lost == 2
    assert parse_reply(stream.gop.reply())[1] == [SPS, PPS, keyframe(4_000)]


def test_a_gop_broken_by_lost_chunks_is_not_handed_out() -> None:
    stream = new_stream()
    send(stream, wire(*GOP_START), chunk_seq=1)
    send(stream, wire(frame(3_000)), chunk_seq=3)  # chunk 2 (a frame) was lost
    assert stream.chunks_lost == 1
    assert parse_reply(stream.gop.reply())[1] == [SPS, PPS]


def test_a_new_connection_is_a_new_byte_stream() -> None:
    stream = new_stream()
    send(stream, wire(*GOP_START)[:-10], connection="old", chunk_seq=1)
    received = stream.receive(
        wire(SPS, PPS, keyframe(5_000)), connection="new", chunk_seq=1, received_ns=1, now=1.0
    )
    assert received.discontinuity
    assert [item.packet for item in received.packets] == [SPS, PPS, keyframe(5_000)]
    assert stream.chunks_lost == 0  # a reconnect loses nothing the relay could count
    # The numbering goes on over connections (it resets only when the relay restarts).
    assert received.packets[0].seq == 5
    # A connection whose first chunks were dropped from the queue counts them.
    send(stream, wire(frame(5_033)), connection="third", chunk_seq=4)
    assert stream.chunks_lost == 3


# A phone booted an hour before it streams: its packet times count µs from boot (Android's).
UNIX_US = 1_800_000_000_000_000
BOOT_US = 3_600_000_000


def test_a_boot_clock_is_anchored_at_the_packet_that_travelled_fastest() -> None:
    clock = PhoneClock()
    assert clock.offset_us is None
    # Arrivals 40 ms, 25 ms and 60 ms after capture (the phone's clock is 1.8e15 µs behind).
    for capture_us, transit_us in ((0, 40_000), (33_333, 25_000), (66_666, 60_000)):
        clock.observe(BOOT_US + capture_us, (UNIX_US + capture_us + transit_us) * 1000)
    assert clock.offset_us == UNIX_US - BOOT_US + 25_000
    # Each capture time is late by that fastest transit, never by a slower one.
    assert clock.captured_ms(BOOT_US + 100_000) == (UNIX_US + 100_000 + 25_000) // 1000


def test_a_phone_that_stamps_unix_time_is_taken_at_its_word() -> None:
    clock = PhoneClock()
    clock.observe(UNIX_US, (UNIX_US + 30_000) * 1000)  # arrived 30 ms after its capture time
    assert clock.offset_us == 0
    assert clock.captured_ms(UNIX_US + 1_000) == (UNIX_US + 1_000) // 1000
    # One whose clock runs ahead of the relay's (a time after its arrival) is anchored instead.
    ahead = PhoneClock()
    ahead.observe(UNIX_US + 500_000, UNIX_US * 1000)
    assert ahead.offset_us == -500_000
    # And one too far behind to be wall time (past the slack) is too.
    behind = PhoneClock()
    behind.observe(UNIX_US, (UNIX_US + WALL_CLOCK_SLACK_US + 1) * 1000)
    assert behind.offset_us == WALL_CLOCK_SLACK_US + 1


def test_packets_carry_their_capture_time_and_a_new_connection_starts_a_new_clock() -> None:
    stream = new_stream()
    received = stream.receive(
        wire(SPS, PPS, keyframe(BOOT_US)),
        connection="c1",
        chunk_seq=1,
        received_ns=(UNIX_US + 20_000) * 1000,
        now=1.0,
    )
    assert {item.captured_ms for item in received.packets} == {(UNIX_US + 20_000) // 1000}
    # A rebooted phone on a new connection: its clock is anchored afresh, not at the old one.
    later = stream.receive(
        wire(keyframe(5_000)),
        connection="c2",
        chunk_seq=1,
        received_ns=(UNIX_US + 9_000_000) * 1000,
        now=2.0,
    )
    assert later.packets[0].captured_ms == (UNIX_US + 9_000_000) // 1000


def test_corrupt_packets_are_counted_over_parser_resets() -> None:
    stream = new_stream()
    garbage = b"\xff" * 50
    relayed = send(stream, garbage + wire(SPS, PPS) + garbage + wire(keyframe(1)), chunk_seq=1)
    assert [item.packet for item in relayed] == [SPS, PPS, keyframe(1)]
    assert stream.corrupt == 2
    send(stream, garbage + wire(frame(2)), chunk_seq=9)  # a reset: a fresh parser
    assert stream.corrupt == 3
    assert stream.packets == 4


def test_gop_iteration_order_and_empty_reply() -> None:
    gop = Gop(max_frames=10, max_bytes=1 << 20)
    assert gop.reply() == bytes(8)
    assert not gop.has_sps_pps


def test_bandwidth_is_bits_per_second_over_the_window_and_warns_like_the_seed() -> None:
    meter = Bandwidth(started=0.0)
    meter.bytes = 2_500_000
    assert meter.roll(5.0) == pytest.approx(4.0)  # 2.5 MB in 5 s = 4 Mbit/s
    assert meter.bytes == 0
    for window in range(2, 6):
        meter.bytes = 500_000
        meter.roll(5.0 * window)
    assert not meter.low(3.0)  # five windows: too early to tell (the seed waits for six)
    meter.bytes = 500_000
    meter.roll(30.0)
    assert meter.low(3.0)  # average (4 + 5 * 0.8) / 6 = 1.33 Mbit/s
    assert not meter.low(1.0)


def test_the_bandwidth_window_counts_every_byte_received() -> None:
    stream = new_stream()
    data = wire(*GOP_START)
    send(stream, data)
    send(stream, b"\xff" * 100)
    assert stream.bandwidth.bytes == len(data) + 100
