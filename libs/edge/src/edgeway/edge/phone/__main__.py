"""`python -m edgeway.edge.phone`: a simulated phone streaming to a gateway until stopped.

    python -m edgeway.edge.phone --gateway http://127.0.0.1:8000 --device phone-1 \
        [--token-file F] [--width 640 --height 360 --fps 30 --gop 2 --bitrate 2000000] \
        [--loop-s 10] [--imu-hz 100]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from edgeway.common.logging import configure_logging, get_logger
from edgeway.edge.credentials import add_token_options, read_token
from edgeway.edge.phone.media import LOOP_S, VideoLoop, draw_frame
from edgeway.edge.phone.simulator import Phone

SERVICE = "phone-simulator"
TOKEN_ENV = "EDGEWAY_PHONE_TOKEN"  # noqa: S105 (a variable name, not a secret)
DEVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the gateway takes as ?device=

log = get_logger("edgeway.edge.phone")  # not "__main__" when run with -m


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgeway.edge.phone",
        description=(
            "Stream a synthetic H.264 pattern and IMU samples to an Edgeway gateway, like "
            "WorldSystem's Android app, until stopped."
        ),
    )
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--device", default="phone", help="device id (?device=)")
    add_token_options(parser, env=TOKEN_ENV, scope="video:publish")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--gop", type=float, default=2.0, help="seconds between keyframes")
    parser.add_argument("--bitrate", type=int, default=2_000_000, help="bits per second")
    parser.add_argument(
        "--loop-s", type=float, default=LOOP_S, help="seconds encoded once and replayed"
    )
    parser.add_argument("--imu-hz", type=float, default=100.0, help="IMU samples/s (0: none)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(service=SERVICE, level=args.log_level)
    if not DEVICE.fullmatch(args.device):
        log.error("--device must be 1 to 64 letters, digits, '_' or '-'", device=args.device)
        return 2
    if min(args.fps, args.gop, args.bitrate, args.loop_s) <= 0 or args.imu_hz < 0:
        log.error("--fps, --gop, --bitrate and --loop-s must be positive, --imu-hz not negative")
        return 2
    try:
        draw_frame(args.width, args.height, 0)
    except ValueError as exc:
        log.error("unusable picture size", reason=str(exc))
        return 2
    token = read_token(parser, args, env=TOKEN_ENV)
    if not token:
        log.warning("no token: the gateway will refuse the phone unless it grants anonymous scopes")
    return asyncio.run(_run_until_signalled(args, token))


async def _run_until_signalled(args: argparse.Namespace, token: str) -> int:
    """Encode the loop, then stream; SIGTERM and SIGINT stop it cleanly."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    phone: Phone | None = None
    try:
        started = time.perf_counter()
        video = await asyncio.to_thread(
            VideoLoop.encode,
            args.width,
            args.height,
            args.fps,
            seconds=args.loop_s,
            gop_s=args.gop,
            bitrate=args.bitrate,
        )
        log.info(
            "video loop encoded",
            frames=len(video.frames),
            gop_frames=video.gop_frames,
            bytes=sum(len(p.payload) for frame in video.frames for p in frame),
            took_s=round(time.perf_counter() - started, 2),
        )
        phone = Phone(args.gateway, args.device, token, video, imu_hz=args.imu_hz)
        await phone.run()
    except asyncio.CancelledError:
        counters = asdict(phone.counters) if phone is not None else {}
        log.info("phone stopped by signal", device=args.device, **counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
