"""The Android H.264 packet format and its parser.

Any cut of the byte stream into messages gives the same packets; bad headers are counted and the
parser picks the stream up again at the next good packet.
"""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeway.common.video.packets import (
    MAX_PACKET_BYTES,
    PacketParser,
    PacketType,
    VideoPacket,
)

EXAMPLES = settings(max_examples=200, deadline=None)
START_CODE = b"\x00\x00\x00\x01"
H264_TYPES = [PacketType.SPS, PacketType.PPS, PacketType.KEYFRAME, PacketType.FRAME]


def nal(body: bytes) -> bytes:
    return START_CODE + body


@st.composite
def video_packets(draw: st.DrawFn, *, max_size: int = 400) -> VideoPacket:
    """A packet as a phone sends it: an Annex-B payload (start code first)."""
    packet_type = draw(st.sampled_from(H264_TYPES))
    body = draw(st.binary(min_size=1, max_size=max_size))
    flags = draw(st.integers(0, 2**32 - 1)) if packet_type >= PacketType.KEYFRAME else 0
    return VideoPacket(packet_type, draw(st.integers(0, 2**64 - 1)), nal(body), flags)


def feed_in_pieces(parser: PacketParser, stream: bytes, cuts: list[int]) -> list[VideoPacket]:
    out: list[VideoPacket] = []
    bounds = [0, *sorted(cut % (len(stream) + 1) for cut in cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        out += parser.feed(stream[start:end])
    return out


def test_encode_is_the_android_wire_form() -> None:
    frame = VideoPacket(PacketType.FRAME, 0x0102030405060708, nal(b"\x41\x9a"), flags=1)
    assert frame.encode() == (
        struct.pack(">IBQII", 27, 4, 0x0102030405060708, 6, 1) + b"\x00\x00\x00\x01\x41\x9a"
    )
    sps = VideoPacket(PacketType.SPS, 33_000, nal(b"\x67\x42"))
    assert sps.encode() == struct.pack(">IBQ", 19, 1, 33_000) + b"\x00\x00\x00\x01\x67\x42"


@EXAMPLES
@given(
    packets=st.lists(video_packets(), max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_every_cut_of_the_stream_gives_the_same_packets(
    packets: list[VideoPacket], cuts: list[int]
) -> None:
    stream = b"".join(packet.encode() for packet in packets)
    parser = PacketParser()
    assert feed_in_pieces(parser, stream, cuts) == packets
    assert parser.corrupt == 0
    assert parser.buffered == 0


@settings(max_examples=30, deadline=None)
@given(packets=st.lists(video_packets(max_size=40), min_size=1, max_size=5))
def test_byte_by_byte_and_all_at_once(packets: list[VideoPacket]) -> None:
    stream = b"".join(packet.encode() for packet in packets)
    one = PacketParser()
    assert [p for i in range(len(stream)) for p in one.feed(stream[i : i + 1])] == packets
    assert PacketParser().feed(stream) == packets


def test_a_packet_waits_for_its_last_byte() -> None:
    frame = VideoPacket(PacketType.KEYFRAME, 7, nal(b"\x65" * 100), flags=1)
    wire = frame.encode()
    parser = PacketParser()
    assert parser.feed(wire[:-1]) == []
    assert parser.buffered == len(wire) - 1
    assert parser.feed(wire[-1:]) == [frame]
    assert parser.buffered == 0


def test_config_packets_are_parsed_and_left_out() -> None:
    config = VideoPacket(PacketType.CONFIG, 1, b'{"width":1280}').encode()
    sps = VideoPacket(PacketType.SPS, 2, nal(b"\x67"))
    frame = VideoPacket(PacketType.FRAME, 3, nal(b"\x41"))
    parser = PacketParser()
    assert parser.feed(config + sps.encode() + config + frame.encode()) == [sps, frame]
    assert parser.corrupt == 0


def test_empty_payloads_round_trip() -> None:
    packets = [VideoPacket(t, 5, b"") for t in PacketType if t is not PacketType.CONFIG]
    assert PacketParser().feed(b"".join(p.encode() for p in packets)) == packets


# Garbage made of bytes >= 0x80 can hold no packet start: a size field beginning with such a byte
# is above MAX_PACKET_BYTES. So every run of it must cost exactly one corrupt count.
garbage = st.binary(min_size=1, max_size=64).map(lambda b: bytes(0x80 | x for x in b))


@EXAMPLES
@given(
    packets=st.lists(video_packets(), min_size=1, max_size=10),
    junk=st.lists(st.one_of(st.none(), garbage), min_size=11, max_size=11),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_garbage_between_packets_is_counted_and_skipped(
    packets: list[VideoPacket], junk: list[bytes | None], cuts: list[int]
) -> None:
    stream = b""
    for packet, before in zip(packets, junk, strict=False):
        stream += (before or b"") + packet.encode()
    trailing = junk[len(packets)] or b""
    stream += trailing
    parser = PacketParser()
    assert feed_in_pieces(parser, stream, cuts) == packets
    assert parser.corrupt == sum(1 for run in junk[: len(packets) + 1] if run)
    assert parser.buffered <= len(trailing)


@EXAMPLES
@given(
    stream=st.lists(
        st.one_of(
            video_packets(max_size=60).map(VideoPacket.encode),
            st.binary(max_size=40),
        ),
        max_size=10,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_any_bytes_parse_the_same_however_they_are_cut(stream: bytes, cuts: list[int]) -> None:
    """Garbage that happens to look like a header may give a false packet; but never an
    exception, and never an answer that depends on where the messages were cut."""
    whole = PacketParser()
    expected = whole.feed(stream)
    pieces = PacketParser()
    assert feed_in_pieces(pieces, stream, cuts) == expected
    assert pieces.corrupt == whole.corrupt
    assert pieces.buffered == whole.buffered
    if len(stream) <= 300:
        single = PacketParser()
        assert [p for i in range(len(stream)) for p in single.feed(stream[i : i + 1])] == expected
        assert single.corrupt == whole.corrupt


def realistic_stream(count: int = 8, seed: int = 1) -> list[VideoPacket]:
    """SPS, PPS, a keyframe and frames with payloads like compressed video (random bytes)."""
    rng = random.Random(seed)
    packets = [
        VideoPacket(PacketType.SPS, 0, nal(b"\x67\x42\xc0\x1e" + rng.randbytes(8))),
        VideoPacket(PacketType.PPS, 0, nal(b"\x68\xce\x3c\x80")),
        VideoPacket(PacketType.KEYFRAME, 0, nal(b"\x65" + rng.randbytes(3000)), flags=1),
    ]
    for i in range(1, count):
        packets.append(VideoPacket(PacketType.FRAME, i * 33_333, nal(b"\x41" + rng.randbytes(700))))
    return packets


BAD_HEADERS = {
    "unknown type 0": struct.pack(">IBQ", 20, 0, 1) + b"\x11" * 7,
    "unknown type 6": struct.pack(">IBQ", 20, 6, 1) + b"\x11" * 7,
    "unknown type 255": struct.pack(">IBQ", 20, 255, 1) + b"\x11" * 7,
    "sps shorter than its header": struct.pack(">IBQ", 12, 1, 1),
    "frame shorter than its header": struct.pack(">IBQII", 20, 4, 1, 0, 0),
    "keyframe size 13": struct.pack(">IBQ", 13, 3, 1),
    "oversize": struct.pack(">IBQII", MAX_PACKET_BYTES + 1, 3, 1, MAX_PACKET_BYTES - 20, 1),
    "size 2^32-1": struct.pack(">IBQII", 2**32 - 1, 4, 1, 2**32 - 22, 0),
    "data_size too large": struct.pack(">IBQII", 21 + 704, 4, 1, 705, 0) + nal(b"\x41" * 700),
    "data_size too small": struct.pack(">IBQII", 21 + 704, 4, 1, 703, 0) + nal(b"\x41" * 700),
    "data_size of the whole packet": struct.pack(">IBQII", 21 + 704, 4, 1, 725, 0)
    + nal(b"\x41" * 700),
}


@pytest.mark.parametrize("bad", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
@pytest.mark.parametrize("where", [0, 2, 3, 8])
def test_a_corrupt_header_is_counted_and_the_next_packet_parsed(bad: bytes, where: int) -> None:
    packets = realistic_stream()
    wires = [p.encode() for p in packets]
    stream = b"".join(wires[:where]) + bad + b"".join(wires[where:])
    for cuts in ([], [len(stream) // 3, len(stream) // 2], list(range(0, len(stream), 37))):
        parser = PacketParser()
        assert feed_in_pieces(parser, stream, cuts) == packets
        assert parser.corrupt == 1


@pytest.mark.parametrize("packet_type", [PacketType.KEYFRAME, PacketType.FRAME])
@pytest.mark.parametrize("kept", range(1, 17))
def test_a_truncated_header_is_counted_and_the_next_packet_parsed(
    packet_type: PacketType, kept: int
) -> None:
    """A header cut before its data_size field is complete is caught by the size checks.
    (One cut after it keeps size, type and data_size: no parser can tell it from a packet.)"""
    packets = realistic_stream()
    truncated = VideoPacket(packet_type, 123_456, nal(b"\x41" * 300)).encode()[:kept]
    stream = b"".join(p.encode() for p in packets[:4]) + truncated
    stream += b"".join(p.encode() for p in packets[4:])
    parser = PacketParser()
    assert parser.feed(stream) == packets
    assert parser.corrupt == 1


def test_a_stream_picked_up_in_the_middle_starts_at_the_next_packet() -> None:
    """After lost chunks the relay starts a fresh parser on bytes from inside a packet.
    (200 offsets of one stream: the real thing, compressed video, is random-looking bytes.)"""
    packets = realistic_stream(count=30, seed=7)
    stream = b"".join(p.encode() for p in packets)
    starts = [0]
    for packet in packets:
        starts.append(starts[-1] + len(packet.encode()))
    rng = random.Random(3)
    for offset in sorted(rng.sample(range(1, len(stream)), 200)):
        following = next(i for i, start in enumerate(starts) if start >= offset)
        parser = PacketParser()
        assert parser.feed(stream[offset:]) == packets[following:]
        assert parser.corrupt == (0 if offset == starts[following] else 1)
        # Told that it starts in the middle, it skips to the next packet without a complaint.
        scanning = PacketParser(in_sync=False)
        assert scanning.feed(stream[offset:]) == packets[following:]
        assert scanning.corrupt == 0


def test_resynchronising_keeps_little_in_memory() -> None:
    parser = PacketParser()
    rng = random.Random(5)
    for _ in range(64):
        assert parser.feed(rng.randbytes(16_384).replace(b"\x00\x00\x01", b"\x00\x02\x01")) == []
        assert parser.buffered <= 24
    assert parser.corrupt == 1
    frame = VideoPacket(PacketType.FRAME, 9, nal(b"\x41\x01"))
    assert parser.feed(b"\xff" * 30 + frame.encode()) == [frame]


def test_a_packet_of_the_largest_size_is_accepted() -> None:
    payload = nal(b"\x65" + bytes(MAX_PACKET_BYTES - 21 - 5))
    frame = VideoPacket(PacketType.KEYFRAME, 1, payload, flags=1)
    assert len(frame.encode()) == MAX_PACKET_BYTES
    parser = PacketParser()
    assert parser.feed(frame.encode()) == [frame]
    assert parser.corrupt == 0
