"""Upload checks at the edge: type by content, bombs refused from the header, CSV really text.

Every fixture is made here with Pillow or by hand; no binary file is committed.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, ImageFile

from edgeway.common.media import (
    ALLOWED,
    ImageFormat,
    MediaRejected,
    check_csv,
    describe,
    inspect_image,
    sniff_image,
)

MAX_PIXELS = 40_000_000


def encoded(pillow_format: str, size: tuple[int, int] = (24, 16), **params: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, pillow_format, **params)
    return out.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_declaring(
    width: int, height: int, idat: bytes, *, bit_depth: int = 8, colour: int = 2
) -> bytes:
    """A PNG whose IHDR says width x height, followed by whatever compressed rows we give it."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A real decompression bomb: ~110 KB of PNG that inflates to 30000x30000 (900 MP) pixels."""
    side = 30_000
    rows = bytes(1 + (side + 7) // 8) * 1000  # 1000 rows of 1-bit black, filter byte 0
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    return png_declaring(side, side, idat, bit_depth=1, colour=0)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every pixel decode Pillow starts."""
    decoded: list[object] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        decoded.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return decoded


ALLOWED_SAMPLES = {
    ImageFormat.JPEG: ("JPEG", "a JPEG image"),
    ImageFormat.PNG: ("PNG", "a PNG image"),
    ImageFormat.BMP: ("BMP", "a BMP image"),
    ImageFormat.TIFF: ("TIFF", "a TIFF image"),
}


@pytest.mark.parametrize("fmt", sorted(ALLOWED))
def test_each_allowed_type_is_known_by_its_bytes(
    fmt: ImageFormat, no_decoding: list[object]
) -> None:
    pillow_format, words = ALLOWED_SAMPLES[fmt]
    data = encoded(pillow_format)
    assert sniff_image(data[:32]) is fmt  # the first bytes are enough
    assert describe(data) == words
    header = inspect_image(data, max_pixels=MAX_PIXELS)
    assert (header.format, header.width, header.height) == (fmt, 24, 16)
    assert no_decoding == []


def test_big_endian_tiff_is_a_tiff() -> None:
    # Pillow writes little-endian; the header of a big-endian TIFF starts "MM\0*".
    assert sniff_image(b"MM\x00*\x00\x00\x00\x08") is ImageFormat.TIFF


def zip_archive() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("payload.txt", "hello")
    return out.getvalue()


OTHER_CONTENT: dict[str, tuple[Callable[[], bytes], str]] = {
    "gif": (lambda: encoded("GIF"), "a GIF image"),
    "webp": (lambda: encoded("WEBP"), "a WebP image"),
    "svg": (
        lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>',
        "an SVG image",
    ),
    "html": (lambda: b"  <!DOCTYPE html><html><body>hi</body></html>", "an HTML document"),
    "zip": (zip_archive, "a ZIP archive"),
    "pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
    "heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "a HEIF/HEIC image"),
    "bigtiff": (lambda: b"II+\x00\x08\x00\x00\x00", "a BigTIFF image"),
    "text": (lambda: "speed,lap\n312.5,12\nnaïve\n".encode(), "text"),
    "binary": (lambda: bytes(range(256)), "unknown binary data"),
}


@pytest.mark.parametrize("name", sorted(OTHER_CONTENT))
def test_other_content_is_refused_saying_what_it_is(name: str) -> None:
    make, words = OTHER_CONTENT[name]
    data = make()
    assert sniff_image(data) is None
    assert describe(data) == words
    with pytest.raises(MediaRejected) as refused:
        inspect_image(data, max_pixels=MAX_PIXELS)
    assert refused.value.code == "wrong_type"
    assert refused.value.reason == f"content is {words}; allowed: JPEG, PNG, BMP, TIFF"


def test_an_empty_upload_is_refused() -> None:
    assert describe(b"") == "an empty file"
    with pytest.raises(MediaRejected) as refused:
        inspect_image(b"", max_pixels=MAX_PIXELS)
    assert refused.value.code == "empty"


def test_content_wins_over_the_name() -> None:
    # PNG bytes uploaded as "photo.jpg" with Content-Type image/jpeg: only the bytes count.
    header = inspect_image(encoded("PNG"), max_pixels=MAX_PIXELS)
    assert header.format is ImageFormat.PNG
    assert (header.format.extension, header.format.content_type) == ("png", "image/png")


def test_text_starting_with_bm_is_not_a_bitmap() -> None:
    data = b"BMW,Audi,Volvo\n1,2,3\n"
    assert sniff_image(data) is None
    assert describe(data) == "text"


@pytest.mark.parametrize("pillow_limit", ["default", "disabled"])
def test_a_decompression_bomb_is_refused_from_its_header(
    bomb: bytes,
    pillow_limit: str,
    no_decoding: list[object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if pillow_limit == "disabled":  # someone turned Pillow's global check off: ours still holds
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with pytest.raises(MediaRejected) as refused:
        inspect_image(bomb, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 1.0
    assert refused.value.code == "decompression_bomb"
    assert "900,000,000 pixels" in refused.value.reason
    assert "40,000,000" in refused.value.reason
    assert no_decoding == []


def test_the_pixel_limit_is_ours_not_pillows() -> None:
    # 4 MP is far below Pillow's own limit (~89 MP) and above the one the caller asked for.
    idat = zlib.compress(b"")
    with pytest.raises(MediaRejected) as refused:
        inspect_image(png_declaring(2000, 2000, idat), max_pixels=1_000_000)
    assert refused.value.code == "decompression_bomb"
    assert "2000x2000" in refused.value.reason
    header = inspect_image(png_declaring(1000, 1000, idat), max_pixels=1_000_000)
    assert (header.width, header.height) == (1000, 1000)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8, id="png-garbage"),
        pytest.param(png_declaring(0, 16, zlib.compress(b"")), id="png-zero-width"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\x00" * 40, id="jpeg-no-frame"),
        pytest.param(b"II*\x00\xff\xff\xff\x7f", id="tiff-bad-ifd-offset"),
    ],
)
def test_a_damaged_header_is_refused_as_corrupt(data: bytes) -> None:
    with pytest.raises(MediaRejected) as refused:
        inspect_image(data, max_pixels=MAX_PIXELS)
    assert refused.value.code == "corrupt"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'time,speed\r\n1,312.5\r\n2,"a, quoted\nfield"\r\n', id="crlf-quoted"),
        pytest.param(b"\xef\xbb\xbftime;speed\n1;312,5\n", id="bom"),
        pytest.param("pilote,écurie\nLeclerc,Ferrari\n".encode(), id="accents"),
        pytest.param(b"a\tb\n", id="tab"),
    ],
)
def test_a_phone_csv_is_accepted(data: bytes) -> None:
    check_csv(data)


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        pytest.param(encoded("PNG"), "not_text", "a PNG image", id="png"),
        pytest.param(zip_archive(), "not_text", "a ZIP archive", id="zip"),
        pytest.param(b"a,b\n1,\x002\n", "not_text", "U+0000 on line 2", id="nul"),
        pytest.param(
            b"a,b\n" + b"1,2\n" * 500 + b"3,\x004\n",
            "not_text",
            "U+0000 on line 502",
            id="late-nul",
        ),
        pytest.param(
            b"a,b\n1,\x1b[31m\n" + b"x" * 600, "not_text", "U+001B on line 2", id="escape"
        ),
        pytest.param(
            b"x" * 600 + b"\nnom,caf\xe9\n", "not_text", "byte 0xe9 at offset 608", id="latin-1"
        ),
        pytest.param("a,b\n".encode("utf-16"), "not_text", "UTF-16 text", id="utf-16"),
        pytest.param(b'a,b\n"1"x,2\n', "not_csv", "line 2", id="bad-quote"),
        pytest.param(b"<html><body>1,2</body></html>", "not_csv", "an HTML document", id="html"),
        pytest.param(b"", "empty", "empty", id="empty"),
    ],
)
def test_anything_else_is_refused_as_csv(data: bytes, code: str, says: str) -> None:
    with pytest.raises(MediaRejected) as refused:
        check_csv(data)
    assert refused.value.code == code
    assert says in refused.value.reason
