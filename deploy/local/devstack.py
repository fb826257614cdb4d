"""`make run`: the whole stack as local processes on the embedded defaults, with demo data.

Starts the occupancy, telemetry, ingestion and tracker services (SQLite and local objects under
var/dev), the video relay, the gateway, a demo camera model, two simulated vehicles (edge telemetry loggers replaying a highway
and a city trace) and a simulated phone (`edgeway.edge.phone`: H.264 and IMU), creates the demo
tracking environment (three rendered cameras, their videos rendered on the first run from a fixed
seed and uploaded through the gateway), then prints where to look. Development profile: legacy producers and clients that cannot send a token are let in
(anonymous occupancy:publish, occupancy:subscribe, telemetry:subscribe, video:publish and
video:subscribe); the vehicle loggers and the phone use tokens, logger control needs a
telemetry:control token. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "libs/common/src"))

from edgeway.common.testing import ServiceProcess  # noqa: E402

GATEWAY_PORT = int(os.environ.get("EDGEWAY_GATEWAY_PORT", "8000"))
OCCUPANCY_PORT = int(os.environ.get("EDGEWAY_OCCUPANCY_PORT", "8081"))
TELEMETRY_PORT = int(os.environ.get("EDGEWAY_TELEMETRY_PORT", "8082"))
VIDEO_RELAY_PORT = int(os.environ.get("EDGEWAY_VIDEO_RELAY_PORT", "8083"))
INGESTION_PORT = int(os.environ.get("EDGEWAY_INGESTION_PORT", "8084"))
TRACKER_PORT = int(os.environ.get("EDGEWAY_TRACKER_PORT", "8085"))
# The demo videos: 20 s at 10 fps per camera (edgeway.tracker.scenes.demo_scene).
DEMO_FRAMES = 200
# The seed's default VIN and a second demo vehicle, registered through the gateway's
# /api/v1/vehicles once it is up (`register_vehicles`), as an operator registers a car.
VEHICLES = (("5YJ3E1EA1KF000001", "highway"), ("5YJ3E1EA1KF000002", "city"))
PHONE = "phone-1"
DATA = ROOT / "var" / "dev"
LOGS = DATA / "logs"


# A photo that ships with the repository, so the README's upload runs as written.
SAMPLE_PHOTO = ROOT / "deploy/local/sample.jpg"


def upload_demo_image(gateway: str, operator: str) -> str:
    """Upload the sample photo the README's example uploads too, so the ingestion status has
    something to show; its URL path."""
    import httpx

    response = httpx.post(
        f"{gateway}/api/v1/ingest/upload",
        data={"camera_id": "demo-cam", "meta": json.dumps({"session": "make-run"})},
        files=[("files", ("sample.jpg", SAMPLE_PHOTO.read_bytes(), "image/jpeg"))],
        headers={"Authorization": f"Bearer {operator}"},
        timeout=10,
    )
    response.raise_for_status()
    status_url: str = response.json()["status_url"]
    return f"{status_url}  (read it with the operator token)"


def register_vehicles(gateway: str, admin: str) -> None:
    """Register the demo vehicles through the gateway (a `telemetry:admin` token), before
    their loggers start. 201 registers one, 200 finds it registered by an earlier run (the
    SQLite data under var/dev stays); 503 and 504 mean the telemetry service is not answering
    yet, so they are asked again for a while."""
    import httpx

    for vin, _ in VEHICLES:
        deadline = time.monotonic() + 60
        while True:
            response = httpx.post(
                f"{gateway}/api/v1/vehicles",
                json={"vin": vin},
                headers={"Authorization": f"Bearer {admin}"},
                timeout=10,
            )
            if response.status_code not in (503, 504) or time.monotonic() > deadline:
                break
            time.sleep(1)
        response.raise_for_status()


def create_demo_environment(gateway: str, admin: str) -> str:
    """The demo tracking environment, as an operator makes one: POST the environment (201, or
    409 when an earlier run made it: the SQLite data under var/dev stays), then PUT each camera's
    video unless it has one. The videos are rendered once, from the scene's fixed seed, into
    var/dev/demo-videos. Returns the environment's id once every video is ready."""
    import httpx

    from edgeway.tracker.scenes import demo_environment, demo_scene

    scene = demo_scene()
    body = demo_environment(scene)
    environment_id: str = body["environment_id"]
    headers = {"Authorization": f"Bearer {admin}"}
    url = f"{gateway}/api/v1/environments"
    deadline = time.monotonic() + 60
    while True:  # 503/504: the tracker is not answering yet
        response = httpx.post(url, json=body, headers=headers, timeout=10)
        if response.status_code not in (503, 504) or time.monotonic() > deadline:
            break
        time.sleep(1)
    if response.status_code != 409:
        response.raise_for_status()
    current = httpx.get(f"{url}/{environment_id}", headers=headers, timeout=10).json()
    videos = {camera["camera_id"]: camera.get("video") for camera in current["cameras"]}
    for camera in scene.cameras:
        video = videos.get(camera.camera_id)
        if video is not None and video["status"] == "ready":
            continue
        path = DATA / "demo-videos" / f"{camera.camera_id}.mp4"
        if not path.is_file():
            scene.write_video(camera, path, DEMO_FRAMES)
        httpx.put(
            f"{url}/{environment_id}/cameras/{camera.camera_id}/video",
            content=path.read_bytes(),
            headers={**headers, "Content-Type": "video/mp4"},
            timeout=60,
        ).raise_for_status()
    deadline = time.monotonic() + 60
    while not httpx.get(f"{url}/{environment_id}", headers=headers, timeout=10).json()["ready"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the demo videos were not taken: see {LOGS}/tracker.log")
        time.sleep(0.5)
    return environment_id


# The README shows the same command (a test holds them together).
MINT_COMMAND = "EDGEWAY_ENVIRONMENT=development .venv/bin/edgeway-token --subject me --scope occupancy:subscribe"


def main() -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    common = {
        "EDGEWAY_ENVIRONMENT": "development",
        "EDGEWAY_DATA_DIR": str(DATA),
        "EDGEWAY_AMQP_URL": os.environ.get(
            "EDGEWAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"
        ),
        # Development profile: Omega's producers and apps send no token.
        "EDGEWAY_ANONYMOUS_SCOPES": json.dumps(
            [
                "occupancy:publish",
                "occupancy:subscribe",
                "telemetry:subscribe",
                "video:publish",
                "video:subscribe",
            ]
        ),
        # No seeded vehicles: the demo ones are registered through the API (register_vehicles).
        "EDGEWAY_TELEMETRY_VEHICLES": "[]",
    }
    occupancy = ServiceProcess(
        "edgeway.occupancy", env=common, port=OCCUPANCY_PORT, log_path=LOGS / "occupancy.log"
    )
    telemetry = ServiceProcess(
        "edgeway.telemetry", env=common, port=TELEMETRY_PORT, log_path=LOGS / "telemetry.log"
    )
    video_relay = ServiceProcess(
        "edgeway.video_relay",
        env=common,
        port=VIDEO_RELAY_PORT,
        log_path=LOGS / "video-relay.log",
    )
    # Embedded defaults: SQLite and a local object directory under var/dev (no S3 server here).
    # RTSP: cameras on this machine as well as public ones on the RTSP ports (the service's
    # default, which reaches no loopback or private address unless it is listed).
    rtsp_destinations = json.dumps(["127.0.0.1", "[::1]", "*:554", "*:322"])
    ingestion = ServiceProcess(
        "edgeway.ingestion",
        env={**common, "EDGEWAY_RTSP_ALLOWED_DESTINATIONS": rtsp_destinations},
        port=INGESTION_PORT,
        log_path=LOGS / "ingestion.log",
    )
    # Embedded defaults: SQLite and uploaded videos under var/dev. HOG's pyramid step 1.1: about
    # twice as fast as the default for a few points of recall (services/tracker/README.md).
    tracker = ServiceProcess(
        "edgeway.tracker",
        env={**common, "EDGEWAY_HOG_SCALE": "1.1"},
        port=TRACKER_PORT,
        log_path=LOGS / "tracker.log",
    )
    gateway = ServiceProcess(
        "edgeway.gateway", env=common, port=GATEWAY_PORT, log_path=LOGS / "gateway.log"
    )
    processes: list[ServiceProcess] = []
    producers: list[subprocess.Popen[bytes]] = []

    def token(subject: str, *scopes: str, bound: tuple[str, str] | None = None) -> str:
        """A token from `edgeway-token`; `bound` adds a producer's identity claim (--vin X)."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "edgeway.gateway.tokens",
                "--subject",
                subject,
                *(part for scope in scopes for part in ("--scope", scope)),
                *(bound or ()),
                "--ttl",
                "30d",
            ],
            env={**os.environ, **common},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def producer(name: str, *args: str, token: tuple[str, str]) -> None:
        """Start a demo producer; its token goes in its environment (`token`: the variable and
        the value), where `ps` does not show it."""
        log = (LOGS / f"{name}.log").open("ab")
        env = {**os.environ, token[0]: token[1]}
        producers.append(subprocess.Popen([sys.executable, *args], stdout=log, stderr=log, env=env))

    try:
        for process in (occupancy, telemetry, video_relay, ingestion, tracker, gateway):
            process.start(wait=90)
            processes.append(process)
        register_vehicles(f"http://127.0.0.1:{GATEWAY_PORT}", token("devstack", "telemetry:admin"))
        producer(
            "demo-camera",
            str(ROOT / "deploy/local/demo_camera.py"),
            "--url",
            f"ws://127.0.0.1:{GATEWAY_PORT}/model/ws/connect",
            token=("EDGEWAY_CAMERA_TOKEN", token("demo-camera", "occupancy:publish")),
        )
        for vin, trace in VEHICLES:
            producer(
                f"vehicle-{vin[-6:]}",
                "-m",
                "edgeway.edge.telemetry_logger",
                "--vin",
                vin,
                "--gateway",
                f"http://127.0.0.1:{GATEWAY_PORT}",
                "--trace",
                trace,
                "--outbox",
                str(DATA / f"vehicle-{vin}.sqlite"),
                token=(
                    "EDGEWAY_LOGGER_TOKEN",
                    token(f"vehicle-{vin}", "telemetry:publish", bound=("--vin", vin)),
                ),
            )
        producer(
            PHONE,
            "-m",
            "edgeway.edge.phone",
            "--gateway",
            f"http://127.0.0.1:{GATEWAY_PORT}",
            "--device",
            PHONE,
            *("--width", "640", "--height", "360", "--fps", "30", "--gop", "2"),
            token=("EDGEWAY_PHONE_TOKEN", token(PHONE, "video:publish", bound=("--device", PHONE))),
        )
        operator = token(
            "operator",
            "telemetry:control",
            "ingest:write",
            "ingest:read",
            "tracking:admin",
            "tracking:read",
            "tracking:subscribe",
        )
        gw = f"http://127.0.0.1:{GATEWAY_PORT}"
        demo_upload = upload_demo_image(gw, operator)
        demo_environment = create_demo_environment(gw, operator)
        print(
            f"""
Edgeway is running (development profile: anonymous publish/subscribe allowed for legacy
Omega producers and clients; every endpoint also takes a token).

  live occupancy  {sys.executable} -m websockets ws://127.0.0.1:{GATEWAY_PORT}/client/ws/connect
  model count     {gw}/model/count
  live telemetry  {sys.executable} -m websockets ws://127.0.0.1:{GATEWAY_PORT}/ws
  fleet status    {gw}/status
  live video      ws://127.0.0.1:{GATEWAY_PORT}/ws/video/consume?device={PHONE}
                  (binary messages of raw H.264, Annex-B: SPS, PPS and the current GOP first)
  video viewer    ws://127.0.0.1:{GATEWAY_PORT}/ws/viewer (IMU, trajectory, restarts; commands
                  to phones need a video:control token)
  video status    {gw}/health/video   {gw}/video/status
  dead zone       curl -X POST -H "Authorization: Bearer $EDGEWAY_OPERATOR" {gw}/toggle_offline
                  (also /logger/stop, /logger/start, /clear_data; ?vin=... for one vehicle)
  uploads         curl -H "Authorization: Bearer $EDGEWAY_OPERATOR" -F camera_id=cam-1 \\
                       -F files=@deploy/local/sample.jpg {gw}/api/v1/ingest/upload
                  a demo upload: {gw}{demo_upload}
                  RTSP: POST {gw}/api/v1/ingest/rtsp {{"rtsp_url": "rtsp://...", "camera_id": "cam-1",
                  "capture_mode": "continuous", "fps": 1, "capture_duration": 30}}
                  (frames land in {DATA}/objects; the status is also on ws://.../ws/ingest/<id>)
  tracking        the demo environment {demo_environment} (three rendered cameras): start a batch task,
                  then watch it (the README has both commands):
                  curl -X POST -H "Authorization: Bearer $EDGEWAY_OPERATOR" -H 'Content-Type: application/json' \\
                       -d '{{"environment_id": "{demo_environment}"}}' {gw}/api/v1/processing-tasks/start
                  {sys.executable} -m websockets "ws://127.0.0.1:{GATEWAY_PORT}/ws/tracking/<task_id>?token=$EDGEWAY_OPERATOR"
  operator token  export EDGEWAY_OPERATOR={operator}
  API docs        {gw}/docs
  gateway         {gw}/readyz   {gw}/metrics
  occupancy       http://127.0.0.1:{OCCUPANCY_PORT}/readyz   http://127.0.0.1:{OCCUPANCY_PORT}/metrics
  telemetry       http://127.0.0.1:{TELEMETRY_PORT}/readyz   http://127.0.0.1:{TELEMETRY_PORT}/metrics
  video relay     http://127.0.0.1:{VIDEO_RELAY_PORT}/readyz   http://127.0.0.1:{VIDEO_RELAY_PORT}/metrics
  ingestion       http://127.0.0.1:{INGESTION_PORT}/readyz   http://127.0.0.1:{INGESTION_PORT}/metrics
  tracker         http://127.0.0.1:{TRACKER_PORT}/readyz   http://127.0.0.1:{TRACKER_PORT}/metrics
  data            {DATA} (SQLite; delete it to start over)
  logs            {LOGS}/*.log
  a token         {MINT_COMMAND}

A demo camera model sends frame results for Omega's seven cameras; two simulated vehicles
({VEHICLES[0][0]} on the highway, {VEHICLES[1][0]} in the city) send compressed telemetry every
300 ms; a simulated phone ({PHONE}) streams 640x360 H.264 at 30 fps (a keyframe every 2 s) and
100 IMU samples a second, and logs the viewer commands it receives ({LOGS}/{PHONE}.log).
Ctrl-C stops everything.
""",
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            for process in processes:
                if process.process is not None and process.process.poll() is not None:
                    print(f"{process.module} exited:\n{process.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        for running in producers:
            running.terminate()
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    raise SystemExit(main())
