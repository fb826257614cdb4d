"""JPEG width and height from the frame header, without decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeway.gateway.video.jpeg import JpegError, jpeg_size

# A real 24x16 baseline JPEG (250 bytes: SOI, COM, DQT, SOF0, DHT, SOS, EOI), made with PyAV
# 18.1's mjpeg encoder (yuvj420p); FFmpeg decodes it as 24x16.
JPEG_24X16 = (Path(__file__).parent / "data" / "24x16.jpg").read_bytes()
SOF0 = bytes.fromhex("ffc0")


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def sof(marker: int, width: int, height: int) -> bytes:
    # precision 8, height, width, 1 component (id 1, sampling 1x1, table 0)
    return segment(
        marker, b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    )


def test_a_real_jpeg_gives_its_width_and_height() -> None:
    assert jpeg_size(JPEG_24X16) == (24, 16)


@pytest.mark.parametrize("marker", [0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCF])
def test_every_kind_of_frame_header_is_read(marker: int) -> None:
    jpeg = b"\xff\xd8" + segment(0xE0, b"JFIF\x00\x01\x01") + sof(marker, 4032, 3024) + b"\xff\xd9"
    assert jpeg_size(jpeg) == (4032, 3024)


def test_tables_and_fill_bytes_before_the_frame_header_are_skipped() -> None:
    # DHT (C4) and DAC (CC) sit in the SOF range but are not frame headers; a DHT whose bytes
    # look like a size must not be read as one. Fill bytes (FF FF ...) may precede a marker.
    dht = segment(0xC4, b"\x00" + b"\x08\x00\x10\x00\x18" + bytes(10))
    dac = segment(0xCC, b"\x00\x11")
    jpeg = b"\xff\xd8" + dht + dac + b"\xff\xff\xff" + sof(0xC0, 640, 480)
    assert jpeg_size(jpeg) == (640, 480)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a JPEG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "not a JPEG"),
        (b"this is not an image", "not a JPEG"),
        (JPEG_24X16[: JPEG_24X16.index(SOF0) + 5], "truncated"),
        (JPEG_24X16[: JPEG_24X16.index(SOF0)], "truncated"),
        (b"\xff\xd8" + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\xff\xd9", "no frame header"),
        (b"\xff\xd8\xff\xd9", "no frame header"),
        (b"\xff\xd8" + sof(0xC0, 0, 480), "no usable size"),
        (b"\xff\xd8\x00\x00", "expected a marker"),
        (b"\xff\xd8\xff\xe0\x00\x01", "segment length"),
    ],
)
def test_anything_else_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(JpegError, match=reason):
        jpeg_size(data)
