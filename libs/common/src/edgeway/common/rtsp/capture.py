"""RTSP capture: frames from a camera, sampled by time or by scene change, off the event loop.

TrackShift, the ingestion backend Edgeway replaces, read RTSP synchronously on the event loop,
cut every capture at about 5 s, treated `event_driven` as `continuous` and reconnected with a
linear backoff. Here PyAV runs in a worker thread that hands kept frames to the loop through a
bounded buffer (oldest dropped when full, as the seed's 100-frame queue did); a watchdog reopens
a stalled connection; reconnects back off exponentially; the capture ends `duration_s` after
its first frame, however long that is.

FFmpeg never connects to the camera itself: each connection goes through a loopback relay to an
address checked against the destination allowlist, which drops redirects (`relay.py`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import av
import av.error
import numpy as np
from av.video.frame import VideoFrame
from numpy.typing import NDArray

from edgeway.common.logging import get_logger, mask_secrets
from edgeway.common.rtsp.destinations import (
    DEFAULT_POLICY,
    Destination,
    DestinationPolicy,
    DestinationRefusedError,
)
from edgeway.common.rtsp.relay import Relay
from edgeway.common.schemas.ingest import CaptureMode  # the API's enum, so jobs pass it through

__all__ = [
    "Capture",
    "CaptureError",
    "CaptureLimits",
    "CaptureMode",
    "CapturePlan",
    "CapturedFrame",
    "change_score",
    "mask_credentials",
    "thumbnail",
]

log = get_logger(__name__)
T = TypeVar("T")

# TCP interleaving: RTP over UDP is lost behind NAT and firewalls and drops packets under load.
# analyzeduration (µs) bounds the stream probe at open: FFmpeg's default of 5 s made every open
# take ~3 s on the test camera and then delivered the probed frames in one burst.
# protocol_whitelist: FFmpeg talks to the relay, over plain RTSP on TCP, and nothing else.
_OPEN_OPTIONS = {
    "rtsp_transport": "tcp",
    "analyzeduration": "500000",
    "protocol_whitelist": "rtsp,tcp",
}
# Errors that another attempt cannot fix: wrong or missing credentials.
_PERMANENT_ERRORS = (av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError)

THUMBNAIL_SHAPE = (36, 64)  # rows, columns: 16:9 like most cameras, ~2300 cells
# ITU-R BT.601 luma weights for R, G, B: the grey level a viewer perceives.
_LUMA = np.array([0.299, 0.587, 0.114])

_SECRET_QUERY = re.compile(
    r"([?&;](?:user(?:name)?|pass(?:word)?|pwd|token|auth|key|secret)[^=&;#]*=)[^&;#]*",
    re.IGNORECASE,
)


def mask_credentials(url: str) -> str:
    """The URL without its user:password (`rtsp://***@host/x`) or secret query values.

    Works on the raw text, not a parsed URL, so a password holding `/`, `@` or `#` unescaped (which
    urlsplit would cut in the wrong place) is still hidden: everything up to the last `@` goes.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" in rest:
        url = f"{scheme}{separator}***@{rest.rpartition('@')[2]}"
    return _SECRET_QUERY.sub(r"\1***", url)


@dataclass(frozen=True)
class CapturePlan:
    """What to capture.

    `fps` is frames kept per second in `continuous`, frames *examined* per second in
    `event_driven`. An examined frame is kept when `change_score` between its thumbnail and the
    last kept frame's is at least `change_threshold` (the first frame is always kept).
    """

    url: str  # rtsp:// or rtsps://, may hold user:password@
    mode: CaptureMode
    fps: float = 1.0
    duration_s: float | None = None  # required (> 0) except for single_frame, which ignores it
    change_threshold: float = 0.08

    def __post_init__(self) -> None:
        Destination.of(self.url)  # the API's URL check; its messages never quote the URL
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, not {self.fps}")
        if self.mode is not CaptureMode.SINGLE_FRAME and not (
            self.duration_s is not None and self.duration_s > 0
        ):
            raise ValueError(f"{self.mode} needs duration_s > 0")
        if not 0 <= self.change_threshold <= 1:
            raise ValueError(
                f"change_threshold is a fraction in [0, 1], not {self.change_threshold}"
            )


@dataclass(frozen=True)
class CaptureLimits:
    open_timeout_s: float = 10.0
    stall_timeout_s: float = 5.0  # no decoded frame for this long: drop the connection, reconnect
    reconnect_attempts: int = 3  # consecutive failed connections before giving up (the seed's 3)
    backoff_initial_s: float = 1.0  # waits 1, 2, 4 ... s between attempts, capped at backoff_max_s
    backoff_max_s: float = 10.0
    buffer_frames: int = 100  # kept frames waiting for the consumer (the seed's queue size)

    def __post_init__(self) -> None:
        if self.reconnect_attempts < 1 or self.buffer_frames < 1:
            raise ValueError("reconnect_attempts and buffer_frames must be at least 1")
        if min(self.open_timeout_s, self.stall_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")

    def backoff(self, failures: int) -> float:
        """The wait before the next attempt after `failures` consecutive failed ones (0: a drop)."""
        return float(min(self.backoff_initial_s * 2 ** max(failures - 1, 0), self.backoff_max_s))


@dataclass(frozen=True, eq=False)
class CapturedFrame:
    image: NDArray[np.uint8]  # RGB, HxWx3
    captured_at: datetime  # UTC wall clock when decoded
    index: int  # 0, 1, 2 ... among kept frames; a gap means the buffer dropped frames
    change: float | None  # the event_driven score that kept it; None for the first and otherwise


class CaptureError(Exception):
    """The capture failed; `reason` names the camera with its credentials masked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def thumbnail(image: NDArray[np.uint8]) -> NDArray[np.float32]:
    """A 36x64 grey image (0..255) of an RGB frame, each cell the mean of the pixels it covers.

    Averaging over whole cells, not sampling, makes the score blind to sensor and compression
    noise, which cancels out within a cell, while a moved object or a light switched on does not.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    height, width = image.shape[:2]
    rows, cols = THUMBNAIL_SHAPE
    row_starts = (np.arange(rows) * height) // rows
    col_starts = (np.arange(cols) * width) // cols
    sums = np.add.reduceat(
        np.add.reduceat(image, row_starts, axis=0, dtype=np.uint32), col_starts, axis=1
    )
    # A repeated start (an image smaller than the thumbnail) makes reduceat return one pixel.
    row_counts = np.maximum(np.diff(row_starts, append=height), 1)
    col_counts = np.maximum(np.diff(col_starts, append=width), 1)
    means = sums / (row_counts[:, None] * col_counts[None, :])[..., None]
    grey: NDArray[np.float32] = (means @ _LUMA).astype(np.float32)
    return grey


def change_score(previous: NDArray[np.float32], current: NDArray[np.float32]) -> float:
    """Mean absolute difference of two thumbnails, as a fraction of full scale.

    0 for the same picture, 1 for black against white.
    """
    return float(np.mean(np.abs(current - previous)) / 255.0)


@dataclass
class _Connection:
    """How one connection ended."""

    got_frame: bool = False
    reason: str = ""
    permanent: bool = False
    done: bool = False  # the capture is complete (or stopped): no reconnect


@dataclass
class _Sampler:
    """Which decoded frames to examine: one per 1/fps, by decode time, from the first frame."""

    period: float
    next_due: float | None = None
    deadline: float | None = None
    last_thumbnail: NDArray[np.float32] | None = field(default=None, repr=False)


class Capture:
    """One RTSP capture. Iterate `frames()` once; `cancel()` from anywhere ends it.

    Counters, readable while it runs: `reconnects` (connections reopened), `dropped` (kept frames
    lost to a full buffer), `examined` (frames sampled at `fps`), `kept` (frames handed to the
    buffer, dropped ones included). `clock` gives epoch seconds for `captured_at` (e.g.
    `TimeSync.now` for NTP-corrected stamps); intervals are always measured on the monotonic clock.
    `destinations` says where it may connect (public addresses on the RTSP ports, by default).
    """

    def __init__(
        self,
        plan: CapturePlan,
        limits: CaptureLimits = CaptureLimits(),  # frozen, so one shared default is safe
        *,
        destinations: DestinationPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self.limits = limits
        self.destinations = destinations
        self._destination = Destination.of(plan.url)
        self.reconnects = 0
        self.dropped = 0
        self.examined = 0
        self.kept = 0
        self._clock = clock
        self._masked_url = mask_credentials(plan.url)
        self._sampler = _Sampler(period=1.0 / plan.fps)
        self._buffer: collections.deque[CapturedFrame] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cancelled = False
        self._finished = False
        self._error: CaptureError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._started = False

    def cancel(self) -> None:
        """End the capture: `frames()` returns at once.

        The worker closes the connection as soon as its current read returns: within a frame
        interval on a live camera, at most `stall_timeout_s` (`open_timeout_s` while opening).
        """
        self._cancelled = True
        self._stop.set()
        self._notify()

    async def frames(self) -> AsyncIterator[CapturedFrame]:
        """Kept frames, oldest first; raises CaptureError when the camera cannot be (re)opened."""
        if self._started:
            raise RuntimeError("a Capture can be iterated only once")
        self._started = True
        if self._cancelled:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        worker = threading.Thread(target=self._work, name="rtsp-capture", daemon=True)
        worker.start()
        try:
            while not self._cancelled:
                self._wakeup.clear()
                frame = self._take()
                if frame is not None:
                    yield frame
                    continue
                if self._finished:
                    if self._error is not None:
                        raise self._error
                    return
                timeout = None
                deadline = self._sampler.deadline
                if deadline is not None:
                    # The duration ends on time even if the worker is stuck in a blocking read.
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
        finally:
            self._stop.set()

    def _take(self) -> CapturedFrame | None:
        with self._lock:
            return self._buffer.popleft() if self._buffer else None

    def _notify(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(wakeup.set)

    # -- worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._run()
        except CaptureError as exc:
            self._error = exc
        except Exception:
            # Never let the consumer wait forever; the log processor masks the URL in the trace.
            log.exception("rtsp capture failed", url=self._masked_url)
            self._error = CaptureError(f"{self._masked_url}: capture failed unexpectedly")
        finally:
            self._finished = True
            self._notify()
            log.info(
                "rtsp capture ended",
                url=self._masked_url,
                kept=self.kept,
                examined=self.examined,
                dropped=self.dropped,
                reconnects=self.reconnects,
                cancelled=self._cancelled,
            )

    def _over(self) -> bool:
        deadline = self._sampler.deadline
        return self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

    def _run(self) -> None:
        failures = 0  # consecutive connections that gave no frame
        first = True
        while not self._over():
            if not first:
                delay = self.limits.backoff(failures)
                log.info("rtsp reconnecting", url=self._masked_url, delay_s=delay)
                deadline = self._sampler.deadline
                if deadline is not None:
                    delay = min(delay, max(deadline - time.monotonic(), 0.0))
                if self._stop.wait(delay) or self._over():
                    return
                self.reconnects += 1
            first = False
            outcome = self._connect()
            if outcome.done or self._over():  # a loss after the end is no failure
                return
            failures = 0 if outcome.got_frame else failures + 1
            log.warning(
                "rtsp connection lost",
                url=self._masked_url,
                reason=outcome.reason,
                failures=failures,
            )
            if outcome.permanent or failures >= self.limits.reconnect_attempts:
                attempts = "attempt" if failures == 1 else "attempts"
                raise CaptureError(
                    f"{self._masked_url}: no frame after {failures} connection {attempts}"
                    f" ({outcome.reason})"
                )

    def _describe(self, exc: BaseException, relay: Relay | None = None) -> str:
        text = str(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
        for url in (self.plan.url, relay.url if relay is not None else None):
            if url:
                text = text.replace(url, mask_credentials(url))
        return mask_secrets(text)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T], limit_s: float) -> T:
        """Run `coroutine` on the consumer's event loop, from the worker thread."""
        assert self._loop is not None  # frames() set it before starting the worker
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(limit_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def _connect(self) -> _Connection:
        limits = self.limits
        opening = Relay.open(self._destination, self.destinations, limit_s=limits.open_timeout_s)
        try:
            # The relay's own time limit ends it first; this one only guards a stopped loop.
            relay = self._on_loop(opening, limits.open_timeout_s + 1)
        except DestinationRefusedError as exc:
            # An ordinary failed attempt, retried like one: the caller learns nothing of how
            # a name resolves from the timing either.
            return _Connection(reason=exc.reason)
        except TimeoutError:
            return _Connection(reason=f"no answer within {limits.open_timeout_s:g} s")
        except OSError as exc:
            # asyncio words a refused connection "Connect call failed (address)": the errno
            # says it as FFmpeg did ("Connection refused"). A TLS error's errno is OpenSSL's.
            errno = None if isinstance(exc, ssl.SSLError) else exc.errno
            return _Connection(reason=os.strerror(errno) if errno else self._describe(exc))
        try:
            outcome = self._read(relay)
        finally:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop has closed: so has the relay
                self._loop.call_soon_threadsafe(relay.close)
        if relay.refusal is not None and not outcome.done:  # what the camera sent, not how
            # FFmpeg took it: a redirect stays one, so it is not tried again
            return _Connection(got_frame=outcome.got_frame, reason=relay.refusal, permanent=True)
        return outcome

    def _read(self, relay: Relay) -> _Connection:
        """One connection through `relay`: open it with FFmpeg, decode until it ends."""
        limits = self.limits
        try:
            container = av.open(
                relay.url,
                options=dict(_OPEN_OPTIONS),
                timeout=(limits.open_timeout_s, limits.stall_timeout_s),
            )
        except av.error.ExitError:
            return _Connection(reason=f"no answer within {limits.open_timeout_s:g} s")
        except _PERMANENT_ERRORS as exc:
            return _Connection(reason=self._describe(exc, relay), permanent=True)
        except (av.error.FFmpegError, OSError) as exc:
            return _Connection(reason=self._describe(exc, relay))
        outcome = _Connection()
        with container:
            if not container.streams.video:
                outcome.reason = "the stream has no video"
                return outcome
            log.info("rtsp connected", url=self._masked_url)
            stream = container.streams.video[0]
            keyframe_seen = False  # decoding from mid-GOP yields grey smears until the next one
            last_frame_at = time.monotonic()
            try:
                for packet in container.demux(stream):
                    if self._stop.is_set():
                        outcome.done = True
                        return outcome
                    keyframe_seen = keyframe_seen or packet.is_keyframe
                    if keyframe_seen:
                        try:
                            decoded = packet.decode()
                        except av.error.InvalidDataError:
                            decoded = []  # a damaged packet: the next keyframe repairs the picture
                        for frame in decoded:
                            last_frame_at = time.monotonic()
                            outcome.got_frame = True
                            if self._on_frame(frame, last_frame_at):
                                outcome.done = True
                                return outcome
                    if time.monotonic() - last_frame_at > limits.stall_timeout_s:
                        outcome.reason = f"no frame for {limits.stall_timeout_s:g} s"
                        return outcome
                outcome.reason = "the stream ended"
            except av.error.ExitError:  # PyAV's read timeout: not one packet for stall_timeout_s
                outcome.reason = f"no frame for {limits.stall_timeout_s:g} s"
            except (av.error.FFmpegError, OSError) as exc:
                outcome.reason = self._describe(exc, relay)
        return outcome

    def _on_frame(self, frame: VideoFrame, now: float) -> bool:
        """Examine and maybe keep one decoded frame; True when the capture is complete."""
        plan, sampler = self.plan, self._sampler
        if sampler.next_due is None:  # the capture's first frame starts its clock
            sampler.next_due = now
            if plan.mode is not CaptureMode.SINGLE_FRAME:
                assert plan.duration_s is not None  # CapturePlan checked it
                sampler.deadline = now + plan.duration_s
        if sampler.deadline is not None and now >= sampler.deadline:
            return True
        if now < sampler.next_due:
            return False
        while sampler.next_due <= now:  # skip slots missed while reconnecting: no burst after
            sampler.next_due += sampler.period
        self.examined += 1
        captured_at = datetime.fromtimestamp(self._clock(), UTC)
        image = np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
        change = None
        if plan.mode is CaptureMode.EVENT_DRIVEN:
            current = thumbnail(image)
            if sampler.last_thumbnail is not None:
                change = change_score(sampler.last_thumbnail, current)
                if change < plan.change_threshold:
                    return False
            sampler.last_thumbnail = current
        self._keep(
            CapturedFrame(image=image, captured_at=captured_at, index=self.kept, change=change)
        )
        return plan.mode is CaptureMode.SINGLE_FRAME

    def _keep(self, frame: CapturedFrame) -> None:
        with self._lock:
            if len(self._buffer) >= self.limits.buffer_frames:
                self._buffer.popleft()  # a late frame is worth less than a fresh one
                self.dropped += 1
            self._buffer.append(frame)
            self.kept += 1
        self._notify()
