"""JPEG dimensions from the frame header, without decoding the image.

The seed decoded every phone frame with OpenCV only to learn its width and height (and died on a
frame that failed to decode). The start-of-frame segment (ITU-T T.81, B.2.2) holds both: walk
the marker segments from SOI to the first SOF and read them there, in microseconds.
"""

from __future__ import annotations

SOI = 0xD8
EOI = 0xD9
SOS = 0xDA
# SOF0-SOF15 are 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC), which share the range.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-RST7 (T.81, B.1.1.3).
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class JpegError(ValueError):
    """The bytes are not a JPEG whose dimensions can be read."""


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG image; raises JpegError for anything else."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != SOI:
        raise JpegError("not a JPEG: it does not start with the SOI marker (FF D8)")
    position = 2
    end = len(data)
    while position < end:
        if data[position] != 0xFF:
            raise JpegError(f"corrupt JPEG: expected a marker at byte {position}")
        while position < end and data[position] == 0xFF:  # fill bytes before a marker
            position += 1
        if position >= end:
            break
        marker = data[position]
        position += 1
        if marker in STANDALONE:
            continue
        if marker in (EOI, SOS):
            raise JpegError("corrupt JPEG: no frame header (SOF) before the image data")
        if position + 2 > end:
            break
        length = int.from_bytes(data[position : position + 2], "big")
        if length < 2:
            raise JpegError(f"corrupt JPEG: segment length {length} at byte {position}")
        if marker in SOF_MARKERS:
            # Segment: length (2), precision (1), height (2), width (2), components...
            if length < 8 or position + 7 > end:
                break
            height = int.from_bytes(data[position + 3 : position + 5], "big")
            width = int.from_bytes(data[position + 5 : position + 7], "big")
            if width == 0 or height == 0:
                raise JpegError(f"JPEG frame header gives {width}x{height}: no usable size")
            return width, height
        position += length
    raise JpegError("truncated JPEG: it ends before its frame header (SOF)")
