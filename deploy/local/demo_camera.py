"""A demo camera model: Omega-style frame results for the seven Omega cameras, forever.

Each camera watches a few tables (ROI zones with a seat capacity); people come and go in a
random walk, and a zone is "occupied" when it holds more people than seats, as Omega's model
decides it (seed-systems.md §1). Reconnects every 5 s when the gateway is away, like Omega's.

    python deploy/local/demo_camera.py --url ws://127.0.0.1:8000/model/ws/connect [--token T]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time

import websockets

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


async def run(url: str, interval: float, seed: int) -> None:
    rng = random.Random(seed)
    cameras = [Camera(name, rng) for name in CAMERAS]
    while True:
        try:
            async with websockets.connect(url, compression=None) as ws:
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
    parser.add_argument("--token", default=None)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo-camera %(message)s")
    url = f"{args.url}?token={args.token}" if args.token else args.url
    asyncio.run(run(url, args.interval, args.seed))


if __name__ == "__main__":
    main()
