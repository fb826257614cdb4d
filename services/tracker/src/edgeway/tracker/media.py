"""Video files: the tracker's object store (a local directory), checking an upload, reading one;
and the relay's JPEG frames, decoded.

Everything here blocks (files, PyAV's decoder): callers run it in a worker thread.

The store is the embedded default of the architecture's object storage: a directory, one file per
object, written beside and renamed into place, so a reader sees a video whole or not at all.
Several replicas must share the directory (a shared volume); an S3 store is not built for the
tracker yet. Keys are made here from checked ids and a UUID, never from a client's file name.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import av.error
import cv2
import numpy as np

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


class VideoStore:
    """Videos as files under `root` (`videos/<environment>/<camera>/<video_id>.<ext>`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key(environment_id: str, camera_id: str, video_id: str, extension: str) -> str:
        return f"videos/{environment_id}/{camera_id}/{video_id}.{extension}"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys are the service's own; this only guards against a bug producing '..'.
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    def stage(self, data: bytes) -> Path:
        """Write an upload to a temporary file in the store (for PyAV to read)."""
        staging = self.root / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=staging, prefix=".upload-")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return Path(name)

    def commit(self, staged: Path, key: str) -> None:
        """Move a staged file to its key (atomic on one file system)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str, *, offset: int, length: int) -> tuple[int, bytes]:
        """The object's size and up to `length` of its bytes from `offset`
        (FileNotFoundError when it is not there)."""
        with self.path(key).open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            file.seek(min(offset, size))
            return size, file.read(length)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


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


def decode_jpeg(data: bytes, *, width: int, height: int) -> Frame | None:
    """A relayed JPEG as a BGR image of the size its headers said (None: it is not one)."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[:2] != (height, width):
        return None
    return np.asarray(image, dtype=np.uint8)
