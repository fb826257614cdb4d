"""Videos: what the scene renderer writes, the store keeps, the probe checks, a reader reads."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeway.common.objects import LocalStore
from edgeway.tracker.media import (
    LocalVideo,
    VideoError,
    VideoReader,
    VideoStore,
    decode_jpeg,
    fit,
    probe_video,
)
from edgeway.tracker.scenes import demo_scene
from edgeway.tracker.vision.homography import fit_homography, project_box


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scene = demo_scene(width=320, height=240, fps=10)
    path = tmp_path_factory.mktemp("videos") / "c01.mp4"
    scene.write_video(scene.cameras[0], path, frames=12)
    return path


def test_a_rendered_video_probes_with_its_size_rate_and_frame_count(video: Path) -> None:
    probe = probe_video(video)
    assert (probe.width, probe.height, probe.frames, probe.fps) == (320, 240, 12, 10.0)
    assert probe.extension == "mp4"


def test_what_is_not_a_video_is_refused_with_a_reason(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    with pytest.raises(VideoError, match=r"not a readable video|no video stream"):
        probe_video(fake)


def test_a_reader_keeps_every_skipth_frame_from_where_it_resumes(video: Path) -> None:
    reader = VideoReader(video, skip=3, start=2)
    indexes = []
    while (read := reader.read()) is not None:
        index, image = read
        indexes.append(index)
        assert image.shape == (240, 320, 3)
    reader.close()
    assert indexes == [6, 9]


def test_a_frame_of_another_size_is_scaled_to_the_cameras_in_its_pixels() -> None:
    image = np.zeros((960, 1280, 3), dtype=np.uint8)
    image[200:600, 400:600] = 255  # a person-sized block at (400, 200)-(600, 600)
    smaller = fit(image, 640, 480)
    assert smaller.shape == (480, 640, 3)
    ys, xs = np.nonzero(smaller[..., 0] > 127)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (200, 100, 300, 300)
    # Area averaging when shrinking: an edge is a blend, not a pick of one pixel.
    stripes = np.zeros((480, 640, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    assert np.allclose(fit(stripes, 320, 240), 127.5, atol=1)
    larger = fit(smaller, 1280, 960)
    assert larger.shape == (960, 1280, 3)
    assert fit(smaller, 640, 480) is smaller  # already the camera's size: untouched


def test_a_relayed_frame_decodes_at_its_own_size_and_garbage_does_not() -> None:
    ok, jpeg = cv2.imencode(".jpg", np.full((240, 320, 3), 90, dtype=np.uint8))
    assert ok
    image = decode_jpeg(jpeg.tobytes())
    assert image is not None
    assert image.shape == (240, 320, 3)
    assert decode_jpeg(b"\xff\xd8 not a jpeg") is None
    assert decode_jpeg(b"") is None


async def test_a_local_stores_videos_are_read_where_they_lie_and_keys_stay_inside(
    tmp_path: Path,
) -> None:
    store = VideoStore(LocalStore(tmp_path / "objects", "tracker"), scratch=tmp_path / "scratch")
    await store.prepare()
    staged = store.stage(b"data")
    assert staged.parent == tmp_path / "scratch" / "staging"
    key = store.key("lab", "c01", "v1", "mp4")
    await store.put(key, b"data")
    assert await store.exists(key)
    video = await store.open(key)
    assert video == LocalVideo(tmp_path / "objects" / "tracker" / key, fetched=False)
    assert store.read(key, offset=1, length=2) == (4, b"at")
    assert await store.redirect(key, expires=timedelta(minutes=5)) is None  # streamed instead
    store.close(video)
    assert video.path.is_file()  # the store's own file is not a copy
    with pytest.raises(ValueError, match="leaves the store"):
        store.read("../../etc/passwd", offset=0, length=1)
    await store.delete(key)
    assert not await store.exists(key)
    with pytest.raises(FileNotFoundError):
        await store.open(key)


def test_scene_sightings_stand_where_the_cameras_homography_says() -> None:
    scene = demo_scene()
    camera = scene.cameras[1]
    homography = fit_homography(camera.image_points, camera.map_points)
    seen = 0
    for index in range(0, 60, 10):
        _, sightings = scene.render(camera, index)
        for sighting in sightings:
            x1, _, x2, _ = sighting.bbox_xyxy
            if x1 <= 0 or x2 >= camera.width:
                continue  # clipped at the edge: its box no longer centres on the feet
            x, y = project_box(homography, sighting.bbox_xyxy) or (np.nan, np.nan)
            assert np.hypot(x - sighting.map_xy[0], y - sighting.map_xy[1]) < 0.05
            seen += 1
    assert seen > 3
