"""Telemetry uploads: alone while the broker keeps up, together while it confirms, in order.

The broker is a recording function here (these are the publisher's rules); the whole path,
through RabbitMQ to the telemetry service, runs in tests/test_telemetry_e2e.py and
services/telemetry/tests/test_flow.py.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from edgeway.common.envelope import Envelope
from edgeway.common.telemetry.uploads import UPLOAD_TYPE, UPLOADS_TYPE, unpack
from edgeway.gateway.metrics import Metrics
from edgeway.gateway.telemetry.publisher import UploadPublisher, UploadsBackloggedError

# The metrics these tests read, on a registry of their own.
METRICS = Metrics.create(CollectorRegistry())


class Broker:
    """Records what is published; each publish waits for `confirm` while it is set up to."""

    def __init__(self) -> None:
        self.published: list[tuple[bytes, Envelope]] = []
        self.hold = False
        self.confirm = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, body: bytes, envelope: Envelope) -> None:
        self.published.append((body, envelope))
        if self.hold:
            await self.confirm.wait()
        if self.fail is not None:
            raise self.fail

    def uploads(self, index: int) -> list[bytes]:
        body, envelope = self.published[index]
        if envelope.type == UPLOADS_TYPE:
            return [upload for upload, _ in unpack(body)]
        return [body]


def upload(number: int) -> tuple[bytes, Envelope]:
    envelope = Envelope(type=UPLOAD_TYPE, producer="logger", headers={"x-vehicle-vin": "V"})
    return f"upload {number}".encode(), envelope


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_upload_that_finds_the_broker_idle_goes_alone_and_unchanged() -> None:
    broker = Broker()
    publisher = UploadPublisher(broker, window=2, metrics=METRICS)
    body, envelope = upload(1)
    await publisher.publish(body, envelope)
    assert broker.published == [(body, envelope)]


async def test_uploads_arriving_during_confirms_go_together_in_order() -> None:
    broker = Broker()
    broker.hold = True
    publisher = UploadPublisher(broker, window=1, metrics=METRICS)
    sent = [upload(n) for n in range(6)]
    tasks = [asyncio.create_task(publisher.publish(*item)) for item in sent]
    await settle()
    assert len(broker.published) == 1  # the first, alone; five wait for its confirm
    assert publisher.waiting == 5
    assert not any(task.done() for task in tasks)

    broker.confirm.set()  # every confirm from now on comes at once
    await asyncio.gather(*tasks)
    assert [broker.uploads(i) for i in range(len(broker.published))] == [
        [b"upload 0"],
        [b"upload 1", b"upload 2", b"upload 3", b"upload 4", b"upload 5"],
    ]
    batch_body, carrier = broker.published[1]
    assert carrier.type == UPLOADS_TYPE
    # Each upload keeps its own envelope: its id is what the service is idempotent on.
    assert [envelope.message_id for _, envelope in unpack(batch_body)] == [
        envelope.message_id for _, envelope in sent[1:]
    ]
    assert [dict(envelope.headers) for _, envelope in unpack(batch_body)] == [
        {"x-vehicle-vin": "V"}
    ] * 5


@pytest.mark.parametrize(
    ("max_uploads", "max_bytes", "sizes"),
    [
        (3, 1_000, [1, 3, 3, 1]),  # by count
        (10, 20, [1, 2, 2, 2, 1]),  # by bytes: 8-byte bodies, two to 20 bytes
    ],
)
async def test_a_batch_is_bounded_by_count_and_bytes(
    max_uploads: int, max_bytes: int, sizes: list[int]
) -> None:
    broker = Broker()
    broker.hold = True
    publisher = UploadPublisher(
        broker, window=1, max_uploads=max_uploads, max_bytes=max_bytes, metrics=METRICS
    )
    tasks = [asyncio.create_task(publisher.publish(*upload(n))) for n in range(8)]
    await settle()
    broker.confirm.set()
    await asyncio.gather(*tasks)
    assert [len(broker.uploads(i)) for i in range(len(broker.published))] == sizes


async def test_a_failed_publish_fails_every_upload_it_carried_and_the_next_goes_on() -> None:
    broker = Broker()
    broker.hold = True
    publisher = UploadPublisher(broker, window=1, metrics=METRICS)
    tasks = [asyncio.create_task(publisher.publish(*upload(n))) for n in range(4)]
    await settle()
    broker.fail = ConnectionError("broker gone")
    broker.confirm.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    assert len(broker.published) == 2  # one alone, then the other three together

    broker.fail = None
    await publisher.publish(*upload(9))
    assert broker.uploads(2) == [b"upload 9"]


async def test_a_client_that_leaves_does_not_take_its_upload_out() -> None:
    broker = Broker()
    broker.hold = True
    publisher = UploadPublisher(broker, window=1, metrics=METRICS)
    first = asyncio.create_task(publisher.publish(*upload(0)))
    left = asyncio.create_task(publisher.publish(*upload(1)))
    await settle()
    left.cancel()
    with pytest.raises(asyncio.CancelledError):
        await left
    broker.confirm.set()
    await first
    await settle()
    assert broker.uploads(1) == [b"upload 1"]  # accepted before the client left: still sent


@pytest.mark.parametrize(
    ("max_waiting", "max_waiting_bytes", "taken"),
    [
        (3, 1_000, 3),  # by count
        (100, 20, 2),  # by bytes: 8-byte bodies, two to 20 bytes
    ],
)
async def test_uploads_beyond_the_waiting_bound_are_refused_at_once(
    max_waiting: int, max_waiting_bytes: int, taken: int
) -> None:
    broker = Broker()
    broker.hold = True
    publisher = UploadPublisher(
        broker,
        window=1,
        max_waiting=max_waiting,
        max_waiting_bytes=max_waiting_bytes,
        metrics=METRICS,
    )
    in_flight = asyncio.create_task(publisher.publish(*upload(0)))
    waiting = [asyncio.create_task(publisher.publish(*upload(n))) for n in range(1, 1 + taken)]
    await settle()
    assert (publisher.waiting, publisher.waiting_bytes) == (taken, 8 * taken)
    # Refused at once, not queued: its client gets 503 now and keeps the upload.
    with pytest.raises(UploadsBackloggedError, match=f"{taken} uploads"):
        await publisher.publish(*upload(99))
    assert publisher.waiting == taken

    broker.confirm.set()
    await asyncio.gather(in_flight, *waiting)
    assert publisher.waiting_bytes == 0
    assert b"upload 99" not in [
        body for i in range(len(broker.published)) for body in broker.uploads(i)
    ]
    await publisher.publish(*upload(100))  # room again
    assert broker.uploads(len(broker.published) - 1) == [b"upload 100"]


async def test_an_upload_that_finds_none_waiting_is_taken_whatever_its_size() -> None:
    broker = Broker()
    broker.hold = True
    publisher = UploadPublisher(
        broker, window=1, max_waiting=4, max_waiting_bytes=4, metrics=METRICS
    )
    first = asyncio.create_task(publisher.publish(*upload(0)))
    second = asyncio.create_task(publisher.publish(b"x" * 64, upload(1)[1]))
    await settle()
    assert publisher.waiting == 1
    with pytest.raises(UploadsBackloggedError):
        await publisher.publish(*upload(2))
    broker.confirm.set()
    await asyncio.gather(first, second)
