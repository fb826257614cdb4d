"""Streaming multipart/form-data for the upload endpoint, with hard limits.

The seed read every uploaded file whole into memory before any check and never enforced its
50 MiB per-file limit. Here the body goes through python-multipart's push parser as it arrives,
and the body, each file, each field and the number of parts are capped while streaming: a request
never holds more than `max_body_bytes`, and a file that crosses its limit is dropped at once while
the rest of the form still goes through. Starlette's `request.form()` is not used because it
spools whole files and has no per-file cap.
"""

from __future__ import annotations

import io
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

TRUNCATED = "truncated multipart body"
# RFC 7578 section 4.7: senders must not use Content-Transfer-Encoding in multipart/form-data;
# these identity values are the only ones whose bytes mean what they say.
IDENTITY_ENCODINGS = frozenset({b"7bit", b"8bit", b"binary"})


@dataclass(frozen=True)
class UploadLimits:
    """Hard caps for one upload request; every one is enforced while the body streams in."""

    max_body_bytes: int  # whole request body
    max_file_bytes: int  # one file part
    max_files: int  # file parts kept; later ones are rejected ("batch limit")
    max_field_bytes: int = 64 * 1024  # one non-file field (e.g. the `meta` JSON)
    max_fields: int = 16
    max_parts: int = 64  # any parts at all (stops part floods)

    def __post_init__(self) -> None:
        # A zero or negative cap is a configuration mistake; refuse it at startup, not per request.
        for name in ("max_body_bytes", "max_file_bytes", "max_field_bytes", "max_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_files", "max_fields"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True)
class UploadedFile:
    """A file part that passed every check.

    `filename` and `content_type` are the client's, untrusted: for display only, never a path.
    """

    field: str
    filename: str
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class RejectedFile:
    """A file part left out of the form, with a code a client can act on."""

    field: str
    filename: str
    code: str  # "too_large", "batch_limit" or "empty"
    reason: str


@dataclass(frozen=True)
class ParsedForm:
    fields: dict[str, str]
    files: list[UploadedFile]
    rejected: list[RejectedFile]


class FormError(Exception):
    """The request as a whole is refused: 400 malformed, 413 too large, 415 not a form."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def describe_size(size: int) -> str:
    """A byte count as a person would write a limit: "50 MiB", "64 KiB", "1000 bytes"."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


@dataclass
class _Part:
    name: str
    filename: str | None  # None: a plain field
    content_type: str | None
    buffer: io.BytesIO | None  # None: this part's bytes are being dropped
    size: int = 0


class _FormReader:
    """The parser's callbacks and what they have collected so far for one request."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.fields: dict[str, str] = {}
        self.files: list[UploadedFile] = []
        self.rejected: list[RejectedFile] = []
        self.finished = False
        self._parts = 0
        self._headers: dict[bytes, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._part: _Part | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self.limits.max_parts:
            raise FormError(400, f"more than {self.limits.max_parts} parts in one form")
        self._headers = {}
        self._part = None

    # The parser caps each header line and the header count, so these buffers stay small.
    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data":
            raise FormError(400, "a part has no Content-Disposition: form-data header")
        raw_name = options.get(b"name")
        if not raw_name:
            raise FormError(400, "a part has no name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormError(400, "a part name is not valid UTF-8") from exc
        encoding = self._headers.get(b"content-transfer-encoding", b"binary").lower()
        if encoding not in IDENTITY_ENCODINGS:
            raise FormError(400, f"part {name!r}: Content-Transfer-Encoding is not supported")
        raw_type = self._headers.get(b"content-type")
        content_type = raw_type.decode("utf-8", errors="replace") if raw_type else None
        raw_filename = options.get(b"filename")
        if raw_filename is None:
            self._start_field(name, content_type)
        else:
            # Browsers send file names as raw UTF-8; a bad byte only spoils the display string.
            self._start_file(name, raw_filename.decode("utf-8", errors="replace"), content_type)

    def _start_field(self, name: str, content_type: str | None) -> None:
        if name in self.fields:
            raise FormError(400, f"field {name!r} is given more than once")
        if len(self.fields) >= self.limits.max_fields:
            raise FormError(400, f"more than {self.limits.max_fields} fields in one form")
        self._part = _Part(name, None, content_type, io.BytesIO())

    def _start_file(self, name: str, filename: str, content_type: str | None) -> None:
        # The slot is decided when the part starts, so parts past the limit are never buffered.
        if len(self.files) >= self.limits.max_files:
            self.rejected.append(
                RejectedFile(
                    name,
                    filename,
                    "batch_limit",
                    f"only {self.limits.max_files} files per request",
                )
            )
            self._part = _Part(name, filename, content_type, None)
        else:
            self._part = _Part(name, filename, content_type, io.BytesIO())

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or part.buffer is None:
            return
        part.size += end - start
        if part.filename is None:
            if part.size > self.limits.max_field_bytes:
                limit = describe_size(self.limits.max_field_bytes)
                raise FormError(400, f"field {part.name!r} exceeds the {limit} limit")
        elif part.size > self.limits.max_file_bytes:
            part.buffer.close()  # release what was kept of it now, not at the end of the request
            part.buffer = None
            reason = f"file exceeds the {describe_size(self.limits.max_file_bytes)} limit"
            self.rejected.append(RejectedFile(part.name, part.filename, "too_large", reason))
            return
        part.buffer.write(memoryview(data)[start:end])

    def _on_part_end(self) -> None:
        part, self._part = self._part, None
        if part is None or part.buffer is None:
            return
        # getvalue() hands over BytesIO's own buffer without copying it (CPython), so a file
        # is never held twice.
        data = part.buffer.getvalue()
        part.buffer.close()
        if part.filename is None:
            try:
                self.fields[part.name] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FormError(400, f"field {part.name!r} is not valid UTF-8") from exc
        elif not data:
            self.rejected.append(RejectedFile(part.name, part.filename, "empty", "file is empty"))
        else:
            self.files.append(UploadedFile(part.name, part.filename, part.content_type, data))

    def _on_end(self) -> None:
        self.finished = True


def _boundary(content_type: str | None) -> bytes:
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1")[:100] or "no Content-Type"
        raise FormError(415, f"expected multipart/form-data, got {shown}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise FormError(415, "multipart/form-data without a boundary")
    return boundary


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        return int(declared)
    except ValueError as exc:
        raise FormError(400, "Content-Length is not a number") from exc


async def read_form(request: Request, limits: UploadLimits) -> ParsedForm:
    """Parse a multipart/form-data body as it streams in, enforcing `limits`.

    Raises FormError when the request as a whole is refused; files refused one by one are
    listed in `ParsedForm.rejected` and the rest of the form is kept.
    """
    boundary = _boundary(request.headers.get("content-type"))
    body_limit = f"request body exceeds the {describe_size(limits.max_body_bytes)} limit"
    declared = _declared_length(request)
    if declared is not None and declared > limits.max_body_bytes:
        raise FormError(413, body_limit)  # before a single body byte is read
    reader = _FormReader(limits)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
    except FormParserError as exc:  # a boundary longer than the parser accepts
        raise FormError(400, f"malformed multipart body: {exc}") from exc
    received = 0
    try:
        async with aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                received += len(chunk)
                if received > limits.max_body_bytes:  # a chunked body has no length to check
                    raise FormError(413, body_limit)
                parser.write(chunk)
    except ClientDisconnect as exc:
        raise FormError(400, TRUNCATED) from exc
    except FormParserError as exc:
        raise FormError(400, f"malformed multipart body: {exc}") from exc
    if not reader.finished:
        raise FormError(400, TRUNCATED)
    return ParsedForm(fields=reader.fields, files=reader.files, rejected=reader.rejected)
