"""`WS /model/ws/connect`: camera models push frame results (Project Omega's wire). Each is checked
at the edge and published to the occupancy work exchange; bad input gets an error frame on the same
socket, which stays open. What the occupancy service rejects later (an unknown camera) comes back
as an error frame too, through this connection's reply channel. Omega's wire has no
acknowledgement, so a frame in flight when the gateway dies is lost unknown to its camera; with
`?ack=1` (Edgeway's, opt-in) each message is answered: `{"type": "ack", "seq", "message_id"}`
once the broker confirmed it, or an error frame whose `details.seq` names it. `seq` counts the
connection's messages from 1. The message id is then derived from the token's subject, the camera
and the timestamp, so a frame sent again after a reconnect is stored once. Up to
`publish_window` frames of a connection are in flight at once; its answers (acks and error
frames alike) go out in the order of the messages they answer.

A frame that finds none of its connection's publishes awaiting a confirm goes at once, alone, as
the plain message it always was. Frames that arrive meanwhile wait together and go as one
message (the work batch of `edgeway.common.batching`, each frame with its own message id and
capture time) as soon as a publish settles, or once `MAX_BATCH_FRAMES` or `MAX_BATCH_BYTES`
wait: under load one confirm, one quorum-log entry, one delivery and one ack serve many frames,
and at low rates nothing waits. A failed publish fails every frame it carried, each answered
with its own error frame. Traced connections publish each frame alone (a span each).

`GET /model/count`: the camera models connected to this replica."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import deque
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, WebSocket
from opentelemetry import trace
from opentelemetry.context import Context
from pydantic import ValidationError

from edgeway.common.amqp import LinkDownError
from edgeway.common.batching import pack_work
from edgeway.common.envelope import Envelope, new_message_id
from edgeway.common.logging import get_logger
from edgeway.common.schemas.errors import ErrorCode, ErrorFrame
from edgeway.common.schemas.occupancy import OBSERVATION_TYPE, FrameResult
from edgeway.gateway.auth import Principal, Scope
from edgeway.gateway.limits import TokenBucket
from edgeway.gateway.state import Gateway, GatewayDep, admit_websocket, require

MODEL_ENDPOINT = "/model/ws/connect"
# Message ids of acknowledged producers: the same frame from the same subject, the same id.
ACKED_FRAME_IDS = uuid.UUID("5f0c9a43-2b1e-4c44-9d8e-0e6b1d2f7a10")
# A frame goes alone while fewer than this many of its connection's publishes await a confirm.
ALONE_BELOW = 1
# Most frames, and bytes of frames, that wait to go together in one message.
MAX_BATCH_FRAMES = 64
MAX_BATCH_BYTES = 1024 * 1024

router = APIRouter()
log = get_logger("edgeway.gateway.occupancy")
tracer = trace.get_tracer("edgeway.gateway")


class Answer:
    """What a message of the connection gets back, once it and every one before it settled:
    the outcome of the publish that carries it (`task`), or an error frame decided at the edge
    (`text`)."""

    __slots__ = ("envelope", "seq", "task", "text")

    def __init__(
        self,
        seq: int,
        *,
        task: asyncio.Future[None] | None = None,
        envelope: Envelope | None = None,
        text: str = "",
    ) -> None:
        self.seq = seq
        self.task = task
        self.envelope = envelope
        self.text = text

    def settled(self) -> bool:
        return self.task is None or self.task.done()


class Pending:
    """Frames that wait for the connection's publishes in flight, to go together in the next
    one; `sent` settles with that publish."""

    __slots__ = ("frames", "sent", "size")

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, Envelope]] = []
        self.size = 0
        self.sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, raw: bytes, envelope: Envelope) -> None:
        self.frames.append((raw, envelope))
        self.size += len(raw)

    def full(self) -> bool:
        return len(self.frames) >= MAX_BATCH_FRAMES or self.size >= MAX_BATCH_BYTES


class ModelSession:
    """One camera model's connection: edge checks, confirmed publishes, error frames back."""

    def __init__(
        self, gateway: Gateway, websocket: WebSocket, principal: Principal, *, acks: bool = False
    ) -> None:
        settings = gateway.settings
        self.acks = acks
        self.seq = 0  # messages received on this connection
        self.gateway = gateway
        self.link = gateway.link
        self.exchange = self.link.topology.occupancy_observations
        self.websocket = websocket
        self.principal = principal
        self.connection_id = uuid.uuid4().hex[:12]
        self.reply_channel = self.link.producer_channel(self.connection_id)
        self.replies = gateway.producer_queue(websocket, MODEL_ENDPOINT)
        self.bucket = TokenBucket(settings.producer_rate, settings.producer_burst)
        self.window = settings.publish_window
        self.max_bytes = settings.max_message_bytes
        # Messages not answered yet, oldest first: answered from the front as they settle.
        self.unanswered: deque[Answer] = deque()
        self.in_flight = 0  # publishes of this connection awaiting their confirms
        self.pending: Pending | None = None  # frames waiting to go together
        self.producer = f"omega-model/{self.principal.subject}"
        self._published = gateway.metrics.published.labels(MODEL_ENDPOINT)
        # Each frame is its own trace, linked to the connection's (a socket lives for days);
        # spans only where they are exported (each costs its publish a task of its own).
        self.traced = settings.otel_exporter != "none"
        connection_span = trace.get_current_span().get_span_context()
        self.trace_links = [trace.Link(connection_span)] if connection_span.is_valid else []

    def error_text(self, frame: ErrorFrame, seq: int) -> str:
        self.gateway.metrics.rejected.labels(MODEL_ENDPOINT, frame.code.value).inc()
        if self.acks:
            frame = frame.model_copy(update={"details": {"seq": seq}})
        return frame.encode()

    def reject(self, frame: ErrorFrame, seq: int) -> None:
        """Answer message `seq` with an error frame, after the answers of those before it."""
        text = self.error_text(frame, seq)
        if self.unanswered:
            self.unanswered.append(Answer(seq, text=text))
        else:
            self.replies.offer(text)

    def message_id(self, frame: FrameResult) -> str:
        """A fresh id; for an acknowledged producer, the frame's own (see the module)."""
        if not self.acks:
            return new_message_id()
        name = f"{self.principal.subject}\x1f{frame.camera}\x1f{orjson.dumps(frame.timestamp)!r}"
        return str(uuid.uuid5(ACKED_FRAME_IDS, name))

    async def run(self) -> None:
        producers = self.gateway.producers.setdefault(MODEL_ENDPOINT, set())
        producers.add(self)
        self.gateway.metrics.connections.labels(MODEL_ENDPOINT).inc()
        writer = asyncio.create_task(self.replies.run())
        log.info("model connected", connection=self.connection_id, subject=self.principal.subject)
        try:
            await self.link.hub.subscribe(self.reply_channel, self.replies)
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("text")
                raw = data.encode() if data is not None else message.get("bytes") or b""
                await self.take(raw)
        finally:
            producers.discard(self)
            self.gateway.metrics.connections.labels(MODEL_ENDPOINT).dec()
            # What was received is published even if the producer left meanwhile.
            in_flight = [answer.task for answer in self.unanswered if answer.task is not None]
            if in_flight:
                await asyncio.wait(in_flight, timeout=self.gateway.settings.graceful_timeout)
            await self.link.hub.unsubscribe(self.reply_channel, self.replies)
            self.replies.close()
            writer.cancel()
            log.info("model disconnected", connection=self.connection_id)

    async def take(self, raw: bytes) -> None:
        """Check one message at the edge and start publishing it (bounded in-flight window)."""
        self.seq += 1
        seq = self.seq
        if len(raw) > self.max_bytes:
            self.reject(
                ErrorFrame(
                    code=ErrorCode.TOO_LARGE,
                    reason=f"message is {len(raw)} bytes; the limit is {self.max_bytes}",
                ),
                seq,
            )
            return
        if not self.bucket.take():
            self.reject(ErrorFrame(code=ErrorCode.RATE_LIMITED, reason="too many messages"), seq)
            return
        try:
            frame = FrameResult.model_validate_json(raw)
        except ValidationError as error:
            self.reject(ErrorFrame.invalid(error), seq)
            return
        if frame.summary.zones == 0:
            self.reject(
                ErrorFrame(
                    code=ErrorCode.ZERO_ZONES,
                    reason="summary.free and summary.occupied are both empty: no zones to count",
                ),
                seq,
            )
            return
        envelope = Envelope(
            message_id=self.message_id(frame),
            type=OBSERVATION_TYPE,
            producer=self.producer,
            captured_at=frame.captured_at().timestamp(),
            reply_channel=self.reply_channel,
        )
        unanswered = self.unanswered
        while len(unanswered) >= self.window:  # the oldest is a publish: wait for it
            head = unanswered[0].task
            assert head is not None
            await asyncio.wait((head,))
        if self.pending is None and (self.traced or self.in_flight < ALONE_BELOW):
            await self.link.work_room()
            # Nothing is awaited from here to the submit: publishes go out in the messages' order.
            task: asyncio.Future[None]
            if self.traced:
                task = asyncio.create_task(self.publish_traced(raw, envelope))
                task.add_done_callback(self.settle)
            else:
                try:
                    task = self.start([(raw, envelope)])
                except LinkDownError as exc:
                    self.reject(unavailable(envelope, exc), seq)
                    return
            unanswered.append(Answer(seq, task=task, envelope=envelope))
            return
        # Behind a publish in flight (or frames already waiting): goes with the next one.
        pending = self.pending = self.pending or Pending()
        pending.add(raw, envelope)
        unanswered.append(Answer(seq, task=pending.sent, envelope=envelope))
        if pending.full():
            self.send_pending()

    def start(
        self, frames: list[tuple[bytes, Envelope]], sent: asyncio.Future[None] | None = None
    ) -> asyncio.Task[None]:
        """Publish one frame as it came, or several as one batch; `sent` (the frames' shared
        answer) settles with it. Raises `LinkDownError` at once while the link is down."""
        if len(frames) == 1:
            body, envelope = frames[0]
        else:
            body, headers = pack_work(frames)
            envelope = Envelope(
                type=OBSERVATION_TYPE,
                producer=self.producer,
                reply_channel=self.reply_channel,
                headers=headers,
            )
        task = self.link.submit_work(body, envelope=envelope, exchange=self.exchange)
        self.in_flight += 1
        task.add_done_callback(functools.partial(self.published, sent))
        return task

    def send_pending(self) -> None:
        """The waiting frames go now, together."""
        pending, self.pending = self.pending, None
        assert pending is not None
        try:
            self.start(pending.frames, pending.sent)
        except LinkDownError as exc:
            pending.sent.set_exception(exc)
            self.settle()

    def published(self, sent: asyncio.Future[None] | None, task: asyncio.Task[None]) -> None:
        """A publish of this connection settled: the frames it carried settle with it, the
        frames that wait go, and what can be answered is."""
        self.in_flight -= 1
        if sent is not None and not sent.done():
            if task.cancelled():
                sent.cancel()
            elif (failure := task.exception()) is not None:
                sent.set_exception(failure)
            else:
                sent.set_result(None)
        if self.pending is not None and self.in_flight < ALONE_BELOW:
            self.send_pending()
        self.settle()

    async def publish_traced(self, raw: bytes, envelope: Envelope) -> None:
        with tracer.start_as_current_span(
            "receive " + MODEL_ENDPOINT,
            context=Context(),
            kind=trace.SpanKind.SERVER,
            links=self.trace_links,
            attributes={"messaging.message.id": envelope.message_id},
        ):
            await self.link.publish_work(raw, envelope=envelope, exchange=self.exchange)

    def settle(self, _: object = None) -> None:
        """Answer, in order, every message at the front whose publish settled."""
        unanswered = self.unanswered
        while unanswered and unanswered[0].settled():
            answer = unanswered.popleft()
            task, envelope = answer.task, answer.envelope
            if task is None or envelope is None:
                self.replies.offer(answer.text)
                continue
            failure = asyncio.CancelledError() if task.cancelled() else task.exception()
            if failure is not None:
                self.replies.offer(self.error_text(unavailable(envelope, failure), answer.seq))
                continue
            self._published.inc()
            if self.acks:
                ack = {"type": "ack", "seq": answer.seq, "message_id": envelope.message_id}
                self.replies.offer(orjson.dumps(ack).decode())


def unavailable(envelope: Envelope, failure: BaseException) -> ErrorFrame:
    """The error frame of a frame the broker did not take (any failure, an outage above all):
    the producer sends it again."""
    log.warning("publish failed", error=repr(failure), message_id=envelope.message_id)
    return ErrorFrame(
        code=ErrorCode.UNAVAILABLE,
        reason="not accepted: the broker did not confirm it; send it again",
        message_id=envelope.message_id,
    )


@router.websocket(MODEL_ENDPOINT)
async def model_connect(
    websocket: WebSocket, gateway: GatewayDep, ack: Annotated[bool, Query()] = False
) -> None:
    principal = await admit_websocket(
        websocket, gateway, scope=Scope.OCCUPANCY_PUBLISH, endpoint=MODEL_ENDPOINT
    )
    if principal is None:
        return
    await ModelSession(gateway, websocket, principal, acks=ack).run()


@router.get(
    "/model/count",
    summary="Connected camera models",
    dependencies=[require(Scope.OCCUPANCY_SUBSCRIBE, "/model/count")],
)
async def model_count(gateway: GatewayDep) -> dict[str, int]:
    return {"count": gateway.producer_count(MODEL_ENDPOINT)}
