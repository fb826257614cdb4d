"""AMQP on the per-message paths: aio-pika and aiormq directly, one confirm-window publisher, one
consumer.

FastStream declares the topology, serves the cold paths (request/reply, control messages) and
writes the AsyncAPI document; what runs once per message does not go through it:
`bench.broker_overhead` measured FastStream at 67-108 µs of CPU per message per hop over
aio-pika, and an occupancy frame takes four hops.

- `AmqpLink`: one robust aio-pika connection of a process. aio-pika reconnects it and reopens
  its channels (prefetch, consumers) after a broker restart or a cut.
- `ConfirmPublisher`: persistent-and-mandatory or transient publishes with publisher confirms,
  many in flight at once up to a window. While the link is down a publish either waits for it
  (a service's: what it publishes comes from a delivery the broker keeps) or fails at once with
  `LinkDownError` (`hold=False`, the gateway's: its producer is told and sends again, rather
  than waiting for an outage to end). A publish returns once the broker confirmed it; a lone
  message goes out at once (no batching delay), and under load the confirms of many messages
  overlap (RabbitMQ confirms several at once with `multiple`). Publishes reach the broker in the
  order they were started. It goes below aio-pika's `Message`/`Exchange` objects to aiormq's
  `basic_publish`, with properties built once per message.
- `Consumer`: a queue's deliveries handed to a coroutine, each acked once it returns (the
  handler has committed its effect) and requeued if it raises, so the queue's delivery limit
  dead-letters a message that can never succeed (at once if it raises `RejectDeliveryError`).
  It consumes on aiormq's channel under aio-pika's robust one: a handler gets a `Delivery`
  (the message's properties read once, in one small object), in the one task aiormq starts per
  delivery. aio-pika's own consumer builds an `IncomingMessage` and a second task per delivery.

Traced like FastStream's middleware does it, and only where a trace exporter is configured
(a `tracer_provider` given to the link): a CONSUMER span per delivery, continuing the
`traceparent` it carries, and a PRODUCER span per publish, whose context the message carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pamqp import commands as spec
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from edgeway.common.envelope import Envelope
from edgeway.common.logging import get_logger

log = get_logger("edgeway.amqp")

# Unconfirmed publishes at once per publisher: enough to keep a confirm round trip hidden at
# thousands of messages per second; a full window makes further publishes wait.
DEFAULT_WINDOW = 256
# How long a publish waits for the broker (a reconnection, then the confirm) before it fails.
DEFAULT_PUBLISH_TIMEOUT = 10.0
PERSISTENT, TRANSIENT = 2, 1  # AMQP delivery modes
# How long a consumer's ack waits for others to go with it (`_Acks`).
ACK_DELAY_S = 0.02
# How often a publish looks again for a channel that closed and is being reopened.
RECONNECT_POLL_S = 0.05
# How long each broker step of a shutdown (cancel, last acks, close) may take. While the broker
# is unreachable a robust channel waits for the reconnection; a stop must not wait with it.
STOP_STEP_TIMEOUT = 5.0

# Seconds; publishes and handlers on a quiet machine take 0.2-20 ms.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PublishRefusedError(RuntimeError):
    """The broker nacked a publish, or returned a mandatory one that no queue takes."""


class LinkDownError(ConnectionError):
    """The link to RabbitMQ is down (a cut, a broker restart) and the publisher does not wait for
    it: nothing published now could be confirmed."""


class RejectDeliveryError(Exception):
    """Raised by a `Consumer`'s handler for a delivery that can never succeed (only a producer
    of another version could send it): rejected without requeue, so the queue dead-letters it at
    once instead of after its delivery limit."""


@dataclass(frozen=True, slots=True)
class AmqpMetrics:
    """The hot paths' Prometheus metrics; one set per registry (`for_registry`)."""

    published: Counter
    publish_seconds: Histogram
    in_flight: Gauge
    consumed: Counter
    handle_seconds: Histogram
    in_process: Gauge

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> AmqpMetrics:
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = _METRICS[registry] = cls._create(registry)
        return metrics

    @classmethod
    def _create(cls, registry: CollectorRegistry) -> AmqpMetrics:
        return cls(
            published=Counter(
                "edgeway_amqp_published_total",
                "Messages published on a hot path, by publisher and outcome "
                "(confirmed, refused: nacked or returned, failed: no answer or no connection)",
                ["publisher", "outcome"],
                registry=registry,
            ),
            publish_seconds=Histogram(
                "edgeway_amqp_publish_seconds",
                "From the start of a publish to the broker's confirm (a wait for room included)",
                ["publisher"],
                buckets=_BUCKETS,
                registry=registry,
            ),
            in_flight=Gauge(
                "edgeway_amqp_publish_in_flight",
                "Publishes started and not yet confirmed",
                ["publisher"],
                registry=registry,
            ),
            consumed=Counter(
                "edgeway_amqp_consumed_total",
                "Deliveries handled on a hot path, by queue and outcome (acked, requeued, "
                "rejected: dead-lettered at once)",
                ["queue", "outcome"],
                registry=registry,
            ),
            handle_seconds=Histogram(
                "edgeway_amqp_handle_seconds",
                "From a delivery's arrival to its ack (waits for the event loop included)",
                ["queue"],
                buckets=_BUCKETS,
                registry=registry,
            ),
            in_process=Gauge(
                "edgeway_amqp_in_process",
                "Deliveries received and not yet acked or requeued",
                ["queue"],
                registry=registry,
            ),
        )


_PROPAGATOR = TraceContextTextMapPropagator()

_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, AmqpMetrics] = weakref.WeakKeyDictionary()


def properties(
    envelope: Envelope, *, durable: bool, headers: Mapping[str, Any] | None = None
) -> spec.Basic.Properties:
    """The AMQP properties that carry `envelope` (as `Envelope.publish_kwargs` does for
    FastStream), plus `headers` of this message."""
    kwargs = envelope.publish_kwargs()
    merged = kwargs["headers"]
    if headers:
        merged = {**merged, **headers}
    return spec.Basic.Properties(
        content_type=kwargs["content_type"],
        headers=merged,
        delivery_mode=PERSISTENT if durable else TRANSIENT,
        correlation_id=kwargs["correlation_id"],
        message_id=kwargs["message_id"],
        message_type=kwargs["message_type"],
    )


class AmqpLink:
    """A process's own robust connection for its per-message paths (apart from FastStream's),
    with one channel for its publishers.

    `start()` connects (retrying until the broker answers, like the FastStream broker);
    publishes made before wait for it. `close()` closes it. `ready` says whether it is
    connected now.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        registry: CollectorRegistry = REGISTRY,
        reconnect_interval: float = 2.0,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`tracer_provider`: only where spans are exported (none: nothing traced)."""
        self.url = url
        self.name = name
        self.metrics = AmqpMetrics.for_registry(registry)
        self.tracer = tracer_provider.get_tracer("edgeway.common.amqp") if tracer_provider else None
        self.reconnect_interval = reconnect_interval
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._started = asyncio.Event()

    async def start(self) -> None:
        while True:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.url,
                    client_properties={"connection_name": f"edgeway-{self.name}-hot"},
                    reconnect_interval=self.reconnect_interval,
                )
                break
            except (OSError, aiormq.exceptions.AMQPError) as exc:
                log.warning("broker not reachable yet", link=self.name, error=repr(exc))
                await asyncio.sleep(self.reconnect_interval)
        self._publish_channel = await self.channel()
        self._started.set()

    async def publish_channel(self, *, hold: bool = True) -> aiormq.Channel:
        """The publishers' channel as it is now. While the link starts or reconnects it waits
        (`hold`) or raises `LinkDownError`.

        It returns only while `ready` is true, and waits by suspending: a caller that loops on
        `while not link.ready: await link.publish_channel()` never spins. (Between a reset
        and aiormq closing the channels, the connection is closed and its channels not yet.)"""
        if not hold and not self.ready:
            raise LinkDownError(f"the {self.name} link to RabbitMQ is down")
        await self._started.wait()
        robust = self._publish_channel
        assert robust is not None
        while True:
            await robust.ready()
            # aiormq's own channel: its `basic_publish` can leave the frame to the writer.
            channel = cast(aiormq.Channel, await robust.get_underlay_channel())
            if not channel.is_closed and self.ready:
                return channel
            # Closed under us, or its connection, and not noticed yet by the robust connection:
            # it reopens them.
            if not hold:
                raise LinkDownError(f"the {self.name} link's publishing channel is closed")
            await asyncio.sleep(RECONNECT_POLL_S)

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError(f"AMQP link {self.name} is not started")
        return self._connection

    @property
    def ready(self) -> bool:
        """Connected now. A connection the broker or the network just dropped is not, even
        before the robust connection has noticed (its transport's connection is closed)."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        transport = connection.transport
        return transport is not None and not transport.connection.is_closed

    async def channel(self, *, prefetch: int = 0) -> AbstractRobustChannel:
        """A channel of its own (restored after a reconnection, with its prefetch)."""
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        if prefetch:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    def publisher(
        self, *, window: int = DEFAULT_WINDOW, name: str | None = None, hold: bool = True
    ) -> ConfirmPublisher:
        """A `ConfirmPublisher` on the link's publishing channel, with a window of its own."""
        return ConfirmPublisher(self, name=name or self.name, window=window, hold=hold)

    async def close(self) -> None:
        self._started.clear()
        if self._connection is not None:
            connection, self._connection, self._publish_channel = self._connection, None, None
            try:
                await asyncio.wait_for(connection.close(), STOP_STEP_TIMEOUT)
            except TimeoutError:
                log.warning("the AMQP connection did not close in time", link=self.name)


class ConfirmPublisher:
    """Confirmed publishes on one channel, up to `window` unconfirmed at once (see the module).

    `publish` waits for room in the window, then for the confirm. `submit` starts a publish
    now, in order, and returns its task: for a caller that keeps its own queue and waits for room
    first (`wait_room`), so that what waits stays in its queue. `hold`: while the link is down, a
    publish waits for it (up to `timeout`); without, it fails at once with `LinkDownError`.
    """

    def __init__(
        self,
        link: AmqpLink,
        *,
        name: str,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        hold: bool = True,
    ) -> None:
        self.link = link
        self.window = window
        self.timeout = timeout
        self.hold = hold
        metrics = link.metrics
        self._published = {
            outcome: metrics.published.labels(name, outcome)
            for outcome in ("confirmed", "refused", "failed")
        }
        self._seconds = metrics.publish_seconds.labels(name)
        self._in_flight_gauge = metrics.in_flight.labels(name)
        self.in_flight = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._promised = 0  # places given to woken waiters that have not resumed yet

    def has_room(self) -> bool:
        return self.in_flight + self._promised < self.window and not self._waiting

    async def wait_room(self) -> None:
        """Until a publish started now would not exceed the window (first come, first served).
        The caller starts its publish before it awaits anything else."""
        if self.has_room():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._promised -= 1  # woken, then cancelled: pass the place on
                self._wake()
            raise
        self._promised -= 1

    async def publish(
        self,
        body: bytes,
        *,
        envelope: Envelope,
        exchange: str,
        routing_key: str = "",
        durable: bool,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish one message; returns once the broker confirmed it.

        Durable work is persistent and mandatory (a message no queue takes raises
        `PublishRefusedError`); live results are transient and may find no listener.
        """
        started = time.perf_counter()
        tracer = self.link.tracer
        span: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext()
            if tracer is None
            else tracer.start_as_current_span(
                f"{exchange or 'default'} publish",
                kind=trace.SpanKind.PRODUCER,
                attributes={"messaging.message.id": envelope.message_id},
            )
        )
        with span:
            if tracer is not None:
                headers = _traced(headers)
            await self.wait_room()
            self._take()
            await self._send(
                body,
                properties(envelope, durable=durable, headers=headers),
                exchange=exchange,
                routing_key=routing_key,
                mandatory=durable,
                started=started,
            )

    def submit(
        self,
        body: bytes,
        *,
        envelope: Envelope,
        exchange: str,
        routing_key: str = "",
        durable: bool,
        headers: Mapping[str, Any] | None = None,
        prepared: spec.Basic.Properties | None = None,
        context: Context | None = None,
    ) -> asyncio.Task[None]:
        """Start one publish now (taking a place in the window even if it is full); its task
        ends once the broker confirmed it. Publishes submitted in order go out in order.

        `prepared`: the message's AMQP properties as the caller built them (for instance
        marshalled once for many messages; they must carry what `envelope` would), used as they
        are where nothing is traced. `context`: where traced, the publish gets a PRODUCER span
        of its own under this context (that of the delivery it reports, say, when it is started
        elsewhere); without it, the current context goes into the headers."""
        tracer = self.link.tracer
        if tracer is not None:
            prepared = None  # the span's context goes into the headers
            if context is not None:
                self._take()
                return asyncio.create_task(
                    self._send_traced(
                        tracer,
                        context,
                        body,
                        envelope=envelope,
                        exchange=exchange,
                        routing_key=routing_key,
                        durable=durable,
                        headers=headers,
                    )
                )
            headers = _traced(headers)
        self._take()
        return asyncio.create_task(
            self._send(
                body,
                prepared or properties(envelope, durable=durable, headers=headers),
                exchange=exchange,
                routing_key=routing_key,
                mandatory=durable,
                started=time.perf_counter(),
            )
        )

    async def _send_traced(
        self,
        tracer: trace.Tracer,
        context: Context,
        body: bytes,
        *,
        envelope: Envelope,
        exchange: str,
        routing_key: str,
        durable: bool,
        headers: Mapping[str, Any] | None,
    ) -> None:
        started = time.perf_counter()
        with tracer.start_as_current_span(
            f"{exchange or 'default'} publish",
            context=context,
            kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.message.id": envelope.message_id},
        ):
            await self._send(
                body,
                properties(envelope, durable=durable, headers=_traced(headers)),
                exchange=exchange,
                routing_key=routing_key,
                mandatory=durable,
                started=started,
            )

    async def _send(
        self,
        body: bytes,
        props: spec.Basic.Properties,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        started: float,
    ) -> None:
        """One publish whose place in the window is taken (`_take`); gives it back."""
        try:
            async with asyncio.timeout(self.timeout):
                # Waits while the connection is being restored (if it holds); no suspension
                # when it is up, so publishes started in order reach the channel's lock in order.
                channel = await self.link.publish_channel(hold=self.hold)
                confirmation = await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=props,
                    mandatory=mandatory,
                    wait=False,  # the frame is queued for the socket; the confirm is the answer
                )
        except aiormq.exceptions.PublishError as exc:
            self._published["refused"].inc()
            raise PublishRefusedError(f"no queue takes {exchange!r}/{routing_key!r}") from exc
        except BaseException:
            self._published["failed"].inc()
            raise
        finally:
            self.in_flight -= 1
            self._in_flight_gauge.dec()
            if self._waiting:
                self._wake()
        if not isinstance(confirmation, spec.Basic.Ack):
            self._published["refused"].inc()
            raise PublishRefusedError(f"the broker did not take the message: {confirmation!r}")
        self._published["confirmed"].inc()
        self._seconds.observe(time.perf_counter() - started)

    def _take(self) -> None:
        self.in_flight += 1
        self._in_flight_gauge.inc()

    def _wake(self) -> None:
        while self._waiting and self.in_flight + self._promised < self.window:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._promised += 1


def _traced(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """`headers` with the current span's `traceparent` (over the envelope's)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return {**(headers or {}), **carrier}


class Delivery:
    """One delivery as a `Consumer`'s handler reads it: aiormq's message, with the properties
    the handlers use under the names aio-pika's `IncomingMessage` gives them."""

    __slots__ = (
        "body",
        "channel",
        "content_type",
        "correlation_id",
        "delivery_tag",
        "headers",
        "message_id",
        "redelivered",
        "routing_key",
        "type",
    )

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        deliver = message.delivery
        # Consumed, never fetched or returned: a Basic.Deliver, which carries its tag.
        assert isinstance(deliver, spec.Basic.Deliver)
        assert deliver.delivery_tag is not None
        props = message.header.properties
        self.body: bytes = message.body
        self.channel: aiormq.abc.AbstractChannel = message.channel
        self.delivery_tag: int = deliver.delivery_tag
        self.redelivered: bool = bool(deliver.redelivered)
        self.routing_key: str = deliver.routing_key or ""
        self.headers: dict[str, Any] = props.headers or {}
        self.message_id: str | None = props.message_id
        self.correlation_id: str | None = props.correlation_id
        self.content_type: str | None = props.content_type
        self.type: str | None = props.message_type


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription:
    """A queue consumed on aiormq's channel under an aio-pika robust channel, again after every
    reconnection (the robust channel restores its queues and bindings, then its reopen callback
    consumes) and after the broker cancels it (its queue deleted, say: tried again until the
    queue is back). aio-pika's own consumer builds an `IncomingMessage` and a second task per
    delivery; here `callback` gets aiormq's message in the one task aiormq starts for it.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        callback: Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]],
        *,
        no_ack: bool = False,
        retry_s: float = 2.0,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.callback = callback
        self.no_ack = no_ack
        self.retry_s = retry_s
        # One tag for the subscription's life, on every channel it consumes on.
        self.tag = f"edgeway.{queue}.{uuid.uuid4().hex[:12]}"
        self._consuming = False
        self._stopping = False
        self._resume: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.channel.reopen_callbacks.add(self._consume_again)
        await self._consume()

    async def _consume(self) -> None:
        underlay = cast(aiormq.Channel, await self.channel.get_underlay_channel())
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        await underlay.basic_consume(
            self.queue, self.callback, no_ack=self.no_ack, consumer_tag=self.tag
        )
        self._consuming = True

    async def _consume_again(self, _channel: object) -> None:
        """The robust channel reopened after a reconnection: consume on its new channel."""
        if not self._stopping:
            await self._consume()

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag != self.tag or self._stopping:
            return
        self._consuming = False
        log.warning("consumer cancelled by the broker; consuming again", queue=self.queue)
        if self._resume is None or self._resume.done():
            self._resume = asyncio.create_task(self._consume_until_stopped())

    async def _consume_until_stopped(self) -> None:
        while not self._stopping and not self._consuming:
            await asyncio.sleep(self.retry_s)
            try:
                await self._consume()
            except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
                log.warning("queue not consumable yet", queue=self.queue, error=repr(exc))

    async def stop(self, *, connected: bool) -> None:
        """Stop consuming (a cancel, when `connected`: the broker took the consumer with a
        connection that is down)."""
        self._stopping = True
        if self._resume is not None:
            self._resume.cancel()
        self.channel.reopen_callbacks.discard(self._consume_again)
        try:
            if not connected:
                raise RuntimeError("the link is down")
            underlay = cast(aiormq.Channel, await self.channel.get_underlay_channel())
            await asyncio.wait_for(underlay.basic_cancel(self.tag), STOP_STEP_TIMEOUT)
        except (aiormq.exceptions.AMQPError, RuntimeError, TimeoutError) as exc:
            log.info("consumer already gone", queue=self.queue, error=repr(exc))


class _Acks:
    """Acks that fall due within `delay` of each other go out as one.

    Each delivery's ack is one `basic.ack multiple` up to the highest tag whose deliveries
    below are all settled, sent `delay` after the first of them fell due, or at once when
    `batch` are due (well under the prefetch, so the broker never waits for them). An ack is
    a frame, a socket write and a wakeup of the broker: at 200 messages a second, one per
    message was every other write of the occupancy service. Nothing waits for an ack (the
    effect is committed, the result published); a crash meanwhile only redelivers what
    consumers are idempotent on. Delivery tags belong to a channel: a channel that closed
    meanwhile takes its acks with it (the broker redelivers those messages).
    """

    def __init__(
        self, on_acked: Callable[[int], None], *, delay: float = ACK_DELAY_S, batch: int = 32
    ) -> None:
        self._on_acked = on_acked
        self._delay = delay
        self._batch = batch
        self._due = 0  # done and not flushed yet, over every channel
        self._timer: asyncio.TimerHandle | None = None
        # Per channel: tags received and not yet acked or nacked, and those of them done.
        self._open: dict[aiormq.abc.AbstractChannel, tuple[set[int], set[int]]] = {}
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        # Acks must reach the channel in the order they were decided: a `multiple` ack that
        # overtook a lower one would leave that one naming an unknown tag, which closes the
        # channel (and redelivers everything unacked). aiormq's write queue is bounded, so two
        # tasks waiting to put may swap; one at a time keeps the order (the lock is FIFO).
        self._order = asyncio.Lock()

    def received(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        self._open.setdefault(channel, (set(), set()))[0].add(tag)

    def done(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        entry = self._open.get(channel)
        if entry is None:
            return
        entry[1].add(tag)
        self._due += 1
        if self._due >= self._batch:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._scheduled:  # the handlers finishing in this turn go with it
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        elif self._timer is None and not self._scheduled:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.flush)

    async def refuse(self, channel: aiormq.abc.AbstractChannel, tag: int, *, requeue: bool) -> None:
        """Nack one delivery (requeued, or to the dead letters), in order with the acks. It
        counts as in hand until its nack is on its way, so no `multiple` ack covers it first."""
        try:
            async with self._order:
                await cast(aiormq.Channel, channel).basic_nack(tag, requeue=requeue, wait=False)
        finally:
            entry = self._open.get(channel)
            if entry is not None:
                entry[0].discard(tag)

    def flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = 0
        for channel, (outstanding, done) in list(self._open.items()):
            if channel.is_closed:
                del self._open[channel]
                continue
            if not done:
                continue
            waiting = outstanding - done
            below = min(waiting) if waiting else None
            due = set(done) if below is None else {tag for tag in done if tag < below}
            if not due:
                continue  # behind a delivery still in hand; acked with it
            outstanding -= due
            done -= due
            # `multiple` acks every delivery of the channel up to the tag that is not settled
            # yet: exactly `due` (those below were acked or nacked before).
            task = asyncio.create_task(self._ack(channel, max(due), len(due)))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _ack(
        self, channel: aiormq.abc.AbstractChannel, tag: int, count: int, *, multiple: bool = True
    ) -> None:
        try:
            async with self._order:
                await cast(aiormq.Channel, channel).basic_ack(tag, multiple=multiple, wait=False)
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
            log.info("acks not sent; the broker redelivers", count=count, error=repr(exc))
            return
        self._on_acked(count)

    async def drain(self) -> None:
        """At the end: send every ack that is due, also those behind a delivery still in
        hand (one by one: a `multiple` ack would take that one too), and wait until they are
        handed to the connection."""
        self.flush()
        for channel, (outstanding, done) in list(self._open.items()):
            for tag in sorted(done):
                task = asyncio.create_task(self._ack(channel, tag, 1, multiple=False))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            outstanding -= done
            done.clear()
        if self._sending:
            await asyncio.wait(set(self._sending))


class Consumer:
    """One queue's deliveries, each handed to `handler` in a task of its own (aiormq's), acked
    once it returns (acks due within 20 ms go out as one, `_Acks`) and requeued when it raises; at
    most `prefetch` at once.

    `start()` consumes from a queue that exists already (its owner declared it: same quorum
    queue, delivery limit and dead letters as FastStream's topology gives it); `stop()` stops
    taking deliveries and waits, up to `grace` seconds, for those in hand.
    """

    def __init__(
        self,
        link: AmqpLink,
        queue: str,
        handler: Handler,
        *,
        prefetch: int,
        grace: float = 10.0,
    ) -> None:
        self.link = link
        self.queue_name = queue
        self.handler = handler
        self.prefetch = prefetch
        self.grace = grace
        metrics = link.metrics
        self._acked = metrics.consumed.labels(queue, "acked")
        self._requeued = metrics.consumed.labels(queue, "requeued")
        self._rejected = metrics.consumed.labels(queue, "rejected")
        self._seconds = metrics.handle_seconds.labels(queue)
        self._in_process_gauge = metrics.in_process.labels(queue)
        self.in_process = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._subscription: Subscription | None = None
        # Acks due together go as one; a quarter of the prefetch goes at once.
        self._acks = _Acks(self._acked.inc, batch=max(1, prefetch // 4))

    async def start(self) -> None:
        channel = await self.link.channel(prefetch=self.prefetch)
        # A passive declare: the queue is its owner's (declared with its arguments already);
        # aio-pika declares it again after a reconnection, with the channel's prefetch.
        await channel.get_queue(self.queue_name, ensure=True)
        self._subscription = Subscription(
            channel, self.queue_name, self._on_delivered, retry_s=self.link.reconnect_interval
        )
        await self._subscription.start()

    async def _on_delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        await self._on_message(Delivery(message))

    async def _on_message(self, message: Delivery) -> None:
        started = time.perf_counter()
        self.in_process += 1
        self._in_process_gauge.inc()
        self._idle.clear()
        channel, tag = message.channel, message.delivery_tag
        self._acks.received(channel, tag)
        try:
            try:
                tracer = self.link.tracer
                if tracer is None:
                    await self.handler(message)
                else:
                    carrier = {k: v for k, v in message.headers.items() if isinstance(v, str)}
                    with tracer.start_as_current_span(
                        f"{self.queue_name} process",
                        context=_PROPAGATOR.extract(carrier),
                        kind=trace.SpanKind.CONSUMER,
                        attributes={"messaging.message.id": message.message_id or ""},
                    ):
                        await self.handler(message)
            except RejectDeliveryError as exc:
                log.error(
                    "delivery rejected to the dead letters",
                    queue=self.queue_name,
                    message_id=message.message_id,
                    error=str(exc),
                )
                await self._acks.refuse(channel, tag, requeue=False)
                self._rejected.inc()
                return
            except Exception as exc:
                # A bug or a message that does not fit (never an outage: handlers ride those
                # out): tried again, until the queue's delivery limit dead-letters it.
                log.exception(
                    "handler failed; requeued",
                    queue=self.queue_name,
                    message_id=message.message_id,
                    error=repr(exc),
                )
                await self._acks.refuse(channel, tag, requeue=True)
                self._requeued.inc()
                return
            self._acks.done(channel, tag)
            self._seconds.observe(time.perf_counter() - started)
        finally:
            self.in_process -= 1
            self._in_process_gauge.dec()
            if not self.in_process:
                self._idle.set()

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.stop(connected=self.link.ready)
            self._subscription = None
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace)
        except TimeoutError:
            log.warning(
                "deliveries still in hand at shutdown; the broker redelivers them",
                queue=self.queue_name,
                count=self.in_process,
            )
        try:
            await asyncio.wait_for(self._acks.drain(), STOP_STEP_TIMEOUT)
        except TimeoutError:
            log.warning("last acks not sent; the broker redelivers", queue=self.queue_name)


__all__ = [
    "DEFAULT_WINDOW",
    "AmqpLink",
    "AmqpMetrics",
    "ConfirmPublisher",
    "Consumer",
    "Delivery",
    "PublishRefusedError",
    "RejectDeliveryError",
    "Subscription",
    "properties",
]
