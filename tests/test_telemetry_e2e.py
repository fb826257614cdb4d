"""Telemetry end to end: the edge logger → gateway → RabbitMQ → telemetry service → PostgreSQL →
dashboards, all real processes (the logger runs in the test process, as a library).

What a seed user would notice: the dashboard protocol and `/status` in the seed's shapes, every
record stored once with what was reconstructed, an offline period replayed with no gap and no
duplicate, a crash of the service losing nothing, bad uploads refused with real status codes,
and logger control that needs its own scope.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from edgeway.common.telemetry import wire
from edgeway.common.telemetry.predictor import FIELDS, PredictorConfig, Sample
from edgeway.common.testing import (
    POSTGRES_ADMIN_URL,
    ServiceProcess,
    bearer,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    make_token,
)
from edgeway.edge.pacing import Backoff
from edgeway.edge.telemetry_logger import TelemetryLogger
from edgeway.edge.traces import city, highway
from tests.stack import Stack

pytestmark = [pytest.mark.connected, pytest.mark.slow]

SEED_VIN = "5YJ3E1EA1KF000001"
CITY_VIN = "5YJ3E1EA1KF000002"
VEHICLES = [SEED_VIN, CITY_VIN]
FAST = Backoff(initial=0.05, maximum=0.2)
DATA_KEYS = {"timestamp", "speed", "battery", "power", "odometer", "heading", "received_at"}
STATS_KEYS = {"total_readings", "transmitted_readings", "skipped_readings", "compression_ratio"}
STATUS_KEYS = {
    "total_records",
    "active_websockets",
    "latest",
    "script_running",
    "compression_stats",
}


@pytest.fixture
def telemetry_database() -> Iterator[str]:
    url = create_postgres_database("edgeway_telemetry")
    yield url
    drop_postgres_database(url)


@pytest.fixture
async def stack(
    amqp_url: str, postgres_url: str, telemetry_database: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    running = Stack(
        amqp_url,
        postgres_url,
        tmp_path,
        telemetry_database_url=telemetry_database,
        extra_env={
            "EDGEWAY_TELEMETRY_VEHICLES": json.dumps(VEHICLES),
            # Records that arrive a second late came from a logger's buffer.
            "EDGEWAY_OFFLINE_AFTER_S": "1",
        },
    ).start()
    yield running
    running.stop()


def rows(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as connection:
        return connection.execute(sql, params).fetchall()  # type: ignore[arg-type]


def stored(database_url: str, vin: str) -> list[tuple[Any, ...]]:
    """(timestamp_ms, sequence, speed, battery, power, heading, reconstructed, uncertain)."""
    return rows(
        database_url,
        "SELECT t.timestamp_ms, t.sequence, t.speed, t.battery, t.power, t.heading,"
        " t.reconstructed, t.uncertain FROM telemetry t JOIN vehicles v ON v.id = t.vehicle_id"
        " WHERE v.vin = %s ORDER BY t.timestamp_ms",
        vin,
    )


def logger(
    stack: Stack, vin: str, samples: list[Sample], tmp_path: Path, **options: Any
) -> TelemetryLogger:
    return TelemetryLogger(
        vin,
        stack.gateway.url,
        make_token("telemetry:publish", vin=[vin]),
        samples,
        tmp_path / f"outbox-{vin}.sqlite",
        period_s=options.pop("period_s", 0.01),
        backoff=FAST,
        **options,
    )


def take(trace: Iterator[Sample], count: int) -> list[Sample]:
    return list(itertools.islice(trace, count))


def now_ms() -> int:
    """Traces start now and advance as fast as the logger records (period_ms = period_s), so a
    record's timestamp is when it was taken, as on a vehicle."""
    return int(time.time() * 1000)


async def messages(ws: websockets.ClientConnection, count: int, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while len(found) < count:
        message = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if message["type"] == kind:
            found.append(message)
    return found


async def eventually(check: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def within_band(decoded: tuple[Any, ...], true: Sample, config: PredictorConfig) -> None:
    """Every field within its band of the truth. The band holds against the value as the wire
    carries it, so heading (whole degrees on the wire) may be another half degree off."""
    _, _, speed, battery, power, heading, _, _ = decoded
    values = {"speed": speed, "battery": battery, "power": power, "heading": heading}
    for name in FIELDS:
        error = abs(values[name] - getattr(true, name))
        quantization = 1e-3
        if name == "heading":
            error = min(error, 360 - error)
            quantization = 0.5
        assert error <= config.band(name) + quantization, (name, values[name], getattr(true, name))


async def test_a_logger_streams_to_the_database_and_every_dashboard(
    stack: Stack, telemetry_database: str, tmp_path: Path
) -> None:
    samples = take(highway(7, start_ms=now_ms(), period_ms=10), 40)
    dashboard_url = stack.ws("/ws", "telemetry:subscribe")
    async with websockets.connect(dashboard_url) as dashboard:
        greeting = [json.loads(await asyncio.wait_for(dashboard.recv(), 10)) for _ in range(3)]
        assert greeting == [
            {"type": "log", "message": "Connected to telemetry server", "log_type": "success"},
            {"type": "history", "data": []},
            {"type": "log", "message": "Loaded 0 historical telemetry records", "log_type": "info"},
        ]
        await logger(stack, SEED_VIN, samples, tmp_path, control=False).run()
        live = await messages(dashboard, 40, "telemetry")

    # The seed's message, with what Edgeway adds (`vin`, `reconstructed`, `uncertain`) at the
    # top level.
    for message in live:
        assert set(message) == {
            "type",
            "data",
            "vehicle_vin",
            "vin",
            "compression_stats",
            "reconstructed",
            "uncertain",
        }
        assert set(message["data"]) == DATA_KEYS
        assert set(message["compression_stats"]) == STATS_KEYS
        assert (message["vehicle_vin"], message["vin"]) == (SEED_VIN[-6:], SEED_VIN)
        assert message["uncertain"] is False
    assert [m["data"]["timestamp"] for m in live] == [s.timestamp_ms for s in samples]
    last_stats = live[-1]["compression_stats"]
    assert last_stats["total_readings"] == 4 * 40
    assert last_stats["skipped_readings"] > 40  # a steady highway skips most fields

    records = stored(telemetry_database, SEED_VIN)
    assert [r[0] for r in records] == [s.timestamp_ms for s in samples]
    assert [r[1] for r in records] == list(range(1, 41))
    assert any(r[6] for r in records), "nothing was reconstructed"
    for record, sample in zip(records, samples, strict=True):
        within_band(record, sample, PredictorConfig())

    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        status = (await http.get("/status", headers=bearer("telemetry:subscribe"))).json()
    assert set(status) == STATUS_KEYS
    assert status["total_records"] == 40
    assert [d["timestamp"] for d in status["latest"]] == [s.timestamp_ms for s in samples[-10:]]
    assert status["compression_stats"]["total_readings"] == 160

    # A dashboard that comes later gets the history at once, oldest first.
    async with websockets.connect(dashboard_url) as late:
        greeting = [json.loads(await asyncio.wait_for(late.recv(), 10)) for _ in range(3)]
    assert [d["timestamp"] for d in greeting[1]["data"]] == [s.timestamp_ms for s in samples]
    assert greeting[2]["message"] == "Loaded 40 historical telemetry records"

    # Message metrics are labelled by kind of routing key, never by vehicle (or request or
    # reply queue): a label set per id would grow the registry for as long as a process lives.
    assert stack.telemetry is not None
    gateway_handlers = metric_handlers(stack.gateway.url)
    telemetry_handlers = metric_handlers(stack.telemetry.url)
    # The records it fanned out (its broadcast consume counts them by kind of channel).
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        fanned_out = (await http.get("/metrics")).text
    assert 'edgeway_gateway_received_total{channel_kind="telemetry"}' in fanned_out
    for handler in gateway_handlers | telemetry_handlers:
        assert SEED_VIN not in handler
        assert not handler.startswith("default.amq.rabbitmq.reply-to.")


async def test_dashboards_joining_mid_stream_get_each_record_once(
    stack: Stack, telemetry_database: str, tmp_path: Path
) -> None:
    """A record stored just before a new dashboard's history is read is in that history, and its
    broadcast may reach the gateway after it: the dashboard must still get it once."""
    samples = take(highway(11, start_ms=now_ms(), period_ms=20), 150)
    timestamps = [sample.timestamp_ms for sample in samples]
    dashboard_url = stack.ws("/ws", "telemetry:subscribe")
    vehicle = logger(stack, SEED_VIN, samples, tmp_path, control=False, period_s=0.02)
    streaming = asyncio.create_task(vehicle.run())

    async def join(delay: float) -> tuple[list[int], list[int]]:
        await asyncio.sleep(delay)
        live: list[int] = []
        async with websockets.connect(dashboard_url) as dashboard:
            greeting = [json.loads(await asyncio.wait_for(dashboard.recv(), 10)) for _ in range(3)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    while True:
                        message = json.loads(await dashboard.recv())
                        if message["type"] == "telemetry":
                            live.append(message["data"]["timestamp"])
        return [record["timestamp"] for record in greeting[1]["data"]], live

    await eventually(lambda: len(stored(telemetry_database, SEED_VIN)) >= 20)
    joined = await asyncio.gather(*(join(0.1 * i) for i in range(12)))
    await asyncio.wait_for(streaming, 30)
    for history, live in joined:
        assert history  # each joined mid-stream
        assert live
        twice = sorted(t for t, count in collections.Counter(history + live).items() if count > 1)
        assert not twice, f"received twice: {twice}; the history ends at {history[-1]}"
        # And nothing missing in between: the history, then every record after it, in order.
        first = timestamps.index(history[0])
        assert history + live == timestamps[first : first + len(history) + len(live)]


async def test_an_offline_period_is_replayed_in_order_with_no_gap_and_no_duplicate(
    stack: Stack, telemetry_database: str, tmp_path: Path
) -> None:
    samples = take(city(3, start_ms=now_ms(), period_ms=20), 120)
    vehicle = logger(stack, CITY_VIN, samples, tmp_path, offline=True, control=False, period_s=0.02)
    running = asyncio.create_task(vehicle.run())
    await eventually(lambda: vehicle.buffered >= 80)  # 1.6 s in the dead zone
    await vehicle.toggle_offline()
    await asyncio.wait_for(running, 60)

    records = stored(telemetry_database, CITY_VIN)
    assert [r[0] for r in records] == [s.timestamp_ms for s in samples]  # no gap, no duplicate
    assert [r[1] for r in records] == list(range(1, 121))
    assert not any(r[7] for r in records)  # nothing lost in transit: nothing uncertain
    for record, sample in zip(records, samples, strict=True):
        within_band(record, sample, PredictorConfig())
    sessions = rows(
        telemetry_database,
        "SELECT records_uploaded, status, started_at, arrived_at FROM offline_sessions s"
        " JOIN vehicles v ON v.id = s.vehicle_id WHERE v.vin = %s",
        CITY_VIN,
    )
    # One session: the records that waited more than a second in the buffer (1.6 s in the dead
    # zone at 20 ms a record: about 30), closed by the live records after them.
    assert len(sessions) == 1
    assert 20 <= sessions[0][0] <= 80
    assert sessions[0][1] == "synced"
    # It arrived after the dead zone, which began with its first record.
    assert sessions[0][3] - sessions[0][2] >= timedelta(seconds=1)

    # The same session, as a dashboard asks the gateway for it.
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
        answer = await http.get(
            "/api/v1/telemetry/sessions",
            params={"vin": CITY_VIN},
            headers=bearer("telemetry:subscribe"),
        )
    assert answer.status_code == 200, answer.text
    [session] = answer.json()["sessions"]
    assert (session["vin"], session["records_uploaded"], session["status"]) == (
        CITY_VIN,
        sessions[0][0],
        "synced",
    )
    assert datetime.fromisoformat(session["started_at"]) == sessions[0][2]
    assert datetime.fromisoformat(session["arrived_at"]) == sessions[0][3]


async def test_kill_9_of_the_service_mid_stream_loses_and_duplicates_nothing(
    stack: Stack, telemetry_database: str, tmp_path: Path
) -> None:
    assert stack.telemetry is not None
    samples = take(highway(11, start_ms=now_ms(), period_ms=5), 400)
    vehicle = logger(stack, SEED_VIN, samples, tmp_path, control=False, period_s=0.005)
    running = asyncio.create_task(vehicle.run())
    await eventually(lambda: vehicle.counters.uploaded >= 100)
    stack.telemetry.kill(signal.SIGKILL)
    await asyncio.sleep(1.0)  # uploads go on: the broker keeps them
    stack.telemetry.start()
    await asyncio.wait_for(running, 90)

    await eventually(lambda: len(stored(telemetry_database, SEED_VIN)) >= 400, within=30)
    records = stored(telemetry_database, SEED_VIN)
    assert [r[0] for r in records] == [s.timestamp_ms for s in samples]
    assert [r[1] for r in records] == list(range(1, 401))
    for record, sample in zip(records, samples, strict=True):
        within_band(record, sample, PredictorConfig())


async def test_bad_uploads_get_their_status_codes_and_store_nothing(
    stack: Stack, telemetry_database: str
) -> None:
    unregistered = "5YJ3E1EA1KF999999"
    publisher = make_token("telemetry:publish", vin=[SEED_VIN, unregistered])
    publish = {"Authorization": f"Bearer {publisher}"}
    sample = take(highway(1, start_ms=now_ms()), 1)[0]
    good = wire.encode_sample(sample)
    out_of_range = wire.encode_sample(
        Sample(sample.timestamp_ms, sample.speed, 140.0, sample.power, sample.odometer, 90.0)
    )
    async with httpx.AsyncClient(base_url=stack.gateway.url, headers=publish) as http:
        statuses = [
            (await http.post("/telemetry", content=good, headers=headers)).status_code
            for headers in (
                {"X-Vehicle-VIN": unregistered},  # well formed, not registered
                {"X-Vehicle-VIN": SEED_VIN, "Content-Type": "text/plain"},
            )
        ]
        battery = await http.post("/telemetry", content=out_of_range)
        garbage = await http.post("/telemetry", content=b"\x0a\xff\xff", headers={})
        oversize = await http.post("/telemetry", content=b"\x00" * (2 * 1024 * 1024))
        anonymous = await http.post("/telemetry", content=good, headers={"Authorization": ""})
    assert statuses == [422, 415]
    assert battery.status_code == 400
    assert "battery" in battery.json()["reason"]
    assert (garbage.status_code, oversize.status_code, anonymous.status_code) == (400, 413, 401)
    assert garbage.json()["code"] == "invalid_telemetry"
    await asyncio.sleep(1.0)
    assert rows(telemetry_database, "SELECT count(*) FROM telemetry") == [(0,)]


@contextlib.contextmanager
def database_outage(database_url: str) -> Iterator[None]:
    """The telemetry service's PostgreSQL database refuses connections (its open ones are cut),
    while the server, which other tests use, runs on."""
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name))
        )
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        yield
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            connection.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
            )


async def test_a_telemetry_outage_is_unavailable_to_uploads_never_unknown(
    stack: Stack, telemetry_database: str
) -> None:
    """While the telemetry service cannot say which vehicles exist (its database is down: it
    answers errors; or it is down itself: no answer in time), a vehicle in the gateway's last
    list is still accepted and queued, and one not in it gets 503 with Retry-After, which its
    logger retries, never 422, which its logger would take as final and move the packets
    aside. Only the service's answer, once it can give one, makes a vehicle unknown."""
    assert stack.telemetry is not None
    unregistered = "5YJ3E1EA1KF999999"
    publisher = make_token("telemetry:publish", vin=[SEED_VIN, unregistered])
    readings = iter(take(highway(13, start_ms=now_ms() - 60_000, period_ms=100), 20))
    sent: list[int] = []

    async def post(http: httpx.AsyncClient, vin: str) -> httpx.Response:
        sample = next(readings)
        response = await http.post(
            "/telemetry", content=wire.encode_sample(sample), headers={"X-Vehicle-VIN": vin}
        )
        if response.status_code == 202:
            sent.append(sample.timestamp_ms)
        return response

    def unavailable(response: httpx.Response) -> bool:
        return (
            response.status_code == 503
            and response.json()["code"] == "unavailable"
            and response.headers.get("retry-after") == "2"
        )

    async with httpx.AsyncClient(
        base_url=stack.gateway.url, headers={"Authorization": f"Bearer {publisher}"}, timeout=30
    ) as http:
        assert (await post(http, SEED_VIN)).status_code == 202  # the gateway has the list now
        with database_outage(telemetry_database):
            await asyncio.sleep(1.2)  # a VIN not in the list is asked about again now
            not_listed = await post(http, unregistered)
            listed = await post(http, SEED_VIN)
            assert listed.status_code == 202, listed.text  # queued: the service waits it out
            assert unavailable(not_listed), (not_listed.status_code, not_listed.text)
        # Back: the service's answer makes the unregistered vehicle unknown (after at most a
        # second of 503s while the gateway asks again in the background).
        answers = [await post(http, unregistered)]
        while answers[-1].status_code != 422:
            assert len(answers) < 30, [r.status_code for r in answers]
            assert unavailable(answers[-1])
            await asyncio.sleep(0.2)
            answers.append(await post(http, unregistered))
        assert answers[-1].json()["code"] == "unknown_vehicle"

        # The service itself stops: requests go unanswered (the gateway waits its request
        # timeout once, then stops waiting), and uploads of listed vehicles wait in the queue.
        stack.telemetry.stop()
        await asyncio.sleep(1.2)
        assert unavailable(await post(http, unregistered))
        assert (await post(http, SEED_VIN)).status_code == 202
        assert unavailable(await post(http, unregistered))
        stack.telemetry.start()

    await eventually(lambda: len(stored(telemetry_database, SEED_VIN)) == len(sent), within=30)
    assert [record[0] for record in stored(telemetry_database, SEED_VIN)] == sent
    assert rows(telemetry_database, "SELECT count(*) FROM rejections") == [(0,)]


async def test_vehicles_are_registered_and_retired_through_the_gateway(
    stack: Stack, telemetry_database: str, tmp_path: Path
) -> None:
    """`/api/v1/vehicles` with a telemetry:admin token. A second gateway replica, which hears
    of a change only from the telemetry service, takes a new vehicle at once and refuses a
    retired one within its cache time (1 s here); what was stored for a retired vehicle stays,
    and registering it again reactivates the same vehicle."""
    new_vin = "1HGCM82633A004352"
    admin = bearer("telemetry:admin")
    vehicle = bearer("telemetry:publish", vin=[new_vin])
    other = ServiceProcess(
        "edgeway.gateway",
        env={
            **stack.gateway.env,
            "EDGEWAY_TELEMETRY_VEHICLES_CACHE_S": "1",
            "EDGEWAY_OTEL_FILE": str(tmp_path / "gateway-2.spans.jsonl"),
        },
        port=free_port(),
        log_path=tmp_path / "gateway-2.log",
    ).start()
    sample = iter(take(highway(17, start_ms=now_ms() - 60_000, period_ms=100), 200))

    async def upload(http: httpx.AsyncClient) -> int:
        body = wire.encode_sample(next(sample))
        response = await http.post(
            "/telemetry", content=body, headers={**vehicle, "X-Vehicle-VIN": new_vin}
        )
        return response.status_code

    try:
        async with (
            httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as first,
            httpx.AsyncClient(base_url=other.url, timeout=30) as second,
        ):
            listed = await first.get("/api/v1/vehicles", headers=admin)
            assert (listed.status_code, listed.json()) == (200, {"vehicles": VEHICLES})
            assert (await first.get("/api/v1/vehicles")).status_code == 401
            operator = bearer("telemetry:control")
            denied = await first.post("/api/v1/vehicles", json={"vin": new_vin}, headers=operator)
            assert denied.status_code == 403
            assert await upload(second) == 422  # not registered yet
            for body, code in (
                (b'{"vin": "1HGCM82633A00435"}', "invalid_vin"),
                (b'{"vin": 1}', "invalid_shape"),
                (b"vin=1HGCM82633A004352", "malformed_json"),
            ):
                bad = await first.post("/api/v1/vehicles", content=body, headers=admin)
                assert bad.status_code == 400, bad.text
                assert (bad.json()["type"], bad.json()["code"]) == ("error", code)
            assert (
                "17 characters"
                in (
                    await first.post("/api/v1/vehicles", json={"vin": "O" * 17}, headers=admin)
                ).json()["reason"]
            )

            created = await first.post(
                "/api/v1/vehicles", json={"vin": new_vin.lower()}, headers=admin
            )
            assert (created.status_code, created.json()) == (
                201,
                {"vin": new_vin, "registration": "created"},
            )
            again = await first.post("/api/v1/vehicles", json={"vin": new_vin}, headers=admin)
            assert (again.status_code, again.json()["registration"]) == (200, "existing")
            listed = await first.get("/api/v1/vehicles", headers=admin)
            assert listed.json() == {"vehicles": [*VEHICLES, new_vin]}
            await asyncio.sleep(1.1)  # past the second replica's pause between two misses
            assert await upload(second) == 202  # it asks again on a miss, and learns of it
            assert await upload(first) == 202
            await eventually(lambda: len(stored(telemetry_database, new_vin)) == 2)

            retired = await first.delete(f"/api/v1/vehicles/{new_vin}", headers=admin)
            assert (retired.status_code, retired.content) == (204, b"")
            retired_at = time.monotonic()
            gone = await first.delete(f"/api/v1/vehicles/{new_vin}", headers=admin)
            assert gone.status_code == 404
            assert (gone.json()["code"], new_vin in gone.json()["reason"]) == ("not_found", True)
            bad_vin = await first.delete("/api/v1/vehicles/not-a-vin", headers=admin)
            assert (bad_vin.status_code, bad_vin.json()["code"]) == (400, "invalid_vin")
            listed = await first.get("/api/v1/vehicles", headers=admin)
            assert listed.json() == {"vehicles": VEHICLES}
            assert await upload(first) == 422  # the replica that retired it: at once
            while await upload(second) != 422:  # the other: within its cache time
                assert time.monotonic() - retired_at < 1.0 + 1.0, "still accepted"
                await asyncio.sleep(0.1)
            # The records of a retired vehicle stay.
            assert len(stored(telemetry_database, new_vin)) == 2

            [(vehicle_id,)] = rows(
                telemetry_database, "SELECT id FROM vehicles WHERE vin = %s", new_vin
            )
            back = await first.post("/api/v1/vehicles", json={"vin": new_vin}, headers=admin)
            assert (back.status_code, back.json()["registration"]) == (201, "reactivated")
            assert rows(telemetry_database, "SELECT id FROM vehicles WHERE vin = %s", new_vin) == [
                (vehicle_id,)
            ]
            assert await upload(first) == 202
            await eventually(lambda: len(stored(telemetry_database, new_vin)) == 3)

            # The registry's database down: 503 with Retry-After, not a refusal.
            with database_outage(telemetry_database):
                for response in (
                    await first.post("/api/v1/vehicles", json={"vin": new_vin}, headers=admin),
                    await first.delete(f"/api/v1/vehicles/{new_vin}", headers=admin),
                    await first.get("/api/v1/vehicles", headers=admin),
                ):
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"] == "2"
                    assert response.json()["code"] == "unavailable"
            # The service not answering at all: 504.
            assert stack.telemetry is not None
            stack.telemetry.stop()
            assert (await first.get("/api/v1/vehicles", headers=admin)).status_code == 504
    finally:
        other.stop()


async def test_logger_control_needs_its_scope_and_reaches_the_logger(
    stack: Stack, tmp_path: Path
) -> None:
    samples = take(highway(5, start_ms=now_ms(), period_ms=50), 100_000)
    vehicle = logger(stack, SEED_VIN, samples, tmp_path, period_s=0.05)
    running = asyncio.create_task(vehicle.run())
    operator = bearer("telemetry:control")
    try:
        async with (
            websockets.connect(stack.ws("/ws", "telemetry:subscribe")) as dashboard,
            httpx.AsyncClient(base_url=stack.gateway.url) as http,
        ):
            await eventually(lambda: stack_has_logger(stack))
            refused = await http.post(
                "/logger/stop",
                headers=bearer("telemetry:publish"),
            )
            assert refused.status_code == 403
            assert (await http.post("/stop_script", headers=operator)).status_code == 202
            await eventually(lambda: not vehicle.running)
            assert (await http.post("/logger/start", headers=operator)).status_code == 202
            await eventually(lambda: vehicle.running)
            # The answer says the new state, once the logger acknowledged the command.
            toggled = await http.post("/toggle_offline", headers=operator)
            assert toggled.status_code == 202
            assert vehicle.offline
            (state,) = toggled.json()["loggers"]
            assert (state["vin"], state["acknowledged"], state["offline"]) == (SEED_VIN, True, True)
            # `?vin=` takes the six characters dashboards show; an unknown vehicle is a 404
            # that says how to register it.
            back = await http.post(
                "/toggle_offline", params={"vin": SEED_VIN[-6:]}, headers=operator
            )
            assert (back.json()["vin"], back.json()["loggers"][0]["offline"]) == (SEED_VIN, False)
            unknown = await http.post(
                "/toggle_offline", params={"vin": "5YJ3E1EA1KF000099"}, headers=operator
            )
            assert unknown.status_code == 404
            assert "POST /api/v1/vehicles" in unknown.json()["reason"]
            cleared = await http.post("/clear_data", headers=operator)
            assert "deletes nothing on the server" in cleared.json()["effect"]
            assert (await http.post("/toggle_offline", headers=operator)).status_code == 202
            await eventually(lambda: vehicle.offline)
            logs = [m["message"] for m in await messages(dashboard, 3, "log")]
            assert any(SEED_VIN[-6:] in line for line in logs)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


def metric_handlers(url: str) -> set[str]:
    """The `handler` labels of a process's metrics."""
    return {
        sample.labels["handler"]
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for sample in family.samples
        if "handler" in sample.labels
    }


def stack_has_logger(stack: Stack) -> bool:
    metrics = httpx.get(stack.gateway.url + "/metrics").text
    return 'edgeway_gateway_connections{endpoint="/telemetry/control/ws"} 1.0' in metrics
