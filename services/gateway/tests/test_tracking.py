"""The gateway's tracking endpoints at the edge: scopes, ids, shapes, sizes, edge devices' seats.

Connected: a real gateway on a private RabbitMQ virtual host, and no tracker, so every check here
is the gateway's own (what it publishes is read back from a queue the test binds), and a
question for the tracker is a 504.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from edgeway.common.testing import (
    BrokerListener,
    ServiceProcess,
    bearer,
    gateway_fixture,
    make_token,
)
from edgeway.common.topology import Topology
from edgeway.gateway.tracking.api import byte_range

pytestmark = pytest.mark.connected

TOPOLOGY = Topology()
TASK = "3f1c3f5e-4a2d-4c1b-9b5e-2b3c4d5e6f70"


ADMIN = bearer("tracking:admin", "tracking:read")
READER = bearer("tracking:read")


gateway = gateway_fixture(
    EDGEWAY_REQUEST_TIMEOUT="0.3",
    EDGEWAY_TRACKING_MAX_DETECTIONS_BYTES="4096",
    EDGEWAY_NTP_SERVERS="[]",
)


def ws_url(gateway: ServiceProcess, path: str, token: str | None = None) -> str:
    url = gateway.url.replace("http", "ws") + path
    return f"{url}?token={token}" if token else url


def edge_frame(camera: str = "c01", **changes: Any) -> dict[str, Any]:
    return {
        "environment_id": "lab",
        "camera_id": camera,
        "frame_index": 7,
        "timestamp": time.time(),
        "detections": [{"bbox_xyxy": [10, 20, 60, 160], "confidence": 0.9}],
        **changes,
    }


async def expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert (reply["type"], reply["code"]) == ("error", code), reply
    assert reply["reason"]
    return dict(reply)


MEDIA_OF_TASK = f"/api/v1/media/tasks/{TASK}"


@pytest.mark.parametrize(
    ("header", "wanted"),
    [
        (None, None),
        ("bytes=0-", (0, 999)),
        ("bytes=10-19", (10, 19)),
        ("bytes=990-5000", (990, 999)),  # past the end: up to the end
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),
        ("bytes=0-1,5-9", None),  # several ranges: the whole file (RFC 9110 lets a server)
        ("items=0-9", None),
        ("bytes=1000-", "bytes 1000- are not in a file of 1000"),
        ("bytes=20-10", "bytes 20-10 are not in a file of 1000"),
        ("bytes=-0", "no bytes to give in a file of 1000"),
    ],
)
def test_a_range_header_is_read_as_rfc_9110_says(
    header: str | None, wanted: tuple[int, int] | str | None
) -> None:
    assert byte_range(header, 1000) == wanted


async def test_every_tracking_endpoint_needs_its_scope(gateway: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for method, path, needs in [
            ("GET", "/api/v1/environments", "tracking:read"),
            ("POST", "/api/v1/environments", "tracking:admin"),
            ("PUT", "/api/v1/environments/lab/cameras/c01/video", "tracking:admin"),
            ("POST", "/api/v1/processing-tasks/start", "tracking:admin"),
            ("POST", "/api/v1/detection-processing-tasks/start", "tracking:admin"),
            ("GET", "/api/v1/detection-processing-tasks/environments", "tracking:read"),
            ("GET", f"/api/v1/processing-tasks/{TASK}/status", "tracking:read"),
            ("GET", f"/api/v1/processing-tasks/{TASK}/tracks", "tracking:read"),
            ("POST", f"/api/v1/processing-tasks/{TASK}/stop", "tracking:admin"),
            ("DELETE", f"/api/v1/detection-processing-tasks/{TASK}", "tracking:admin"),
            (
                "GET",
                f"{MEDIA_OF_TASK}/environments/lab/cameras/c01/sub_videos/v.mp4",
                "tracking:read",
            ),
        ]:
            anonymous = await http.request(method, path)
            assert anonymous.status_code == 401, path
            assert "tracking:" in anonymous.json()["reason"]
            wrong = await http.request(
                method,
                path,
                headers=bearer("occupancy:subscribe"),
            )
            assert wrong.status_code == 403, path
            assert needs in wrong.json()["reason"]
        write = await http.post("/api/v1/environments", headers=READER, json={})
        assert write.status_code == 403
    for path, scope in [
        ("/ws/detections", "tracking:subscribe"),
        (f"/ws/tracking/{TASK}", "tracking:publish"),
    ]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(ws_url(gateway, path, make_token(scope)))
        assert refused.value.response.status_code == 403


@pytest.mark.parametrize("bad", ["%2E%2E", "a.b", "con sole", "-x", "x" * 65, "über"])
async def test_path_like_ids_are_refused_before_the_tracker_is_asked(
    gateway: ServiceProcess, bad: str
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=ADMIN) as http:
        for response in (
            await http.get(f"/api/v1/environments/{bad}"),
            await http.delete(f"/api/v1/environments/{bad}"),
            await http.put(
                f"/api/v1/environments/{bad}/cameras/c01/video",
                content=b"x",
                headers={"Content-Type": "video/mp4"},
            ),
            await http.put(
                f"/api/v1/environments/lab/cameras/{bad}/video",
                content=b"x",
                headers={"Content-Type": "video/mp4"},
            ),
            await http.get(f"{MEDIA_OF_TASK}/environments/{bad}/cameras/c01/sub_videos/v.mp4"),
            await http.get(f"{MEDIA_OF_TASK}/environments/lab/cameras/{bad}/sub_videos/v.mp4"),
        ):
            assert response.status_code == 400, response.text
            assert response.json()["code"] == "invalid_id"
        created = await http.post(
            "/api/v1/environments",
            json={
                "environment_id": bad,
                "name": "x",
                "cameras": [
                    {"camera_id": "c01", "width": 640, "height": 480, "source": {"kind": "file"}}
                ],
            },
        )
        assert created.status_code == 400
        assert created.json()["code"] == "invalid_shape"
        assert created.json()["reason"].startswith("environment_id:")


@pytest.mark.parametrize("bad", ["%2E%2E", "v", ".mp4", "v.mp4.", "v.MP4", "-v.mp4", "v w.mp4"])
async def test_a_video_name_that_the_tracker_never_makes_is_refused(
    gateway: ServiceProcess, bad: str
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=ADMIN) as http:
        response = await http.get(f"{MEDIA_OF_TASK}/environments/lab/cameras/c01/sub_videos/{bad}")
    assert (response.status_code, response.json()["code"]) == (400, "invalid_id")


async def test_environment_bodies_are_checked_at_the_edge(gateway: ServiceProcess) -> None:
    camera = {"camera_id": "c01", "width": 640, "height": 480, "source": {"kind": "file"}}
    async with httpx.AsyncClient(base_url=gateway.url, headers=ADMIN) as http:
        cases = [
            ({"environment_id": "lab", "name": "Lab", "cameras": [camera, camera]}, "unique"),
            (
                {
                    "environment_id": "lab",
                    "name": "Lab",
                    "cameras": [camera],
                    "overlaps": [["c01", "c09"]],
                },
                "not in cameras",
            ),
            (
                {
                    "environment_id": "lab",
                    "name": "Lab",
                    "cameras": [{**camera, "source": {"kind": "rtsp"}}],
                },
                "url",
            ),
            (
                {
                    "environment_id": "lab",
                    "name": "Lab",
                    "cameras": [
                        {**camera, "source": {"kind": "rtsp", "url": "rtsp://cam/a\r\nX: y"}}
                    ],
                },
                "control character",
            ),
            (
                {
                    "environment_id": "lab",
                    "name": "Lab",
                    "cameras": [{**camera, "source": {"kind": "relay", "device": "a/b"}}],
                },
                "device",
            ),
            (
                {
                    "environment_id": "lab",
                    "name": "Lab",
                    "cameras": [
                        {
                            **camera,
                            "homography": {
                                "image_points": [[0, 0]] * 4,
                                "map_points": [[0, 0]] * 3,
                            },
                        }
                    ],
                },
                "map_points",
            ),
        ]
        for body, why in cases:
            response = await http.post("/api/v1/environments", json=body)
            assert response.status_code == 400, response.text
            assert why in response.json()["reason"]
        not_json = await http.post(
            "/api/v1/environments", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert (not_json.status_code, not_json.json()["code"]) == (400, "malformed_json")
        form = await http.post("/api/v1/environments", data={"environment_id": "lab"})
        assert form.status_code == 415
        video = await http.put(
            "/api/v1/environments/lab/cameras/c01/video",
            content=b"GIF89a",
            headers={"Content-Type": "image/gif"},
        )
        assert (video.status_code, video.json()["code"]) == (415, "unsupported_media_type")
        status = await http.get("/api/v1/processing-tasks/not-a-task/status")
        assert (status.status_code, status.json()["code"]) == (404, "not_found")


async def test_without_a_tracker_questions_time_out_with_504(gateway: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=ADMIN) as http:
        response = await http.get("/api/v1/environments")
    assert response.status_code == 504
    assert response.json()["code"] == "timeout"


@asynccontextmanager
async def detections(amqp_url: str) -> AsyncIterator[BrokerListener]:
    """What the gateway publishes for edge devices, on every routing key."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await channel.declare_exchange(
            TOPOLOGY.tracking_detections.name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": TOPOLOGY.names.tracking_unrouted},
        )
        yield await BrokerListener.bind(channel, TOPOLOGY.tracking_detections.name, "#")


async def test_bad_edge_frames_get_error_frames_and_the_socket_stays_open(
    gateway: ServiceProcess, amqp_url: str
) -> None:
    async with (
        detections(amqp_url) as published_frames,
        websockets.connect(
            ws_url(gateway, "/ws/detections", make_token("tracking:publish", device=["lab/c01"]))
        ) as ws,
    ):
        await ws.send("{not json")
        await expect_error(ws, "malformed_json")
        await ws.send(json.dumps({"environment_id": "lab"}))
        await expect_error(ws, "invalid_shape")
        nan = json.dumps(edge_frame()).replace("0.9", "NaN")
        await ws.send(nan)
        assert "finite" in (await expect_error(ws, "invalid_shape"))["reason"]
        await ws.send(
            json.dumps(edge_frame(detections=[{"bbox_xyxy": [60, 20, 10, 160], "confidence": 0.9}]))
        )
        assert "x1 < x2" in (await expect_error(ws, "invalid_shape"))["reason"]
        await ws.send(json.dumps(edge_frame(environment_id="../etc")))
        await expect_error(ws, "invalid_shape")
        await ws.send(
            json.dumps(
                edge_frame(detections=[{"bbox_xyxy": [1, 2, 3, 4], "confidence": 0.5}] * 100)
            )
        )
        await expect_error(ws, "too_large")
        # A token bound to lab/c01 produces for no other camera.
        await ws.send(json.dumps(edge_frame("c02")))
        refused = await expect_error(ws, "forbidden")
        assert refused["details"] == {"camera_id": "c02", "frame_index": 7}
        await ws.send(json.dumps(edge_frame(timestamp=math.pi)))  # good: published

        published = await published_frames.get(within=10)
    assert published.routing_key == "lab.c01"
    assert json.loads(published.body)["timestamp"] == math.pi
    assert published.headers["x-reply-channel"].startswith("gateway.")
    assert published.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


async def test_a_newer_connection_for_a_camera_replaces_the_older(gateway: ServiceProcess) -> None:
    url = ws_url(gateway, "/ws/detections", make_token("tracking:publish", device=["lab/c01"]))
    async with websockets.connect(url) as first:
        await first.send(json.dumps(edge_frame()))
        await asyncio.sleep(0.3)  # seated
        async with websockets.connect(url) as second:
            await second.send(json.dumps(edge_frame()))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(first.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
