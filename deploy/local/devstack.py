"""`make run`: the whole stack as local processes on the embedded defaults, with demo data.

Starts the occupancy, telemetry, ingestion and tracker services (SQLite and local objects under
var/dev), the video relay, the gateway, a demo camera model, two simulated vehicles (edge telemetry loggers replaying a highway
and a city trace) and a simulated phone (`edgeway.edge.phone`: H.264 and IMU), creates the demo
tracking environment (three rendered cameras, their videos rendered on the first run from a fixed
seed and uploaded through the gateway), then prints where to look. Development profile: legacy producers and clients that cannot send a token are let in
(anonymous occupancy:publish, occupancy:subscribe, telemetry:subscribe, video:publish and
video:subscribe); the vehicle loggers and the phone use tokens, logger control needs a
telemetry:control token. Ctrl-C stops everything.

Settings: every `EDGEWAY_...` variable given to `make run` reaches every service and wins over
the defaults below (`EDGEWAY_OCCUPANCY_EXTRA_CAMERAS='{"Lib_1": "Library"}' make run`). The
ports are `EDGEWAY_GATEWAY_PORT` and the others below; they are checked before anything starts,
so a second `make run` says which ports another stack holds instead of starting half a stack.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "libs/common/src"))


GATEWAY_PORT = int(os.environ.get("EDGEWAY_GATEWAY_PORT", "8000"))
OCCUPANCY_PORT = int(os.environ.get("EDGEWAY_OCCUPANCY_PORT", "8081"))
TELEMETRY_PORT = int(os.environ.get("EDGEWAY_TELEMETRY_PORT", "8082"))
VIDEO_RELAY_PORT = int(os.environ.get("EDGEWAY_VIDEO_RELAY_PORT", "8083"))
INGESTION_PORT = int(os.environ.get("EDGEWAY_INGESTION_PORT", "8084"))
TRACKER_PORT = int(os.environ.get("EDGEWAY_TRACKER_PORT", "8085"))
# The demo RTSP camera (GStreamer, edgeway.common.testing.rtsp_server): RTSP's usual test port.
RTSP_PORT = int(os.environ.get("EDGEWAY_RTSP_DEMO_PORT", "8554"))
PORTS = {
    "gateway": GATEWAY_PORT,
    "occupancy": OCCUPANCY_PORT,
    "telemetry": TELEMETRY_PORT,
    "video relay": VIDEO_RELAY_PORT,
    "ingestion": INGESTION_PORT,
    "tracker": TRACKER_PORT,
    "RTSP demo camera": RTSP_PORT,
}
# The demo videos: 20 s at 10 fps per camera (edgeway.tracker.scenes.demo_scene).
DEMO_FRAMES = 200
# The seed's default VIN and a second demo vehicle, registered through the gateway's
# /api/v1/vehicles once it is up (`register_vehicles`), as an operator registers a car.
VEHICLES = (("5YJ3E1EA1KF000001", "highway"), ("5YJ3E1EA1KF000002", "city"))
PHONE = "phone-1"
DATA = Path(os.environ.get("EDGEWAY_DATA_DIR", ROOT / "var" / "dev")).resolve()
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


def render_demo_video(camera_id: str) -> Path:
    """One demo camera's video under var/dev/demo-videos, rendered from the scene's fixed seed
    unless an earlier run did (written beside, then renamed: a run cut short leaves none)."""
    from edgeway.tracker.scenes import demo_scene

    path = DATA / "demo-videos" / f"{camera_id}.mp4"
    if not path.is_file():
        scene = demo_scene()
        (camera,) = [camera for camera in scene.cameras if camera.camera_id == camera_id]
        partial = path.with_name(f".{path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.write_video(camera, partial, DEMO_FRAMES)
        partial.replace(path)
    return path


def render_demo_videos() -> None:
    """Every demo camera's video (render_demo_video), while the services start."""
    from edgeway.tracker.scenes import demo_scene

    for camera in demo_scene().cameras:
        render_demo_video(camera.camera_id)


def wait_for_producers(gateway: str, *, timeout: float = 90) -> list[str]:
    """Wait until the demo producers show where the banner points (the camera model connected,
    the vehicles' records stored, the phone's stream decodable), so what a reader opens first
    has data; after `timeout`, what is still missing (each named by its log)."""
    import httpx

    # Each log, with the address and the field that says its producer shows.
    checks = {
        "demo-camera.log": ("/model/count", "count"),
        "vehicle-*.log": ("/status", "total_records"),
        f"{PHONE}.log": ("/health/video", "has_sps_pps"),
    }
    deadline = time.monotonic() + timeout
    while checks and time.monotonic() < deadline:
        for name, (path, key) in list(checks.items()):
            try:
                if httpx.get(gateway + path, timeout=5).json()[key]:
                    del checks[name]
            except (httpx.HTTPError, KeyError, ValueError):
                pass  # not answering yet: asked again
        time.sleep(0.5)
    return [f"{LOGS}/{name}" for name in checks]


def gateway_settings(env: dict[str, str]) -> Any:
    """The gateway's settings as it reads them from `env` (its JWT secret, audience and
    issuer), for minting tokens in this process: a process per token took seconds each."""
    from edgeway.gateway.settings import GatewaySettings

    previous = dict(os.environ)
    os.environ.update(env)
    try:
        return GatewaySettings()
    finally:
        os.environ.clear()
        os.environ.update(previous)


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
        path = render_demo_video(camera.camera_id)
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


# A live environment over the simulated phone's relayed frames (the video relay decodes its H.264
# to JPEGs on `video_frames_exchange`): the README's live task runs on it.
PHONE_ENVIRONMENT = {
    "environment_id": "phone-live",
    "name": "The simulated phone, live",
    "cameras": [
        {
            "camera_id": "phone-1",
            "width": 640,
            "height": 360,
            "source": {"kind": "relay", "device": "phone-1"},
        }
    ],
}


def create_phone_environment(gateway: str, admin: str) -> str:
    """The live environment over the phone (201, or 409 when an earlier run made it)."""
    import httpx

    response = httpx.post(
        f"{gateway}/api/v1/environments",
        json=PHONE_ENVIRONMENT,
        headers={"Authorization": f"Bearer {admin}"},
        timeout=10,
    )
    if response.status_code != 409:
        response.raise_for_status()
    return str(PHONE_ENVIRONMENT["environment_id"])


def taken_ports(ports: dict[str, int]) -> dict[str, int]:
    """The ports of `ports` something already listens on (on 127.0.0.1, where the services
    listen). SO_REUSEADDR as the services' own sockets: a port held only by connections closing
    (TIME_WAIT) is free."""
    taken = {}
    for name, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken[name] = port
    return taken


def ports_message(taken: dict[str, int]) -> str:
    """What to tell someone whose ports are held: whose they seem to be, and the way out."""
    import httpx

    held = ", ".join(f"{port} ({name})" for name, port in taken.items())
    try:
        ours = httpx.get(f"http://127.0.0.1:{GATEWAY_PORT}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        ours = False
    who = (
        "Another Edgeway stack is running here"
        if ours and "gateway" in taken
        else "Other programs are listening here"
    )
    return (
        f"{who}, on port{'s' if len(taken) > 1 else ''} {held}. Nothing was started.\n"
        "Stop it first (Ctrl-C where its `make run` runs), or run this one on other ports, e.g.\n"
        "  EDGEWAY_GATEWAY_PORT=9000 EDGEWAY_OCCUPANCY_PORT=9081 EDGEWAY_TELEMETRY_PORT=9082 "
        "EDGEWAY_VIDEO_RELAY_PORT=9083 \\\n"
        "  EDGEWAY_INGESTION_PORT=9084 EDGEWAY_TRACKER_PORT=9085 EDGEWAY_RTSP_DEMO_PORT=9554 "
        "EDGEWAY_DATA_DIR=var/dev2 make run"
    )


def demo_cameras(env: dict[str, str]) -> list[str]:
    """The cameras the occupancy service maps (its settings as `env` gives them): the demo
    camera model sends for each, so a camera added with EDGEWAY_OCCUPANCY_EXTRA_CAMERAS shows up
    on the live socket at once. The service has refused settings that are not JSON already."""
    from edgeway.occupancy.settings import OMEGA_PLACES

    cameras = json.loads(env.get("EDGEWAY_OCCUPANCY_CAMERAS") or "null") or OMEGA_PLACES
    extra = json.loads(env.get("EDGEWAY_OCCUPANCY_EXTRA_CAMERAS") or "{}")
    return list({**cameras, **extra})


def settings(**defaults: str) -> dict[str, str]:
    """A service's environment: devstack's `defaults`, under every `EDGEWAY_...` setting the
    user gave `make run` (theirs win)."""
    given = {name: value for name, value in os.environ.items() if name.startswith("EDGEWAY_")}
    return {**defaults, **given}


# The README shows the same command (a test holds them together).
MINT_COMMAND = "EDGEWAY_ENVIRONMENT=development .venv/bin/edgeway-token --subject me --scope occupancy:subscribe"


def main() -> int:
    # Ctrl-C stops everything, even where SIGINT came ignored (a shell starts background jobs
    # so, and Python then keeps it ignored): the stack must never outlive what stopped it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    taken = taken_ports(PORTS)
    if taken:
        print(ports_message(taken), file=sys.stderr)
        return 1
    # Imported once the ports are known to be free: a second `make run` answers at once.
    from edgeway.common.testing import ServiceProcess
    from edgeway.common.testing.rtsp import RtspServer, rtsp_server_available

    LOGS.mkdir(parents=True, exist_ok=True)
    defaults = {
        "EDGEWAY_ENVIRONMENT": "development",
        "EDGEWAY_DATA_DIR": str(DATA),
        "EDGEWAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
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
    common = settings(**defaults)
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
    # Embedded defaults: SQLite and a local object directory under var/dev (no S3 server here),
    # whose frames the ingestion service serves itself at signed, expiring URLs.
    # RTSP: cameras on this machine (the demo camera) as well as public ones on the RTSP ports
    # (the service's default, which reaches no loopback or private address unless it is listed).
    rtsp_destinations = json.dumps(["127.0.0.1", "[::1]", "*:554", "*:322"])
    ingestion = ServiceProcess(
        "edgeway.ingestion",
        env=settings(**defaults, EDGEWAY_RTSP_ALLOWED_DESTINATIONS=rtsp_destinations),
        port=INGESTION_PORT,
        log_path=LOGS / "ingestion.log",
    )
    # Embedded defaults: SQLite and uploaded videos under var/dev. HOG's pyramid step 1.1: about
    # twice as fast as the default for a few points of recall (services/tracker/README.md).
    tracker = ServiceProcess(
        "edgeway.tracker",
        env=settings(**defaults, EDGEWAY_HOG_SCALE="1.1"),
        port=TRACKER_PORT,
        log_path=LOGS / "tracker.log",
    )
    gateway = ServiceProcess(
        "edgeway.gateway", env=common, port=GATEWAY_PORT, log_path=LOGS / "gateway.log"
    )
    # The demo RTSP camera, when GStreamer's RTSP server is installed (the tests need it too:
    # deploy/local/ensure-test-tools.sh); without it the stack runs, and the banner says why not.
    rtsp_missing = rtsp_server_available()
    rtsp_camera = RtspServer(port=RTSP_PORT) if rtsp_missing is None else None
    processes: list[ServiceProcess] = []
    producers: list[subprocess.Popen[bytes]] = []

    minting = gateway_settings(common)

    def token(subject: str, *scopes: str, bound: tuple[str, str] | None = None) -> str:
        """A token as `edgeway-token` mints it for this gateway (30 days); `bound` adds a
        producer's identity claim (`("vin", VIN)`)."""
        from edgeway.gateway.tokens import mint

        assert minting.jwt_secret is not None  # development: the built-in secret at least
        return mint(
            subject=subject,
            scopes=list(scopes),
            ttl=30 * 24 * 3600,
            key=minting.jwt_secret.get_secret_value(),
            algorithm="HS256",
            audience=minting.jwt_audience,
            issuer=minting.jwt_issuer,
            identities={bound[0]: [bound[1]]} if bound else None,
        )

    def producer(name: str, *args: str, token: tuple[str, str]) -> None:
        """Start a demo producer; its token goes in its environment (`token`: the variable and
        the value), where `ps` does not show it."""
        log = (LOGS / f"{name}.log").open("ab")
        env = {**os.environ, token[0]: token[1]}
        producers.append(subprocess.Popen([sys.executable, *args], stdout=log, stderr=log, env=env))

    try:
        # All at once, and the demo videos rendered meanwhile: one after the other, the
        # services took about a minute to start on a busy 2-core machine.
        for process in (occupancy, telemetry, video_relay, ingestion, tracker, gateway):
            process.start(wait=0)
            processes.append(process)
        rendering = threading.Thread(target=render_demo_videos, name="demo-videos", daemon=True)
        rendering.start()
        if rtsp_camera is not None:
            rtsp_camera.start()
        for process in processes:
            process.wait_ready(120)
        register_vehicles(f"http://127.0.0.1:{GATEWAY_PORT}", token("devstack", "telemetry:admin"))
        producer(
            "demo-camera",
            str(ROOT / "deploy/local/demo_camera.py"),
            "--url",
            f"ws://127.0.0.1:{GATEWAY_PORT}/model/ws/connect",
            *(part for camera in demo_cameras(common) for part in ("--camera", camera)),
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
                    token(f"vehicle-{vin}", "telemetry:publish", bound=("vin", vin)),
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
            token=("EDGEWAY_PHONE_TOKEN", token(PHONE, "video:publish", bound=("device", PHONE))),
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
        # The web console's sign-in link (web/): every page it has, logger control included.
        console = token(
            "console",
            *("occupancy:subscribe", "telemetry:subscribe", "telemetry:control", "video:subscribe"),
            *(
                "ingest:write",
                "ingest:read",
                "tracking:admin",
                "tracking:read",
                "tracking:subscribe",
                "system:read",
            ),
        )
        demo_upload = upload_demo_image(gw, operator)
        rendering.join()
        demo_environment = create_demo_environment(gw, operator)
        phone_environment = create_phone_environment(gw, operator)
        missing = wait_for_producers(gw)
        if missing:
            print(f"Some demo producers show nothing yet; see {', '.join(missing)}", flush=True)
        if rtsp_camera is not None:
            rtsp_lines = f"""\
                  RTSP, from the demo camera ({rtsp_camera.url("moving")}, 320x240 H.264):
                  curl -H "Authorization: Bearer $EDGEWAY_OPERATOR" -H 'Content-Type: application/json' \\
                       -d '{{"rtsp_url": "{rtsp_camera.url("moving")}", "camera_id": "cam-1", "capture_mode": "continuous", "fps": 1, "capture_duration": 5}}' \\
                       {gw}/api/v1/ingest/rtsp"""
        else:
            rtsp_lines = f"                  RTSP demo camera off: {rtsp_missing}"
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
  dead zone       curl -X POST -H "Authorization: Bearer $EDGEWAY_OPERATOR" "{gw}/toggle_offline?vin={VEHICLES[0][0][-6:]}"
                  (the answer lists each logger's new state; also /logger/stop, /logger/start,
                  /clear_data; without ?vin= for every vehicle)
  uploads         curl -H "Authorization: Bearer $EDGEWAY_OPERATOR" -F camera_id=cam-1 \\
                       -F files=@deploy/local/sample.jpg {gw}/api/v1/ingest/upload
                  a demo upload: {gw}{demo_upload}
{rtsp_lines}
                  (frames land in {DATA}/objects, served at the status's storage_url; the
                  status is also on ws://127.0.0.1:{GATEWAY_PORT}/ws/ingest/<request_id>)
  tracking        the demo environment {demo_environment} (three rendered cameras): start a batch task,
                  then watch it (the README has both commands):
                  curl -X POST -H "Authorization: Bearer $EDGEWAY_OPERATOR" -H 'Content-Type: application/json' \\
                       -d '{{"environment_id": "{demo_environment}"}}' {gw}/api/v1/processing-tasks/start
                  {sys.executable} -m websockets "ws://127.0.0.1:{GATEWAY_PORT}/ws/tracking/<task_id>?token=$EDGEWAY_OPERATOR"
                  and {phone_environment}, the phone's relayed frames: the README starts a live task on it
  web console     {gw}/#token={console}
  operator token  export EDGEWAY_OPERATOR={operator}
  API docs        {gw}/docs   (AsyncAPI: {gw}/docs/asyncapi)
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
        if rtsp_camera is not None:
            rtsp_camera.stop()
        for running in producers:
            running.terminate()
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    raise SystemExit(main())
