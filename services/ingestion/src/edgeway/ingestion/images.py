"""Uploaded images are decoded and re-encoded from their pixels before anything stores them.

Whatever rode along with the pixels (EXIF with GPS positions, XMP, ICC profiles, comments, PNG
text chunks, a ZIP appended to make a polyglot) is gone from the output, because the output is
written from pixels alone. Decoding is CPU work on hostile input, so it runs in worker threads:
at most `workers` at once, each with a time limit.

A Python thread cannot be killed. When a decode passes its time limit the client gets its
refusal at once, but the thread runs on and keeps its worker slot until it really ends; later
jobs wait for a free slot. So slow or malicious images can cost `workers` threads at most,
never an unbounded pile of abandoned ones.
"""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps

from edgeway.common.logging import get_logger
from edgeway.common.media import DECODE_ERRORS, ImageFormat, MediaRejected, inspect_image

log = get_logger(__name__)

_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ImageLimits:
    # 40 MP: above 12-24 MP phone photos and 8K UHD frames (33.2 MP). Decoded as RGBA that is
    # 160 MB, and a job holds up to three such buffers (decode, mode conversion, clean copy),
    # so two workers stay under 1 GB. Phones' 48/50 MP full-resolution modes exceed it.
    max_pixels: int = 40_000_000
    # Measured on the 2-core dev machine: a 12 MP JPEG decodes in 0.13 s and re-encodes in 0.08 s;
    # a 12 MP PNG re-encodes in 1.2 s at compress level 1, so a 40 MP PNG needs about 4 s.
    decode_timeout_s: float = 5.0
    workers: int = 2  # decode threads at once: one per core of the 2-core target machine
    jpeg_quality: int = 90
    # zlib level 1 vs Pillow's default 6: 1.2 s vs 2.5 s for a 12 MP photo-like PNG, files about
    # 15% larger (measured here); level 6 would put 40 MP PNGs past the time limit.
    png_compress_level: int = 1

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.decode_timeout_s <= 0 or self.workers < 1:
            raise ValueError("max_pixels, decode_timeout_s and workers must be positive")
        if not 1 <= self.jpeg_quality <= 95:  # Pillow: above 95 grows files, not quality
            raise ValueError("jpeg_quality must be within 1..95")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError("png_compress_level must be within 0..9")


@dataclass(frozen=True)
class CleanImage:
    data: bytes
    format: ImageFormat  # of `data`: JPEG or PNG
    extension: str
    content_type: str
    width: int
    height: int
    # What the client sent; JPEG for RTSP frames, which arrive as pixels and are stored as JPEG.
    source_format: ImageFormat


def reencode_image(data: bytes, *, limits: ImageLimits) -> CleanImage:
    """Decode the first frame, turn it upright, and write it again from its pixels alone.

    JPEG sources stay JPEG (a PNG of a photo is several times larger); BMP, TIFF and PNG become
    PNG (lossless, keeps transparency). Blocking: `ImageSanitizer` runs it in a worker thread.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide Pillow switch; with it, cut-off uploads are padded with grey and accepted.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    header = inspect_image(data, max_pixels=limits.max_pixels)
    output = ImageFormat.JPEG if header.format is ImageFormat.JPEG else ImageFormat.PNG
    try:
        pixels = _decode(data, header.format, alpha=output is ImageFormat.PNG)
    except Image.DecompressionBombError as exc:
        # Only reachable when Pillow's global limit is below ours: its refusal stands.
        raise MediaRejected(
            "decompression_bomb", f"the {header.format.label} image has too many pixels to decode"
        ) from exc
    except DECODE_ERRORS as exc:
        raise MediaRejected(
            "corrupt", f"the {header.format.label} image is truncated or damaged: {exc}"
        ) from exc
    out = io.BytesIO()
    if output is ImageFormat.JPEG:
        pixels.save(out, "JPEG", quality=limits.jpeg_quality)
    else:
        pixels.save(out, "PNG", compress_level=limits.png_compress_level)
    return _clean(out.getvalue(), output, pixels.size, source=header.format)


def encode_rgb_jpeg(rgb: npt.NDArray[np.uint8], *, quality: int) -> CleanImage:
    """An RTSP frame (height x width x 3, uint8, RGB) as a JPEG. Blocking."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"expected a non-empty HxWx3 uint8 array, got {rgb.shape} {rgb.dtype}")
    image = Image.fromarray(np.ascontiguousarray(rgb))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return _clean(out.getvalue(), ImageFormat.JPEG, image.size, source=ImageFormat.JPEG)


def _decode(data: bytes, source: ImageFormat, *, alpha: bool) -> Image.Image:
    """The upright first frame in an encodable mode, as a new image carrying nothing but pixels."""
    with Image.open(io.BytesIO(data), formats=[source.pillow_format]) as image:
        image.load()  # the first frame only: multi-page TIFFs and MPOs are never seeked
        ImageOps.exif_transpose(image, in_place=True)
        normalised = _normalise(image, alpha=alpha)
        # A fresh image has an empty `info`: encoders that copy EXIF, ICC profiles, comments or
        # PNG text from it find nothing.
        clean = Image.new(normalised.mode, normalised.size)
        clean.paste(normalised)
    return clean


def _normalise(image: Image.Image, *, alpha: bool) -> Image.Image:
    """RGB or L (and RGBA where `alpha`): the modes every viewer and our encoders take."""
    if alpha and image.has_transparency_data:
        # Covers palette and RGB PNGs whose transparency lives in a tRNS chunk, which the
        # clean copy would otherwise lose.
        return image if image.mode == "RGBA" else image.convert("RGBA")
    if image.mode in ("RGB", "L"):
        return image
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert("L") clips 16-bit values at 255 (a white image); scale them instead.
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray((wide >> 8).astype(np.uint8))
    if image.mode in ("1", "LA", "La", "F"):
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, palette, RGBX, ...


def _clean(
    data: bytes, output: ImageFormat, size: tuple[int, int], *, source: ImageFormat
) -> CleanImage:
    width, height = size
    return CleanImage(
        data=data,
        format=output,
        extension=output.extension,
        content_type=output.content_type,
        width=width,
        height=height,
        source_format=source,
    )


class ImageSanitizer:
    """The ingestion service's image check: one per process, used from one event loop."""

    def __init__(self, limits: ImageLimits = ImageLimits()) -> None:
        self._limits = limits
        self._slots = asyncio.Semaphore(limits.workers)
        self._executor = ThreadPoolExecutor(
            max_workers=limits.workers, thread_name_prefix="edgeway-image"
        )

    @property
    def limits(self) -> ImageLimits:
        return self._limits

    async def clean(self, data: bytes) -> CleanImage:
        """Refuse (MediaRejected) or return the image re-encoded from its pixels."""
        # The header check first, on the event loop: bombs and wrong types never wait for a slot.
        inspect_image(data, max_pixels=self._limits.max_pixels)
        return await self._in_worker(functools.partial(reencode_image, data, limits=self._limits))

    async def encode_frame(self, rgb: npt.NDArray[np.uint8]) -> CleanImage:
        """An RTSP frame (HxWx3 uint8 RGB) as a JPEG at `jpeg_quality`."""
        job = functools.partial(encode_rgb_jpeg, rgb, quality=self._limits.jpeg_quality)
        return await self._in_worker(job)

    async def _in_worker(self, job: Callable[[], CleanImage]) -> CleanImage:
        await self._slots.acquire()
        try:
            running = asyncio.get_running_loop().run_in_executor(self._executor, job)
        except BaseException:
            self._slots.release()
            raise
        # The slot is given back when the thread ends, not when we stop waiting for it.
        running.add_done_callback(self._release)
        timeout = self._limits.decode_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(running), timeout)
        except TimeoutError as exc:
            log.warning("image_worker_timeout", timeout_s=timeout, workers=self._limits.workers)
            raise MediaRejected(
                "timeout", f"the image took longer than {timeout:g} s to decode and re-encode"
            ) from exc

    def _release(self, running: asyncio.Future[CleanImage]) -> None:
        self._slots.release()
        if not running.cancelled():
            running.exception()  # after a timeout nobody awaits it; do not log it as unretrieved
