"""Video fan-out: the suite's video path against an in-process seed-like relay, in one run.

    .venv/bin/python -m bench.video_fanout [--quick] [--output PATH]

- suite: `edgeway.gateway` + `edgeway.video_relay` on a private RabbitMQ virtual host;
- relay: `bench.inproc_video_relay` (one process, SPS/PPS cache only, like the seed).

For each: one phone process streams a pre-encoded 640x360 30 fps 2 Mbit/s stream (gop 2 s) with
fresh timestamps to `/ws/video`; 100 viewers in 2 worker processes read `/ws/video/consume`.
Latency per frame = viewer receive time - the phone's send time of that frame (frames are
counted by packet order: payloads whose first NAL unit is not SPS/PPS). Then 10 late joiners at
random moments: time from connect to the first decoded frame (PyAV). Then gateway (or relay)
RSS with 0 and 100 viewers. Prints tables and writes bench/results/video_fanout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import av
import httpx
import orjson
import websockets

from bench.cpu import CpuMeter, pids_named
from edgeway.common.testing import ServiceProcess, create_vhost, drop_vhost, free_port
from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.edge.phone.media import synthetic_stream
from edgeway.gateway.tokens import mint_with_secret

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "bench-video-secret-that-is-long-enough-for-hs256"  # noqa: S105 (local only)
WIDTH, HEIGHT, FPS, GOP_S, BITRATE = 640, 360, 30, 2.0, 2_000_000
P99_GOAL_MS, JOIN_GOAL_MS = 50.0, 150.0

Frame = list[VideoPacket]  # SPS/PPS (before keyframes) then the KEYFRAME or FRAME


def encode_clip(seconds: float) -> list[Frame]:
    frames: list[Frame] = []
    held: Frame = []
    for packet in synthetic_stream(WIDTH, HEIGHT, FPS, seconds, gop_s=GOP_S, bitrate=BITRATE):
        held.append(packet)
        if packet.type in (PacketType.KEYFRAME, PacketType.FRAME):
            frames.append(held)
            held = []
    return frames


def token(*scopes: str, device: str | None = None) -> str:
    """A token; a phone's names its device (the `device` claim), as the gateway requires."""
    return mint_with_secret(
        SECRET, *scopes, subject="bench", ttl=3600, device=[device] if device else None
    )


def nal_type(payload: bytes) -> int:
    index = payload.find(b"\x00\x00\x01")
    return payload[index + 3] & 0x1F if 0 <= index < len(payload) - 3 else -1


def is_frame(payload: bytes) -> bool:
    return nal_type(payload) not in (7, 8)


# --------------------------------------------------------------------------------------------
# Phone and viewer processes


async def _phone(url: str, clip: list[Frame], count: int) -> list[float]:
    sent: list[float] = []
    async with websockets.connect(url, compression=None, max_size=None, proxy=None) as ws:
        started = time.monotonic()
        for n in range(count):
            delay = started + n / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = clip[n % len(clip)]
            now_us = time.time_ns() // 1000
            sent.append(time.time())
            for packet in frame:
                await ws.send(replace(packet, timestamp_us=now_us).encode())
        await asyncio.sleep(0.5)
    return sent


def phone_process(url: str, clip: list[Frame], count: int, out: Any) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        out.put(asyncio.run(_phone(url, clip, count)))


async def _viewer(url: str, expected: int, ready: asyncio.Event, done: list[list[float]]) -> None:
    times: list[float] = []
    async with websockets.connect(url, compression=None, max_size=None, proxy=None) as ws:
        ready.set()
        while len(times) < expected:
            try:
                message = await asyncio.wait_for(ws.recv(), 5.0 if times else 90.0)
            except (TimeoutError, websockets.ConnectionClosed):
                break
            if isinstance(message, bytes) and is_frame(message):
                times.append(time.time())
    done.append(times)


async def _viewers(url: str, count: int, expected: int, out: Any) -> None:
    done: list[list[float]] = []
    events = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(_viewer(url, expected, e, done)) for e in events]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    out.put(("ready", os.getpid()))
    await asyncio.gather(*tasks, return_exceptions=True)
    out.put(("done", done))


def viewer_process(url: str, count: int, expected: int, out: Any) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_viewers(url, count, expected, out))


async def _join(url: str) -> float:
    """Seconds from connect to the first decoded picture."""
    decoder = av.CodecContext.create("h264", "r")
    started = time.monotonic()
    headers = b""
    async with websockets.connect(url, compression=None, max_size=None, proxy=None) as ws:
        while True:
            message = await asyncio.wait_for(ws.recv(), 10)
            if not isinstance(message, bytes):
                continue
            if not is_frame(message):
                headers += message
                continue
            with contextlib.suppress(av.error.FFmpegError):
                if decoder.decode(av.Packet(headers + message)):
                    return time.monotonic() - started


async def late_joins(url: str, joins: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    results = []
    await asyncio.sleep(2.5)  # let the stream run past its first GOP
    for _ in range(joins):
        await asyncio.sleep(rng.uniform(0.0, 2 * GOP_S))
        results.append(await _join(url))
    return results


# --------------------------------------------------------------------------------------------
# Targets


class Target:
    def __init__(self, name: str, logs: Path) -> None:
        self.name = name
        self.logs = logs
        self.vhost: str | None = None
        self.processes: dict[str, ServiceProcess] = {}

    def _service(self, label: str, module: str, env: dict[str, str], wait: float = 60) -> None:
        log_path = self.logs / f"video_fanout-{self.name}-{label}.log"
        log_path.unlink(missing_ok=True)
        process = ServiceProcess(module, env=env, port=free_port(), log_path=log_path)
        self.processes[label] = process
        process.start(wait=wait)

    def start(self) -> None:
        if self.name == "relay":
            self._service("relay", "bench.inproc_video_relay", {})
            return
        self.vhost, amqp_url = create_vhost("edgeway-bench")
        env = {
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_JWT_SECRET": SECRET,
            "EDGEWAY_NTP_SERVERS": "[]",
            "EDGEWAY_LOG_LEVEL": "WARNING",
        }
        self._service("video_relay", "edgeway.video_relay", env)
        self._service("gateway", "edgeway.gateway", env)

    @property
    def front(self) -> ServiceProcess:
        return self.processes["gateway" if self.name == "suite" else "relay"]

    def url(self, path: str, scope: str, device: str) -> str:
        base = self.front.url.replace("http", "ws")
        return f"{base}{path}?token={token(scope, device=device)}&device={device}"

    def wait_consumers(self, count: int, timeout: float = 30.0) -> None:
        if self.name != "suite":
            return
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {token('video:subscribe')}"}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = httpx.get(self.front.url + "/health/video", headers=headers, timeout=5)
                if health.json().get("active_consumers", 0) >= count:
                    return
            time.sleep(0.1)

    def groups(self) -> dict[str, Any]:
        def pid_of(process: ServiceProcess) -> Any:
            return lambda: [process.process.pid] if process.process is not None else []

        groups = {label: pid_of(process) for label, process in self.processes.items()}
        if self.name == "suite":
            groups["rabbitmq"] = lambda: pids_named("beam.smp")
        return groups

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            with contextlib.suppress(Exception):
                process.stop()
        if self.vhost is not None:
            with contextlib.suppress(Exception):
                drop_vhost(self.vhost)
            self.vhost = None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_target(
    target: Target, clip: list[Frame], args: argparse.Namespace, children: list[Any]
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    target.start()
    front_pid = target.front.process.pid if target.front.process else 0
    device = f"bench-{target.name}-{os.getpid()}"
    consume = target.url("/ws/video/consume", "video:subscribe", device)
    publish = target.url("/ws/video", "video:publish", device)
    frames = round(args.seconds * FPS)
    time.sleep(1.0)
    rss_idle = rss_kib(front_pid)

    queue = ctx.Queue()
    per_worker = [
        args.viewers // args.workers + (i < args.viewers % args.workers)
        for i in range(args.workers)
    ]
    workers = [
        ctx.Process(target=viewer_process, args=(consume, n, frames, queue)) for n in per_worker
    ]
    children.extend(workers)
    for worker in workers:
        worker.start()
    worker_pids = [queue.get(timeout=90)[1] for _ in workers]
    target.wait_consumers(args.viewers)
    time.sleep(1.0)
    rss_full = rss_kib(front_pid)

    groups = target.groups()
    groups["viewers"] = lambda: worker_pids
    phone_out = ctx.Queue()
    phone = ctx.Process(target=phone_process, args=(publish, clip, frames, phone_out))
    children.append(phone)
    groups["phone"] = lambda: [phone.pid] if phone.pid else []
    meter = CpuMeter(groups)
    meter.start()
    phone.start()
    sent: list[float] = phone_out.get(timeout=args.seconds + 60)
    results: list[list[float]] = []
    for _ in workers:
        _kind, done = queue.get(timeout=60)
        results.extend(done)
    cpu = meter.stop()
    for process in (*workers, phone):
        process.join(10)

    latencies = [
        (received - sent[i]) * 1000
        for times in results
        for i, received in enumerate(times)
        if i < len(sent)
    ]
    counts = [len(times) for times in results]
    drops = sum(max(0, len(sent) - c) for c in counts)

    # Late joiners, while a second phone streams on a fresh device.
    join_device = device + "-join"
    join_publish = target.url("/ws/video", "video:publish", join_device)
    join_consume = target.url("/ws/video/consume", "video:subscribe", join_device)
    join_frames = round((3 + args.joins * (2 * GOP_S + 1.5)) * FPS)
    phone_out = ctx.Queue()
    phone = ctx.Process(target=phone_process, args=(join_publish, clip, join_frames, phone_out))
    children.append(phone)
    phone.start()
    try:
        joins = asyncio.run(late_joins(join_consume, args.joins, seed=7))
    finally:
        phone.terminate()
        phone.join(10)
    target.stop()

    join_ms = [j * 1000 for j in joins]
    return {
        "frames_sent": len(sent),
        "viewers": len(results),
        "frames_received_min": min(counts, default=0),
        "frames_received_mean": round(statistics.fmean(counts), 1) if counts else 0,
        "drops": drops,
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 2),
            "p99": round(percentile(latencies, 99), 2),
            "max": round(max(latencies, default=float("nan")), 2),
        },
        "cpu_percent": cpu,
        "late_join_ms": [round(j, 1) for j in join_ms],
        "late_join_mean_ms": round(statistics.fmean(join_ms), 1) if join_ms else None,
        "late_join_max_ms": round(max(join_ms), 1) if join_ms else None,
        "rss_kib_0_viewers": rss_idle,
        "rss_kib_100_viewers": rss_full,
        "rss_kib_per_viewer": round((rss_full - rss_idle) / max(1, args.viewers), 1),
    }


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def report(results: dict[str, dict[str, Any]]) -> None:
    rows = [
        [
            "target",
            "sent",
            "viewers",
            "recv min",
            "recv mean",
            "drops",
            "p50 ms",
            "p99 ms",
            "max ms",
        ]
    ]
    for name, r in results.items():
        lat = r["latency_ms"]
        rows.append(
            [
                name,
                str(r["frames_sent"]),
                str(r["viewers"]),
                str(r["frames_received_min"]),
                str(r["frames_received_mean"]),
                str(r["drops"]),
                str(lat["p50"]),
                str(lat["p99"]),
                str(lat["max"]),
            ]
        )
    print("\nRelay-added latency per frame (viewer receive - phone send)\n" + table(rows))
    rows = [["target", "group", "cpu % of a core"]]
    for name, r in results.items():
        rows += [[name, group, str(value)] for group, value in r["cpu_percent"].items()]
    print("\nCPU during the stream\n" + table(rows))
    rows = [["target", "joins", "mean ms", "max ms", "each ms"]]
    for name, r in results.items():
        each = " ".join(f"{j:.0f}" for j in r["late_join_ms"])
        rows.append(
            [
                name,
                str(len(r["late_join_ms"])),
                str(r["late_join_mean_ms"]),
                str(r["late_join_max_ms"]),
                each,
            ]
        )
    print("\nLate joiner: connect -> first decoded frame\n" + table(rows))
    rows = [["target", "RSS 0 viewers KiB", "RSS 100 viewers KiB", "KiB per viewer"]]
    for name, r in results.items():
        rows.append(
            [
                name,
                str(r["rss_kib_0_viewers"]),
                str(r["rss_kib_100_viewers"]),
                str(r["rss_kib_per_viewer"]),
            ]
        )
    print("\nMemory of the front process (suite: gateway)\n" + table(rows))
    if "suite" in results:
        s = results["suite"]
        ok = s["latency_ms"]["p99"] <= P99_GOAL_MS and s["drops"] == 0
        print(
            f"\nVERDICT latency: {'PASS' if ok else 'FAIL'} "
            f"(suite p99 {s['latency_ms']['p99']} ms <= {P99_GOAL_MS}, drops {s['drops']} == 0)"
        )
        ok = s["late_join_max_ms"] is not None and s["late_join_max_ms"] <= JOIN_GOAL_MS
        print(
            f"VERDICT late joiner: {'PASS' if ok else 'FAIL'} "
            f"(suite max {s['late_join_max_ms']} ms, mean {s['late_join_mean_ms']} ms <= "
            f"{JOIN_GOAL_MS}; relay mean {results.get('relay', {}).get('late_join_mean_ms')} ms)"
        )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "video_fanout.json")
    args = parser.parse_args(argv)
    args.seconds = 3.0 if args.quick else 10.0
    args.joins = 3 if args.quick else 10
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    print(
        f"encoding {args.seconds:.0f} s of {WIDTH}x{HEIGHT} {FPS} fps "
        f"{BITRATE / 1e6:.0f} Mbit/s, gop {GOP_S} s"
    )
    clip = encode_clip(args.seconds)
    results: dict[str, dict[str, Any]] = {}
    children: list[Any] = []
    targets = [Target(name, RESULTS / "logs") for name in ("suite", "relay")]
    try:
        for target in targets:
            print(f"running {target.name} ...", flush=True)
            results[target.name] = run_target(target, clip, args, children)
    except KeyboardInterrupt:
        print("interrupted: stopping", file=sys.stderr)
    finally:
        for child in children:
            with contextlib.suppress(Exception):
                if child.is_alive():
                    child.terminate()
                    child.join(5)
        for target in targets:
            target.stop()
    if results:
        report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "quick": args.quick,
        "stream": {
            "width": WIDTH,
            "height": HEIGHT,
            "fps": FPS,
            "gop_s": GOP_S,
            "bitrate": BITRATE,
        },
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    args.output.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.output} ({payload['seconds']} s)")
    return 0 if len(results) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
