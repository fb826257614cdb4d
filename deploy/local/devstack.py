"""`make run`: the whole stack as local processes on the embedded defaults, with demo data.

Starts the occupancy service (SQLite under var/dev), the gateway and a demo camera model, then
prints where to look. Development profile: legacy producers and clients that cannot send a
token are let in (anonymous occupancy:publish and occupancy:subscribe); tokens work as well.
Ctrl-C stops everything.
"""

from __future__ import annotations

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
DATA = ROOT / "var" / "dev"
LOGS = DATA / "logs"


def main() -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    common = {
        "EDGEWAY_ENVIRONMENT": "development",
        "EDGEWAY_DATA_DIR": str(DATA),
        "EDGEWAY_AMQP_URL": os.environ.get(
            "EDGEWAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"
        ),
        # Development profile: Omega's producers and apps send no token.
        "EDGEWAY_ANONYMOUS_SCOPES": '["occupancy:publish", "occupancy:subscribe"]',
    }
    occupancy = ServiceProcess(
        "edgeway.occupancy", env=common, port=OCCUPANCY_PORT, log_path=LOGS / "occupancy.log"
    )
    gateway = ServiceProcess(
        "edgeway.gateway", env=common, port=GATEWAY_PORT, log_path=LOGS / "gateway.log"
    )
    processes: list[ServiceProcess] = []
    camera: subprocess.Popen[bytes] | None = None
    try:
        for process in (occupancy, gateway):
            process.start(wait=90)
            processes.append(process)
        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgeway.gateway.tokens",
                "--subject",
                "demo-camera",
                "--scope",
                "occupancy:publish",
                "--ttl",
                "30d",
            ],
            env={**os.environ, **common},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        camera_log = (LOGS / "demo-camera.log").open("ab")
        camera = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "deploy/local/demo_camera.py"),
                "--url",
                f"ws://127.0.0.1:{GATEWAY_PORT}/model/ws/connect",
                "--token",
                token,
            ],
            stdout=camera_log,
            stderr=subprocess.STDOUT,
        )
        gw = f"http://127.0.0.1:{GATEWAY_PORT}"
        print(
            f"""
Edgeway is running (development profile: anonymous publish/subscribe allowed for legacy
Omega producers and clients; every endpoint also takes a token).

  live occupancy  {sys.executable} -m websockets ws://127.0.0.1:{GATEWAY_PORT}/client/ws/connect
  model count     {gw}/model/count
  API docs        {gw}/docs
  gateway         {gw}/readyz   {gw}/metrics
  occupancy       http://127.0.0.1:{OCCUPANCY_PORT}/readyz   http://127.0.0.1:{OCCUPANCY_PORT}/metrics
  data            {DATA} (SQLite; delete it to start over)
  logs            {LOGS}/*.log
  a token         {sys.executable} -m edgeway.gateway.tokens --subject me --scope occupancy:subscribe

A demo camera model sends frame results for Omega's seven cameras. Ctrl-C stops everything.
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
        if camera is not None:
            camera.terminate()
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    raise SystemExit(main())
