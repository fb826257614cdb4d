"""Uploaded files are hostile: their type is decided by their content, never by name or header.

The gateway calls `inspect_image` and `check_csv` at the edge (cheap: magic numbers and the image
header, no pixel decoding); the ingestion service checks images again by decoding and re-encoding
them (`edgeway.ingestion.images`). Both refuse with `MediaRejected`, whose `code` a client can
act on and whose `reason` says in a sentence what was wrong.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import struct
import zlib
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image

# Enough for every signature below and for finding an <html>/<svg> tag after an XML prolog.
SNIFF_BYTES = 512


class MediaRejected(Exception):  # noqa: N818 (a refusal, not an error in our code)
    """A file a client sent cannot be accepted; `code` is for machines, `reason` for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class ImageFormat(StrEnum):
    JPEG = "jpeg"
    PNG = "png"
    BMP = "bmp"
    TIFF = "tiff"

    @property
    def label(self) -> str:
        return self.value.upper()

    @property
    def pillow_format(self) -> str:
        """Pillow's plugin name, for `Image.open(formats=...)` and `Image.save`."""
        return self.value.upper()

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is ImageFormat.JPEG else self.value


ALLOWED = frozenset(ImageFormat)
_ALLOWED_LABELS = ", ".join(f.label for f in ImageFormat)

# Formats Pillow may report for each sniffed type: phones write multi-picture JPEGs (MPO: a photo
# plus depth or preview pictures) that Pillow's JPEG plugin opens as "MPO".
_PILLOW_NAMES = {
    ImageFormat.JPEG: frozenset({"JPEG", "MPO"}),
    ImageFormat.PNG: frozenset({"PNG"}),
    ImageFormat.BMP: frozenset({"BMP"}),
    ImageFormat.TIFF: frozenset({"TIFF"}),
}

# BITMAPINFOHEADER sizes a real BMP carries at offset 14 (core, V1..V5, OS/2 2.x): "BM" alone is
# two letters that a text file can start with. Source: Microsoft's BITMAPV5HEADER documentation.
_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff_image(head: bytes) -> ImageFormat | None:
    """The allowed image type the first bytes announce, or None; nothing else is consulted."""
    if head.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return ImageFormat.TIFF
    if (
        head.startswith(b"BM")
        and len(head) >= 18
        and struct.unpack_from("<I", head, 14)[0] in _BMP_DIB_SIZES
    ):
        return ImageFormat.BMP
    return None


# Signatures of what people upload by mistake or on purpose, for the reason a client reads.
# Sources: each format's specification (GIF89a, RIFF/WebP, ISO BMFF "ftyp", PKWARE APPNOTE,
# PDF 1.7, RFC 1952 gzip, ...).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II+\x00", "a BigTIFF image"),
    (b"MM\x00+", "a BigTIFF image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"PK\x07\x08", "a ZIP archive"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"\x28\xb5\x2f\xfd", "a Zstandard archive"),
    (b"\x7fELF", "an ELF executable"),
    (b"8BPS", "a Photoshop document"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
    (b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"),
    (b"OggS", "an Ogg media file"),
    (b"ID3", "an MP3 audio file"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Microsoft Office document"),
)
_RIFF_KINDS = {b"WEBP": "a WebP image", b"AVI ": "an AVI video", b"WAVE": "a WAV audio file"}
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# C0 and C1 control characters other than tab, line feed and carriage return: no text file
# a person typed or a spreadsheet exported contains them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BOM = codecs.BOM_UTF8


def describe(head: bytes) -> str:
    """What the first bytes look like, in words for a client ("a GIF image", "text", ...)."""
    if not head:
        return "an empty file"
    sniffed = sniff_image(head)
    if sniffed is not None:
        return f"a {sniffed.label} image"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head.startswith(b"RIFF") and head[8:12] in _RIFF_KINDS:
        return _RIFF_KINDS[head[8:12]]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "a HEIF/HEIC image"
        if brand in _AVIF_BRANDS:
            return "an AVIF image"
        return "an MP4/QuickTime video"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16 text"
    text = _decode_head(head)
    if text is None or _CONTROL.search(text):
        # "MZ" is too short to trust before text has been ruled out.
        return "a Windows executable" if head.startswith(b"MZ") else "unknown binary data"
    return _describe_text(text)


def _decode_head(head: bytes) -> str | None:
    """UTF-8 text of `head`, tolerating a character cut at the end of the sniffed bytes."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(head.removeprefix(_BOM), final=False)
    except UnicodeDecodeError:
        return None


def _describe_text(text: str) -> str:
    lowered = text.lstrip().lower()
    if lowered.startswith("<svg") or (lowered.startswith("<?xml") and "<svg" in lowered):
        return "an SVG image"
    if lowered.startswith(("<!doctype html", "<html")) or any(
        tag in lowered for tag in ("<html", "<head>", "<body", "<script")
    ):
        return "an HTML document"
    if lowered.startswith("<?xml"):
        return "an XML document"
    return "text"


_TEXTUAL = frozenset({"text", "an HTML document", "an SVG image", "an XML document"})


@dataclass(frozen=True)
class ImageHeader:
    format: ImageFormat
    width: int
    height: int


# What Pillow raises on malformed input: its plugins parse with struct, slicing and dict look-ups.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    KeyError,
    IndexError,
    TypeError,
    ZeroDivisionError,
)
_PILLOW_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def inspect_image(data: bytes, *, max_pixels: int) -> ImageHeader:
    """Type and size of an uploaded image from its header alone; pixel data is never decoded.

    Refuses (MediaRejected) anything but JPEG/PNG/BMP/TIFF content, damaged headers and images
    declaring more than `max_pixels` pixels: a few kilobytes can declare gigabytes of pixels.
    """
    if not data:
        raise MediaRejected("empty", "the file is empty")
    head = data[:SNIFF_BYTES]
    sniffed = sniff_image(head)
    if sniffed is None:
        reason = f"content is {describe(head)}; allowed: {_ALLOWED_LABELS}"
        raise MediaRejected("wrong_type", reason)
    try:
        # Image.open parses the header only; Pillow's own bomb check here depends on the global
        # MAX_IMAGE_PIXELS, so the limit that counts is ours, below.
        with Image.open(io.BytesIO(data), formats=[sniffed.pillow_format]) as image:
            pillow_format = image.format
            width, height = image.size
    except Image.DecompressionBombError as exc:
        found = _PILLOW_BOMB_PIXELS.search(str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise MediaRejected(
            "decompression_bomb",
            f"the {sniffed.label} image declares {declared}; the limit is {max_pixels:,}",
        ) from exc
    except DECODE_ERRORS as exc:
        raise MediaRejected(
            "corrupt", f"content starts like a {sniffed.label} image but its header is damaged"
        ) from exc
    if pillow_format not in _PILLOW_NAMES[sniffed]:
        raise MediaRejected(
            "corrupt", f"content starts like a {sniffed.label} image but decodes as {pillow_format}"
        )
    if width <= 0 or height <= 0:
        raise MediaRejected("corrupt", f"the {sniffed.label} image declares {width}x{height}")
    if width * height > max_pixels:
        raise MediaRejected(
            "decompression_bomb",
            f"the {sniffed.label} image declares {width}x{height} "
            f"({width * height:,} pixels); the limit is {max_pixels:,}",
        )
    return ImageHeader(format=sniffed, width=width, height=height)


def check_csv(data: bytes) -> None:
    """Refuse (MediaRejected) an upload that is not a UTF-8 CSV file a phone could have written.

    UTF-8 with or without a BOM; no NUL or other control characters but tab, CR and LF; no markup
    (an HTML file parses as one-column CSV, and would be served back to browsers); and the csv
    module in strict mode must read every row.
    """
    if not data:
        raise MediaRejected("empty", "the file is empty")
    what = describe(data[:SNIFF_BYTES])
    if what not in _TEXTUAL and what != "unknown binary data":
        raise MediaRejected("not_text", f"content is {what}, not UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MediaRejected(
            "not_text", f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        ) from exc
    control = _CONTROL.search(text)
    if control is not None:
        line = text.count("\n", 0, control.start()) + 1
        raise MediaRejected(
            "not_text", f"control character U+{ord(control.group()):04X} on line {line}"
        )
    if what != "text":
        raise MediaRejected("not_csv", f"content is {what}, not CSV")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as exc:
        raise MediaRejected("not_csv", f"not valid CSV on line {reader.line_num}: {exc}") from exc
