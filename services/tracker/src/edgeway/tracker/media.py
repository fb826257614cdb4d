"""Video files: the tracker's videos in the object store, checking an upload, reading one; and
the relay's JPEG frames, decoded.

Everything here blocks (files, PyAV's decoder) except `VideoStore`'s object calls: callers run
the rest in a worker thread.

Videos live in the object store of `edgeway.common.objects`: a local directory by default
(several replicas share it as a volume), or an S3 bucket when `EDGEWAY_STORAGE_ENDPOINT` is set
(every replica reaches it). Keys are made here from checked ids and a UUID, never from a
client's file name. PyAV reads files: a local store's video is read where it lies, an S3 one
from a copy a task fetches into the replica's scratch directory and deletes when it ends.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import av
import av.error
import cv2
import numpy as np

from edgeway.common.objects import LocalStore, ObjectStore
from edgeway.tracker.vision import Frame


class VideoError(ValueError):
    """A file that is not a video the tracker can read; the reason is the client's."""


@dataclass(frozen=True, slots=True)
class VideoProbe:
    frames: int
    fps: float
    width: int
    height: int
    extension: str


# The containers people record cameras in, by the name FFmpeg gives their demuxer.
EXTENSIONS = (("mp4", "mp4"), ("matroska", "mkv"), ("avi", "avi"), ("mpegts", "ts"))
CONTENT_TYPES = {
    "mp4": "video/mp4",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
    "ts": "video/mp2t",
}


@dataclass(frozen=True, slots=True)
class LocalVideo:
    """A video as a file PyAV can open; `fetched` when it is a copy to delete after use."""

    path: Path
    fetched: bool


class VideoStore:
    """Videos in an object store (`videos/<environment>/<camera>/<video_id>.<ext>`), with a
    local `scratch` directory for uploads being checked and for S3 videos being read."""

    def __init__(self, objects: ObjectStore, *, scratch: Path) -> None:
        self.objects = objects
        self.scratch = scratch

    @staticmethod
    def key(environment_id: str, camera_id: str, video_id: str, extension: str) -> str:
        return f"videos/{environment_id}/{camera_id}/{video_id}.{extension}"

    @staticmethod
    def content_type(key: str) -> str:
        return CONTENT_TYPES.get(key.rpartition(".")[2], "application/octet-stream")

    async def prepare(self) -> None:
        """Make the bucket (or directory) and the scratch directory."""
        await self.objects.ensure_bucket()
        (self.scratch / "staging").mkdir(parents=True, exist_ok=True)

    def stage(self, data: bytes) -> Path:
        """Write an upload to a temporary file (for PyAV to probe; blocking)."""
        staging = self.scratch / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=staging, prefix=".upload-")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return Path(name)

    async def put(self, key: str, data: bytes) -> None:
        await self.objects.put(key, data, content_type=self.content_type(key), metadata={})

    async def exists(self, key: str) -> bool:
        return await self.objects.exists(key)

    async def delete(self, key: str) -> None:
        await self.objects.delete(key)

    def _local_path(self, key: str) -> Path | None:
        """The file of a local store's object (None for an S3 store)."""
        if not isinstance(self.objects, LocalStore):
            return None
        path = (self.objects.root / key).resolve()
        # Keys are the service's own; this only guards against a bug producing '..'.
        if not path.is_relative_to(self.objects.root.resolve()):
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    async def open(self, key: str) -> LocalVideo:
        """The video as a file: the local store's own, or a fetched copy of the S3 object
        (FileNotFoundError when it is not in the store)."""
        path = self._local_path(key)
        if path is not None:
            if not await asyncio.to_thread(path.is_file):
                raise FileNotFoundError(key)
            return LocalVideo(path, fetched=False)
        if not await self.objects.exists(key):
            raise FileNotFoundError(key)
        data = await self.objects.get(key)
        fetched = await asyncio.to_thread(self._write_copy, key, data)
        return LocalVideo(fetched, fetched=True)

    def _write_copy(self, key: str, data: bytes) -> Path:
        folder = self.scratch / "fetched"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, suffix="." + key.rpartition(".")[2])
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return Path(name)

    @staticmethod
    def close(video: LocalVideo) -> None:
        """Done reading: a fetched copy goes (blocking)."""
        if video.fetched:
            video.path.unlink(missing_ok=True)

    async def redirect(self, key: str, *, expires: timedelta) -> str | None:
        """Where a client may fetch the video itself: a presigned URL of an S3 store (None
        for the local store, whose videos the media route streams)."""
        if self._local_path(key) is not None:
            return None
        (url,) = await self.objects.urls([key], expires=expires)
        return url

    def read(self, key: str, *, offset: int, length: int) -> tuple[int, bytes]:
        """A local store's video: its size and up to `length` of its bytes from `offset`
        (FileNotFoundError when it is not there; blocking)."""
        path = self._local_path(key)
        if path is None:
            raise ValueError("an S3 store's videos are fetched at their presigned URLs")
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            file.seek(min(offset, size))
            return size, file.read(length)


def probe_video(path: Path, *, max_frames: int = 1_000_000) -> VideoProbe:
    """Open a file as FFmpeg would and check it is a video the tracker can read: a video stream
    whose first frame decodes. Frames are counted from the container's packets (no decode)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError("the video stream has no frame that decodes")
            width, height = first.width, first.height
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            format_name = container.format.name
        with av.open(str(path)) as container:
            frames = 0
            for packet in container.demux(container.streams.video[0]):
                if packet.size:
                    frames += 1
                    if frames > max_frames:
                        raise VideoError(f"the video has more than {max_frames} frames")
    except av.error.FFmpegError as exc:
        raise VideoError(f"not a readable video ({exc.strerror or type(exc).__name__})") from None
    extension = next((ext for name, ext in EXTENSIONS if name in format_name.split(",")), "bin")
    return VideoProbe(frames=frames, fps=fps, width=width, height=height, extension=extension)


class VideoReader:
    """One camera's frames in order, every `skip`-th, starting at read number `start`.

    Read number n is the video's frame n * skip (SpotOn's pacing); a resumed task starts where
    its checkpoint left off, decoding and dropping the frames before it.
    """

    def __init__(self, path: Path, *, skip: int, start: int = 0) -> None:
        self._container: Any = av.open(str(path))
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._frames = self._container.decode(stream)
        self.skip = skip
        self._next_source = 0  # the index of the next frame the decoder gives
        self.next_read = start
        self.ended = False

    def read(self) -> tuple[int, Frame] | None:
        """The next kept frame as (source frame index, BGR image); None at the end."""
        if self.ended:
            return None
        want = self.next_read * self.skip
        for frame in self._frames:
            index = self._next_source
            self._next_source += 1
            if index == want:
                self.next_read += 1
                image: Frame = np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
                return index, image
        self.ended = True
        return None

    def close(self) -> None:
        self._container.close()


def decode_jpeg(data: bytes) -> Frame | None:
    """A relayed JPEG as a BGR image (None: it is not one)."""
    if not data:
        return None  # OpenCV raises on an empty buffer
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return None if image is None else np.asarray(image, dtype=np.uint8)


def fit(image: Frame, width: int, height: int) -> Frame:
    """An image at a camera's declared size: as it is when it already is, else scaled (area
    averaging when shrinking, bilinear when enlarging), so boxes, hand-off rules and the
    homography stay in the declared pixels."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width * height < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, (width, height), interpolation=interpolation))
