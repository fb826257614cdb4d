"""Videos: what the scene renderer writes, the store keeps, the probe checks, a reader reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeway.tracker.media import VideoError, VideoReader, VideoStore, probe_video
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


def test_the_store_keeps_keys_inside_its_root(tmp_path: Path) -> None:
    store = VideoStore(tmp_path)
    staged = store.stage(b"data")
    key = store.key("lab", "c01", "v1", "mp4")
    store.commit(staged, key)
    assert store.exists(key)
    assert store.path(key).read_bytes() == b"data"
    with pytest.raises(ValueError, match="leaves the store"):
        store.path("../../etc/passwd")
    store.delete(key)
    assert not store.exists(key)


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
