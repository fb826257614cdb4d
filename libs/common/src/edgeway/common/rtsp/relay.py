"""FFmpeg's only way to a camera: a loopback relay to one checked address that drops redirects.

FFmpeg's RTSP demuxer (libavformat/rtsp.c, `ff_rtsp_connect`) resolves the URL's host itself,
and follows every 3xx answer to its `Location`: to any host, any number of times, sending the
first URL's credentials along. Nothing in FFmpeg or PyAV lets a caller check an address before
FFmpeg connects to it, or refuse a redirect. So FFmpeg is never given the camera's address:

- the service resolves the host and checks every address (`destinations.DestinationPolicy`),
  then connects to a checked one itself (TLS for rtsps, terminated here, as FFmpeg did it:
  without verifying the camera's certificate);
- FFmpeg gets `rtsp://[user:password@]127.0.0.1:<relay port>/<path>` and can reach nothing
  else (`protocol_whitelist`: rtsp and tcp);
- FFmpeg's requests go to the camera unchanged; the camera's answers go to FFmpeg one whole
  message at a time, read by `RedirectGuard` the way FFmpeg reads them, and a redirect (a 3xx
  status, or any `Location` header) ends the connection instead: FFmpeg never reads one.

Redirects are refused rather than followed to a checked host: following one would need a new
relay per hop and the credentials sent to a host the caller never named. A camera that
redirects gets its final URL configured instead.
"""

from __future__ import annotations

import asyncio
import enum
import re
import ssl

from edgeway.common.logging import get_logger, mask_secrets
from edgeway.common.rtsp.destinations import Destination, DestinationPolicy, IPAddress

log = get_logger("edgeway.common.rtsp.relay")

# FFmpeg keeps 4095 bytes of a line and atoi()s a status word: lines and codes past what it
# reads exactly are refused rather than guessed at.
MAX_LINE = 4000
MAX_BODY = 1024 * 1024  # an answer's body (an SDP: a few kB)
MAX_MESSAGE = 4 * 1024 * 1024  # an answer with its interleaved packets, held until it is whole
CHUNK = 64 * 1024
# strtol(): leading C whitespace, a sign, digits (none: 0).
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]*)")
# FFmpeg's get_word(): words are separated by space and tab (CR and LF are gone by then).
_WORD = re.compile(rb"[^ \t]+")
_SPACE = b" \t"


class RelayRefusedError(Exception):
    """The camera sent what FFmpeg must not read; `reason` is for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _State(enum.Enum):
    LINE = enum.auto()  # reading a line of an answer (or between answers)
    FRAME_HEADER = enum.auto()  # after '$': channel and 16-bit length
    FRAME = enum.auto()  # an interleaved RTP/RTCP packet's payload
    BODY = enum.auto()  # an answer's body (Content-Length bytes)


class RedirectGuard:
    """The camera-to-FFmpeg direction, split as FFmpeg's `ff_rtsp_read_reply` splits it.

    FFmpeg reads byte by byte: CR is dropped, LF ends a line, a NUL ends its text, and a '$'
    where a line starts begins an interleaved packet (`$`, channel, 16-bit length, payload),
    skipped; the first line of an answer is `RTSP/1.0 <code> ...`, the others headers, an empty
    line ends it, and `Content-Length:` bytes of body follow. `feed` holds an answer until it
    is whole, then passes it on, or raises RelayRefusedError if it is a redirect or if it could
    be read differently than here (an over-long line, an odd status or length). Packets
    between answers pass as soon as they are whole.
    """

    def __init__(self) -> None:
        self._state = _State.LINE
        self._held = bytearray()  # the current answer or packet, not yet passed on
        self._line = bytearray()  # the current line's bytes as FFmpeg keeps them (no CR)
        self._lines = 0  # lines of the current answer read so far; 0: between answers
        self._header = bytearray()  # a packet's channel and length
        self._remaining = 0  # bytes left of a packet or a body
        self._length = 0  # the answer's Content-Length
        self._status = b""
        self._location: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        """The bytes FFmpeg may read now, out of what came so far."""
        out = bytearray()
        position, size = 0, len(data)
        while position < size:
            if self._state is _State.FRAME_HEADER:
                take = min(3 - len(self._header), size - position)
                self._header += data[position : position + take]
                self._hold(data[position : position + take])
                position += take
                if len(self._header) == 3:
                    self._remaining = int.from_bytes(self._header[1:3], "big")
                    self._state = _State.FRAME
                    if self._remaining == 0:
                        self._packet_done(out)
            elif self._state in (_State.FRAME, _State.BODY):
                take = min(self._remaining, size - position)
                self._hold(data[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    if self._state is _State.FRAME:
                        self._packet_done(out)
                    else:
                        self._answer_done(out)
            else:
                position = self._read_line(data, position, out)
        return bytes(out)

    def _hold(self, data: bytes | bytearray) -> None:
        self._held += data
        if len(self._held) > MAX_MESSAGE:
            raise RelayRefusedError(f"an answer of over {MAX_MESSAGE} bytes")

    def _release(self, out: bytearray) -> None:
        out += self._held
        self._held.clear()

    def _read_line(self, data: bytes, position: int, out: bytearray) -> int:
        if not self._line:  # where a line starts, CRs are skipped and '$' starts a packet
            start = position
            while position < len(data) and data[position] == 0x0D:
                position += 1
            self._hold(data[start:position])
            if position == len(data):
                return position
            if data[position] == 0x24:  # '$'
                self._hold(data[position : position + 1])
                self._header.clear()
                self._state = _State.FRAME_HEADER
                return position + 1
        end = data.find(b"\n", position)
        stop = len(data) if end < 0 else end + 1
        self._hold(data[position:stop])
        self._line += data[position : stop if end < 0 else end].replace(b"\r", b"")
        if len(self._line) > MAX_LINE:
            raise RelayRefusedError(f"a line of over {MAX_LINE} bytes")
        if end >= 0:
            line = bytes(self._line).partition(b"\0")[0]
            self._line.clear()
            self._line_done(line, out)
        return stop

    def _line_done(self, line: bytes, out: bytearray) -> None:
        if not line:  # the end of the answer's head (FFmpeg: even before any line)
            if self._length > 0:
                self._remaining = self._length
                self._state = _State.BODY
            else:
                self._answer_done(out)
            return
        if self._lines == 0:
            words = _WORD.findall(line)[:2]
            if words and words[0].startswith(b"RTSP/"):
                self._status = words[1] if len(words) > 1 else b""
                if not re.fullmatch(rb"[0-9]{3}", self._status):
                    raise RelayRefusedError(f"an answer with status {self._status[:20]!r}")
        else:
            lower = line.lower()
            if lower.startswith(b"location:"):
                self._location = line[len(b"location:") :].strip(_SPACE)
            elif lower.startswith(b"content-length:"):
                self._length = _content_length(line[len(b"content-length:") :])
        self._lines += 1

    def _packet_done(self, out: bytearray) -> None:
        self._state = _State.LINE
        if self._lines == 0:  # between answers: FFmpeg may have it now
            self._release(out)

    def _answer_done(self, out: bytearray) -> None:
        status, location = self._status, self._location
        self._state = _State.LINE
        self._lines, self._length, self._status, self._location = 0, 0, b"", None
        if status.startswith(b"3") or location is not None:
            what = f"status {status.decode()}" if status.startswith(b"3") else "a Location header"
            target = mask_secrets((location or b"").decode("ascii", "replace"))
            raise RelayRefusedError(
                f"the camera answered a redirect ({what}, to {target!r}): not followed"
            )
        self._release(out)


def _content_length(text: bytes) -> int:
    """strtol() of a Content-Length value, which FFmpeg keeps in an int: out of 0..MAX_BODY
    (where an int would wrap) it is refused."""
    match = _STRTOL.match(text)
    assert match is not None  # every part of the pattern may be empty
    value = int(match.group(2) or b"0") * (-1 if match.group(1) == b"-" else 1)
    if not 0 <= value <= MAX_BODY:
        raise RelayRefusedError(f"an answer with Content-Length {text[:20]!r}")
    return value


def _tls_context() -> ssl.SSLContext:
    # FFmpeg's tls protocol does not verify the peer by default, and cameras mostly have
    # self-signed certificates: the same, here.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Relay:
    """One camera connection, joined to the first connection FFmpeg makes to `port`."""

    def __init__(
        self,
        destination: Destination,
        camera: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        address: IPAddress,
    ) -> None:
        self.destination = destination
        self.address = address  # the checked address the camera connection went to
        self.refusal: str | None = None  # why the relay cut the connection, for the log
        self.port = 0
        self._camera = camera
        self._server: asyncio.Server | None = None
        self._client: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(
        cls, destination: Destination, policy: DestinationPolicy, *, limit_s: float
    ) -> Relay:
        """Resolve, check, connect to the camera, listen for FFmpeg.

        Raises DestinationRefusedError (an address the policy does not admit), OSError or
        TimeoutError (no address could be reached within `limit_s` seconds).
        """
        async with asyncio.timeout(limit_s):
            addresses = await policy.resolve(destination)
            camera, address = await _connect(destination, addresses)
        relay = cls(destination, camera, address)
        try:
            relay._server = await asyncio.start_server(relay._serve, "127.0.0.1", 0, backlog=1)
        except BaseException:
            camera[1].close()
            raise
        relay.port = relay._server.sockets[0].getsockname()[1]
        return relay

    @property
    def url(self) -> str:
        """What FFmpeg opens: the caller's URL through the relay."""
        return self.destination.via(self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._client is not None or self._server is None:
            writer.close()  # one client, FFmpeg's: a later one gets nothing
            return
        self._client = writer
        self._server.close()
        camera_reader, camera_writer = self._camera
        self._tasks = [
            asyncio.create_task(self._pump(reader, camera_writer, None)),
            asyncio.create_task(self._pump(camera_reader, writer, RedirectGuard())),
        ]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        guard: RedirectGuard | None,
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                if guard is not None:
                    data = guard.feed(data)
                if data:
                    writer.write(data)
                    await writer.drain()
        except RelayRefusedError as exc:
            self.refusal = exc.reason  # before closing: FFmpeg reads it once its read fails
            log.warning(
                "rtsp answer refused",
                host=self.destination.host,
                address=str(self.address),
                reason=exc.reason,
            )
        except (OSError, ssl.SSLError):
            pass  # either side went away: the other is closed below
        finally:
            self.close()

    def close(self) -> None:
        """Close both connections and stop listening; call on the loop, any number of times."""
        if self._server is not None:
            self._server.close()
        for writer in (self._camera[1], self._client):
            if writer is not None:
                writer.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()


async def _connect(
    destination: Destination, addresses: list[IPAddress]
) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], IPAddress]:
    """A connection to the first address that answers (TLS for rtsps), and that address."""
    tls = _tls_context() if destination.scheme == "rtsps" else None
    named = tls is not None and destination.literal() is None
    server_hostname = destination.host if named else None  # SNI takes names only
    error: OSError | None = None
    for address in addresses:
        try:
            camera = await asyncio.open_connection(
                str(address), destination.port, ssl=tls, server_hostname=server_hostname
            )
        except OSError as exc:
            error = exc
            continue
        return camera, address
    assert error is not None  # resolve() returns at least one address
    raise error
