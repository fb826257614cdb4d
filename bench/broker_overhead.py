"""What each layer between a handler and RabbitMQ costs, per message, on this machine.

Every Edgeway message is published once and consumed once per hop, so these costs are paid on
every hop of every message. Each variant runs in its own process (so CPU time is its own, worker
threads included) against a private virtual host, on a quorum queue like the durable work queues:

- consume: 5000 messages waiting in the queue, consumed with prefetch 128 and acked one by one;
- publish: 5000 persistent, mandatory messages with confirms, 256 in flight.

Variants, from the bare client up to how Edgeway's broker is built (`edgeway.common.broker`):
`aio-pika` alone; FastStream with `message: RabbitMessage` injected by FastDepends (how handlers
were first written); FastStream with `apply_types=False` and the `whole_message` decoder (how they
are now); then with the Prometheus middleware (always on) and the OpenTelemetry middleware (on
when a trace exporter is configured).

`python -m bench.broker_overhead` prints a table and writes bench/results/broker_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from bench.loadgen import run_loop
from edgeway.common.broker import whole_message
from edgeway.common.envelope import Envelope
from edgeway.common.testing import create_vhost, drop_vhost

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGES = 5000
PREFETCH = 128
IN_FLIGHT = 256
BODY = orjson.dumps({"event": "frame_result", "camera": "OW_1", "pad": "x" * 280})  # ~330 B
QUORUM = {"x-queue-type": "quorum"}
# A traceparent as the gateway's middleware writes it, so extraction has work to do.
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

VARIANTS: dict[str, tuple[bool, tuple[str, ...]]] = {
    # name: (FastDepends on, middlewares)
    "faststream, message injected": (True, ("prometheus",)),
    "faststream, plain handler": (False, ()),
    "  + prometheus (always)": (False, ("prometheus",)),
    "  + prometheus + tracing (exporter on)": (False, ("prometheus", "tracing")),
}


def _headers() -> dict[str, Any]:
    envelope = Envelope(type="bench.v1", producer="bench", captured_at=time.time())
    headers: dict[str, Any] = envelope.publish_kwargs()["headers"]
    return {**headers, "traceparent": TRACEPARENT}


def _broker(url: str, *, fastdepends: bool, middlewares: tuple[str, ...]) -> RabbitBroker:
    chosen: list[Any] = []
    if "tracing" in middlewares:
        chosen.append(RabbitTelemetryMiddleware(tracer_provider=TracerProvider()))
    if "prometheus" in middlewares:
        chosen.append(RabbitPrometheusMiddleware(registry=CollectorRegistry()))
    return RabbitBroker(
        url,
        default_channel=Channel(
            prefetch_count=PREFETCH, publisher_confirms=True, on_return_raises=True
        ),
        middlewares=chosen,
        apply_types=fastdepends,
        log_level=logging.DEBUG,
    )


async def _fill(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        declared = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        await declared.purge()
        headers = _headers()
        for _ in range(MESSAGES):
            await channel.default_exchange.publish(
                aio_pika.Message(BODY, headers=headers, delivery_mode=2), routing_key=queue
            )


async def _body(message: StreamMessage[Any]) -> bytes:
    return message.body


async def consume(url: str, variant: str) -> float:
    """CPU seconds per message to consume and ack MESSAGES waiting messages."""
    queue = f"bench-consume-{abs(hash(variant))}"
    await _fill(url, queue)
    done = asyncio.Event()
    seen = 0

    def count() -> None:
        nonlocal seen
        seen += 1
        if seen == MESSAGES:
            done.set()

    started = time.process_time()
    if variant == "aio-pika":
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        declared = await channel.declare_queue(queue, durable=True, arguments=QUORUM)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            count()
            await message.ack()

        started = time.process_time()
        await declared.consume(on_message)
        await done.wait()
        elapsed = time.process_time() - started
        await connection.close()
        return elapsed / MESSAGES
    fastdepends, middlewares = VARIANTS[variant]
    broker = _broker(url, fastdepends=fastdepends, middlewares=middlewares)
    rabbit_queue = RabbitQueue(queue, durable=True, arguments=QUORUM)
    if fastdepends:

        @broker.subscriber(rabbit_queue, ack_policy=AckPolicy.ACK, decoder=_body)
        async def injected(body: bytes, message: RabbitMessage) -> None:
            count()

    else:

        @broker.subscriber(rabbit_queue, ack_policy=AckPolicy.ACK, decoder=whole_message)
        async def plain(message: StreamMessage[Any]) -> None:
            count()

    started = time.process_time()
    await broker.start()
    await done.wait()
    elapsed = time.process_time() - started
    await broker.stop()
    return elapsed / MESSAGES


async def publish(url: str, variant: str) -> float:
    """CPU seconds per message to publish MESSAGES with confirms, IN_FLIGHT at a time."""
    queue = f"bench-publish-{abs(hash(variant))}"
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    declared = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    headers = _headers()
    send: Callable[[], Coroutine[Any, Any, Any]]
    if variant == "aio-pika":

        def send() -> Coroutine[Any, Any, Any]:
            return channel.default_exchange.publish(
                aio_pika.Message(BODY, headers=headers, delivery_mode=2),
                routing_key=queue,
                mandatory=True,
            )

    else:
        fastdepends, middlewares = VARIANTS[variant]
        broker = _broker(url, fastdepends=fastdepends, middlewares=middlewares)
        await broker.start()

        def send() -> Coroutine[Any, Any, Any]:
            return broker.publish(BODY, queue=queue, headers=headers, persist=True, mandatory=True)

    window = asyncio.Semaphore(IN_FLIGHT)
    pending: set[asyncio.Task[Any]] = set()

    def finished(task: asyncio.Task[Any]) -> None:
        pending.discard(task)
        window.release()

    started = time.process_time()
    for _ in range(MESSAGES):
        await window.acquire()
        task = asyncio.create_task(send())
        pending.add(task)
        task.add_done_callback(finished)
    while pending:
        await asyncio.wait(set(pending))
    elapsed = time.process_time() - started
    await declared.delete(if_unused=False, if_empty=False)
    await connection.close()
    return elapsed / MESSAGES


def _measure(url: str, variant: str, out: Any) -> None:
    async def both() -> None:
        out.send((await consume(url, variant), await publish(url, variant)))

    run_loop(both())


def measure(url: str, variant: str) -> tuple[float, float]:
    """(consume, publish) CPU seconds per message, measured in a fresh process."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(
        target=_measure, args=(url, variant, sender)
    )
    process.start()
    result: tuple[float, float] = receiver.recv()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS / "broker_overhead.json")
    args = parser.parse_args()
    vhost, url = create_vhost("bench-broker")
    rows: list[dict[str, Any]] = []
    try:
        for variant in ("aio-pika", *VARIANTS):
            consume_s, publish_s = measure(url, variant)
            rows.append(
                {"variant": variant, "consume_us": consume_s * 1e6, "publish_us": publish_s * 1e6}
            )
    finally:
        drop_vhost(vhost)
    base = rows[0]
    print(f"Broker overhead: CPU µs per message, {MESSAGES} messages, quorum queue")
    print(f"{'variant':40} {'consume':>8} {'publish':>8} {'+ over aio-pika':>16}")
    for row in rows:
        extra = row["consume_us"] + row["publish_us"] - base["consume_us"] - base["publish_us"]
        print(
            f"{row['variant']:40} {row['consume_us']:8.0f} {row['publish_us']:8.0f} {extra:16.0f}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(
        orjson.dumps({"messages": MESSAGES, "rows": rows}, option=orjson.OPT_INDENT_2)
    )
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
