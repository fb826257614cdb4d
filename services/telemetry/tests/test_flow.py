"""The telemetry service as it runs: a real process between the real RabbitMQ and PostgreSQL.

A test plays the gateway's side: it publishes protobuf uploads to `edgeway.telemetry.raw` with
the contract's headers (as the gateway does after `POST /telemetry`), listens on the broadcast
exchange, and asks history, status and vehicles over request/reply. The loggers' side is the
shared encoder (`edgeway.common.telemetry`), fed with a small generated drive.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import psycopg
import pytest
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed
from faststream.rabbit import RabbitBroker, RabbitQueue
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from edgeway.common.broker import declare_shared, declare_work
from edgeway.common.db import make_engine
from edgeway.common.envelope import Envelope, new_message_id
from edgeway.common.settings import async_database_url
from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import (
    FIELDS,
    Decoded,
    Decoder,
    Encoder,
    Packet,
    PredictorConfig,
    Sample,
)
from edgeway.common.telemetry.uploads import UPLOADS_TYPE, pack
from edgeway.common.testing import POSTGRES_ADMIN_URL, ServiceProcess, free_port
from edgeway.common.topology import Channels, Topology
from edgeway.telemetry.domain import RECORD_TYPE, UPLOAD_TYPE
from edgeway.telemetry.flows import DB_RETRY_DELAYS
from edgeway.telemetry.settings import DEMO_VINS, SEED_VIN

pytestmark = pytest.mark.connected

TOPOLOGY = Topology()
# Long enough for a broker round trip and a commit on a loaded CI machine; a pass takes far less.
WAIT = 15.0
PERIOD_MS = 300  # the seed logger's replay period
PROTOBUF = "application/x-protobuf"


def drive(count: int, *, start_ms: int, seed: int = 7) -> list[Sample]:
    """A plausible drive: speed wandering around 40 mph, turns through north, regen on braking."""
    rng = random.Random(seed)
    speed, battery, odometer, heading = 40.0, 80.0, 12_000.0, 350.0
    samples = []
    for i in range(count):
        change = rng.uniform(-3.0, 3.0)
        speed = min(max(speed + change, 0.0), 90.0)
        power = 0.35 * speed + (8.0 * change if change > 0 else 4.0 * change)
        battery = max(battery - 0.002 * max(power, 0.0), 5.0)
        odometer += speed * PERIOD_MS / 3_600_000
        heading = (heading + rng.uniform(-4.0, 4.0)) % 360
        samples.append(Sample(start_ms + i * PERIOD_MS, speed, battery, power, odometer, heading))
    return samples


def encode_all(samples: Sequence[Sample]) -> list[Packet]:
    encoder = Encoder()
    return [encoder.encode(sample) for sample in samples]


def expected(packets: Sequence[Packet]) -> list[Decoded]:
    """What a decoder that saw every packet makes of them (the service's predictor config)."""
    decoder = Decoder(PredictorConfig())
    return [decoder.decode(packet) for packet in packets]


def now_ms() -> int:
    return int(time.time() * 1000)


class Gateway:
    """The gateway's side of the service, on one broker connection."""

    def __init__(self, broker: RabbitBroker, listener: AbstractQueue) -> None:
        self.broker = broker
        self.listener = listener
        self.received: list[AbstractIncomingMessage] = []

    async def upload(
        self,
        body: bytes,
        *,
        vin: str = SEED_VIN,
        compressed: bool = True,
        batch: bool = False,
        message_id: str | None = None,
        received_at: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Publish an upload as the gateway does after a logger's POST /telemetry."""
        envelope = Envelope(
            type=UPLOAD_TYPE,
            producer="gateway",
            message_id=message_id or new_message_id(),
            content_type=PROTOBUF,
            received_at=time.time() if received_at is None else received_at,
        )
        kwargs = envelope.publish_kwargs()
        kwargs["headers"] |= {
            "x-vehicle-vin": vin,
            "x-compressed": "true" if compressed else "false",
            "x-batch": "true" if batch else "false",
        } | (headers or {})
        await self.broker.publish(
            body, exchange=TOPOLOGY.telemetry_raw, persist=True, mandatory=True, **kwargs
        )
        return envelope.message_id

    async def upload_together(self, uploads: Sequence[tuple[bytes, str]]) -> list[str]:
        """Several uploads (body, VIN) in one message, as a busy gateway sends them; their ids."""
        envelopes = [
            Envelope(
                type=UPLOAD_TYPE,
                producer="gateway",
                content_type=PROTOBUF,
                headers={"x-vehicle-vin": vin, "x-compressed": "true", "x-batch": "false"},
            )
            for _, vin in uploads
        ]
        carrier = Envelope(type=UPLOADS_TYPE, producer="gateway", content_type=PROTOBUF)
        await self.broker.publish(
            pack(
                [(body, envelope) for (body, _), envelope in zip(uploads, envelopes, strict=True)]
            ),
            exchange=TOPOLOGY.telemetry_raw,
            persist=True,
            mandatory=True,
            **carrier.publish_kwargs(),
        )
        return [envelope.message_id for envelope in envelopes]

    async def send(
        self, packets: Sequence[Packet], *, vin: str = SEED_VIN, received_at: float | None = None
    ) -> list[str]:
        """One upload per packet, as the seed's logger posts them."""
        return [
            await self.upload(wire.encode_packet(packet), vin=vin, received_at=received_at)
            for packet in packets
        ]

    async def broadcasts(self, count: int, within: float = WAIT) -> list[AbstractIncomingMessage]:
        """The next `count` record broadcasts, in the order they arrived."""
        deadline = time.monotonic() + within
        while len(self.received) < count:
            incoming = await self.listener.get(no_ack=True, fail=False)
            if incoming is not None:
                self.received.append(incoming)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received)} of {count} broadcasts in {within}s")
            await asyncio.sleep(0.02)
        taken, self.received = self.received[:count], self.received[count:]
        return taken

    async def nothing_more(self, within: float = 1.5) -> None:
        """No broadcast arrives for a while (after something that must broadcast nothing)."""
        with pytest.raises(TimeoutError):
            await self.broadcasts(1, within=within)

    async def ask(self, query: dict[str, Any]) -> Any:
        reply = await self.broker.request(
            orjson.dumps(query), queue=TOPOLOGY.telemetry_requests_queue.name, timeout=WAIT
        )
        return orjson.loads(reply.body)


def telemetry_process(
    amqp_url: str, postgres_url: str, tmp_path: Path, **env: str
) -> ServiceProcess:
    return ServiceProcess(
        "edgeway.telemetry",
        env={
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_TELEMETRY_DATABASE_URL": postgres_url,
            "EDGEWAY_DATA_DIR": str(tmp_path / "var"),
            **env,
        },
        port=free_port(),
        log_path=tmp_path / "telemetry.log",
    )


@pytest.fixture
def service(amqp_url: str, postgres_url: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    process = telemetry_process(amqp_url, postgres_url, tmp_path)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture
def start_service(
    amqp_url: str, postgres_url: str, tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start the service later in the test, with extra settings (uploads may wait for it)."""
    started: list[ServiceProcess] = []

    def start(**env: str) -> ServiceProcess:
        process = telemetry_process(amqp_url, postgres_url, tmp_path, **env)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture
async def gateway(amqp_url: str, service: ServiceProcess) -> AsyncIterator[Gateway]:
    async with RabbitBroker(amqp_url) as broker:
        await broker.connect()
        listener = await broker.declare_queue(
            RabbitQueue(f"test.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        )
        broadcast = await broker.declare_exchange(TOPOLOGY.broadcast)
        await listener.bind(broadcast, routing_key=Channels.TELEMETRY_VEHICLES)
        yield Gateway(broker, listener)


@pytest.fixture
async def db(postgres_url: str, service: ServiceProcess) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(async_database_url(postgres_url, service="telemetry", data_dir=Path()))
    yield engine
    await engine.dispose()


async def query(db: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with db.connect() as connection:
        return list((await connection.execute(text(sql), params)).all())


async def eventually(db: AsyncEngine, sql: str, wanted: Any, **params: Any) -> None:
    deadline = time.monotonic() + WAIT
    while (rows := await query(db, sql, **params)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"{sql}: {rows} != {wanted}")
        await asyncio.sleep(0.1)


def metric_sum(service: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (values: prefixes)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(service.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(key, "").startswith(value) for key, value in labels.items()
            ):
                total += sample.value
    return total


def metric(service: ServiceProcess, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    line = f"{name}{{{selector}}} " if selector else f"{name} "
    for row in httpx.get(service.url + "/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.removeprefix(line))
    raise AssertionError(f"no {line!r} in /metrics")


def bodies(messages: Sequence[AbstractIncomingMessage]) -> list[dict[str, Any]]:
    return [orjson.loads(message.body) for message in messages]


def data(decoded: Decoded) -> dict[str, Any]:
    sample = decoded.sample
    return {
        "timestamp": sample.timestamp_ms,
        "speed": sample.speed,
        "battery": sample.battery,
        "power": sample.power,
        "odometer": sample.odometer,
        "heading": float(sample.heading),
    }


# --- the stream -----------------------------------------------------------------------------------


async def test_a_compressed_stream_is_reconstructed_stored_and_broadcast_in_the_seeds_shape(
    gateway: Gateway, db: AsyncEngine, service: ServiceProcess
) -> None:
    packets = encode_all(drive(40, start_ms=now_ms() - 12_000))
    truth = expected(packets)
    assert any(packet.speed is None for packet in packets)  # the drive does compress
    received_at = now_ms() / 1000  # whole ms: the same instant after the header's round trip
    message_ids = await gateway.send(packets, received_at=received_at)
    sent = await gateway.broadcasts(len(packets))

    first = sent[0]
    assert first.routing_key == Channels.telemetry_vehicle(SEED_VIN)
    assert first.type == RECORD_TYPE
    assert first.correlation_id == message_ids[0]
    assert first.delivery_mode == DeliveryMode.NOT_PERSISTENT
    skipped = 0
    for index, (message, decoded) in enumerate(zip(bodies(sent), truth, strict=True)):
        skipped += len(decoded.reconstructed)
        total = 4 * (index + 1)
        assert message == {
            "type": "telemetry",
            "data": data(decoded)
            | {
                "received_at": datetime.fromtimestamp(received_at, UTC).isoformat(
                    timespec="microseconds"
                )
            },
            "vehicle_vin": "000001",
            "vin": SEED_VIN,
            "compression_stats": {
                "total_readings": total,
                "transmitted_readings": total - skipped,
                "skipped_readings": skipped,
                "compression_ratio": round(skipped / total * 100, 2),
            },
            "reconstructed": [name for name in FIELDS if name in decoded.reconstructed],
            "uncertain": False,
        }
    assert skipped > 0

    rows = await query(
        db,
        "SELECT timestamp_ms, speed, battery, power, odometer, heading, reconstructed, uncertain,"
        " sequence, predictor_version, compressed FROM telemetry ORDER BY id",
    )
    assert [tuple(row[:6]) for row in rows] == [tuple(data(d).values()) for d in truth]
    masks = [sum(1 << FIELDS.index(name) for name in d.reconstructed) for d in truth]
    assert [row.reconstructed for row in rows] == masks
    assert [row.sequence for row in rows] == list(range(1, 41))
    assert [row.predictor_version for row in rows] == [
        1 if packet.is_resync else None for packet in packets
    ]
    assert all(row.compressed and not row.uncertain for row in rows)
    stats = await query(
        db,
        "SELECT total_packets, transmitted_fields, skipped_fields, bandwidth_saved_percent"
        " FROM compression_stats",
    )
    assert stats == [(40, 160 - skipped, skipped, pytest.approx(skipped / 160 * 100))]
    state = await query(db, "SELECT revision, timestamp_ms, sequence FROM vehicle_state")
    assert [(row.timestamp_ms, row.sequence) for row in state] == [(packets[-1].timestamp_ms, 40)]
    assert metric(service, "edgeway_telemetry_records_total", outcome="stored") == 40.0


async def test_a_redelivered_or_replayed_upload_stores_nothing_twice(
    gateway: Gateway, db: AsyncEngine, service: ServiceProcess
) -> None:
    packets = encode_all(drive(60, start_ms=now_ms() - 20_000, seed=3))
    truth = expected(packets)
    first = await gateway.upload(wire.encode_batch(packets[:50]), batch=True)
    sent = await gateway.broadcasts(50)
    # One batch, broadcast record by record in record order.
    assert [message["data"] for message in bodies(sent)] == [
        data(d) | {"received_at": message["data"]["received_at"]}
        for d, message in zip(truth[:50], bodies(sent), strict=True)
    ]

    # The broker redelivers it (same message id), then the logger, which never got its 202,
    # uploads the last ten again together with ten new ones.
    await gateway.upload(wire.encode_batch(packets[:50]), batch=True, message_id=first)
    await gateway.upload(wire.encode_batch(packets[40:60]), batch=True)
    sent = await gateway.broadcasts(10)
    assert [m["data"]["timestamp"] for m in bodies(sent)] == [p.timestamp_ms for p in packets[50:]]
    assert [m["data"]["speed"] for m in bodies(sent)] == [d.sample.speed for d in truth[50:]]
    await gateway.nothing_more()

    assert await query(db, "SELECT count(*), count(DISTINCT timestamp_ms) FROM telemetry") == [
        (60, 60)
    ]
    assert await query(db, "SELECT total_packets FROM compression_stats") == [(60,)]
    assert metric(service, "edgeway_telemetry_records_total", outcome="duplicate") == 60.0
    assert metric(service, "edgeway_telemetry_records_total", outcome="stored") == 60.0

    # A packet older than the vehicle's last record that was never stored is no duplicate: it
    # came too late to decode, and is kept with its upload's bytes instead of being dropped.
    straggler = replace(packets[20], timestamp_ms=packets[20].timestamp_ms + 1)
    body = wire.encode_batch([packets[59], straggler])
    late = await gateway.upload(body, batch=True)
    await eventually(
        db,
        "SELECT code, payload FROM rejections WHERE message_id = :id",
        [("out_of_order", body)],
        id=late,
    )
    assert await query(db, "SELECT count(*) FROM telemetry") == [(60,)]
    assert metric(service, "edgeway_telemetry_records_total", outcome="duplicate") == 61.0
    assert metric(service, "edgeway_telemetry_records_total", outcome="rejected") == 1.0


async def test_malformed_uploads_are_kept_as_rejections_and_the_stream_goes_on(
    gateway: Gateway, db: AsyncEngine, service: ServiceProcess
) -> None:
    packets = encode_all(drive(3, start_ms=now_ms() - 2_000))
    good = wire.encode_packet(packets[0])
    speeding = wire.encode_sample(Sample(now_ms() - 1500, 400.0, 50.0, 10.0, 100.0, 90.0))
    garbage = b"\xff\xff\xff\xff not protobuf"
    rejected = {
        await gateway.upload(garbage): ("invalid_payload", SEED_VIN, garbage),
        await gateway.upload(good, vin="1HGCM82633A004352"): (
            "unknown_vehicle",
            "1HGCM82633A004352",
            good,
        ),
        await gateway.upload(good, vin="not-a-vin"): ("invalid_vin", "not-a-vin", good),
        await gateway.upload(speeding, compressed=False): ("invalid_payload", SEED_VIN, speeding),
        await gateway.upload(good, headers={"x-compressed": "maybe"}): (
            "invalid_header",
            SEED_VIN,
            good,
        ),
    }
    await gateway.send(packets)
    sent = bodies(await gateway.broadcasts(3))
    assert [message["data"]["timestamp"] for message in sent] == [p.timestamp_ms for p in packets]

    rows = await query(db, "SELECT message_id, code, vehicle_vin, payload, reason FROM rejections")
    assert {row.message_id: (row.code, row.vehicle_vin, row.payload) for row in rows} == rejected
    reasons = {row.code: row.reason for row in rows}
    assert "vehicle_speed = 400 is outside [0, 300] mph" in {
        row.reason for row in rows if row.payload == speeding
    }
    assert "1HGCM82633A004352" in reasons["unknown_vehicle"]
    assert await query(db, "SELECT count(*) FROM telemetry") == [(3,)]
    assert metric(service, "edgeway_telemetry_rejected_uploads_total", code="invalid_payload") == 2
    assert (
        metric(service, "edgeway_telemetry_records_total", outcome="rejected") == 1
    )  # unknown car


async def test_uploads_sent_together_are_taken_in_order_each_on_its_own(
    gateway: Gateway, db: AsyncEngine, service: ServiceProcess
) -> None:
    """A busy gateway puts several uploads in one message: each is stored, rejected and counted
    as if it had come alone, in the message's order; an unreadable message is set aside."""
    cars = {SEED_VIN: encode_all(drive(6, start_ms=now_ms() - 4_000, seed=1))}
    cars[DEMO_VINS[0]] = encode_all(drive(6, start_ms=now_ms() - 4_000, seed=2))
    garbage = b"\xff\xff not protobuf"
    uploads = [(wire.encode_packet(cars[vin][index]), vin) for index in range(6) for vin in cars]
    uploads.insert(5, (garbage, SEED_VIN))
    ids = await gateway.upload_together(uploads)
    sent = await gateway.broadcasts(12)
    assert [(m.routing_key, orjson.loads(m.body)["data"]["timestamp"]) for m in sent] == [
        (Channels.telemetry_vehicle(vin), packet.timestamp_ms)
        for index in range(6)
        for vin, packets in cars.items()
        for packet in packets[index : index + 1]
    ]
    for vin, packets in cars.items():
        stored = await query(
            db,
            "SELECT t.timestamp_ms FROM telemetry t JOIN vehicles v ON v.id = t.vehicle_id"
            " WHERE v.vin = :vin ORDER BY t.id",
            vin=vin,
        )
        assert [row.timestamp_ms for row in stored] == [p.timestamp_ms for p in packets]
    rejected = await query(db, "SELECT message_id, code FROM rejections")
    assert rejected == [(ids[5], "invalid_payload")]
    assert metric(service, "edgeway_telemetry_records_total", outcome="stored") == 12.0

    # A message that is no batch at all (only a gateway of another version could send one) is
    # rejected to the dead letters; the uploads after it go on.
    carrier = Envelope(type=UPLOADS_TYPE, producer="gateway", content_type=PROTOBUF)
    await gateway.broker.publish(
        b"\xff\xff\xff",
        exchange=TOPOLOGY.telemetry_raw,
        persist=True,
        mandatory=True,
        **carrier.publish_kwargs(),
    )
    later = encode_all(drive(8, start_ms=now_ms() - 1_000, seed=1))[6:]
    await gateway.upload(wire.encode_batch(later), batch=True, vin=DEMO_VINS[1])
    assert len(await gateway.broadcasts(2)) == 2
    dead = await gateway.broker.declare_queue(
        TOPOLOGY.dead_letter_queue(TOPOLOGY.telemetry_raw_queue.name)
    )
    deadline = time.monotonic() + WAIT
    while (message := await dead.get(no_ack=True, fail=False)) is None:
        assert time.monotonic() < deadline, "nothing was dead-lettered"
        await asyncio.sleep(0.1)
    assert message.type == UPLOADS_TYPE
    assert message.body == b"\xff\xff\xff"


async def test_legacy_loggers_are_decoded_best_effort(gateway: Gateway, db: AsyncEngine) -> None:
    """Uncompressed VehicleData without sequence numbers (the seed's logger without compression)."""
    samples = drive(3, start_ms=now_ms() - 2_000)
    for sample in samples:
        await gateway.upload(wire.encode_sample(sample), compressed=False, vin=DEMO_VINS[0])
    sent = await gateway.broadcasts(3)
    assert {message.routing_key for message in sent} == {Channels.telemetry_vehicle(DEMO_VINS[0])}
    messages = bodies(sent)
    assert [m["data"]["heading"] for m in messages] == [
        float(round(s.heading) % 360) for s in samples
    ]
    assert all(m["reconstructed"] == [] and not m["uncertain"] for m in messages)
    assert messages[-1]["compression_stats"] == {
        "total_readings": 12,
        "transmitted_readings": 12,
        "skipped_readings": 0,
        "compression_ratio": 0.0,
    }
    rows = await query(db, "SELECT sequence, predictor_version, compressed FROM telemetry")
    assert rows == [(None, None, False)] * 3


# --- offline sessions -----------------------------------------------------------------------------


async def test_a_store_and_forward_replay_is_one_offline_session(
    gateway: Gateway, db: AsyncEngine
) -> None:
    samples = drive(90, start_ms=now_ms() - 120_000, seed=11)
    # The logger was off for 7 s after record 29 (parked): the replay ends more than
    # offline_after_s (5 s) before the gateway gets it, so all of it arrives late.
    samples[30:] = [replace(s, timestamp_ms=s.timestamp_ms + 7_000) for s in samples[30:]]
    packets = encode_all(samples)

    def at(index: int) -> float:  # when the gateway got packet `index` live
        return packets[index].timestamp_ms / 1000 + 0.2

    # Live for 10 packets; offline for 20 (packet 17 lost in the logger), replayed in one batch
    # when the car is back; then live again.
    for index in range(10):
        await gateway.send([packets[index]], received_at=at(index))
    replay = [packet for index, packet in enumerate(packets[10:30], 10) if index != 17]
    replayed_at = packets[29].timestamp_ms / 1000 + 6
    await gateway.upload(wire.encode_batch(replay), batch=True, received_at=replayed_at)
    for index in range(30, 90):
        await gateway.send([packets[index]], received_at=at(index))
    sent = bodies(await gateway.broadcasts(89))

    sessions = await query(
        db,
        "SELECT started_at, ended_at, records_buffered, records_uploaded, status"
        " FROM offline_sessions",
    )
    assert sessions == [
        (
            datetime.fromtimestamp(packets[10].timestamp_ms / 1000, UTC),
            datetime.fromtimestamp(packets[30].timestamp_ms / 1000, UTC),
            20,  # numbered by the logger, the lost one included
            19,
            "synced",
        )
    ]
    assert await query(db, "SELECT offline_session_id FROM vehicle_state") == [(None,)]

    # What the gateway is told when it asks for the vehicle's sessions (the console's table).
    def iso(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")

    answer = await gateway.ask({"query": "offline_sessions", "vin": SEED_VIN, "limit": 5})
    assert answer == {
        "vin": SEED_VIN,
        "sessions": [
            {
                "id": answer["sessions"][0]["id"],
                "vin": SEED_VIN,
                "started_at": iso(packets[10].timestamp_ms / 1000),
                "ended_at": iso(packets[30].timestamp_ms / 1000),
                "arrived_at": iso(replayed_at),
                "records_buffered": 20,
                "records_uploaded": 19,
                "status": "synced",
            }
        ],
    }
    assert await gateway.ask({"query": "offline_sessions", "vin": DEMO_VINS[0]}) == {
        "vin": DEMO_VINS[0],
        "sessions": [],
    }
    refused = await gateway.ask({"query": "offline_sessions", "vin": SEED_VIN, "limit": 0})
    assert refused["code"] == "invalid_request"

    # What a decoder makes of the packets that came; after the loss, records are uncertain until
    # the next resync (30 s of record time after the first), which makes the decoder exact again.
    arrived = [packet for index, packet in enumerate(packets) if index != 17]
    assert [m["data"] | {"received_at": None} for m in sent] == [
        data(d) | {"received_at": None} for d in expected(arrived)
    ]
    resync = next(i for i in range(1, 90) if packets[i].is_resync)
    assert resync == 77
    uncertain = {m["data"]["timestamp"] for m in sent if m["uncertain"]}
    assert uncertain == {packets[i].timestamp_ms for i in range(18, resync)}
    assert [m["data"]["speed"] for m in sent[-13:]] == [
        d.sample.speed for d in expected(packets)[-13:]
    ]


# --- request/reply --------------------------------------------------------------------------------


async def test_history_status_and_vehicles_are_answered_over_request_reply(
    gateway: Gateway,
) -> None:
    assert await gateway.ask({"query": "history"}) == []
    assert await gateway.ask({"query": "vehicles"}) == {"vehicles": [SEED_VIN, *DEMO_VINS]}
    empty = await gateway.ask({"query": "status"})
    assert empty == {
        "total_records": 0,
        "latest": [],
        "compression_stats": {
            "total_readings": 0,
            "transmitted_readings": 0,
            "skipped_readings": 0,
            "compression_ratio": 0.0,
        },
    }

    cars = [SEED_VIN, DEMO_VINS[1]]
    streams = {
        vin: encode_all(drive(8, start_ms=now_ms() - 5_000, seed=n)) for n, vin in enumerate(cars)
    }
    for index in range(8):
        for vin in cars:
            await gateway.send([streams[vin][index]], vin=vin)
    sent = bodies(await gateway.broadcasts(16))
    records = [message["data"] for message in sent]

    assert await gateway.ask({"query": "history", "limit": 5}) == records[-5:]
    assert await gateway.ask({"query": "history", "limit": 1000}) == records  # at most 100
    status = await gateway.ask({"query": "status"})
    assert status["total_records"] == 16
    # `latest` says whose each record is, as the live messages do: the full VIN and its tag.
    assert status["latest"] == [
        {"vin": m["vin"], "vehicle_vin": m["vehicle_vin"], **m["data"]} for m in sent[-10:]
    ]
    assert {m["vin"] for m in sent} == set(cars)
    assert all(m["vehicle_vin"] == m["vin"][-6:] for m in sent)
    fleet = status["compression_stats"]
    assert fleet["total_readings"] == 64
    assert fleet["skipped_readings"] == sum(len(m["reconstructed"]) for m in sent)
    assert fleet["compression_ratio"] == round(fleet["skipped_readings"] / 64 * 100, 2)
    assert "error" in await gateway.ask({"query": "latest"})
    assert "error" in await gateway.ask({"query": "history", "limit": "ten"})


NEW_VIN = "1HGCM82633A004352"


async def test_vehicles_are_registered_retired_and_reactivated_over_request_reply(
    gateway: Gateway, db: AsyncEngine
) -> None:
    """The registry behind the gateway's /api/v1/vehicles: a retired vehicle's uploads are
    refused as unknown (and kept), its records stay, and registering it again reactivates the
    same vehicle."""
    created = await gateway.ask({"query": "register_vehicle", "vin": NEW_VIN.lower()})
    assert created == {"vin": NEW_VIN, "registration": "created"}
    again = await gateway.ask({"query": "register_vehicle", "vin": NEW_VIN})
    assert again == {"vin": NEW_VIN, "registration": "existing"}
    assert await gateway.ask({"query": "vehicles"}) == {"vehicles": [SEED_VIN, *DEMO_VINS, NEW_VIN]}
    bad = await gateway.ask({"query": "register_vehicle", "vin": "5YJ3E1EA1KF00000I"})
    assert bad["code"] == "invalid_vin"
    assert "17 characters" in bad["error"]
    assert (await gateway.ask({"query": "retire_vehicle"}))["code"] == "invalid_vin"

    packets = encode_all(drive(10, start_ms=now_ms() - 5_000, seed=9))
    await gateway.send(packets[:5], vin=NEW_VIN)  # registered a moment ago: taken at once
    await gateway.broadcasts(5)

    retired = await gateway.ask({"query": "retire_vehicle", "vin": NEW_VIN})
    assert retired == {"vin": NEW_VIN, "retired": True}
    assert await gateway.ask({"query": "retire_vehicle", "vin": NEW_VIN}) == {
        "error": f"vehicle {NEW_VIN} is not registered",
        "code": "not_found",
    }
    assert NEW_VIN not in (await gateway.ask({"query": "vehicles"}))["vehicles"]
    # This replica answered the retirement: refused at once, kept with its bytes.
    [refused] = await gateway.send(packets[5:6], vin=NEW_VIN)
    await eventually(
        db,
        "SELECT code FROM rejections WHERE message_id = :id",
        [("unknown_vehicle",)],
        id=refused,
    )
    await gateway.nothing_more(within=0.5)
    stored_sql = (
        "SELECT count(*), count(DISTINCT t.vehicle_id) FROM telemetry t"
        " JOIN vehicles v ON v.id = t.vehicle_id WHERE v.vin = :vin"
    )
    assert await query(db, stored_sql, vin=NEW_VIN) == [(5, 1)]  # what was accepted stays

    [(vehicle_id,)] = await query(db, "SELECT id FROM vehicles WHERE vin = :vin", vin=NEW_VIN)
    back = await gateway.ask({"query": "register_vehicle", "vin": NEW_VIN})
    assert back == {"vin": NEW_VIN, "registration": "reactivated"}
    await gateway.send(packets[5:], vin=NEW_VIN)  # its logger sends again what was refused
    sent = bodies(await gateway.broadcasts(5))
    assert [m["data"]["timestamp"] for m in sent] == [p.timestamp_ms for p in packets[5:]]
    assert not any(m["uncertain"] for m in sent)  # its decoder went on from its stored state
    assert await query(db, stored_sql, vin=NEW_VIN) == [(10, 1)]
    assert await query(db, "SELECT DISTINCT vehicle_id FROM telemetry") == [(vehicle_id,)]


async def test_a_retirement_made_elsewhere_stops_uploads_within_the_cache_time(
    early: tuple[Gateway, Dashboard],
    start_service: Callable[..., ServiceProcess],
    postgres_url: str,
) -> None:
    """Another replica answered the retirement (or an operator set `retired_at`): the one
    consuming uploads was not told, and reads the vehicle again after its cache time."""
    gateway, dashboard = early
    start_service(EDGEWAY_TELEMETRY_VEHICLE_CACHE_S="1")
    db = make_engine(async_database_url(postgres_url, service="telemetry", data_dir=Path()))
    try:
        packets = encode_all(drive(2, start_ms=now_ms() - 2_000, seed=4))
        await gateway.send(packets[:1])  # the seed's car, in the consumer's cache now
        await dashboard.until(1)
        async with db.begin() as connection:
            await connection.execute(
                text("UPDATE vehicles SET retired_at = now() WHERE vin = :vin"), {"vin": SEED_VIN}
            )
        await asyncio.sleep(1.5)
        [refused] = await gateway.send(packets[1:])
        await eventually(
            db,
            "SELECT code FROM rejections WHERE message_id = :id",
            [("unknown_vehicle",)],
            id=refused,
        )
        assert len(dashboard.received) == 1
        assert await query(db, "SELECT count(*) FROM telemetry") == [(1,)]
    finally:
        await db.dispose()


@contextlib.contextmanager
def database_outage(postgres_url: str) -> Iterator[None]:
    """The service's PostgreSQL database refuses connections (its open ones are cut), while
    the server itself, which other tests use, runs on."""
    name = postgres_url.rsplit("/", 1)[1]
    database = sql.Identifier(name)
    admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
    admin(
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"), name
    )
    try:
        yield
    finally:
        admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(database))


async def test_a_database_outage_is_answered_as_unavailable_never_as_no_vehicles(
    gateway: Gateway, postgres_url: str
) -> None:
    assert SEED_VIN in (await gateway.ask({"query": "vehicles"}))["vehicles"]
    with database_outage(postgres_url):
        for request in (
            {"query": "vehicles"},
            {"query": "register_vehicle", "vin": NEW_VIN},
            {"query": "retire_vehicle", "vin": SEED_VIN},
        ):
            assert await gateway.ask(request) == {
                "error": "telemetry database unavailable",
                "code": "unavailable",
            }
    assert SEED_VIN in (await gateway.ask({"query": "vehicles"}))["vehicles"]


# --- broadcasts: after the ack, bounded, lossy ----------------------------------------------------


class Dashboard:
    """Every record broadcast, as a consumer of the broadcast exchange receives them."""

    def __init__(self) -> None:
        self.received: list[AbstractIncomingMessage] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.received.append(message)

    async def until(self, count: int, within: float = WAIT) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received)} of {count} broadcasts in {within}s")
            await asyncio.sleep(0.02)
        return bodies(self.received)


@pytest.fixture
async def early(amqp_url: str) -> AsyncIterator[tuple[Gateway, Dashboard]]:
    """The gateway's side before the service runs: the queues declared (uploads wait for the
    service), a dashboard consuming every vehicle's broadcasts."""
    async with RabbitBroker(amqp_url) as broker:
        await broker.connect()
        await declare_shared(broker, TOPOLOGY)
        await declare_work(broker, TOPOLOGY, TOPOLOGY.telemetry_raw, TOPOLOGY.telemetry_raw_queue)
        listener = await broker.declare_queue(
            RabbitQueue(f"test.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        )
        broadcast = await broker.declare_exchange(TOPOLOGY.broadcast)
        await listener.bind(broadcast, routing_key=Channels.TELEMETRY_VEHICLES)
        dashboard = Dashboard()
        await listener.consume(dashboard.on_message, no_ack=True)
        yield Gateway(broker, listener), dashboard


def broadcast_settled(service: ServiceProcess) -> float:
    """Records the service is done broadcasting: confirmed, failed or dropped."""
    return sum(
        metric(service, f"edgeway_telemetry_broadcast_{outcome}_total")
        for outcome in ("published", "failures", "dropped")
    )


async def test_uploads_are_acked_once_committed_while_their_broadcasts_still_drain(
    early: tuple[Gateway, Dashboard], start_service: Callable[..., ServiceProcess]
) -> None:
    """A logger fleet's outboxes replayed at once: every upload is committed and acked while
    most broadcasts still wait in the queue; SIGTERM then drains the queue before the process
    ends, so every record reaches the dashboard, in order."""
    gateway, dashboard = early
    vins = [SEED_VIN, *DEMO_VINS]
    per_vehicle, batch = 6000, 1000
    total, uploads = per_vehicle * len(vins), per_vehicle * len(vins) // batch
    start_ms = now_ms() - per_vehicle * PERIOD_MS - 60_000
    streams = {
        vin: encode_all(drive(per_vehicle, start_ms=start_ms, seed=n)) for n, vin in enumerate(vins)
    }
    # Waiting before the service starts, so it takes them in one or two groups.
    for first in range(0, per_vehicle, batch):
        for vin in vins:
            body = wire.encode_batch(streams[vin][first : first + batch])
            await gateway.upload(body, vin=vin, batch=True)
    service = start_service(
        EDGEWAY_TELEMETRY_BROADCAST_BACKLOG=str(total),
        EDGEWAY_TELEMETRY_REPLAY_BROADCAST_RATE="inf",  # every replayed record is broadcast
    )

    deadline = time.monotonic() + WAIT
    while (
        metric_sum(
            service,
            "edgeway_amqp_consumed_total",
            queue=TOPOLOGY.telemetry_raw_queue.name,
            outcome="acked",
        )
        < uploads
    ):
        assert time.monotonic() < deadline, "uploads not acked"
        await asyncio.sleep(0.01)
    # Read after the last ack: most records are still to be broadcast.
    settled = broadcast_settled(service)
    assert settled < total / 2
    assert metric(service, "edgeway_telemetry_records_total", outcome="stored") == total
    assert metric(service, "edgeway_telemetry_broadcast_queued") > 0

    await asyncio.to_thread(service.stop)  # SIGTERM, as an orchestrator does
    sent = await dashboard.until(total)
    for vin in vins:
        tag = vin[-6:]
        assert [m["data"]["timestamp"] for m in sent if m["vehicle_vin"] == tag] == [
            packet.timestamp_ms for packet in streams[vin]
        ]
    assert len(sent) == total
    assert "broadcast queue drained" in service.log_text()


async def test_a_full_broadcast_queue_drops_the_oldest_replayed_records_first(
    early: tuple[Gateway, Dashboard],
    start_service: Callable[..., ServiceProcess],
    postgres_url: str,
) -> None:
    """150 records may wait. A live upload (100 records) and a replay (1000, a minute late)
    committed back to back: the replay's oldest make room, every live record is broadcast, and
    every record is stored."""
    gateway, dashboard = early
    live_vin, replay_vin = DEMO_VINS[0], SEED_VIN
    now = now_ms()
    live = encode_all(drive(100, start_ms=now - 1_000, seed=1))
    replay = encode_all(drive(1000, start_ms=now - 1000 * PERIOD_MS - 60_000, seed=2))
    # The gateway got both now: the live batch within a second of its first record.
    await gateway.upload(wire.encode_batch(live), vin=live_vin, batch=True, received_at=now / 1000)
    await gateway.upload(
        wire.encode_batch(replay), vin=replay_vin, batch=True, received_at=now / 1000
    )
    service = start_service(EDGEWAY_TELEMETRY_BROADCAST_BACKLOG="150")

    deadline = time.monotonic() + WAIT
    while broadcast_settled(service) < 1100:
        assert time.monotonic() < deadline, "broadcasts not settled"
        await asyncio.sleep(0.05)
    published = int(metric(service, "edgeway_telemetry_broadcast_published_total"))
    dropped = metric(service, "edgeway_telemetry_broadcast_dropped_total")
    sent = await dashboard.until(published)
    await asyncio.sleep(0.2)
    assert len(dashboard.received) == published

    live_sent = [m["data"]["timestamp"] for m in sent if m["vehicle_vin"] == live_vin[-6:]]
    replay_sent = [m["data"]["timestamp"] for m in sent if m["vehicle_vin"] == replay_vin[-6:]]
    assert live_sent == [packet.timestamp_ms for packet in live]
    assert 0 < len(replay_sent) <= 150  # the newest of the replay, in order
    assert replay_sent == [packet.timestamp_ms for packet in replay][-len(replay_sent) :]
    assert dropped == 1000 - len(replay_sent) >= 850
    assert metric(service, "edgeway_telemetry_records_total", outcome="stored") == 1100
    db = make_engine(async_database_url(postgres_url, service="telemetry", data_dir=Path()))
    try:
        assert await query(db, "SELECT count(*) FROM telemetry") == [(1100,)]
    finally:
        await db.dispose()


# --- ordering and crashes -------------------------------------------------------------------------


async def test_the_upload_queue_has_a_single_active_consumer(
    amqp_url: str, service: ServiceProcess
) -> None:
    """Declaring it without the argument is refused: the broker holds the queue with it."""
    queue = TOPOLOGY.telemetry_raw_queue
    assert queue.arguments is not None
    without = {k: v for k, v in queue.arguments.items() if k != "x-single-active-consumer"}
    without["x-queue-type"] = "quorum"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(ChannelPreconditionFailed, match="x-single-active-consumer"):
            await channel.declare_queue(queue.name, durable=True, arguments=dict(without))


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    gateway: Gateway, db: AsyncEngine, service: ServiceProcess
) -> None:
    total = 600
    cars = [SEED_VIN, *DEMO_VINS]
    streams = {
        vin: encode_all(drive(total, start_ms=now_ms() - total * PERIOD_MS, seed=n))
        for n, vin in enumerate(cars)
    }

    async def produce() -> None:
        for index in range(0, total, 3):
            for vin in cars:  # single packets and small batches, interleaved across cars
                chunk = streams[vin][index : index + 3]
                if index % 2:
                    await gateway.send(chunk, vin=vin)
                else:
                    await gateway.upload(wire.encode_batch(chunk), vin=vin, batch=True)
            await asyncio.sleep(0.005)

    async def crash() -> int:
        for _ in range(int(WAIT * 100)):
            stored = (await query(db, "SELECT count(*) FROM telemetry"))[0][0]
            if stored >= 300:
                break
            await asyncio.sleep(0.01)
        service.kill(signal.SIGKILL)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(service.start)
        return int(stored)

    _, at_kill = await asyncio.gather(produce(), crash())
    assert at_kill < total * len(cars)  # the kill landed mid-stream
    await eventually(db, "SELECT count(*) FROM telemetry", [(total * len(cars),)])

    for vin in cars:
        rows = await query(
            db,
            "SELECT t.timestamp_ms, t.speed, t.battery, t.power, t.heading, t.uncertain"
            " FROM telemetry t JOIN vehicles v ON v.id = t.vehicle_id WHERE v.vin = :vin"
            " ORDER BY t.timestamp_ms",
            vin=vin,
        )
        truth = expected(streams[vin])
        # Every record once, reconstructed exactly as by a decoder that never stopped.
        assert [tuple(row) for row in rows] == [
            (
                d.sample.timestamp_ms,
                d.sample.speed,
                d.sample.battery,
                d.sample.power,
                float(d.sample.heading),
                False,
            )
            for d in truth
        ]
    assert await query(db, "SELECT sum(total_packets) FROM compression_stats") == [
        (total * len(cars),)
    ]


def admin(statement: sql.SQL | sql.Composed, *params: Any) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(statement, params)


@pytest.mark.slow
async def test_a_database_outage_delays_uploads_but_loses_and_reorders_none(
    gateway: Gateway, db: AsyncEngine, postgres_url: str, service: ServiceProcess
) -> None:
    packets = encode_all(drive(30, start_ms=now_ms() - 10_000, seed=5))
    await gateway.send(packets[:10])
    await gateway.broadcasts(10)
    name = postgres_url.rsplit("/", 1)[1]
    database = sql.Identifier(name)
    admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
    admin(
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"), name
    )
    try:
        await gateway.send(packets[10:20])
        await gateway.upload(wire.encode_batch(packets[20:]), batch=True)
        # Longer than the occupancy service rides out (7.5 s): still waiting, nothing requeued.
        await gateway.nothing_more(within=9)
    finally:
        admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(database))

    sent = bodies(await gateway.broadcasts(20))
    assert [m["data"]["timestamp"] for m in sent] == [p.timestamp_ms for p in packets[10:]]
    rows = await query(db, "SELECT timestamp_ms, speed, heading FROM telemetry ORDER BY id")
    assert [tuple(row) for row in rows] == [
        (d.sample.timestamp_ms, d.sample.speed, float(d.sample.heading)) for d in expected(packets)
    ]
    # Retried in the handler past the first four pauses (7.5 s), never requeued.
    assert service.log_text().count("database unavailable, retrying") >= 5
    assert sum(DB_RETRY_DELAYS[:4]) < 9


def test_drive_is_inside_the_wire_ranges() -> None:
    """The generated drive is one a logger could send (else the tests above test rejections)."""
    for sample in drive(2000, start_ms=now_ms()):
        body = wire.encode_sample(sample)
        [packet] = wire.parse_upload(body, compressed=False, batch=False)
        assert packet.timestamp_ms == sample.timestamp_ms
        assert math.isfinite(sample.power)
