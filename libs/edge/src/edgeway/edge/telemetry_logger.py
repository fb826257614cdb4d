"""The vehicle telemetry logger: trace -> predictive encoder -> SQLite outbox -> gateway.

Three loops share one `TelemetryLogger`:

- the recorder takes a reading every period, encodes it (`edgeway.common.telemetry.predictor`)
  and appends the packet to the outbox together with the encoder state, in one transaction;
- the uploader drains the outbox in recording order with httpx: one packet as a
  CompressedVehicleData, or when more wait, up to `batch_size` as a CompressedBatch
  (`X-Batch: true`). 202: the packets leave the outbox. No connection, no answer in time, any
  5xx, 408 (the body came too slowly) or 429: the gateway cannot take them now; the packets
  stay, the buffer grows, and the uploader retries with exponential backoff, waiting at least
  what a `Retry-After` asks (up to MAX_RETRY_AFTER_S). A 503 is never about the packet: the
  gateway says so when the broker, or the telemetry service that confirms the VIN, is
  unavailable. Another 4xx: the packet is at fault; it moves to the outbox's `rejected`
  table (a refused batch is first resent one packet at a time to find which) and the stream goes
  on. 401 and 403 are the exception: the token is at fault, not the packet, so nothing is moved
  and the uploader keeps retrying with backoff until an operator fixes the token;
- the control client keeps `WS /telemetry/control/ws?vin=...` open to the gateway: it reports
  the logger's status and log lines, and obeys start, stop, toggle_offline and clear_data.

The encoder state lives in the outbox file, so a restarted logger goes on with the next
sequence number; without a stored state it starts afresh and its first packet is a resync.
`legacy=True` sends what the seed's logger without compression would: one uncompressed
VehicleData per request, without a sequence number.

Run it as `python -m edgeway.edge.telemetry_logger --vin VIN --gateway URL --trace highway`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any

import httpx

from edgeway.common.logging import configure_logging, get_logger
from edgeway.common.telemetry import telemetry_pb2, wire
from edgeway.common.telemetry.predictor import (
    FIELDS,
    Encoder,
    PredictorConfig,
    PredictorState,
    Sample,
)
from edgeway.edge.control import ControlClient, LogType, control_url_for
from edgeway.edge.credentials import add_token_options, read_token
from edgeway.edge.outbox import Entry, Outbox
from edgeway.edge.pacing import Backoff, Signal
from edgeway.edge.traces import DEFAULT_PERIOD_MS, TRACES

SERVICE = "telemetry-logger"
UPLOAD_PATH = "/telemetry"
TOKEN_ENV = "EDGEWAY_LOGGER_TOKEN"  # noqa: S105 (a variable name, not a secret)
# 100 packets of ~30 bytes: far below the gateway's 1 MiB body limit, and a 30 s backlog
# (at 300 ms) goes in one request.
DEFAULT_BATCH_SIZE = 100
# Answers that say "not now" rather than "not this": the packets stay and are sent again.
# 408: the gateway gave up waiting for a body that came too slowly (a poor link).
RETRY_STATUSES = frozenset({408, 429})
# The longest a gateway's Retry-After is obeyed for (seconds): a wrong header must not park a
# logger for hours; its backoff still grows to its own maximum.
MAX_RETRY_AFTER_S = 300.0

log = get_logger("edgeway.edge.telemetry_logger")  # not "__main__" when run with -m


@dataclass(slots=True)
class Counters:
    """What the logger did since it started or since the last clear_data."""

    recorded: int = 0
    uploaded: int = 0
    rejected: int = 0
    requests: int = 0
    resyncs: int = 0
    transmitted_fields: int = 0
    skipped_fields: int = 0


class _Outcome(Enum):
    SENT = "sent"  # 202: gone from the outbox
    REJECTED = "rejected"  # refused for good: moved aside
    SPLIT = "split"  # a batch was refused: resend its packets one by one
    RETRY = "retry"  # the gateway cannot take it now: back off


class TelemetryLogger:
    """One vehicle's logger. `await run()` until the trace ends and the outbox is empty.

    `trace`: the readings to record (`edgeway.edge.traces`); `period_s`: seconds between two
    readings (0: as fast as the outbox takes them). `running=False` starts paused, `offline=True`
    in a dead zone. `control=False` keeps no control connection.
    """

    def __init__(
        self,
        vin: str,
        gateway_url: str,
        token: str,
        trace: Iterable[Sample],
        outbox_path: str | Path,
        *,
        period_s: float = DEFAULT_PERIOD_MS / 1_000,
        legacy: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        config: PredictorConfig | None = None,
        running: bool = True,
        offline: bool = False,
        control: bool = True,
        control_url: str | None = None,
        backoff: Backoff | None = None,
        request_timeout_s: float = 10.0,
        status_interval_s: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if period_s < 0:
            raise ValueError("period_s must not be negative")
        self.vin = wire.check_vin(vin)
        self.upload_url = gateway_url.rstrip("/") + UPLOAD_PATH
        self.control_url = (
            (control_url or control_url_for(gateway_url, self.vin)) if control else None
        )
        self.outbox_path = Path(outbox_path)
        self.legacy = legacy
        self.counters = Counters()
        self._token = token
        self._trace = iter(trace)
        self._period_s = period_s
        self._batch_size = batch_size
        self._config = config if config is not None else PredictorConfig()
        self._running = running
        self._offline = offline
        self._backoff = backoff if backoff is not None else Backoff()
        self._request_timeout_s = request_timeout_s
        self._encoder = Encoder(self._config)
        self._outbox: Outbox | None = None
        self._recording_done = False
        self._split_through = 0  # outbox ids up to this one go one per request
        self._retry_after: float | None = None  # the last "not now" answer's Retry-After
        self._link_problem: str | None = None  # why the last upload did not go through
        self._record_lock = asyncio.Lock()  # one packet (encode + append) or one clear_data
        self._changed = Signal()  # anything: a packet, a command, an upload
        self._commanded = Signal()  # a command only (cuts a backoff short)
        self._control = (
            ControlClient(
                self.control_url,
                token=token,
                status=self.status,
                commands={
                    "start": self.start,
                    "stop": self.stop,
                    "toggle_offline": self.toggle_offline,
                    "clear_data": self.clear_data,
                },
                backoff=self._backoff,
                status_interval_s=status_interval_s,
                open_timeout_s=request_timeout_s,
            )
            if self.control_url is not None
            else None
        )

    # ---- state -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def offline(self) -> bool:
        return self._offline

    @property
    def buffered(self) -> int:
        """Packets recorded and not yet taken by the gateway."""
        return self._outbox.pending if self._outbox is not None else 0

    @property
    def encoder_state(self) -> PredictorState:
        return self._encoder.state

    def status(self) -> dict[str, Any]:
        return {"running": self._running, "offline": self._offline, "buffered": self.buffered}

    # ---- commands (what the control connection calls) ----------------------------------------

    async def start(self) -> None:
        if not self._running:
            self._running = True
            self._emit("Logger started", "success")
            self._notify(command=True)

    async def stop(self) -> None:
        if self._running:
            self._running = False
            self._emit("Logger stopped", "info", buffered=self.buffered)
            self._notify(command=True)

    async def toggle_offline(self) -> None:
        self._offline = not self._offline
        if self._offline:
            self._emit("Entered a dead zone: recording to the buffer, sending nothing", "warning")
        else:
            self._emit(
                f"Left the dead zone: sending {self.buffered} buffered packets in order",
                "success",
                buffered=self.buffered,
            )
        self._notify(command=True)

    async def clear_data(self) -> None:
        """Reset the counters and restart the encoder (its next packet is a resync, numbered 1).

        Unsent packets stay in the outbox: nobody has them yet."""
        async with self._record_lock:
            self.counters = Counters()
            self._encoder = Encoder(self._config)
            if self._outbox is not None:
                await self._outbox.clear_state()
        self._emit("Counters cleared and encoder restarted", "info", buffered=self.buffered)
        self._notify(command=True)

    # ---- the loops ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Record, upload and listen to the gateway until the trace ends and all is sent."""
        async with (
            await Outbox.open(self.outbox_path, vin=self.vin) as outbox,
            httpx.AsyncClient(timeout=self._request_timeout_s) as client,
        ):
            self._outbox = outbox
            await self._restore_encoder(outbox)
            self._emit(
                "Logger ready",
                "info",
                mode="legacy" if self.legacy else "compressed",
                buffered=outbox.pending,
                next_sequence=None if self.legacy else (self._encoder.state.last_sequence or 0) + 1,
            )
            control = (
                asyncio.create_task(self._control.run(), name="logger-control")
                if self._control is not None
                else None
            )
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._record(outbox), name="logger-recorder")
                    group.create_task(self._upload(outbox, client), name="logger-uploader")
            finally:
                if control is not None:
                    control.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await control
        log.info("logger finished", **asdict(self.counters))

    async def _restore_encoder(self, outbox: Outbox) -> None:
        if self.legacy:
            return
        saved = await outbox.load_state()
        if saved is None:
            self._encoder = Encoder(self._config)
            return
        try:
            self._encoder = Encoder(self._config, PredictorState.from_json(saved))
        except ValueError as exc:
            # Another predictor version or a damaged row: start afresh (the next packet is a
            # resync, numbered 1, which the decoder takes as a restarted stream).
            self._emit(f"Stored encoder state unusable ({exc}); starting afresh", "warning")
            self._encoder = Encoder(self._config)

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    async def _record(self, outbox: Outbox) -> None:
        loop = asyncio.get_running_loop()
        skipped = 0
        due = loop.time()
        try:
            while True:
                if not self._running:
                    await self._wait_until(lambda: self._running)
                    due = loop.time()
                sample = next(self._trace, None)
                if sample is None:
                    return
                last = self._encoder.state.last_timestamp_ms
                if not self.legacy and last is not None and sample.timestamp_ms <= last:
                    # A replay restarted from its beginning: go on after what is already stored.
                    skipped += 1
                    continue
                if skipped:
                    log.info("skipped readings recorded before the restart", readings=skipped)
                    skipped = 0
                await self._record_one(outbox, sample)
                due += self._period_s
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            self._recording_done = True
            self._notify()

    async def _record_one(self, outbox: Outbox, sample: Sample) -> None:
        async with self._record_lock:
            if self.legacy:
                await outbox.append(
                    sequence=None,
                    timestamp_ms=sample.timestamp_ms,
                    body=wire.encode_sample(sample),
                    compressed=False,
                )
                self.counters.transmitted_fields += len(FIELDS)
            else:
                # If the append fails the exception ends the logger: the stored state is the one
                # before this packet, so a restart numbers it again, with no gap.
                packet = self._encoder.encode(sample)
                await outbox.append(
                    sequence=packet.sequence,
                    timestamp_ms=packet.timestamp_ms,
                    body=wire.encode_packet(packet),
                    compressed=True,
                    encoder_state=self._encoder.state.to_json(),
                )
                sent = sum(
                    value is not None
                    for value in (packet.speed, packet.battery, packet.power, packet.heading)
                )
                self.counters.transmitted_fields += sent
                self.counters.skipped_fields += len(FIELDS) - sent
                self.counters.resyncs += packet.is_resync
            self.counters.recorded += 1
        self._notify()

    async def _upload(self, outbox: Outbox, client: httpx.AsyncClient) -> None:
        delays = self._backoff.delays()

        def ready() -> bool:
            sendable = self._running and not self._offline and outbox.pending > 0
            return sendable or (self._recording_done and outbox.pending == 0)

        while True:
            await self._wait_until(ready)
            if outbox.pending == 0:
                return  # the trace is over and the gateway has everything
            entries = self._next_request(await outbox.peek(self._batch_size))
            outcome = await self._send(client, outbox, entries)
            if outcome is _Outcome.RETRY:
                delay = max(next(delays), self._retry_after or 0.0)
                self._retry_after = None
                log.debug("upload backing off", seconds=round(delay, 3))
                await self._commanded.wait(delay)  # a command (start, end of dead zone) cuts it
            else:
                delays = self._backoff.delays()
            self._notify()

    def _next_request(self, waiting: list[Entry]) -> list[Entry]:
        """What goes in one request: legacy packets and packets under suspicion go alone;
        compressed ones go together (a batch holds one kind of message)."""
        first = waiting[0]
        if not first.compressed or first.id <= self._split_through:
            return [first]
        batch = [first]
        for entry in waiting[1:]:
            if not entry.compressed:
                break
            batch.append(entry)
        return batch

    async def _send(
        self, client: httpx.AsyncClient, outbox: Outbox, entries: list[Entry]
    ) -> _Outcome:
        is_batch = len(entries) > 1
        headers = {
            "Content-Type": "application/x-protobuf",
            "X-Compressed": "true" if entries[0].compressed else "false",
            "X-Vehicle-VIN": self.vin,
        }
        if is_batch:
            headers["X-Batch"] = "true"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        body = self._batch_body(entries) if is_batch else entries[0].body
        self.counters.requests += 1
        first, last = entries[0].sequence, entries[-1].sequence
        try:
            response = await client.post(self.upload_url, content=body, headers=headers)
        except httpx.TransportError as exc:
            return self._link_down(f"gateway unreachable: {type(exc).__name__} {exc}")
        status = response.status_code
        if status == 202:
            await outbox.remove(entries)
            self.counters.uploaded += len(entries)
            if self._link_problem is not None:
                self._link_problem = None
                self._emit(
                    f"Gateway reachable again; {outbox.pending} packets still buffered",
                    "success",
                    buffered=outbox.pending,
                )
            log.debug("uploaded", packets=len(entries), first=first, last=last)
            return _Outcome.SENT
        reason = _reason(response)
        if status in RETRY_STATUSES or status >= 500:
            self._retry_after = _retry_after(response)
            return self._link_down(f"gateway answered {status}: {reason}")
        if status in (401, 403):
            # The token, not the packet, is refused: keep everything and keep asking.
            return self._link_down(f"gateway refused the token ({status}): {reason}", "error")
        if is_batch:
            # Find the packet at fault: the others go through one by one.
            self._split_through = entries[-1].id
            log.warning("batch refused; resending one by one", status=status, reason=reason)
            return _Outcome.SPLIT
        entry = entries[0]
        await outbox.reject(entry, status=status, reason=reason)
        self.counters.rejected += 1
        self._emit(
            f"Packet {entry.sequence} refused ({status}: {reason}); moved aside",
            "error",
            sequence=entry.sequence,
            timestamp_ms=entry.timestamp_ms,
            status=status,
        )
        return _Outcome.REJECTED

    def _link_down(self, why: str, log_type: LogType = "warning") -> _Outcome:
        """Say so once per kind of trouble, not once per retry."""
        kind = why.split(":")[0]
        if self._link_problem != kind:
            self._link_problem = kind
            self._emit(f"{why}; buffering", log_type, buffered=self.buffered)
        else:
            log.debug("upload failed again", reason=why)
        return _Outcome.RETRY

    def _batch_body(self, entries: Sequence[Entry]) -> bytes:
        batch = telemetry_pb2.CompressedBatch(
            records=[telemetry_pb2.CompressedVehicleData.FromString(e.body) for e in entries],
            device_id=self.vin,
        )
        body: bytes = batch.SerializeToString()
        return body

    # ---- log lines and the control connection -------------------------------------------------

    def _emit(self, message: str, log_type: LogType, **fields: Any) -> None:
        """A log line for this process's log and for the gateway's control connection."""
        level = {"info": "info", "success": "info", "warning": "warning", "error": "error"}
        getattr(log, level[log_type])(message, vin=self.vin, **fields)
        if self._control is not None:
            self._control.log(message, log_type)

    def _notify(self, *, command: bool = False) -> None:
        """Wake whoever waits for a change (a packet, an upload, a command)."""
        self._changed.fire()
        if command:
            self._commanded.fire()
        if self._control is not None:
            self._control.changed(urgent=command)


def _retry_after(response: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (delta-seconds or an HTTP date), at most
    MAX_RETRY_AFTER_S; None when it has none or one that cannot be read."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _reason(response: httpx.Response) -> str:
    """The gateway's `reason` from an error body, or the start of whatever it sent."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    reason = body.get("reason") if isinstance(body, dict) else None
    if isinstance(reason, str):
        return reason
    return str(body)[:200]


# ---- the command -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgeway.edge.telemetry_logger",
        description="Replay a generated driving trace to an Edgeway gateway, like a car's logger.",
    )
    parser.add_argument("--vin", required=True, help="the vehicle's VIN (17 characters)")
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway base URL")
    add_token_options(parser, env=TOKEN_ENV, scope="telemetry:publish")
    parser.add_argument("--trace", choices=sorted(TRACES), default="highway")
    parser.add_argument("--period", type=float, default=DEFAULT_PERIOD_MS / 1_000, help="seconds")
    parser.add_argument("--outbox", type=Path, required=True, help="SQLite outbox file")
    parser.add_argument("--legacy", action="store_true", help="uncompressed, unnumbered packets")
    parser.add_argument("--seed", type=int, default=0, help="trace seed")
    parser.add_argument("--count", type=int, default=None, help="readings to record, then exit")
    parser.add_argument(
        "--start-ms",
        type=int,
        default=None,
        help="record time of the first reading (default: now)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--paused", action="store_true", help="wait for a start command")
    parser.add_argument("--offline", action="store_true", help="start in a dead zone")
    parser.add_argument("--no-control", action="store_true", help="no control connection")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(service=SERVICE, level=args.log_level)
    if args.period <= 0:
        log.error("--period must be positive", period=args.period)
        return 2
    try:
        vin = wire.check_vin(args.vin)
    except wire.WireError as exc:
        log.error("bad VIN", reason=exc.reason)
        return 2
    token = read_token(parser, args, env=TOKEN_ENV)
    if not token:
        log.warning("no token: the gateway will refuse uploads unless it grants anonymous scopes")
    start_ms = args.start_ms if args.start_ms is not None else int(time.time() * 1_000)
    trace: Iterable[Sample] = TRACES[args.trace](
        args.seed, period_ms=max(1, round(args.period * 1_000)), start_ms=start_ms
    )
    if args.count is not None:
        trace = islice(trace, args.count)
    logger = TelemetryLogger(
        vin,
        args.gateway,
        token,
        trace,
        args.outbox,
        period_s=args.period,
        legacy=args.legacy,
        batch_size=args.batch_size,
        running=not args.paused,
        offline=args.offline,
        control=not args.no_control,
    )
    return asyncio.run(_run_until_signalled(logger))


async def _run_until_signalled(logger: TelemetryLogger) -> int:
    """Run the logger; SIGTERM and SIGINT stop it cleanly (the outbox keeps what is unsent)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await logger.run()
    except asyncio.CancelledError:
        log.info("logger stopped by signal", buffered=logger.buffered, **asdict(logger.counters))
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
