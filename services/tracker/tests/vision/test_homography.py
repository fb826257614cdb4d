"""Image-to-map projection: exact recovery, RANSAC against outliers, SpotOn's .npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeway.tracker.vision.homography import (
    HomographyError,
    fit_homography,
    load_spoton_npz,
    project_box,
    project_points,
)

TRUE_H = np.array([[0.02, 0.001, -3.0], [0.0005, 0.05, -8.0], [0.0, 0.0004, 1.0]])


def _pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(seed).uniform([0, 200], [640, 480], (n, 2))
    return image, project_points(TRUE_H, image)


def test_fit_recovers_a_known_homography() -> None:
    image, world = _pairs(12)
    h = fit_homography(image, world)
    probe = np.array([[320.0, 400.0], [10.0, 250.0]])
    assert np.allclose(project_points(h, probe), project_points(TRUE_H, probe), atol=1e-6)


def test_ransac_ignores_a_wrong_pair() -> None:
    image, world = _pairs(20)
    world[3] += 50.0  # one badly clicked point
    h = fit_homography(image, world, ransac_threshold=0.05)
    assert np.allclose(project_points(h, image[:3]), world[:3], atol=1e-4)


def test_fewer_than_four_pairs_or_mismatched_counts_are_refused() -> None:
    image, world = _pairs(3)
    with pytest.raises(HomographyError, match="at least 4"):
        fit_homography(image, world)
    with pytest.raises(HomographyError, match="map points"):
        fit_homography(_pairs(5)[0], world)


def test_collinear_points_are_refused_not_fitted_to_a_singular_matrix() -> None:
    with pytest.raises(HomographyError, match="degenerate"):
        fit_homography([[0, 0], [1, 1], [2, 2], [3, 3]], [[0, 0], [8, 0], [8, 6], [0, 6]])


def test_spoton_npz_and_bottom_centre(tmp_path: Path) -> None:
    image, world = _pairs(8)
    path = tmp_path / "homography_points_c01_scene_s47.npz"
    np.savez(path, image_points=image, map_points=world)
    h = load_spoton_npz(path)
    x, y = project_box(h, (300.0, 100.0, 340.0, 420.0)) or (np.nan, np.nan)
    expected = project_points(TRUE_H, [[320.0, 420.0]])[0]  # bottom-centre, not box centre
    assert (x, y) == pytest.approx(tuple(expected), abs=1e-6)
    assert project_box(None, (0, 0, 1, 1)) is None
    np.savez(tmp_path / "bad.npz", image_points=image)
    with pytest.raises(HomographyError, match="map_points"):
        load_spoton_npz(tmp_path / "bad.npz")
