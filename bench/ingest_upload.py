"""Image uploads end to end beside raw object-store puts, in one run.

    .venv/bin/python -m bench.ingest_upload [--quick]

One S3-protocol server (moto, its own process, as in the tests) takes both:

1. Raw: the `minio` client puts every image straight into a bucket from 8 threads: the storage
   limit of this machine and server.
2. Suite: 8 HTTP clients post the same images to `POST /api/v1/ingest/upload` on the gateway, in
   requests of 10 files and of 1 file; the ingestion service checks each in full (decode and
   re-encode in a worker thread), stores it in the same server and commits its row in PostgreSQL.
   The clock stops at the last row's commit (`frames.created_at`), so "stored and committed" is
   what is measured, not "accepted".

The images are ~200 KB JPEGs (noise, so they do not compress to nothing). Prints a table and
writes bench/results/ingest_upload.json; it never asserts timings. The target (issue 5): suite
images/s >= 0.5 x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from minio import Minio
from PIL import Image

from bench.cpu import CpuMeter, background, pids_named
from bench.occupancy_fanout import interrupts_as_keyboard_interrupt, machine_facts, table
from edgeway.common.testing import (
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
    make_token,
)
from edgeway.common.testing.s3 import ACCESS_KEY, SECRET_KEY, S3Server
from tests.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = 8
TARGET_RATIO = 0.5
BUCKET = "bench-frames"


def make_images(count: int, *, target_bytes: int = 200_000) -> list[bytes]:
    """`count` distinct JPEGs of about `target_bytes` (Gaussian noise at quality 90)."""
    side = 256
    for _ in range(4):  # size by measurement: bytes grow with the pixel count
        probe = io.BytesIO()
        Image.effect_noise((side, side), 60).convert("RGB").save(probe, "JPEG", quality=90)
        side = int(side * (target_bytes / len(probe.getvalue())) ** 0.5)
    base = Image.effect_noise((side, side), 60).convert("RGB")
    images = []
    for index in range(count):
        tile = base.rotate(index % 360)
        out = io.BytesIO()
        tile.save(out, "JPEG", quality=90)
        images.append(out.getvalue())
    return images


def raw_puts(client: Minio, images: list[bytes]) -> dict[str, Any]:
    if not client.bucket_exists("raw"):
        client.make_bucket("raw")
    started = time.perf_counter()

    def put(item: tuple[int, bytes]) -> None:
        index, data = item
        client.put_object("raw", f"raw/{index}.jpg", io.BytesIO(data), len(data), "image/jpeg")

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(put, enumerate(images)))
    seconds = time.perf_counter() - started
    return _rates("raw minio puts", len(images), sum(map(len, images)), seconds, batch=1)


def _rates(name: str, count: int, size: int, seconds: float, *, batch: int) -> dict[str, Any]:
    return {
        "path": name,
        "batch": batch,
        "images": count,
        "seconds": round(seconds, 3),
        "images_per_s": round(count / seconds, 1),
        "mb_per_s": round(size / seconds / 1e6, 2),
    }


async def suite_uploads(
    stack: Stack, database_url: str, images: list[bytes], *, batch: int
) -> dict[str, Any]:
    with psycopg.connect(database_url) as connection:
        before = connection.execute("SELECT count(*) FROM frames").fetchone()
    assert before is not None
    headers = {"Authorization": f"Bearer {make_token('ingest:write')}"}
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    queue: asyncio.Queue[list[bytes]] = asyncio.Queue()
    for item in batches:
        queue.put_nowait(item)
    latencies: list[float] = []
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            files = [
                ("files", (f"{i}.jpg", data, "image/jpeg"))
                for i, data in enumerate(await queue.get())
            ]
            sent = time.perf_counter()
            response = await http.post(
                "/api/v1/ingest/upload", data={"camera_id": "bench-cam"}, files=files
            )
            latencies.append(time.perf_counter() - sent)
            failures += response.status_code != 202

    started_wall = time.time()
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=stack.gateway.url, headers=headers, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    accepted_s = time.perf_counter() - started
    expected = before[0] + len(images) - failures * batch
    row = await asyncio.to_thread(_wait_committed, database_url, expected)
    last: datetime = row[1]
    seconds = last.timestamp() - started_wall
    result = _rates(
        f"suite, {batch} file(s) per request",
        len(images),
        sum(map(len, images)),
        seconds,
        batch=batch,
    )
    result.update(
        {
            "committed": row[0] - before[0],
            "failed_requests": failures,
            "accepted_s": round(accepted_s, 3),
            "request_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "request_max_ms": round(max(latencies) * 1000, 1),
        }
    )
    return result


def cpu_meter(stack: Stack, s3: S3Server) -> CpuMeter:
    def pid(process: Any) -> list[int]:
        return [process.pid] if process is not None and process.poll() is None else []

    return CpuMeter(
        {
            "gateway": lambda: pid(stack.gateway.process),
            "ingestion": lambda: pid(stack.ingestion.process if stack.ingestion else None),
            "s3 server": lambda: pid(s3.process),
            "rabbitmq": lambda: pids_named("beam.smp"),
            "postgres": lambda: pids_named("postgres"),
        }
    )


def measured(meter: CpuMeter, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s result with each process group's CPU: % of a core, and ms per image."""
    meter.start()
    result = run()
    cpu = meter.stop()
    result["cpu_percent"] = cpu
    result["cpu_ms_per_image"] = {
        name: round(percent / 100 * result["seconds"] * 1000 / result["images"], 2)
        for name, percent in cpu.items()
    }
    return result


def _wait_committed(database_url: str, expected: int) -> tuple[int, datetime]:
    """(frames, last commit time) once `expected` frames are committed (or after 5 min)."""
    with psycopg.connect(database_url) as connection:
        deadline = time.monotonic() + 300
        while True:
            row = connection.execute("SELECT count(*), max(created_at) FROM frames").fetchone()
            assert row is not None
            if row[0] >= expected or time.monotonic() > deadline:
                return row[0], row[1]
            time.sleep(0.05)


def render(results: dict[str, Any]) -> str:
    rows = [
        [
            run["path"],
            str(run["images"]),
            f"{run['images_per_s']:.1f}",
            f"{run['mb_per_s']:.2f}",
            str(run.get("request_p50_ms", "-")),
            f"{run['images_per_s'] / results['baseline_images_per_s']:.2f}",
        ]
        for run in (results["raw"], *results["suite"], results["raw_after"])
    ]
    # "x raw": against the mean of the two raw runs.
    headers = ["path", "images", "images/s", "MB/s", "req p50 ms", "x raw"]
    groups = list(results["raw"]["cpu_ms_per_image"])
    cpu_rows = [
        [run["path"], *(f"{run['cpu_ms_per_image'][g]:.1f}" for g in groups)]
        for run in (results["raw"], *results["suite"], results["raw_after"])
    ]
    verdict = "met" if results["best_ratio"] >= TARGET_RATIO else "NOT met"
    return (
        f"image uploads, ~{results['image_kb']:.0f} KB JPEGs, {CLIENTS} clients, "
        f"machine busy {results['background_cpu']:.0f}% before the run\n"
        + table(headers, rows)
        + f"\nbest suite/raw = {results['best_ratio']:.2f} (target >= {TARGET_RATIO}: {verdict})"
        + "\n\nCPU ms per image, by process group (machine: every process; other: not ours)\n"
        + table(["path", *groups], cpu_rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Image uploads: suite vs raw minio puts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images")
    parser.add_argument("--images", type=int, default=400, help="images per run")
    args = parser.parse_args(argv)
    count = 40 if args.quick else args.images
    images = make_images(count)
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "background_cpu": background(),
        "image_kb": statistics.mean(map(len, images)) / 1000,
    }
    work = Path(tempfile.mkdtemp(prefix="edgeway-bench-ingest-"))
    vhost, amqp_url = create_vhost()
    occupancy_db = create_postgres_database()
    ingestion_db = create_postgres_database("edgeway_ingestion")
    s3 = S3Server(work / "moto.log")
    stack: Stack | None = None
    try:
        with interrupts_as_keyboard_interrupt():
            s3.start()
            client = Minio(s3.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
            stack = Stack(
                amqp_url,
                occupancy_db,
                work,
                extra_env={"EDGEWAY_LOG_LEVEL": "WARNING"},
                ingestion_env={
                    **s3.env,
                    "EDGEWAY_INGESTION_DATABASE_URL": ingestion_db,
                    "EDGEWAY_STORAGE_BUCKET": BUCKET,
                    "EDGEWAY_LOG_LEVEL": "WARNING",
                },
            ).start()
            # Warm both paths (connections, bucket lookups, the decode threads).
            raw_puts(client, images[:8])
            asyncio.run(suite_uploads(stack, ingestion_db, images[:10], batch=10))
            meter = cpu_meter(stack, s3)
            results["raw"] = measured(meter, lambda: raw_puts(client, images))
            results["suite"] = [
                measured(
                    meter,
                    lambda batch=batch: asyncio.run(
                        suite_uploads(stack, ingestion_db, images, batch=batch)
                    ),
                )
                for batch in (10, 1)
            ]
            # Raw again after the suite: this machine's speed drifts within minutes, so the
            # baseline is the mean of a run on each side of the suite's.
            results["raw_after"] = measured(meter, lambda: raw_puts(client, images))
            results["raw_after"]["path"] = "raw minio puts, again"
    finally:
        if stack is not None:
            stack.stop()
        s3.stop()
        drop_postgres_database(ingestion_db)
        drop_postgres_database(occupancy_db)
        drop_vhost(vhost)
    results["baseline_images_per_s"] = statistics.mean(
        run["images_per_s"] for run in (results["raw"], results["raw_after"])
    )
    results["best_ratio"] = max(
        run["images_per_s"] / results["baseline_images_per_s"] for run in results["suite"]
    )
    print(render(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest_upload.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
