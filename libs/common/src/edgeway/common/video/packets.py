"""The Android H.264 packet format of `WS /ws/video` (WorldSystem, docs/replaced-systems.md).

Big-endian. Every packet starts with `u32 total_size` (the whole packet, header included),
`u8 type` and `u64 ts` (µs). SPS, PPS and CONFIG stop there (13 bytes); KEYFRAME and FRAME go on
with `u32 data_size` and `u32 flags` (MediaCodec's buffer flags), 21 bytes in all. The payload
follows: Annex-B NAL units as MediaCodec gives them, start codes included, so the payloads of
SPS, PPS, KEYFRAME and the FRAMEs after it, concatenated, are a decodable H.264 stream.

The seed read only the type byte and sliced at a fixed offset, so a packet split over two
WebSocket messages, or two packets in one, broke the stream. `PacketParser` is driven by the size
field instead and takes the byte stream in pieces of any size.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum


class PacketType(IntEnum):
    SPS = 1
    PPS = 2
    KEYFRAME = 3
    FRAME = 4
    CONFIG = 5  # defined by the Android client, never sent with a meaning: parsed and ignored


SHORT_HEADER = struct.Struct(">IBQ")  # total_size, type, ts
LONG_HEADER = struct.Struct(">IBQII")  # total_size, type, ts, data_size, flags
# The largest packet accepted: an intra frame of a 4K phone stream at a high bitrate stays well
# under this; anything larger is a corrupt size field, not a frame.
MAX_PACKET_BYTES = 8 * 1024 * 1024

_PREFIX = struct.Struct(">IB")  # what is needed to judge a header: total_size and type
_FRAME_TYPES = frozenset({PacketType.KEYFRAME, PacketType.FRAME})
_MAX_FIRST_BYTE = MAX_PACKET_BYTES >> 24
_KNOWN_TYPES = frozenset(int(packet_type) for packet_type in PacketType)


def header_size(packet_type: PacketType) -> int:
    return LONG_HEADER.size if packet_type in _FRAME_TYPES else SHORT_HEADER.size


@dataclass(frozen=True, slots=True)
class VideoPacket:
    type: PacketType
    timestamp_us: int
    payload: bytes
    # MediaCodec buffer flags; carried only by KEYFRAME and FRAME (SPS, PPS, CONFIG have none).
    flags: int = 0

    def encode(self) -> bytes:
        """The Android wire form."""
        if self.type in _FRAME_TYPES:
            total = LONG_HEADER.size + len(self.payload)
            header = LONG_HEADER.pack(
                total, self.type, self.timestamp_us, len(self.payload), self.flags
            )
        else:
            header = SHORT_HEADER.pack(
                SHORT_HEADER.size + len(self.payload), self.type, self.timestamp_us
            )
        return header + self.payload


# While resynchronising, a position is taken for a packet start only if it looks like one of the
# H.264 packets a phone sends: size below 2^24 (so the first byte is 0 and MAX_PACKET_BYTES is
# checked after), type SPS/PPS with a 13-byte header or KEYFRAME/FRAME with a 21-byte one, and a
# payload that opens with an Annex-B start code. Without the start code about one position in
# 20 000 of compressed video passes the size and type checks, and a false header can claim up to
# 8 MiB and swallow seconds of good packets. CONFIG packets are never resynchronised onto.
_CANDIDATE = re.compile(
    rb"(?=\x00[\x00-\x80][\x00-\xff]{2}(?:[\x01\x02][\x00-\xff]{8}|[\x03\x04][\x00-\xff]{16})"
    rb"\x00\x00\x00?\x01)"
)
# The most bytes the pattern looks at from a candidate position: 21-byte header + 4-byte code.
_CANDIDATE_SPAN = LONG_HEADER.size + 4


class PacketParser:
    """Parses one phone's byte stream, however it is cut into messages.

    `corrupt` counts rejected headers: unknown type, size smaller than the header (or, for
    KEYFRAME and FRAME, than 21 bytes), size above `MAX_PACKET_BYTES`, `data_size` that
    disagrees with `total_size`. After one, the parser scans forward for the next plausible
    packet start (see `_CANDIDATE`) and counts nothing more until it finds one: a run of garbage
    counts once. It never raises on bad input, and its output depends only on the bytes, not on
    where the messages were cut.

    `in_sync=False` starts by scanning: for a stream picked up in the middle (after lost
    chunks), where the first bytes are probably not a packet start.
    """

    def __init__(self, *, in_sync: bool = True) -> None:
        self._buffer = bytearray()
        self._resyncing = not in_sync
        self.corrupt = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a packet not complete yet (at most MAX_PACKET_BYTES)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[VideoPacket]:
        self._buffer += data
        buffer = self._buffer
        packets: list[VideoPacket] = []
        pos = 0
        while True:
            if self._resyncing:
                found = self._next_candidate(pos)
                if found < 0:
                    pos = -found - 1
                    break
                pos = found
                self._resyncing = False
            available = len(buffer) - pos
            if available and buffer[pos] > _MAX_FIRST_BYTE:
                pos = self._reject(pos)  # too large, whatever the other size bytes are
                continue
            if available < _PREFIX.size:
                break
            total, raw_type = _PREFIX.unpack_from(buffer, pos)
            if raw_type not in _KNOWN_TYPES:
                pos = self._reject(pos)
                continue
            packet_type = PacketType(raw_type)
            header = header_size(packet_type)
            if total < header or total > MAX_PACKET_BYTES:
                pos = self._reject(pos)
                continue
            if available < header:
                break
            flags = 0
            if header == LONG_HEADER.size:
                _, _, timestamp, data_size, flags = LONG_HEADER.unpack_from(buffer, pos)
                if data_size != total - header:
                    pos = self._reject(pos)
                    continue
            else:
                _, _, timestamp = SHORT_HEADER.unpack_from(buffer, pos)
            if available < total:
                break
            if packet_type is not PacketType.CONFIG:
                payload = bytes(buffer[pos + header : pos + total])
                packets.append(VideoPacket(packet_type, timestamp, payload, flags))
            pos += total
        del buffer[:pos]
        return packets

    def _reject(self, pos: int) -> int:
        self.corrupt += 1
        self._resyncing = True
        return pos + 1

    def _next_candidate(self, pos: int) -> int:
        """The first plausible packet start at or after `pos`, or, when none can be told yet,
        -1 - the first position still undecided (one that more bytes may make plausible)."""
        buffer = self._buffer
        while True:
            match = _CANDIDATE.search(buffer, pos)
            if match is None:
                return -1 - self._first_undecided(pos, len(buffer))
            start = match.start()
            if start + _CANDIDATE_SPAN > len(buffer):
                # Wait if an earlier position may still turn out plausible, so that the result
                # does not depend on where the stream was cut.
                undecided = self._first_undecided(pos, start)
                if undecided < start:
                    return -1 - undecided
            if self._plausible(start):
                return start
            pos = start + 1

    def _first_undecided(self, pos: int, end: int) -> int:
        """The first position in [pos, end) whose bytes, up to the end of the buffer, agree
        with `_CANDIDATE` so far (`end` if none). Only the last few positions can."""
        buffer = self._buffer
        for start in range(max(pos, len(buffer) - _CANDIDATE_SPAN + 1), end):
            tail = bytes(buffer[start : start + _CANDIDATE_SPAN])
            if tail[:1] not in (b"", b"\x00") or (len(tail) > 1 and tail[1] > 0x80):
                continue
            if len(tail) <= 4:
                return start
            if not PacketType.SPS <= tail[4] <= PacketType.FRAME:
                continue
            code = tail[header_size(PacketType(tail[4])) :]
            if b"\x00\x00\x01".startswith(code[:3]) or b"\x00\x00\x00\x01".startswith(code):
                return start
        return end

    def _plausible(self, pos: int) -> bool:
        total, raw_type = _PREFIX.unpack_from(self._buffer, pos)
        header = header_size(PacketType(raw_type))
        if not header + 4 <= total <= MAX_PACKET_BYTES:
            return False
        if header == LONG_HEADER.size:
            data_size = LONG_HEADER.unpack_from(self._buffer, pos)[3]
            return bool(data_size == total - header)
        return True
