"""RTSP capture against a real GStreamer RTSP camera (edgeway.common.testing.rtsp), no mocks.

The seed (docs/replaced-systems.md) cut captures at ~5 s, blocked the event loop, ignored
event_driven and backed off linearly; these tests pin each of those down as fixed.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import numpy as np
import pytest

from edgeway.common.rtsp.capture import (
    Capture,
    CapturedFrame,
    CaptureError,
    CaptureLimits,
    CaptureMode,
    CapturePlan,
    change_score,
    mask_credentials,
    thumbnail,
)
from edgeway.common.rtsp.destinations import DestinationPolicy
from edgeway.common.testing.processes import free_port
from edgeway.common.testing.rtsp import RtspServer, rtsp_server_available

USER = "camera"
PASSWORD = "s3cret/p@ss"  # a '/' and an '@' that must be percent-encoded and still masked
SWITCH_INTERVAL_S = 1.0
# Small limits so failures show within a second or two; the defaults are production values.
FAST = CaptureLimits(
    open_timeout_s=1.0,
    stall_timeout_s=1.0,
    reconnect_attempts=4,
    backoff_initial_s=0.2,
    backoff_max_s=0.5,
)

# The test cameras listen on loopback, which a capture reaches only where it is allowed: by
# default, public addresses only.
LOOPBACK = DestinationPolicy.parse(["127.0.0.1"])


def on_loopback(plan: CapturePlan, limits: CaptureLimits | None = None) -> Capture:
    return Capture(plan, limits or CaptureLimits(), destinations=LOOPBACK)


def _require_server() -> None:
    reason = rtsp_server_available()
    if reason is not None:
        pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="module")
def camera() -> Iterator[RtspServer]:
    """One shared camera with digest auth, for the tests that do not break it."""
    _require_server()
    with RtspServer(user=USER, password=PASSWORD, switch_interval_s=SWITCH_INTERVAL_S) as server:
        yield server


@pytest.fixture
def own_camera() -> Iterator[RtspServer]:
    """A camera of this test's own, to kill or pause."""
    _require_server()
    with RtspServer() as server:
        yield server


async def collect(capture: Capture) -> tuple[list[CapturedFrame], list[float]]:
    """All frames, and the monotonic time each reached the consumer."""
    frames: list[CapturedFrame] = []
    arrivals: list[float] = []
    async for frame in capture.frames():
        frames.append(frame)
        arrivals.append(time.monotonic())
    return frames, arrivals


def _secret_forms() -> tuple[str, str]:
    return PASSWORD, quote(PASSWORD, safe="")


# -- no server ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/cam", "rtsp://***@10.0.0.5:554/cam"),
        ("rtsps://admin@cam.local/live", "rtsps://***@cam.local/live"),
        # unescaped '/' and '@' in the password: urlsplit would leave half of it in the host
        ("rtsp://admin:pa/ss@wd@10.0.0.5/cam", "rtsp://***@10.0.0.5/cam"),
        ("rtsp://10.0.0.5:554/cam", "rtsp://10.0.0.5:554/cam"),
        (
            "rtsp://10.0.0.5/cam?user=admin&password=hunter2",
            "rtsp://10.0.0.5/cam?user=***&password=***",
        ),
        ("admin:hunter2@10.0.0.5", "***@10.0.0.5"),
        ("", ""),
    ],
)
def test_mask_credentials_hides_user_and_password(url: str, expected: str) -> None:
    assert mask_credentials(url) == expected


def test_change_score_is_zero_for_the_same_picture_and_one_for_black_against_white() -> None:
    black = np.zeros((240, 320, 3), np.uint8)
    white = np.full((240, 320, 3), 255, np.uint8)
    assert change_score(thumbnail(black), thumbnail(black)) == 0.0
    assert change_score(thumbnail(black), thumbnail(white)) == pytest.approx(1.0)


def test_change_score_ignores_noise_but_sees_a_changed_region() -> None:
    rng = np.random.default_rng(7)
    scene = rng.integers(0, 256, (36, 64, 3)).repeat(20, axis=0).repeat(20, axis=1).astype(np.uint8)
    noisy = np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8)
    assert change_score(thumbnail(scene), thumbnail(noisy)) < 0.02  # sensor noise: no event

    lit = scene.copy()
    lit[:, : scene.shape[1] // 4] = 255  # a quarter of the view lights up
    score = change_score(thumbnail(scene), thumbnail(lit))
    assert 0.08 <= score <= 0.25


@pytest.mark.parametrize("shape", [(240, 320), (1080, 1920), (7, 10), (1, 1), (333, 517)])
def test_thumbnail_is_the_same_size_for_any_frame(shape: tuple[int, int]) -> None:
    image = np.full((*shape, 3), (200, 100, 50), np.uint8)
    small = thumbnail(image)
    assert small.shape == (36, 64)
    # BT.601 luma of (200, 100, 50): every cell averages to the same grey
    assert np.allclose(small, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, atol=0.01)


def test_backoff_doubles_up_to_the_cap() -> None:
    limits = CaptureLimits(backoff_initial_s=1.0, backoff_max_s=10.0)
    assert [limits.backoff(n) for n in range(6)] == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_plan_rejects_bad_input_without_echoing_the_password() -> None:
    with pytest.raises(ValueError, match="rtsp") as caught:
        CapturePlan("http://admin:hunter2@cam/x", CaptureMode.SINGLE_FRAME)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ValueError, match="duration_s"):
        CapturePlan("rtsp://cam/x", CaptureMode.CONTINUOUS, fps=1)
    with pytest.raises(ValueError, match="fps"):
        CapturePlan("rtsp://cam/x", CaptureMode.CONTINUOUS, fps=0, duration_s=1)


# -- against the camera --------------------------------------------------------------------------


async def test_single_frame_is_the_cameras_picture(camera: RtspServer) -> None:
    capture = on_loopback(CapturePlan(camera.url("static"), CaptureMode.SINGLE_FRAME))
    before = datetime.now(UTC)
    frames, _ = await collect(capture)

    assert len(frames) == 1
    frame = frames[0]
    assert frame.image.shape == (240, 320, 3)
    assert frame.image.dtype == np.uint8
    # SMPTE bars, in RGB order: white bar on the left, blue bar on the right
    assert (frame.image[60, 10] > 200).all()
    assert frame.image[60, 310, 2] > 200
    assert frame.image[60, 310, :2].max() < 60
    assert before <= frame.captured_at <= datetime.now(UTC)
    assert frame.captured_at.tzinfo is UTC
    assert (frame.index, frame.change) == (0, None)
    assert (capture.kept, capture.reconnects) == (1, 0)


@pytest.mark.slow
async def test_continuous_keeps_fps_for_the_duration(camera: RtspServer) -> None:
    plan = CapturePlan(camera.url("static"), CaptureMode.CONTINUOUS, fps=2, duration_s=3)
    frames, arrivals = await collect(on_loopback(plan))
    ended = time.monotonic()

    assert 5 <= len(frames) <= 7
    assert [frame.index for frame in frames] == list(range(len(frames)))
    gaps = [(b.captured_at - a.captured_at).total_seconds() for a, b in itertools.pairwise(frames)]
    assert all(0.25 <= gap <= 0.75 for gap in gaps[1:]), gaps  # the first may follow the probe
    assert 2.7 <= ended - arrivals[0] <= 3.6


@pytest.mark.slow
async def test_a_long_capture_is_not_cut_at_5s_and_leaves_the_loop_free(
    camera: RtspServer,
) -> None:
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    plan = CapturePlan(camera.url("moving"), CaptureMode.CONTINUOUS, fps=1, duration_s=6.5)
    tick_task = asyncio.create_task(ticker())
    try:
        frames, arrivals = await collect(on_loopback(plan))
    finally:
        tick_task.cancel()
    ended = time.monotonic()

    assert 6 <= len(frames) <= 8
    assert frames[-1].captured_at - frames[0].captured_at >= timedelta(seconds=5)
    assert 6.2 <= ended - arrivals[0] <= 7.2
    # The loop kept ticking every 50 ms the whole time: PyAV never ran on it.
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.25
    assert len(ticks) >= (ended - ticks[0]) / 0.05 * 0.7


@pytest.mark.slow
async def test_event_driven_keeps_one_frame_of_a_static_scene(camera: RtspServer) -> None:
    plan = CapturePlan(camera.url("static"), CaptureMode.EVENT_DRIVEN, fps=5, duration_s=2)
    capture = on_loopback(plan)
    frames, _ = await collect(capture)

    assert len(frames) == 1
    assert capture.examined >= 8


@pytest.mark.slow
async def test_event_driven_keeps_every_frame_of_a_changing_scene(camera: RtspServer) -> None:
    plan = CapturePlan(camera.url("moving"), CaptureMode.EVENT_DRIVEN, fps=5, duration_s=2)
    capture = on_loopback(plan)
    frames, _ = await collect(capture)

    assert len(frames) >= 8
    assert capture.kept == capture.examined
    assert frames[0].change is None
    assert all(f.change is not None and f.change >= plan.change_threshold for f in frames[1:])


@pytest.mark.slow
async def test_event_driven_keeps_one_frame_per_scene_switch(camera: RtspServer) -> None:
    # /switch flips black <-> white every SWITCH_INTERVAL_S (1 s): ~3 switches in 3.5 s
    plan = CapturePlan(camera.url("switch"), CaptureMode.EVENT_DRIVEN, fps=5, duration_s=3.5)
    capture = on_loopback(plan)
    frames, _ = await collect(capture)

    assert 3 <= len(frames) <= 5, [f.change for f in frames]
    assert capture.examined >= 15
    assert all(f.change is not None and f.change > 0.9 for f in frames[1:])
    gaps = [(b.captured_at - a.captured_at).total_seconds() for a, b in itertools.pairwise(frames)]
    assert all(gap >= 0.7 for gap in gaps[1:]), gaps  # one frame per switch, not a burst


async def test_wrong_or_missing_password_fails_without_leaking_it(
    camera: RtspServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    wrong = camera.url("static").replace(quote(PASSWORD, safe=""), "wrong")
    for url in (wrong, camera.url("static", credentials=False)):
        started = time.monotonic()
        with pytest.raises(CaptureError) as caught:
            await collect(on_loopback(CapturePlan(url, CaptureMode.SINGLE_FRAME), FAST))
        # a refusal is final: no retries with backoff
        assert time.monotonic() - started < 1.0
        assert "401" in caught.value.reason
        assert f"127.0.0.1:{camera.port}/static" in caught.value.reason

    capture = on_loopback(CapturePlan(camera.url("static"), CaptureMode.SINGLE_FRAME))
    frames, _ = await collect(capture)
    assert len(frames) == 1

    logged = capsys.readouterr().out + caplog.text
    assert "rtsp://***@127.0.0.1" in logged
    for secret in _secret_forms():
        assert secret not in logged


async def test_basic_auth_camera() -> None:
    _require_server()
    with RtspServer(user=USER, password=PASSWORD, auth="basic") as server:
        frames, _ = await collect(
            on_loopback(CapturePlan(server.url("static"), CaptureMode.SINGLE_FRAME))
        )
        assert len(frames) == 1
        with pytest.raises(CaptureError, match="401"):
            await collect(
                on_loopback(
                    CapturePlan(server.url("static", credentials=False), CaptureMode.SINGLE_FRAME)
                )
            )


async def test_unreachable_camera_fails_after_the_attempts_with_backoff() -> None:
    url = f"rtsp://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/cam"
    limits = CaptureLimits(reconnect_attempts=3, backoff_initial_s=0.2, open_timeout_s=1)
    capture = on_loopback(CapturePlan(url, CaptureMode.SINGLE_FRAME), limits)
    started = time.monotonic()
    with pytest.raises(CaptureError) as caught:
        await collect(capture)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s, between the three attempts
    assert elapsed < 3
    assert capture.reconnects == 2
    assert caught.value.reason.startswith(f"rtsp://***@127.0.0.1:{url.rsplit(':', 1)[1]}")
    assert "no frame after 3 connection attempts (Connection refused)" in caught.value.reason
    for secret in _secret_forms():
        assert secret not in str(caught.value)


@pytest.mark.slow
async def test_capture_survives_the_camera_restarting(own_camera: RtspServer) -> None:
    plan = CapturePlan(own_camera.url("static"), CaptureMode.CONTINUOUS, fps=4, duration_s=4.5)
    capture = on_loopback(plan, FAST)
    restarted_at: list[datetime] = []

    async def crash_and_restart() -> None:
        await asyncio.sleep(1.5)
        own_camera.kill()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_camera.restart)
        restarted_at.append(datetime.now(UTC))

    chaos = asyncio.create_task(crash_and_restart())
    frames, _ = await collect(capture)
    await chaos

    assert capture.reconnects >= 1
    after = [f for f in frames if f.captured_at > restarted_at[0]]
    assert len(after) >= 3, [f.captured_at for f in frames]
    assert [f.index for f in frames] == list(range(len(frames)))


@pytest.mark.slow
async def test_watchdog_reconnects_a_stalled_camera(own_camera: RtspServer) -> None:
    plan = CapturePlan(own_camera.url("static"), CaptureMode.CONTINUOUS, fps=4, duration_s=5)
    capture = on_loopback(plan, FAST)
    resumed_at: list[datetime] = []

    async def stall() -> None:
        await asyncio.sleep(1.5)
        own_camera.pause()  # the TCP connection stays open; nothing more arrives
        await asyncio.sleep(2.5)  # past stall_timeout_s (1 s)
        own_camera.resume()
        resumed_at.append(datetime.now(UTC))

    chaos = asyncio.create_task(stall())
    frames, arrivals = await collect(capture)
    await chaos

    assert capture.reconnects >= 1
    assert any(f.captured_at > resumed_at[0] for f in frames)
    # the duration clock ran through the stall: the capture still ended ~5 s after its first frame
    assert time.monotonic() - arrivals[0] <= 5.6


async def test_cancel_ends_a_long_capture_promptly(camera: RtspServer) -> None:
    plan = CapturePlan(camera.url("moving"), CaptureMode.CONTINUOUS, fps=10, duration_s=600)
    capture = on_loopback(plan)
    cancelled_at: list[float] = []
    received = 0

    def cancel_from_another_thread() -> None:
        cancelled_at.append(time.monotonic())
        capture.cancel()

    async for _ in capture.frames():
        received += 1
        if received == 3:
            threading.Timer(0.3, cancel_from_another_thread).start()

    assert cancelled_at
    assert time.monotonic() - cancelled_at[0] < 1.0
    assert received >= 3


@pytest.mark.slow
async def test_a_slow_consumer_loses_the_oldest_frames_and_they_are_counted(
    camera: RtspServer,
) -> None:
    plan = CapturePlan(camera.url("moving"), CaptureMode.CONTINUOUS, fps=10, duration_s=2.5)
    capture = on_loopback(plan, CaptureLimits(buffer_frames=3))
    indexes: list[int] = []
    async for frame in capture.frames():
        indexes.append(frame.index)
        if len(indexes) == 1:
            await asyncio.sleep(1.5)  # a slow upload: ~15 frames are kept meanwhile

    # ~15 frames came during the wait at 10 fps, 3 fit the buffer; a loaded machine's camera
    # sends fewer, so the bound leaves room: what matters is that the oldest went.
    assert capture.dropped >= 4
    assert len(indexes) + capture.dropped == capture.kept
    assert indexes == sorted(indexes)
    # What survived the wait is the newest: the buffer held the last 3, not the first 3.
    assert 1 < indexes[1] <= 1 + capture.dropped
    assert indexes[1:4] == [indexes[1], indexes[1] + 1, indexes[1] + 2]
