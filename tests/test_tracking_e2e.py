"""Tracking end to end: clients → gateway → RabbitMQ → tracker → PostgreSQL and back.

What a SpotOn user would notice: environments through the API, videos uploaded through the
gateway, a batch task whose `/ws/tracking/{task_id}` gives SpotOn's tracking updates with global
ids and map positions to COMPLETED, edge devices' boxes tracked live across two overlapping
cameras, a live phone's video (the simulated phone through the video relay; JPEGs on
`/ws/phone`) detected and tracked beside an edge camera, a batch task's videos served (with
Range) after it ended, or by a redirect to a presigned URL when they are kept in S3, stored
tracks as JSON and MOTChallenge text, and clear refusals that store nothing.
(The worker killed mid-task and the stop within a second: services/tracker/tests/test_flow.py.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from edgeway.common.schemas.tracking import MAX_MEDIA_CHUNK
from edgeway.common.testing import (
    bearer,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    make_token,
)
from edgeway.common.testing.s3 import S3Server
from edgeway.edge.phone.media import VideoLoop
from edgeway.edge.phone.simulator import Phone
from edgeway.tracker.scenes import Scene, demo_environment, demo_scene, write_video
from tests.stack import Stack

pytestmark = [pytest.mark.connected, pytest.mark.slow]

ADMIN = bearer("tracking:admin", "tracking:read")
SUBSCRIBER = make_token("tracking:subscribe")
FRAMES = 16


@pytest.fixture(scope="module")
def stack(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    occupancy_db = create_postgres_database()
    tracker_db = create_postgres_database("edgeway_tracker")
    stack = Stack(
        amqp_url,
        occupancy_db,
        tmp_path_factory.mktemp("tracking-stack"),
        video_relay=True,
        tracker_env={
            "EDGEWAY_TRACKER_DATABASE_URL": tracker_db,
            "EDGEWAY_HOG_SCALE": "1.1",
            "EDGEWAY_CHECKPOINT_FRAMES": "5",
        },
    ).start()
    yield stack
    stack.stop()
    drop_postgres_database(tracker_db)
    drop_postgres_database(occupancy_db)


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway.url, headers=ADMIN, timeout=30) as client:
        yield client


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, headers=ADMIN, timeout=30) as client:
        yield client


def external_camera(camera_id: str, *, mirrored: bool) -> dict[str, Any]:
    """640 x 480 looking at an 8 x 6 m floor, 80 px a metre; `mirrored` looks from the other
    side (its x runs the other way), so the two see the same floor."""
    corners = [[0, 480], [640, 480], [640, 0], [0, 0]]
    floor = [[8, 0], [0, 0], [0, 6], [8, 6]] if mirrored else [[0, 0], [8, 0], [8, 6], [0, 6]]
    return {
        "camera_id": camera_id,
        "width": 640,
        "height": 480,
        "source": {"kind": "external"},
        "homography": {"image_points": corners, "map_points": floor},
    }


def box_at(x: float, y: float, *, mirrored: bool) -> list[float]:
    """A person standing at map (x, y), as the camera sees them (feet at the box's bottom)."""
    u = (8 - x) * 80 if mirrored else x * 80
    v = 480 - y * 80
    return [u - 20, v - 120, u + 20, v]


async def expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        if reply.get("type") == "error":
            assert reply["code"] == code, reply
            assert reply["reason"]
            return dict(reply)


async def messages_until(ws: ClientConnection, kind: str, within: float = 90) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + within
    while True:
        got.append(json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic())))
        if got[-1]["type"] == kind:
            return got


def test_environments_are_created_read_replaced_and_deleted_with_clear_errors(
    http: httpx.Client,
) -> None:
    npz = io.BytesIO()
    np.savez(
        npz,
        image_points=np.array([[0, 480], [640, 480], [640, 0], [0, 0]]),
        map_points=np.array([[0, 0], [8, 0], [8, 6], [0, 6]]),
    )
    body = {
        "environment_id": "hall",
        "name": "Hall",
        "cameras": [
            {
                "camera_id": "c01",
                "width": 640,
                "height": 480,
                "source": {"kind": "file"},
                "homography": {"npz_base64": base64.b64encode(npz.getvalue()).decode()},
                "handoff_rules": [{"quadrant": "upper_right", "target_camera_id": "c03"}],
            },
            {"camera_id": "c03", "width": 640, "height": 480, "source": {"kind": "external"}},
        ],
        "overlaps": [["c01", "c03"]],
    }
    created = http.post("/api/v1/environments", json=body)
    assert created.status_code == 201, created.text
    camera = created.json()["cameras"][0]
    assert camera["homography"]["map_points"] == [[0, 0], [8, 0], [8, 6], [0, 6]]  # the .npz, read
    assert camera["video"] is None
    again = http.post("/api/v1/environments", json=body)
    assert (again.status_code, again.json()["code"]) == (409, "conflict")

    assert http.get("/api/v1/environments/hall").json()["name"] == "Hall"
    listed = http.get("/api/v1/detection-processing-tasks/environments").json()
    assert {
        "environment_id": "hall",
        "name": "Hall",
        "cameras": ["c01", "c03"],
        "ready": False,
    } in (listed["environments"])
    mixed = http.post("/api/v1/processing-tasks/start", json={"environment_id": "hall"})
    assert (mixed.status_code, mixed.json()["code"]) == (400, "not_ready")
    assert "mix file and live" in mixed.json()["reason"]

    replaced = http.put("/api/v1/environments/hall", json={**body, "name": "Great hall"})
    assert (replaced.status_code, replaced.json()["name"]) == (200, "Great hall")
    wrong = http.put("/api/v1/environments/hall", json={**body, "environment_id": "other"})
    assert wrong.status_code == 400
    assert http.delete("/api/v1/environments/hall").status_code == 204

    for path, status, code in [
        ("/api/v1/environments/hall", 404, "unknown_environment"),
        ("/api/v1/environments/a.b", 400, "invalid_id"),
        (f"/api/v1/processing-tasks/{uuid.uuid4()}/status", 404, "not_found"),
    ]:
        response = http.get(path)
        assert (response.status_code, response.json()["code"]) == (status, code), path
    unknown = http.post("/api/v1/processing-tasks/start", json={"environment_id": "nowhere"})
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_environment")
    traversal = http.post(
        "/api/v1/environments", json={**body, "environment_id": "../../etc/passwd"}
    )
    assert traversal.status_code == 400
    video = http.put(
        "/api/v1/environments/nowhere/cameras/c01/video",
        content=b"\x00\x00\x00\x18ftypmp42",
        headers={"Content-Type": "video/mp4"},
    )
    assert (video.status_code, video.json()["code"]) == (404, "unknown_environment")
    # Nothing of it was stored.
    names = [
        env["environment_id"] for env in http.get("/api/v1/environments").json()["environments"]
    ]
    assert "hall" not in names
    assert not [n for n in names if "etc" in n or n == "nowhere"]


@pytest.fixture(scope="module")
def scene() -> Scene:
    return demo_scene(width=480, height=360, fps=10)


def upload_videos(http: httpx.Client, scene: Scene, folder: Path, environment_id: str) -> None:
    for camera in scene.cameras:
        path = folder / f"{camera.camera_id}.mp4"
        scene.write_video(camera, path, FRAMES)
        response = http.put(
            f"/api/v1/environments/{environment_id}/cameras/{camera.camera_id}/video",
            content=path.read_bytes(),
            headers={"Content-Type": "video/mp4"},
        )
        assert response.status_code == 202, response.text
        assert response.json()["status_url"] == f"/api/v1/environments/{environment_id}"
    deadline = time.monotonic() + 30
    while not http.get(f"/api/v1/environments/{environment_id}").json()["ready"]:
        assert time.monotonic() < deadline, http.get(
            f"/api/v1/environments/{environment_id}"
        ).json()
        time.sleep(0.2)


async def test_a_batch_task_streams_spotons_updates_to_completion(
    stack: Stack, http: httpx.Client, api: httpx.AsyncClient, scene: Scene, tmp_path: Path
) -> None:
    created = await api.post(
        "/api/v1/environments", json=demo_environment(scene, environment_id="lab")
    )
    assert created.status_code == 201, created.text
    await asyncio.to_thread(upload_videos, http, scene, tmp_path, "lab")

    started = await api.post(
        "/api/v1/detection-processing-tasks/start", json={"environment_id": "lab"}
    )
    assert started.status_code == 202, started.text
    task = started.json()
    task_id = task["task_id"]
    assert task == {
        "task_id": task_id,
        "message": "Processing task (batch) initiated.",
        "status_url": f"/api/v1/detection-processing-tasks/{task_id}/status",
        "websocket_url": f"/ws/tracking/{task_id}",
    }
    async with websockets.connect(stack.ws(task["websocket_url"], "tracking:subscribe")) as ws:
        messages = await messages_until(ws, "batch_processing_complete")
    assert messages[0]["type"] == "status_update"  # the status first, whenever one joins
    updates = [m["payload"] for m in messages if m["type"] == "tracking_update"]
    assert updates, [m["type"] for m in messages]
    assert updates[-1]["global_frame_index"] == FRAMES - 1
    tracks = [t for u in updates for c in u["cameras"].values() for t in c["tracks"]]
    assert tracks
    assert all(t["global_id"] and t["map_coords"] is not None for t in tracks)
    assert set(updates[-1]["cameras"]) == {"c01", "c02", "c03"}

    status = (await api.get(f"/api/v1/processing-tasks/{task_id}/status")).json()
    assert (status["status"], status["progress"]) == ("COMPLETED", 1.0)
    # A client that joins afterwards hears the final status at once.
    async with websockets.connect(stack.ws(f"/ws/tracking/{task_id}", "tracking:subscribe")) as ws:
        late = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert (late["type"], late["payload"]["status"]) == ("status_update", "COMPLETED")

    page = await api.get(f"/api/v1/processing-tasks/{task_id}/tracks", params={"camera_id": "c01"})
    c01 = [t for u in updates for t in u["cameras"]["c01"]["tracks"]]
    assert len(page.json()["tracks"]) == len(c01)
    mot = await api.get(
        f"/api/v1/processing-tasks/{task_id}/tracks", params={"camera_id": "c01", "format": "mot"}
    )
    assert mot.headers["content-type"].startswith("text/plain")
    first = mot.text.splitlines()[0].split(",")
    assert len(first) == 10
    assert int(first[0]) >= 1  # MOT frames count from 1
    no_camera = await api.get(
        f"/api/v1/processing-tasks/{task_id}/tracks", params={"format": "mot"}
    )
    assert no_camera.status_code == 400


async def test_edge_detections_are_tracked_live_across_overlapping_cameras(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    body = {
        "environment_id": "live",
        "name": "Live",
        "cameras": [
            external_camera("c01", mirrored=False),
            external_camera("c02", mirrored=True),
        ],
        "overlaps": [["c01", "c02"]],
    }
    assert (await api.post("/api/v1/environments", json=body)).status_code == 201
    started = await api.post(
        "/api/v1/processing-tasks/start", json={"environment_id": "live", "mode": "live"}
    )
    assert started.status_code == 202, started.text
    task_id = started.json()["task_id"]
    twice = await api.post(
        "/api/v1/processing-tasks/start", json={"environment_id": "live", "mode": "live"}
    )
    assert (twice.status_code, twice.json()["code"]) == (409, "conflict")

    device = (
        stack.gateway.url.replace("http", "ws")
        + "/ws/detections?token="
        + make_token("tracking:publish", device=["live/c01", "live/c02", "live/c09", "nowhere/c01"])
    )
    async with (
        websockets.connect(stack.ws(f"/ws/tracking/{task_id}", "tracking:subscribe")) as viewer,
        websockets.connect(device) as edge,
    ):
        await messages_until(viewer, "status_update")
        deadline = time.monotonic() + 20
        while (await api.get(f"/api/v1/processing-tasks/{task_id}/status")).json()[
            "status"
        ] != "PROCESSING":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        for frame in range(12):
            x = 2.0 + frame * 0.2
            for camera, mirrored in (("c01", False), ("c02", True)):
                detection = {"bbox_xyxy": box_at(x, 2.0, mirrored=mirrored), "confidence": 0.9}
                await edge.send(
                    json.dumps(
                        {
                            "environment_id": "live",
                            "camera_id": camera,
                            "frame_index": frame,
                            "timestamp": time.time(),
                            "detections": [detection],
                        }
                    )
                )
            await asyncio.sleep(0.05)
        seen: dict[int, dict[str, Any]] = {}
        while len(seen) < 12:
            message = json.loads(await asyncio.wait_for(viewer.recv(), 20))
            if message["type"] == "tracking_update":
                seen[message["payload"]["global_frame_index"]] = message["payload"]["cameras"]

        # One person, one global id, in both cameras, standing where the boxes say.
        last = seen[11]
        (left,), (right,) = last["c01"]["tracks"], last["c02"]["tracks"]
        assert left["global_id"] == right["global_id"]
        assert left["map_coords"] == pytest.approx([4.2, 2.0], abs=0.05)
        assert right["map_coords"] == pytest.approx([4.2, 2.0], abs=0.05)

        # What only the tracker knows is refused by the tracker, on this same socket.
        refusals = [
            ({"camera_id": "c09"}, "unknown_camera"),
            (
                {"detections": [{"bbox_xyxy": [600, 10, 700, 200], "confidence": 0.9}]},
                "out_of_frame",
            ),
            ({"environment_id": "nowhere"}, "unknown_environment"),
        ]
        for change, code in refusals:
            frame_body = {
                "environment_id": "live",
                "camera_id": "c01",
                "frame_index": 50,
                "timestamp": time.time(),
                "detections": [],
                **change,
            }
            await edge.send(json.dumps(frame_body))
            refused = await expect_error(edge, code)
            assert refused["details"]["frame_index"] == 50

        stopped = await api.delete(f"/api/v1/processing-tasks/{task_id}")
        assert (stopped.status_code, stopped.json()["status"]) == (200, "STOPPED")
        deadline = time.monotonic() + 5
        while True:  # status updates sent before the stop may still be on their way
            messages = await messages_until(viewer, "status_update", within=5)
            if messages[-1]["payload"]["status"] == "STOPPED" or time.monotonic() > deadline:
                break
        assert messages[-1]["payload"]["status"] == "STOPPED"
        await edge.send(
            json.dumps(
                {
                    "environment_id": "live",
                    "camera_id": "c01",
                    "frame_index": 60,
                    "timestamp": 1.0,
                    "detections": [],
                }
            )
        )
        await expect_error(edge, "not_tracking")

    gid = left["global_id"]
    both = (
        await api.get(f"/api/v1/processing-tasks/{task_id}/tracks", params={"global_id": gid})
    ).json()
    assert {row["camera_id"] for row in both["tracks"]} == {"c01", "c02"}


async def start_live(api: httpx.AsyncClient, environment: dict[str, Any]) -> str:
    """Create the environment and start a live task on it; its id once it is PROCESSING."""
    created = await api.post("/api/v1/environments", json=environment)
    assert created.status_code == 201, created.text
    started = await api.post(
        "/api/v1/processing-tasks/start",
        json={"environment_id": environment["environment_id"], "mode": "live"},
    )
    assert started.status_code == 202, started.text
    task_id: str = started.json()["task_id"]
    deadline = time.monotonic() + 20
    while (await api.get(f"/api/v1/processing-tasks/{task_id}/status")).json()[
        "status"
    ] != "PROCESSING":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    return task_id


async def tracking_updates(ws: ClientConnection, count: int, within: float = 60) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + within
    while len(got) < count:
        message = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if message["type"] == "tracking_update":
            got.append(message["payload"])
    return got


async def updates_until(ws: ClientConnection, *, last: int, within: float = 60) -> list[Any]:
    """Tracking updates up to the one of global frame index `last`."""
    got: list[Any] = []
    deadline = time.monotonic() + within
    while not got or got[-1]["global_frame_index"] < last:
        message = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if message["type"] == "tracking_update":
            got.append(message["payload"])
    return got


async def test_a_live_task_tracks_the_simulated_phones_video_through_the_relay(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    device = "phone-e2e"
    task_id = await start_live(
        api,
        {
            "environment_id": "phones",
            "name": "Phones",
            "cameras": [
                {
                    "camera_id": "p1",
                    "width": 320,
                    "height": 180,
                    "source": {"kind": "relay", "device": device},
                }
            ],
        },
    )
    video = VideoLoop.encode(320, 180, 15, seconds=1.0, gop_s=0.5, bitrate=300_000)
    phone = Phone(
        stack.gateway.url, device, make_token("video:publish", device=[device]), video, imu_hz=0
    )
    async with websockets.connect(
        stack.ws(f"/ws/tracking/{task_id}", "tracking:subscribe")
    ) as viewer:
        await messages_until(viewer, "status_update")  # the gateway watches the task now
        streaming = asyncio.create_task(phone.run())
        try:
            updates = await tracking_updates(viewer, 3)
        finally:
            streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streaming
    # H.264 from the phone, decoded by the relay, detected and tracked: one step per frame
    # detected (the pattern shows nobody, so no tracks), numbered from 0.
    assert [u["global_frame_index"] for u in updates] == [0, 1, 2]
    assert all(list(u["cameras"]) == ["p1"] and u["scene_id"] == "phones" for u in updates)
    assert all(u["cameras"]["p1"]["tracks"] == [] for u in updates)
    stopped = await api.post(f"/api/v1/processing-tasks/{task_id}/stop")
    assert (stopped.status_code, stopped.json()["status"]) == (200, "STOPPED")


async def test_a_phones_frames_are_tracked_beside_an_edge_camera(
    stack: Stack, api: httpx.AsyncClient, scene: Scene
) -> None:
    demo = demo_environment(scene, environment_id="mixed")
    phone_camera, edge_camera = demo["cameras"][0], demo["cameras"][1]
    task_id = await start_live(
        api,
        {
            "environment_id": "mixed",
            "name": "Mixed",
            "cameras": [
                {**phone_camera, "source": {"kind": "relay", "device": "lab-phone"}},
                {**edge_camera, "source": {"kind": "external"}},
            ],
        },
    )
    cameras = {camera.camera_id: camera for camera in scene.cameras}
    edge_url = (
        stack.gateway.url.replace("http", "ws")
        + "/ws/detections?token="
        + make_token("tracking:publish", device=["mixed/c02"])
    )
    async with (
        websockets.connect(stack.ws(f"/ws/tracking/{task_id}", "tracking:subscribe")) as viewer,
        websockets.connect(stack.ws("/ws/phone", "video:publish", device="lab-phone")) as phone,
        websockets.connect(edge_url) as edge,
    ):
        await messages_until(viewer, "status_update")  # the gateway watches the task now
        # Read as they come: a client that does not read is a slow one, and loses the oldest.
        reading = asyncio.create_task(updates_until(viewer, last=29))
        for frame in range(30):
            image, _ = scene.render(cameras["c01"], frame)
            ok, jpeg = cv2.imencode(".jpg", image)
            assert ok
            await phone.send(time.time_ns().to_bytes(8, "big") + jpeg.tobytes())
            _, sightings = scene.render(cameras["c02"], frame)
            detections = [{"bbox_xyxy": list(s.bbox_xyxy), "confidence": 0.9} for s in sightings]
            await edge.send(
                json.dumps(
                    {
                        "environment_id": "mixed",
                        "camera_id": "c02",
                        "frame_index": frame,
                        "timestamp": time.time(),
                        "detections": detections,
                    }
                )
            )
            await asyncio.sleep(0.1)
        updates = await reading
    # The edge camera's frame indexes drive the steps; the phone's camera joins a step with
    # its newest frame detected since the last one it joined.
    assert [u["global_frame_index"] for u in updates] == list(range(30))
    assert all("c02" in u["cameras"] for u in updates)
    phone_steps = [u["cameras"]["c01"] for u in updates if "c01" in u["cameras"]]
    assert len(phone_steps) >= 2
    tracks = [t for camera in phone_steps for t in camera["tracks"]]
    assert tracks
    assert all(-2 < t["map_coords"][0] < 15 and -3 < t["map_coords"][1] < 8 for t in tracks)
    stopped = await api.delete(f"/api/v1/processing-tasks/{task_id}")
    assert stopped.status_code == 200


def noise_video(path: Path, frames: int, seed: int) -> bytes:
    """A 320 x 240 H.264 file of noise: it hardly compresses, so a few frames make a big file."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(frames)]
    write_video(path, images, fps=10)
    return path.read_bytes()


async def put_video(api: httpx.AsyncClient, environment_id: str, data: bytes) -> str:
    """Upload a camera's video; its id once the tracker took it."""
    path = f"/api/v1/environments/{environment_id}/cameras/c01"
    put = await api.put(path + "/video", content=data, headers={"Content-Type": "video/mp4"})
    assert put.status_code == 202, put.text
    video_id: str = put.json()["video_id"]
    deadline = time.monotonic() + 30
    while True:
        camera = (await api.get(f"/api/v1/environments/{environment_id}")).json()["cameras"][0]
        if camera["video"] is not None and camera["video"]["video_id"] == video_id:
            assert camera["video"]["status"] == "ready", camera
            return video_id
        assert time.monotonic() < deadline, camera
        await asyncio.sleep(0.2)


async def test_a_batch_tasks_videos_are_served_with_ranges_after_it_ended(
    stack: Stack, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = noise_video(tmp_path / "first.mp4", 30, seed=1)
    assert len(data) > MAX_MEDIA_CHUNK  # the gateway reads it from the tracker in chunks
    camera = {"camera_id": "c01", "width": 320, "height": 240, "source": {"kind": "file"}}
    body = {"environment_id": "media", "name": "Media", "cameras": [camera]}
    assert (await api.post("/api/v1/environments", json=body)).status_code == 201
    video_id = await put_video(api, "media", data)
    started = await api.post("/api/v1/processing-tasks/start", json={"environment_id": "media"})
    task_id = started.json()["task_id"]
    async with websockets.connect(stack.ws(f"/ws/tracking/{task_id}", "tracking:subscribe")) as ws:
        messages = await messages_until(ws, "batch_processing_complete")
    kinds = [m["type"] for m in messages]
    assert kinds.count("media_available") == 1
    assert kinds.index("media_available") < kinds.index("tracking_update")
    (media,) = messages[kinds.index("media_available")]["payload"]["media_urls"]
    url = f"/api/v1/media/tasks/{task_id}/environments/media/cameras/c01/sub_videos/{video_id}.mp4"
    assert media == {
        "camera_id": "c01",
        "sub_video_filename": f"{video_id}.mp4",
        "url": url,
        "start_global_frame_index": 0,
        "num_frames_in_sub_video": 30,
    }

    # The task has ended; its video is still served, whole or in ranges.
    whole = await api.get(url)
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    middle = MAX_MEDIA_CHUNK - 10  # across the chunk boundary
    part = await api.get(url, headers={"Range": f"bytes={middle}-{middle + 19}"})
    assert (part.status_code, part.content) == (206, data[middle : middle + 20])
    assert part.headers["content-range"] == f"bytes {middle}-{middle + 19}/{len(data)}"
    tail = await api.get(url, headers={"Range": "bytes=-100"})
    assert (tail.status_code, tail.content) == (206, data[-100:])
    beyond = await api.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert (beyond.status_code, beyond.headers["content-range"]) == (416, f"bytes */{len(data)}")
    other = await api.get(url.replace(f"{video_id}.mp4", "someone-else.mp4"))
    assert (other.status_code, other.json()["code"]) == (404, "not_found")
    async with httpx.AsyncClient(base_url=stack.gateway.url) as nobody:
        assert (await nobody.get(url)).status_code == 401

    # A client that joins later hears of the videos after the status.
    async with websockets.connect(stack.ws(f"/ws/tracking/{task_id}", "tracking:subscribe")) as ws:
        first = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
    assert [m["type"] for m in first] == ["status_update", "media_available"]
    assert first[1]["payload"]["media_urls"] == [media]

    # A new video for the camera does not take the task's away (SpotOn's URLs 404'd).
    await put_video(api, "media", noise_video(tmp_path / "second.mp4", 5, seed=2))
    again = await api.get(url)
    assert (again.status_code, again.content) == (200, data)


@pytest.fixture
def s3_stack(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second stack whose tracker keeps its videos in a bucket of moto's S3 server. Its own
    virtual host: beside the module's stack, two trackers with their own databases would share
    the request queue, and a create answered by one would be unknown to the other."""
    vhost, amqp_url = create_vhost()
    occupancy_db = create_postgres_database()
    tracker_db = create_postgres_database("edgeway_tracker")
    stack = Stack(
        amqp_url,
        occupancy_db,
        tmp_path_factory.mktemp("tracking-s3-stack"),
        tracker_env={
            "EDGEWAY_TRACKER_DATABASE_URL": tracker_db,
            **s3_server.env,
            "EDGEWAY_STORAGE_BUCKET": f"tracker-{uuid.uuid4().hex[:12]}",
        },
    ).start()
    yield stack
    stack.stop()
    drop_postgres_database(tracker_db)
    drop_postgres_database(occupancy_db)
    drop_vhost(vhost)


async def test_an_s3_stores_videos_are_served_by_a_redirect_to_a_presigned_url(
    s3_stack: Stack, s3_server: S3Server, tmp_path: Path
) -> None:
    data = noise_video(tmp_path / "s3.mp4", 8, seed=3)
    async with httpx.AsyncClient(base_url=s3_stack.gateway.url, headers=ADMIN, timeout=30) as api:
        camera = {"camera_id": "c01", "width": 320, "height": 240, "source": {"kind": "file"}}
        body = {"environment_id": "media-s3", "name": "Media on S3", "cameras": [camera]}
        assert (await api.post("/api/v1/environments", json=body)).status_code == 201
        video_id = await put_video(api, "media-s3", data)
        started = await api.post(
            "/api/v1/processing-tasks/start", json={"environment_id": "media-s3"}
        )
        task_id = started.json()["task_id"]
        path = f"/ws/tracking/{task_id}"
        async with websockets.connect(s3_stack.ws(path, "tracking:subscribe")) as ws:
            messages = await messages_until(ws, "batch_processing_complete")
        assert sum(m["type"] == "tracking_update" for m in messages) == 8
        url = (
            f"/api/v1/media/tasks/{task_id}/environments/media-s3/cameras/c01/"
            f"sub_videos/{video_id}.mp4"
        )
        moved = await api.get(url)
        assert moved.status_code == 307, moved.text
        location = moved.headers["location"]
        assert location.startswith(f"http://{s3_server.endpoint}/tracker-")
    async with httpx.AsyncClient(timeout=30) as anyone:  # the signature is the permission
        whole = await anyone.get(location)
        assert (whole.status_code, whole.content) == (200, data)
        part = await anyone.get(location, headers={"Range": "bytes=10-29"})
        assert (part.status_code, part.content) == (206, data[10:30])
