"""`edgeway-dead-letters`: see what the work queues dead-lettered, and move it back.

    edgeway-dead-letters list
    edgeway-dead-letters requeue edgeway.occupancy.observations [--limit 100]

A durable message is dead-lettered when it failed its queue's delivery limit (5 deliveries): a
message no consumer could take (a bug, a schema that did not fit). Once the cause is fixed, an
operator moves it back to its work queue, where it is taken as new. Each is published to the
work queue, confirmed by the broker, and only then removed from the dead letters; a crash in
between leaves a second copy, which the consumers take once (they are idempotent on the
message id, which is kept). The broker is EDGEWAY_AMQP_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from edgeway.common.settings import CommonSettings
from edgeway.common.topology import Topology

# Headers the broker writes on a dead-lettered copy; a requeued message starts afresh.
BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                  "x-first-death-reason", "x-delivery-count")  # fmt: skip
REQUEUED_HEADER = "x-requeued-from"


async def _dead_count(channel: AbstractChannel, topology: Topology, work: str) -> int:
    dead = topology.dead_letter_queue(work)
    queue = await channel.declare_queue(dead.name, passive=True)
    count: int = queue.declaration_result.message_count or 0
    return count


async def counts(url: str, topology: Topology) -> dict[str, int]:
    """Dead-lettered messages waiting, per work queue (queues never declared are left out)."""
    found: dict[str, int] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        for work in topology.work_queues:
            channel = await connection.channel()  # a passive miss closes its channel
            try:
                found[work.name] = await _dead_count(channel, topology, work.name)
            except aio_pika.exceptions.ChannelClosed:
                continue
    return found


async def requeue(url: str, topology: Topology, work: str, *, limit: int | None = None) -> int:
    """Move up to `limit` dead letters of `work` back to it, oldest first; how many moved."""
    if work not in {queue.name for queue in topology.work_queues}:
        raise ValueError(f"{work} is not a work queue; these are: {_names(topology)}")
    moved = 0
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await channel.declare_queue(topology.dead_letter_queue(work).name, passive=True)
        while limit is None or moved < limit:
            message = await dead.get(no_ack=False, fail=False)
            if message is None:
                break
            headers: dict[str, Any] = {
                key: value for key, value in message.headers.items() if key not in BROKER_HEADERS
            }
            headers[REQUEUED_HEADER] = dead.name
            copy = aio_pika.Message(
                message.body,
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=message.priority,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                message_id=message.message_id,
                timestamp=message.timestamp,
                type=message.type,
                user_id=message.user_id,
                app_id=message.app_id,
            )
            # Straight to the queue (the default exchange routes by queue name), confirmed.
            await channel.default_exchange.publish(copy, routing_key=work, mandatory=True)
            await message.ack()
            moved += 1
    return moved


def _names(topology: Topology) -> str:
    return ", ".join(queue.name for queue in topology.work_queues)


def main(argv: list[str] | None = None) -> int:
    topology = Topology(CommonSettings().exchanges)
    parser = argparse.ArgumentParser(
        prog="edgeway-dead-letters", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="dead letters waiting, per work queue")
    back = commands.add_parser("requeue", help="move a work queue's dead letters back to it")
    back.add_argument("queue", help=f"the work queue: {_names(topology)}")
    back.add_argument("--limit", type=int, default=None, help="at most this many (oldest first)")
    args = parser.parse_args(argv)
    url = CommonSettings().amqp_url
    if args.command == "list":
        for work, waiting in asyncio.run(counts(url, topology)).items():
            sys.stdout.write(f"{work}\t{waiting}\n")
        return 0
    try:
        moved = asyncio.run(requeue(url, topology, args.queue, limit=args.limit))
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(f"moved {moved} message(s) back to {args.queue}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
