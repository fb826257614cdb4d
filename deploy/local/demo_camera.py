"""A demo camera model: Omega-style frame results for the seven Omega cameras (or the
`--camera` ids given), forever.

Each camera watches a few tables (ROI zones with a seat capacity); people come and go in a
random walk, and a zone is "occupied" when it holds more people than seats, as Omega's model
decides it. Reconnects every 5 s when the gateway is away, like Omega's.

    EDGEWAY_CAMERA_TOKEN=... python deploy/local/demo_camera.py \
        --url ws://127.0.0.1:8000/model/ws/connect

The token (scope occupancy:publish) comes from EDGEWAY_CAMERA_TOKEN or --token-file, never from
the command line, and travels in the Authorization header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time

import websockets

from edgeway.edge.credentials import add_token_options, read_token

TOKEN_ENV = "EDGEWAY_CAMERA_TOKEN"  # noqa: S105 (a variable name, not a secret)

CAMERAS = ("OW_1", "Flint_1", "PaulaPlaza_1", "SU_1", "SU_2", "SU_3", "Tims_1")
log = logging.getLogger("demo-camera")


class Camera:
    def __init__(self, camera: str, rng: random.Random) -> None:
        self.camera = camera
        self.rng = rng
        self.capacity = [rng.choice((2, 4, 6)) for _ in range(rng.randint(3, 8))]
        self.people = [rng.randint(0, c) for c in self.capacity]

    def frame(self) -> dict[str, object]:
        self.people = [max(0, n + self.rng.choice((-1, 0, 0, 1))) for n in self.people]
        segments = []
        for index, (capacity, count) in enumerate(zip(self.capacity, self.people, strict=True)):
            status = "occupied" if capacity and count > capacity else "free"
            segments.append(
                {
                    "index": index,
                    "name": f"table_{index}",
                    "capacity": capacity,
                    "count": count,
                    "status": status,
                }
            )
        return {
            "event": "frame_result",
            "camera": self.camera,
            "timestamp": time.time(),
            "summary": {
                "total_people": sum(self.people),
                "free": [s["name"] for s in segments if s["status"] == "free"],
                "occupied": [s["name"] for s in segments if s["status"] == "occupied"],
            },
            "segments": segments,
        }


async def run(url: str, token: str, interval: float, seed: int, names: list[str]) -> None:
    rng = random.Random(seed)
    cameras = [Camera(name, rng) for name in names]
    while True:
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with websockets.connect(url, compression=None, additional_headers=headers) as ws:
                log.info("connected to %s", url.split("?")[0])
                errors = asyncio.create_task(_print_errors(ws))
                try:
                    while True:
                        for camera in cameras:
                            await ws.send(json.dumps(camera.frame()))
                            await asyncio.sleep(interval / len(cameras))
                finally:
                    errors.cancel()
        except (OSError, websockets.WebSocketException) as exc:
            log.warning("gateway unavailable (%s); retrying in 5 s", exc)
            await asyncio.sleep(5)


async def _print_errors(ws: websockets.ClientConnection) -> None:
    async for reply in ws:
        log.warning("gateway said: %s", reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/model/ws/connect")
    add_token_options(parser, env=TOKEN_ENV, scope="occupancy:publish")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--camera",
        action="append",
        dest="cameras",
        help="a camera id to send for (repeat it; default: Omega's seven)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo-camera %(message)s")
    token = read_token(parser, args, env=TOKEN_ENV)
    asyncio.run(run(args.url, token, args.interval, args.seed, args.cameras or list(CAMERAS)))


if __name__ == "__main__":
    main()
