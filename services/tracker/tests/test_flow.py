"""The tracker as it runs: real processes between the real RabbitMQ and PostgreSQL.

The test plays the gateway's side: it asks over request/reply, uploads videos as the gateway
publishes them, and listens to `tracking.task.<id>` on the broadcast exchange. The videos are
rendered scenes (`edgeway.tracker.scenes`) with people at known map positions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import cv2
import httpx
import orjson
import pytest
from faststream.rabbit import RabbitBroker, RabbitQueue
from minio import Minio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from edgeway.common.broker import publish
from edgeway.common.db import make_engine
from edgeway.common.envelope import Envelope
from edgeway.common.schemas.tracking import (
    HEADER_CAMERA_ID,
    HEADER_ENVIRONMENT_ID,
    HEADER_VIDEO_ID,
    VIDEO_TYPE,
)
from edgeway.common.settings import async_database_url
from edgeway.common.testing import ServiceProcess, free_port
from edgeway.common.testing.rtsp import RtspServer, rtsp_server_available
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server
from edgeway.common.topology import Channels, Topology
from edgeway.tracker.scenes import Scene, demo_environment, demo_scene

pytestmark = [pytest.mark.connected, pytest.mark.slow]

TOPOLOGY = Topology()
WAIT = 30.0
FRAMES = 30  # per camera: ~0.3 s a step with HOG on this machine's two shared cores


@pytest.fixture(scope="module")
def scene() -> Scene:
    return demo_scene(width=480, height=360, fps=10)


@pytest.fixture(scope="module")
def videos(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("videos")
    found = {}
    for camera in scene.cameras:
        path = folder / f"{camera.camera_id}.mp4"
        scene.write_video(camera, path, FRAMES)
        found[camera.camera_id] = path.read_bytes()
    return found


class Trackers:
    """Tracker replicas sharing one database and one object directory."""

    def __init__(self, amqp_url: str, postgres_url: str, workdir: Path) -> None:
        self.env = {
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_TRACKER_DATABASE_URL": postgres_url,
            "EDGEWAY_DATA_DIR": str(workdir / "var"),
            "EDGEWAY_NTP_SERVERS": "[]",
            "EDGEWAY_HOG_SCALE": "1.1",
            "EDGEWAY_TASKS_PER_WORKER": "1",
            "EDGEWAY_CHECKPOINT_FRAMES": "5",
        }
        self.workdir = workdir
        self.replicas: list[ServiceProcess] = []

    def start(self, count: int = 1) -> list[ServiceProcess]:
        started = []
        for _ in range(count):
            n = len(self.replicas)
            process = ServiceProcess(
                "edgeway.tracker",
                env={**self.env, "EDGEWAY_REPLICA_ID": f"replica-{n}"},
                port=free_port(),
                log_path=self.workdir / f"tracker-{n}.log",
            )
            self.replicas.append(process.start())
            started.append(process)
        return started

    def stop(self) -> None:
        for process in self.replicas:
            process.stop()


@pytest.fixture
def trackers(amqp_url: str, postgres_url: str, tmp_path: Path) -> Iterator[Trackers]:
    group = Trackers(amqp_url, postgres_url, tmp_path)
    try:
        yield group
    finally:
        group.stop()


class Gateway:
    """The gateway's side: requests, video uploads, and a listener on the task channels."""

    def __init__(self, broker: RabbitBroker, listener: aio_pika.abc.AbstractQueue) -> None:
        self.broker = broker
        self.listener = listener

    async def ask(self, command: str, **fields: Any) -> tuple[int, Any]:
        reply = await self.broker.request(
            orjson.dumps({"command": command, **fields}),
            queue=TOPOLOGY.tracking_requests_queue.name,
            timeout=WAIT,
        )
        answer = orjson.loads(reply.body)
        return answer["status"], answer["body"]

    async def upload(self, environment_id: str, camera_id: str, data: bytes) -> str:
        status, body = await self.ask(
            "prepare_video", environment_id=environment_id, camera_id=camera_id
        )
        assert status == 200, body
        await publish(
            self.broker,
            data,
            envelope=Envelope(
                type=VIDEO_TYPE,
                producer="test",
                content_type="video/mp4",
                headers={
                    HEADER_ENVIRONMENT_ID: environment_id,
                    HEADER_CAMERA_ID: camera_id,
                    HEADER_VIDEO_ID: body["video_id"],
                },
            ),
            exchange=TOPOLOGY.tracking_videos,
            durable=True,
        )
        return str(body["video_id"])

    async def environment_ready(
        self, environment_id: str, cameras: tuple[str, ...] = ("c01", "c02", "c03")
    ) -> dict[str, Any]:
        """The environment once each of `cameras` has its video (taken or refused)."""
        deadline = time.monotonic() + WAIT
        while True:
            status, body = await self.ask("get_environment", environment_id=environment_id)
            assert status == 200, body
            videos = [c.get("video") for c in body["cameras"] if c["camera_id"] in cameras]
            if all(v is not None for v in videos) or time.monotonic() > deadline:
                return dict(body)
            await asyncio.sleep(0.2)

    async def messages(self, task_id: str, *, until: str, within: float = 120) -> list[Any]:
        """Every message on the task's channel, up to one of type `until`."""
        got: list[Any] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            message = await self.listener.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            if message.routing_key != Channels.tracking_task(task_id):
                continue
            body = orjson.loads(message.body)
            got.append(body)
            if body["type"] == until:
                return got
        raise TimeoutError(f"no {until} in {within}s; got {[m['type'] for m in got][-20:]}")


@pytest.fixture
async def gateway(amqp_url: str, trackers: Trackers) -> AsyncIterator[Gateway]:
    async with RabbitBroker(amqp_url) as broker:
        await broker.connect()
        listener = await broker.declare_queue(
            RabbitQueue(f"test.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        )
        broadcast = await broker.declare_exchange(TOPOLOGY.broadcast)
        await listener.bind(broadcast, routing_key=Channels.TRACKING_TASKS)
        yield Gateway(broker, listener)


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(async_database_url(postgres_url, service="tracker", data_dir=Path()))
    yield engine
    await engine.dispose()


async def query(db: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with db.connect() as connection:
        return list((await connection.execute(text(sql), params)).all())


async def prepared(gateway: Gateway, scene: Scene, videos: dict[str, bytes]) -> None:
    status, body = await gateway.ask("create_environment", environment=demo_environment(scene))
    assert status == 201, body
    for camera_id, data in videos.items():
        await gateway.upload("demo-lab", camera_id, data)
    environment = await gateway.environment_ready("demo-lab")
    assert environment["ready"], environment


def metric(process: ServiceProcess, name: str) -> float:
    for row in httpx.get(process.url + "/metrics").text.splitlines():
        if row.startswith(name + " "):
            return float(row.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def test_a_batch_task_tracks_every_camera_to_the_end(
    trackers: Trackers, gateway: Gateway, db: AsyncEngine, scene: Scene, videos: dict[str, bytes]
) -> None:
    trackers.start()
    await prepared(gateway, scene, videos)
    status, started = await gateway.ask("start_task", environment_id="demo-lab", mode="batch")
    assert status == 202, started
    task_id = started["task_id"]

    messages = await gateway.messages(task_id, until="batch_processing_complete")

    statuses = [m["payload"]["status"] for m in messages if m["type"] == "status_update"]
    assert statuses[:3] == ["INITIALIZING", "DOWNLOADING_DATA", "PROCESSING"]
    assert statuses[-1] == "COMPLETED"
    updates = [m["payload"] for m in messages if m["type"] == "tracking_update"]
    assert [u["global_frame_index"] for u in updates] == list(range(FRAMES))
    tracks = [t for u in updates for cam in u["cameras"].values() for t in cam["tracks"]]
    assert len(tracks) > FRAMES  # four people crossing three cameras
    assert all(uuid.UUID(t["global_id"]) and t["class_id"] == 1 for t in tracks)
    positions = [t["map_coords"] for t in tracks if t["map_coords"] is not None]
    assert len(positions) == len(tracks)  # every camera has a homography
    # On the floor (13 x 6 m), give or take HOG's loose boxes.
    assert all(-2 < x < 15 and -3 < y < 8 for x, y in positions)

    status, final = await gateway.ask("task_status", task_id=task_id)
    assert final["status"] == {
        "task_id": task_id,
        "status": "COMPLETED",
        "progress": 1.0,
        "current_step": "Completed",
        "details": f"{FRAMES} frames tracked",
    }
    stored = await query(
        db, "SELECT count(*) FROM track_observations WHERE task_id = :t", t=task_id
    )
    assert stored == [(len(tracks),)]
    status, page = await gateway.ask("tracks", task_id=task_id, camera_id="c02", limit=10_000)
    assert status == 200
    assert len(page["tracks"]) == sum(len(u["cameras"]["c02"]["tracks"]) for u in updates)


async def test_videos_in_an_s3_bucket_are_tracked_and_served_at_presigned_urls(
    trackers: Trackers,
    gateway: Gateway,
    scene: Scene,
    videos: dict[str, bytes],
    s3_server: S3Server,
) -> None:
    """With EDGEWAY_STORAGE_* naming an S3 server (moto's), the videos go to its bucket, a batch
    task reads them from there (fetched copies, deleted after), and the media route answers
    with a presigned URL that serves the very file."""
    bucket = f"tracker-{uuid.uuid4().hex[:12]}"
    trackers.env.update(s3_server.env, EDGEWAY_STORAGE_BUCKET=bucket)
    trackers.start()
    await prepared(gateway, scene, videos)
    client = Minio(s3_server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
    keys = [o.object_name for o in client.list_objects(bucket, prefix="videos/", recursive=True)]
    assert sorted(k.split("/")[2] for k in keys if k) == ["c01", "c02", "c03"]
    local = trackers.workdir / "var"
    assert not [p for p in local.rglob("*") if p.suffix in (".mp4", ".mkv")]  # none on disk

    status, started = await gateway.ask("start_task", environment_id="demo-lab", mode="batch")
    assert status == 202, started
    task_id = started["task_id"]
    messages = await gateway.messages(task_id, until="batch_processing_complete")
    assert sum(m["type"] == "tracking_update" for m in messages) == FRAMES
    status, final = await gateway.ask("task_status", task_id=task_id)
    assert final["status"]["status"] == "COMPLETED"
    assert not [p for p in local.rglob("*") if p.suffix in (".mp4", ".mkv")]  # copies gone

    (media,) = [m["payload"] for m in messages if m["type"] == "media_available"]
    c01 = next(u for u in media["media_urls"] if u["camera_id"] == "c01")
    status, head = await gateway.ask(
        "media",
        task_id=task_id,
        environment_id="demo-lab",
        camera_id="c01",
        filename=c01["sub_video_filename"],
    )
    assert status == 200, head
    assert set(head) == {"redirect"}
    assert head["redirect"].startswith(f"http://{s3_server.endpoint}/{bucket}/videos/demo-lab/")
    async with httpx.AsyncClient(timeout=WAIT) as http:
        fetched = await http.get(head["redirect"])
    assert fetched.status_code == 200
    assert fetched.content == videos["c01"]


async def test_a_killed_worker_hands_its_task_to_another_that_stores_no_frame_twice(
    trackers: Trackers, gateway: Gateway, db: AsyncEngine, scene: Scene, videos: dict[str, bytes]
) -> None:
    first, second = trackers.start(2)
    await prepared(gateway, scene, videos)
    _status, started = await gateway.ask("start_task", environment_id="demo-lab", mode="batch")
    task_id = started["task_id"]

    deadline = time.monotonic() + WAIT
    while True:  # past its second checkpoint (every 5 frames), mid-task
        rows = await query(db, "SELECT owner, checkpoint_frame FROM tasks WHERE id = :t", t=task_id)
        if rows[0][1] >= 9 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    owner, checkpoint = rows[0]
    assert 9 <= checkpoint < FRAMES - 5
    victim, survivor = (first, second) if owner == "replica-0" else (second, first)
    victim.kill()  # SIGKILL: no goodbye, its connection just drops

    messages = await gateway.messages(task_id, until="batch_processing_complete")

    rows = await query(db, "SELECT owner, generation, status FROM tasks WHERE id = :t", t=task_id)
    assert rows[0] == ("replica-1" if owner == "replica-0" else "replica-0", 2, "COMPLETED")
    assert metric(survivor, "edgeway_tracker_tasks_resumed_total") == 1.0
    # What is stored of each frame is what its last run tracked: frames between the checkpoint
    # and the kill were tracked twice (two updates) but stored once, from the resumed run.
    last: dict[tuple[str, int], set[int]] = {}
    for update in (m["payload"] for m in messages if m["type"] == "tracking_update"):
        for camera_id, camera in update["cameras"].items():
            key = (camera_id, update["global_frame_index"])
            last[key] = {t["track_id"] for t in camera["tracks"]}
    stored: dict[tuple[str, int], set[int]] = {}
    for camera_id, frame, track in await query(
        db,
        "SELECT camera_id, frame_index, track_id FROM track_observations WHERE task_id = :t",
        t=task_id,
    ):
        stored.setdefault((camera_id, frame), set()).add(track)
    assert {k: v for k, v in last.items() if v} == stored
    assert {frame for _, frame in last} == set(range(FRAMES))


async def test_two_workers_share_tasks_and_a_stopped_one_ends_within_a_second(
    trackers: Trackers, gateway: Gateway, db: AsyncEngine, scene: Scene, videos: dict[str, bytes]
) -> None:
    trackers.start(2)  # one task each at most (EDGEWAY_TASKS_PER_WORKER=1)
    await prepared(gateway, scene, videos)
    _, first = await gateway.ask("start_task", environment_id="demo-lab", mode="batch")
    _, second = await gateway.ask("start_task", environment_id="demo-lab", mode="batch")
    stopped_id, running_id = first["task_id"], second["task_id"]
    await gateway.messages(stopped_id, until="tracking_update")
    owners = await query(db, "SELECT owner FROM tasks WHERE status = 'PROCESSING'")
    assert sorted(owner for (owner,) in owners) == ["replica-0", "replica-1"]

    status, stopped = await gateway.ask("stop_task", task_id=stopped_id)
    asked = time.monotonic()
    assert (status, stopped["status"]) == (200, "STOPPED")
    deadline = time.monotonic() + 5
    while True:  # status updates sent before the stop may still be on their way
        after = await gateway.messages(stopped_id, until="status_update", within=5)
        if after[-1]["payload"]["status"] == "STOPPED" or time.monotonic() > deadline:
            break
    assert after[-1]["payload"]["status"] == "STOPPED"
    await asyncio.sleep(1.0)
    late = []
    while (message := await gateway.listener.get(no_ack=True, fail=False)) is not None:
        if message.routing_key == Channels.tracking_task(stopped_id):
            late.append(orjson.loads(message.body))
    # At most the step that was running when the stop came.
    assert len([m for m in late if m["type"] == "tracking_update"]) <= 1
    assert time.monotonic() - asked < 3
    rows = await query(db, "SELECT id, status FROM tasks ORDER BY id")
    assert dict(rows) == {stopped_id: "STOPPED", running_id: "PROCESSING"}
    status, again = await gateway.ask("stop_task", task_id=stopped_id)
    assert (status, again["status"]) == (200, "STOPPED")
    await gateway.ask("stop_task", task_id=running_id)


async def test_a_file_that_is_not_a_video_is_refused_with_its_reason(
    trackers: Trackers, gateway: Gateway, scene: Scene
) -> None:
    trackers.start()
    status, _ = await gateway.ask("create_environment", environment=demo_environment(scene))
    assert status == 201
    await gateway.upload("demo-lab", "c01", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 4000)
    environment = await gateway.environment_ready("demo-lab", ("c01",))
    video = environment["cameras"][0]["video"]
    assert video["status"] == "rejected"
    assert "not a readable video" in video["reason"] or "no video stream" in video["reason"]
    status, refused = await gateway.ask("start_task", environment_id="demo-lab")
    assert status == 400
    assert refused["code"] == "not_ready"


def relayed_environment(scene: Scene) -> dict[str, Any]:
    """The demo scene's first two cameras as phones whose video the relay decodes."""
    body = demo_environment(scene, environment_id="relay-lab")
    body["cameras"] = [
        {**camera, "source": {"kind": "relay", "device": f"phone-{camera['camera_id']}"}}
        for camera in body["cameras"][:2]
    ]
    body["overlaps"] = [pair for pair in body["overlaps"] if set(pair) <= {"c01", "c02"}]
    for camera in body["cameras"]:
        camera["handoff_rules"] = [
            rule
            for rule in camera.get("handoff_rules", [])
            if rule["target_camera_id"] in {"c01", "c02"}
        ]
    return body


async def relay_jpeg(
    broker: RabbitBroker, device: str, image: Any, *, at: float, body: bytes | None = None
) -> None:
    """A frame as the video relay publishes it: a JPEG (or `body`, as sent) and the seed's
    headers, as strings."""
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    height, width = image.shape[:2]
    received = str(int(at * 1e9))
    await broker.publish(
        jpeg.tobytes() if body is None else body,
        exchange=TOPOLOGY.worldsystem("video_frames"),
        headers={
            "timestamp_ns": received,
            "server_received": received,
            "ntp_time": received,
            "ntp_offset": "0.0",
            "width": str(width),
            "height": str(height),
            "x-device": device,
        },
        content_type="application/octet-stream",
        persist=False,
    )


async def started_live(gateway: Gateway, environment: dict[str, Any]) -> str:
    """Create an environment and start a live task on it; its id, once it is PROCESSING."""
    status, body = await gateway.ask("create_environment", environment=environment)
    assert status == 201, body
    assert body["ready"]
    status, started = await gateway.ask(
        "start_task", environment_id=environment["environment_id"], mode="live"
    )
    assert status == 202, started
    task_id = str(started["task_id"])
    deadline = time.monotonic() + WAIT
    while (await gateway.ask("task_status", task_id=task_id))[1]["status"]["status"] != (
        "PROCESSING"
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    return task_id


def relay_metric(tracker: ServiceProcess, outcome: str) -> float:
    return metric(
        tracker, f'edgeway_tracker_camera_frames_total{{outcome="{outcome}",source="relay"}}'
    )


async def test_a_live_task_tracks_relayed_phone_frames_and_drops_what_it_cannot_detect(
    trackers: Trackers, gateway: Gateway, db: AsyncEngine, scene: Scene
) -> None:
    (tracker,) = trackers.start()
    task_id = await started_live(gateway, relayed_environment(scene))

    cameras = {camera.camera_id: camera for camera in scene.cameras}
    sent = 40
    images = [
        {c: scene.render(cameras[c], frame)[0] for c in ("c01", "c02")} for frame in range(sent)
    ]
    for frame in images:  # a burst: far faster than HOG detects two cameras
        at = time.time()
        for camera_id, image in frame.items():
            await relay_jpeg(gateway.broker, f"phone-{camera_id}", image, at=at)
    other = scene.render(cameras["c03"], 0)[0]
    await relay_jpeg(gateway.broker, "phone-c03", other, at=time.time())  # not this task's
    # Not a JPEG: refused.
    await relay_jpeg(gateway.broker, "phone-c01", other, at=time.time(), body=b"\xff\xd8 not")

    updates: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # until no step came for 2 s: every frame is handled
        try:
            messages = await gateway.messages(task_id, until="tracking_update", within=2)
        except TimeoutError:
            break
        payload = messages[-1]["payload"]
        updates[payload["global_frame_index"]] = payload["cameras"]
    # Steps are numbered from 0 on, one per detection round, each with the cameras seen.
    assert sorted(updates) == list(range(len(updates)))
    assert all(set(cams) <= {"c01", "c02"} and cams for cams in updates.values())
    tracks = [t for cams in updates.values() for cam in cams.values() for t in cam["tracks"]]
    assert tracks, updates
    assert all(t["map_coords"] is not None for t in tracks)
    assert all(-2 < t["map_coords"][0] < 15 and -3 < t["map_coords"][1] < 8 for t in tracks)

    count = {
        outcome: relay_metric(tracker, outcome)
        for outcome in ("tracked", "dropped", "ignored", "rejected")
    }
    assert count["tracked"] == sum(len(cams) for cams in updates.values())
    # 80 frames came; the detector saw fewer. Where the others went depends on who was behind:
    # dropped here (counted) for a newer frame of their camera, or at the task's bounded queue.
    assert count["tracked"] < 2 * sent
    assert count["tracked"] + count["dropped"] <= 2 * sent
    assert count["ignored"] >= 1
    assert count["rejected"] >= 1

    status, stopped = await gateway.ask("stop_task", task_id=task_id)
    assert (status, stopped["status"]) == (200, "STOPPED")
    stored = await query(
        db, "SELECT count(*) FROM track_observations WHERE task_id = :t", t=task_id
    )
    assert stored[0][0] <= len(tracks)  # what the last checkpoint held


def iou(a: list[float], b: tuple[float, float, float, float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


async def test_relayed_frames_of_another_size_are_scaled_to_the_cameras_and_tracked(
    trackers: Trackers, gateway: Gateway, scene: Scene
) -> None:
    """A phone that sends twice the declared size: its frames are scaled down to it, so boxes
    land on the people in the camera's own pixels (and map coordinates follow)."""
    (tracker,) = trackers.start()
    task_id = await started_live(gateway, relayed_environment(scene))
    camera = next(c for c in scene.cameras if c.camera_id == "c01")
    matched = boxes = 0
    for frame in range(0, 30, 6):
        image, sightings = scene.render(camera, frame)
        bigger = cv2.resize(image, (2 * camera.width, 2 * camera.height))
        await relay_jpeg(gateway.broker, "phone-c01", bigger, at=time.time())
        payload = (await gateway.messages(task_id, until="tracking_update", within=WAIT))[-1]
        tracks = payload["payload"]["cameras"]["c01"]["tracks"]
        for track in tracks:
            x1, y1, x2, y2 = track["bbox_xyxy"]
            assert 0 <= x1 < x2 <= camera.width, track
            assert 0 <= y1 < y2 <= camera.height, track
            boxes += 1
            matched += any(iou(track["bbox_xyxy"], s.bbox_xyxy) >= 0.3 for s in sightings)
    assert boxes >= 5
    assert matched >= 0.7 * boxes, (matched, boxes)
    scaled = 'edgeway_tracker_camera_frames_scaled_total{source="relay"}'
    assert metric(tracker, scaled) == 5
    assert relay_metric(tracker, "tracked") == 5
    assert relay_metric(tracker, "rejected") == 0
    status, stopped = await gateway.ask("stop_task", task_id=task_id)
    assert (status, stopped["status"]) == (200, "STOPPED")


RTSP_USER, RTSP_PASSWORD = "operator", "s3cret/pass@word"


@pytest.fixture
def rtsp_camera() -> Iterator[RtspServer]:
    reason = rtsp_server_available()
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    with RtspServer(user=RTSP_USER, password=RTSP_PASSWORD) as server:
        yield server


def rtsp_environment(url: str) -> dict[str, Any]:
    camera = {
        "camera_id": "c01",
        "width": 320,
        "height": 240,
        "source": {"kind": "rtsp", "url": url},
    }
    return {"environment_id": "rtsp-lab", "name": "RTSP lab", "cameras": [camera]}


async def test_a_live_task_reads_an_rtsp_camera_whose_password_is_never_shown_or_stored(
    trackers: Trackers,
    gateway: Gateway,
    db: AsyncEngine,
    rtsp_camera: RtspServer,
    tmp_path: Path,
) -> None:
    trackers.env["EDGEWAY_RTSP_ALLOWED_DESTINATIONS"] = '["127.0.0.1"]'  # the test camera
    (tracker,) = trackers.start()
    url = rtsp_camera.url("moving")
    secret = quote(RTSP_PASSWORD, safe="")
    assert secret in url
    status, created = await gateway.ask("create_environment", environment=rtsp_environment(url))
    assert status == 201, created
    masked = f"rtsp://***@127.0.0.1:{rtsp_camera.port}/moving"
    assert created["cameras"][0]["source"] == {"kind": "rtsp", "url": masked}
    status, started = await gateway.ask("start_task", environment_id="rtsp-lab", mode="live")
    assert status == 202, started
    task_id = started["task_id"]

    updates = []
    deadline = time.monotonic() + WAIT
    while len(updates) < 3:
        remaining = deadline - time.monotonic()
        messages = await gateway.messages(task_id, until="tracking_update", within=remaining)
        updates.append(messages[-1]["payload"])
    # PyAV reads the camera (through the loopback relay), the detector sees each newest frame.
    assert [u["global_frame_index"] for u in updates] == [0, 1, 2]
    assert all(list(u["cameras"]) == ["c01"] for u in updates)
    tracked = 'edgeway_tracker_camera_frames_total{outcome="tracked",source="rtsp"}'
    assert metric(tracker, tracked) >= 3
    status, stopped = await gateway.ask("stop_task", task_id=task_id)
    assert (status, stopped["status"]) == (200, "STOPPED")

    # Replacing the environment with the URL as it was read keeps the password sealed.
    status, replaced = await gateway.ask(
        "replace_environment",
        environment_id="rtsp-lab",
        environment={**rtsp_environment(masked), "name": "Renamed"},
    )
    assert status == 200, replaced
    (environment,) = await query(db, "SELECT spec FROM environments")
    (task,) = await query(db, "SELECT environment FROM tasks WHERE id = :t", t=task_id)
    for stored in (str(environment), str(task)):
        assert RTSP_PASSWORD not in stored
        assert secret not in stored
        assert masked in stored
        assert "sealed" in stored
    log = (tmp_path / "tracker-0.log").read_text()
    assert masked in log
    assert secret not in log
    assert RTSP_PASSWORD not in log

    # A wrong password fails the task, with why, and still nothing shows it.
    wrong = url.replace(secret, "wrong-pass")
    status, _ = await gateway.ask(
        "replace_environment", environment_id="rtsp-lab", environment=rtsp_environment(wrong)
    )
    assert status == 200
    status, started = await gateway.ask("start_task", environment_id="rtsp-lab", mode="live")
    failed_id = started["task_id"]
    deadline = time.monotonic() + WAIT
    while True:
        _, body = await gateway.ask("task_status", task_id=failed_id)
        if body["status"]["status"] == "FAILED" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert body["status"]["status"] == "FAILED"
    details = body["status"]["details"]
    assert "camera c01" in details
    assert "***@127.0.0.1" in details
    assert "wrong-pass" not in details


async def test_a_replica_stopped_with_sigterm_hands_its_live_task_to_the_next(
    trackers: Trackers, gateway: Gateway, db: AsyncEngine, scene: Scene
) -> None:
    (first,) = trackers.start()
    environment = relayed_environment(scene)
    environment["cameras"][1]["source"] = {"kind": "external"}  # both kinds of live input
    status, _ = await gateway.ask("create_environment", environment=environment)
    assert status == 201
    _, started = await gateway.ask("start_task", environment_id="relay-lab", mode="live")
    task_id = started["task_id"]
    await gateway.messages(task_id, until="status_update")  # INITIALIZING at least
    deadline = time.monotonic() + WAIT
    while (await gateway.ask("task_status", task_id=task_id))[1]["status"]["status"] != (
        "PROCESSING"
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    first.stop()  # SIGTERM: the run ends and its task goes back to the queue, never FAILED
    rows = await query(db, "SELECT status, generation FROM tasks WHERE id = :t", t=task_id)
    assert rows[0][0] != "FAILED", rows
    trackers.start()
    deadline = time.monotonic() + WAIT
    while True:
        rows = await query(db, "SELECT status, owner FROM tasks WHERE id = :t", t=task_id)
        if rows[0] == ("PROCESSING", "replica-1") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert rows[0] == ("PROCESSING", "replica-1")
    await gateway.ask("stop_task", task_id=task_id)
