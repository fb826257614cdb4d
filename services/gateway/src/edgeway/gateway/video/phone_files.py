"""A phone's CSV file uploads on `/ws/phone` (WorldSystem's), checked and bounded.

The seed wrote `fileName` under `./uploads` unsanitised (path traversal), had no size limit, and
leaked the files of chunked uploads when a phone disconnected. Here the name is kept as a label
only (the ingestion service makes the object key), every upload is held to a byte cap, a phone
has a bounded number of chunked uploads open, chunks must come in order, and what a phone leaves
unfinished is dropped with its connection.

Messages: `{"type": "file_upload", "fileName", "fileContent"}` in one piece, or
`file_upload_start {fileName}`, `file_upload_chunk {fileName, chunkIndex, chunk}` from index 0,
then `file_upload_complete {fileName}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from edgeway.common.schemas.ingest import MAX_FILE_NAME


class UploadRefused(Exception):  # noqa: N818 - a refusal the phone is told about, not a bug
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PhoneFile:
    name: str  # the phone's label for it, never a path
    content: bytes


@dataclass
class _Partial:
    content: bytearray = field(default_factory=bytearray)
    next_index: int = 0


def _name(message: dict[str, Any]) -> str:
    name = message.get("fileName")
    if name is None:
        # The seed's default name.
        return f"upload_{int(time.time())}.csv"
    if not isinstance(name, str) or not name or len(name) > MAX_FILE_NAME:
        raise UploadRefused(f"fileName must be a string of 1 to {MAX_FILE_NAME} characters")
    return name


def _text(message: dict[str, Any], key: str) -> bytes:
    value = message.get(key)
    if not isinstance(value, str):
        raise UploadRefused(f"{key} must be a string (the file's text)")
    return value.encode()


class PhoneUploads:
    """One phone connection's uploads in progress."""

    def __init__(self, *, max_bytes: int, max_open: int) -> None:
        self.max_bytes = max_bytes
        self.max_open = max_open
        self._open: dict[str, _Partial] = {}

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise UploadRefused(f"the file is over the {self.max_bytes}-byte limit")

    def whole(self, message: dict[str, Any]) -> PhoneFile:
        """`file_upload`: the whole file in one message."""
        name = _name(message)
        content = _text(message, "fileContent")
        self._check_size(len(content))
        return PhoneFile(name, content)

    def start(self, message: dict[str, Any]) -> str:
        name = _name(message)
        if name in self._open:
            raise UploadRefused(f"an upload of {name!r} is already open")
        if len(self._open) >= self.max_open:
            raise UploadRefused(f"at most {self.max_open} uploads may be open at once")
        self._open[name] = _Partial()
        return name

    def chunk(self, message: dict[str, Any]) -> None:
        name = _name(message)
        partial = self._open.get(name)
        if partial is None:
            raise UploadRefused(f"no upload of {name!r} is open: send file_upload_start first")
        index = message.get("chunkIndex")
        if not isinstance(index, int) or isinstance(index, bool) or index != partial.next_index:
            del self._open[name]
            raise UploadRefused(
                f"chunkIndex {index!r} out of order (expected {partial.next_index}): "
                f"the upload of {name!r} is dropped"
            )
        data = _text(message, "chunk")
        if len(partial.content) + len(data) > self.max_bytes:
            del self._open[name]
            raise UploadRefused(
                f"the upload of {name!r} is over the {self.max_bytes}-byte limit and is dropped"
            )
        partial.content += data
        partial.next_index += 1

    def complete(self, message: dict[str, Any]) -> PhoneFile:
        name = _name(message)
        partial = self._open.pop(name, None)
        if partial is None:
            raise UploadRefused(f"no upload of {name!r} is open")
        return PhoneFile(name, bytes(partial.content))

    def close(self) -> None:
        """The phone left: unfinished uploads are dropped (the seed leaked their files)."""
        self._open.clear()

    @property
    def open_count(self) -> int:
        return len(self._open)
