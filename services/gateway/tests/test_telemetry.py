"""The real gateway process at the telemetry edge: uploads, status codes, logger control.

Connected: a real gateway on a private RabbitMQ virtual host. No telemetry service runs here, so
accepted uploads wait in their quorum queue, where the test reads them back, and the gateway has
no vehicle list (it accepts any valid VIN until the service answers; the end-to-end tests cover
unknown vehicles with the real service).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest
import websockets

from edgeway.common.telemetry import telemetry_pb2, wire
from edgeway.common.telemetry.predictor import Encoder, Packet, Sample
from edgeway.common.telemetry.uploads import UPLOADS_TYPE, unpack
from edgeway.common.testing import (
    ServiceProcess,
    bearer,
    gateway_fixture,
    make_token,
    start_gateway,
)
from edgeway.common.testing.faults import FaultProxy
from edgeway.common.topology import Topology
from edgeway.gateway.telemetry.uploads import SEED_VIN

pytestmark = pytest.mark.connected

QUEUE = "edgeway.telemetry.raw"
VIN = "5YJ3E1EA1KF000042"
PROTOBUF = {"Content-Type": "application/x-protobuf"}


# A logger's token names the vehicles it uploads for: this test's and the seed's default.
LOGGER = bearer("telemetry:publish", vin=[VIN, SEED_VIN])
DASHBOARD = make_token("telemetry:subscribe")
OPERATOR = bearer("telemetry:control")


def samples(count: int, start_ms: int = 1_763_000_000_000) -> list[Sample]:
    return [
        Sample(
            timestamp_ms=start_ms + 300 * i,
            speed=60.0 + i * 0.1,
            battery=80.0 - i * 0.01,
            power=20.0,
            odometer=1000.0 + i * 0.005,
            heading=(355.0 + i) % 360,
        )
        for i in range(count)
    ]


def packets(count: int) -> list[Packet]:
    encoder = Encoder()
    return [encoder.encode(sample) for sample in samples(count)]


gateway = gateway_fixture(
    EDGEWAY_REQUEST_TIMEOUT="0.3",
    EDGEWAY_MAX_UPLOAD_BYTES="65536",
)


async def drain_queue(amqp_url: str, *, wait: float = 1.0) -> list[Any]:
    """Everything the gateway published into the (otherwise unconsumed) work queue.

    A consumer, not basic.get: the queue has a single active consumer, which basic.get bypasses.
    """
    connection = await aio_pika.connect(amqp_url)
    messages: list[Any] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(QUEUE, ensure=True)
        async with queue.iterator() as incoming:
            while True:
                try:
                    message = await asyncio.wait_for(anext(incoming), wait)
                except TimeoutError:
                    return messages
                await message.ack()
                messages.append(message)


async def test_uploads_are_accepted_once_queued_with_their_headers(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    await drain_queue(amqp_url, wait=0.2)
    one, batch = packets(1)[0], packets(5)
    legacy = wire.encode_sample(samples(1)[0])
    async with httpx.AsyncClient(base_url=gateway.url, headers=LOGGER) as http:
        first = await http.post(
            "/telemetry",
            content=wire.encode_packet(one),
            headers={**PROTOBUF, "X-Compressed": "true", "X-Vehicle-VIN": VIN},
        )
        second = await http.post(
            "/api/telemetry",  # the seed README's path
            content=wire.encode_batch(batch),
            headers={**PROTOBUF, "X-Compressed": "true", "X-Batch": "true", "X-Vehicle-VIN": VIN},
        )
        # A seed logger: no X-Compressed, no VIN (the seed's default), no content type.
        third = await http.post("/telemetry", content=legacy)
    assert [r.status_code for r in (first, second, third)] == [202, 202, 202]
    assert [r.json()["records"] for r in (first, second, third)] == [1, 5, 1]
    assert first.json()["status"] == "accepted"
    queued = await drain_queue(amqp_url)
    assert [m.message_id for m in queued] == [
        r.json()["message_id"] for r in (first, second, third)
    ]
    assert [m.body for m in queued] == [
        wire.encode_packet(one),
        wire.encode_batch(batch),
        legacy,
    ]  # published unchanged
    headers = [
        (m.headers["x-vehicle-vin"], m.headers["x-compressed"], m.headers["x-batch"])
        for m in queued
    ]
    assert headers == [
        (VIN, "true", "false"),
        (VIN, "true", "true"),
        ("5YJ3E1EA1KF000001", "false", "false"),
    ]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in queued)
    assert all(m.content_type == "application/x-protobuf" for m in queued)


def _out_of_range() -> bytes:
    message = telemetry_pb2.CompressedVehicleData(
        timestamp=1_763_000_000_000,
        vehicle_speed=50.0,
        battery_level=140.0,  # percent
        power_kw=10.0,
        odometer=10.0,
        heading=90,
        is_resync=True,
    )
    return message.SerializeToString()


async def test_bad_uploads_get_real_status_codes_and_nothing_is_queued(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    await drain_queue(amqp_url, wait=0.2)
    good = wire.encode_packet(packets(1)[0])
    compressed = {**PROTOBUF, "X-Compressed": "true", "X-Vehicle-VIN": VIN}
    cases: list[tuple[dict[str, Any], int, str]] = [
        (
            {"content": b"\xff\xff\xff not protobuf", "headers": compressed},
            400,
            "invalid_telemetry",
        ),
        ({"content": _out_of_range(), "headers": compressed}, 400, "invalid_telemetry"),
        (
            {"content": good, "headers": {**compressed, "X-Vehicle-VIN": "not-a-vin"}},
            400,
            "invalid_telemetry",
        ),
        (
            {"content": good, "headers": {**compressed, "X-Compressed": "maybe"}},
            400,
            "invalid_telemetry",
        ),
        (
            {"content": good, "headers": {**compressed, "Content-Type": "application/json"}},
            415,
            "unsupported_media_type",
        ),
        ({"content": b"\x08" * 70_000, "headers": compressed}, 413, "too_large"),
    ]
    async with httpx.AsyncClient(base_url=gateway.url, headers=LOGGER) as http:
        for request, status, code in cases:
            response = await http.post("/telemetry", **request)
            assert response.status_code == status, (request["headers"], response.text)
            body = response.json()
            assert (body["type"], body["code"]) == ("error", code)
            assert body["reason"]
        assert "battery" in (await http.post("/telemetry", **cases[1][0])).json()["reason"]
        no_token = await http.post(
            "/telemetry", content=good, headers={**compressed, "Authorization": ""}
        )
        wrong_scope = await http.post(
            "/telemetry",
            content=good,
            headers={**compressed, "Authorization": f"Bearer {DASHBOARD}"},
        )
    assert (no_token.status_code, wrong_scope.status_code) == (401, 403)
    assert await drain_queue(amqp_url, wait=0.5) == []


async def test_control_commands_reach_the_logger_and_its_log_reaches_dashboards(
    gateway: ServiceProcess,
) -> None:
    ws = gateway.url.replace("http", "ws")
    logger_token = LOGGER["Authorization"].split()[1]
    async with (
        websockets.connect(f"{ws}/ws?token={DASHBOARD}") as dashboard,
        websockets.connect(f"{ws}/telemetry/control/ws?vin={VIN}&token={logger_token}") as logger,
    ):
        greeting = [json.loads(await asyncio.wait_for(dashboard.recv(), 5)) for _ in range(4)]
        assert greeting[0] == {
            "type": "log",
            "message": "Connected to telemetry server",
            "log_type": "success",
        }
        # No telemetry service here: the dashboard is told, and gets an empty history.
        assert (greeting[1]["type"], greeting[1]["log_type"]) == ("log", "warning")
        assert greeting[2] == {"type": "history", "data": []}
        assert greeting[3]["message"] == "Loaded 0 historical telemetry records"

        await logger.send(json.dumps({"type": "status", "running": True, "offline": False}))
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            refused = await http.post("/logger/stop", headers=LOGGER)
            stop = await http.post("/logger/stop", headers=OPERATOR)
            other_vehicle = await http.post(
                "/toggle_offline", params={"vin": "5YJ3E1EA1KF000099"}, headers=OPERATOR
            )
            this_vehicle = await http.post("/stop_script", params={"vin": VIN}, headers=OPERATOR)
        assert refused.status_code == 403
        assert (stop.status_code, other_vehicle.status_code, this_vehicle.status_code) == (
            202,
            202,
            202,
        )
        received = [json.loads(await asyncio.wait_for(logger.recv(), 5)) for _ in range(2)]
        # The command for another vehicle never reached this logger.
        assert [(m["type"], m["command"], m["command_id"]) for m in received] == [
            ("command", "stop", stop.json()["command_id"]),
            ("command", "stop", this_vehicle.json()["command_id"]),
        ]
        await logger.send(
            json.dumps({"type": "ack", "command_id": received[0]["command_id"], "running": False})
        )
        await logger.send(json.dumps({"type": "log", "message": "paused", "log_type": "info"}))
        await logger.send("not json")
        error = json.loads(await asyncio.wait_for(logger.recv(), 5))
        assert (error["type"], error["code"]) == ("error", "malformed_json")

        lines = []
        while not any(line.get("message", "").endswith("paused") for line in lines):
            lines.append(json.loads(await asyncio.wait_for(dashboard.recv(), 5)))
        assert all(line["type"] == "log" for line in lines)
        assert any(
            f"[{VIN[-6:]}] command {received[0]['command_id']} done" in line["message"]
            for line in lines
        )


# --- identities: a vehicle's token speaks for its vehicles only --------------------------------

OTHER_VIN = "5YJ3E1EA1KF000077"


async def test_a_logger_token_cannot_upload_for_another_vehicle(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    await drain_queue(amqp_url, wait=0.2)
    body = wire.encode_packet(packets(1)[0])
    compressed = {**PROTOBUF, "X-Compressed": "true"}
    unbound = make_token("telemetry:publish")  # subject "telemetry-edge", no vin claim
    by_subject = make_token("telemetry:publish", subject=OTHER_VIN)
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        other = await http.post(
            "/telemetry", content=body, headers={**compressed, **LOGGER, "X-Vehicle-VIN": OTHER_VIN}
        )
        nameless = await http.post(
            "/telemetry",
            content=body,
            headers={**compressed, "Authorization": f"Bearer {unbound}", "X-Vehicle-VIN": VIN},
        )
        own = await http.post(
            "/telemetry",
            content=body,
            headers={
                **compressed,
                "Authorization": f"Bearer {by_subject}",
                "X-Vehicle-VIN": OTHER_VIN.lower(),  # VINs compare as the wire writes them
            },
        )
    assert (other.status_code, nameless.status_code, own.status_code) == (403, 403, 202)
    assert other.json()["code"] == "forbidden"
    assert OTHER_VIN in other.json()["reason"]
    published = await drain_queue(amqp_url, wait=0.5)
    assert [m.headers["x-vehicle-vin"] for m in published] == [OTHER_VIN]


async def test_a_control_socket_is_refused_to_other_vehicles_and_not_taken_over(
    gateway: ServiceProcess,
) -> None:
    ws = gateway.url.replace("http", "ws")
    own = LOGGER["Authorization"].split()[1]
    other = make_token("telemetry:publish", vin=[OTHER_VIN])
    url = f"{ws}/telemetry/control/ws?vin={VIN}&token="
    async with websockets.connect(url + other) as intruder:
        refused = json.loads(await asyncio.wait_for(intruder.recv(), 5))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(intruder.recv(), 5)
    assert (refused["code"], intruder.close_code) == ("forbidden", 1008)

    async with websockets.connect(url + own) as first:
        await first.send(json.dumps({"type": "status", "running": True}))
        # The vehicle's own token may replace its connection (a logger that reconnects).
        async with websockets.connect(url + own) as second:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(first.recv(), 5)
            assert first.close_code == 1008
            await second.send(json.dumps({"type": "status", "running": True}))
            await second.send("not json")
            error = json.loads(await asyncio.wait_for(second.recv(), 5))
            assert error["code"] == "malformed_json"


async def test_the_control_socket_refuses_bad_status_and_floods_and_budgets_log_lines(
    gateway: ServiceProcess,
) -> None:
    ws = gateway.url.replace("http", "ws")
    own = LOGGER["Authorization"].split()[1]
    async with (
        websockets.connect(f"{ws}/ws?token={DASHBOARD}") as dashboard,
        websockets.connect(f"{ws}/telemetry/control/ws?vin={VIN}&token={own}") as logger,
    ):
        for _ in range(4):  # greeting, history
            await asyncio.wait_for(dashboard.recv(), 5)
        for bad in ({"buffered": "lots"}, {"buffered": -1}, {"running": "yes"}, {"buffered": {}}):
            await logger.send(json.dumps({"type": "status", **bad}))
            error = json.loads(await asyncio.wait_for(logger.recv(), 5))
            assert (error["code"], error["reason"].startswith("status:")) == ("invalid_shape", True)
        await logger.send("x" * (16 * 1024 + 1))
        assert json.loads(await asyncio.wait_for(logger.recv(), 5))["code"] == "too_large"

        # 2,000 lines at once, as the attack sent them: the socket's rate refuses most, and
        # the line budget lets at most its burst through to the dashboards.
        await asyncio.gather(
            *(
                logger.send(json.dumps({"type": "log", "message": f"flood {i}"}))
                for i in range(2000)
            )
        )
        await logger.send(json.dumps({"type": "status", "running": True}))  # still open
        lines = [message["message"] for message in await until_quiet(dashboard, 2)]
        flood = [line for line in lines if "flood" in line]
        assert 0 < len(flood) <= 60  # the budget's burst (50) and its rate (10/s) for a moment
        errors = [message["code"] for message in await until_quiet(logger, 1)]
        assert "rate_limited" in errors

        # A line far over the length limit is cut, and says by how much.
        await asyncio.sleep(1.5)  # the budgets refill
        await logger.send(json.dumps({"type": "log", "message": "<b>" + "y" * 5000}))
        line = ""
        while "yyy" not in line:
            line = json.loads(await asyncio.wait_for(dashboard.recv(), 5))["message"]
        assert len(line) < 1200
        assert "more characters" in line


async def until_quiet(ws: websockets.ClientConnection, quiet_s: float) -> list[Any]:
    """Every message a socket receives until it has been quiet for `quiet_s` seconds."""
    received: list[Any] = []
    with contextlib.suppress(TimeoutError):
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), quiet_s)))
    return received


# --- the uploads waiting for the broker are bounded -------------------------------------------


async def test_uploads_beyond_the_waiting_bound_get_503_with_retry_after(
    amqp_url: str, tmp_path: Path
) -> None:
    """The broker confirms slowly (every chunk on the gateway's link is delayed): two uploads
    are in flight, two wait (the bound here), and the others are refused at once with
    Retry-After instead of being held in memory; nothing refused is published."""
    broker = urlsplit(amqp_url)
    with FaultProxy(upstream=(broker.hostname or "127.0.0.1", broker.port or 5672)) as proxy:
        via_proxy = broker._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}").geturl()
        gateway = start_gateway(
            via_proxy,
            tmp_path,
            EDGEWAY_REQUEST_TIMEOUT="0.3",
            EDGEWAY_TELEMETRY_WAITING_UPLOADS="2",
        )
        try:
            await drain_queue(amqp_url, wait=0.2)
            body = wire.encode_packet(packets(1)[0])
            headers = {**PROTOBUF, "X-Compressed": "true", "X-Vehicle-VIN": VIN}
            async with httpx.AsyncClient(base_url=gateway.url, headers=LOGGER, timeout=30) as http:
                # The first upload waits for the gateway's one question to the (absent)
                # telemetry service; from then on uploads are only held up by the broker.
                first = await http.post("/telemetry", content=body, headers=headers)
                proxy.delay(0.5)
                burst = await asyncio.gather(
                    *(http.post("/telemetry", content=body, headers=headers) for _ in range(10))
                )
            proxy.restore()
        finally:
            gateway.stop()
    assert first.status_code == 202
    accepted = [r for r in burst if r.status_code == 202]
    refused = [r for r in burst if r.status_code != 202]
    assert refused, "every upload was held"
    assert len(accepted) >= 4  # two in flight and two waiting were taken
    for response in refused:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert (response.json()["type"], response.json()["code"]) == ("error", "unavailable")
    queued = await drain_queue(amqp_url)
    carried: list[str] = []
    for message in queued:  # one upload, or several sent together
        if message.type == UPLOADS_TYPE:
            carried += [envelope.message_id for _, envelope in unpack(message.body)]
        else:
            carried.append(str(message.message_id))
    assert sorted(carried) == sorted(r.json()["message_id"] for r in [first, *accepted])


SESSION = {
    "id": 7,
    "vin": VIN,
    "started_at": "2025-11-21T12:00:00.000000+00:00",
    "ended_at": None,
    "arrived_at": "2025-11-21T12:05:00.250000+00:00",
    "records_buffered": 20,
    "records_uploaded": 19,
    "status": "syncing",
}


async def test_offline_sessions_are_asked_of_the_telemetry_service_and_bad_queries_refused(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    """`GET /api/v1/telemetry/sessions` with a telemetry:subscribe token; the telemetry service
    is played here on its request queue: what it is asked, and how its answers come back."""
    spec = Topology().telemetry_requests_queue
    asked: list[dict[str, Any]] = []
    connection = await aio_pika.connect(amqp_url)
    url = "/api/v1/telemetry/sessions"
    dashboard = {"Authorization": f"Bearer {DASHBOARD}"}
    try:
        channel = await connection.channel()
        requests = await channel.declare_queue(
            spec.name, durable=False, arguments=spec.arguments, auto_delete=True
        )

        async def answer(request: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with request.process():
                query = json.loads(request.body)
                asked.append(query)
                if query.get("vin") == SEED_VIN:
                    reply: Any = {"error": f"vehicle {SEED_VIN} is not registered"}
                    reply["code"] = "not_found"
                elif query.get("limit") == 99:
                    reply = {"error": "telemetry database unavailable", "code": "unavailable"}
                else:
                    reply = {"vin": query.get("vin"), "sessions": [SESSION]}
                assert request.reply_to is not None
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(reply).encode(),
                        correlation_id=request.correlation_id,
                        content_type="application/json",
                    ),
                    routing_key=request.reply_to,
                )

        await requests.consume(answer)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            found = await http.get(url, params={"vin": VIN}, headers=dashboard)
            assert (found.status_code, found.json()) == (200, {"vin": VIN, "sessions": [SESSION]})
            spanned = await http.get(
                url,
                params={
                    "vin": VIN,
                    "limit": 5,
                    "since": "2025-11-21T12:00:00Z",
                    "until": "2025-11-21T14:00:00+02:00",
                },
                headers=dashboard,
            )
            assert spanned.status_code == 200, spanned.text
            assert asked == [
                {"query": "offline_sessions", "vin": VIN, "limit": 20},
                {
                    "query": "offline_sessions",
                    "vin": VIN,
                    "limit": 5,
                    "since": "2025-11-21T12:00:00+00:00",
                    "until": "2025-11-21T14:00:00+02:00",
                },
            ]

            unknown = await http.get(url, params={"vin": SEED_VIN}, headers=dashboard)
            assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")
            down = await http.get(url, params={"vin": VIN, "limit": 99}, headers=dashboard)
            assert (down.status_code, down.json()["code"]) == (503, "unavailable")
            assert "Retry-After" in down.headers

            # Refused at the gateway, with the error object; the service is not asked.
            asked.clear()
            bad_vin = await http.get(url, params={"vin": "not-a-vin"}, headers=dashboard)
            assert (bad_vin.status_code, bad_vin.json()["code"]) == (400, "invalid_vin")
            for params in (
                {},
                {"vin": VIN, "limit": 0},
                {"vin": VIN, "limit": 101},
                {"vin": VIN, "limit": "ten"},
                {"vin": VIN, "since": "yesterday"},
                {"vin": VIN, "since": "2025-11-21T12:00:00"},  # no offset
                {"vin": VIN, "since": "2025-11-21T13:00:00Z", "until": "2025-11-21T12:00:00Z"},
            ):
                refused = await http.get(url, params=params, headers=dashboard)
                assert refused.status_code == 422, (params, refused.text)
                assert refused.json()["type"] == "error"
                assert refused.json()["code"] == "validation_error"
            assert asked == []
            assert (await http.get(url, params={"vin": VIN})).status_code == 401
            forbidden = await http.get(url, params={"vin": VIN}, headers=LOGGER)
            assert (forbidden.status_code, forbidden.json()["code"]) == (403, "forbidden")
    finally:
        await connection.close()
    # Nobody answers: 504 once the request times out.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        gone = await http.get(url, params={"vin": VIN}, headers=dashboard)
    assert (gone.status_code, gone.json()["code"]) == (504, "timeout")
