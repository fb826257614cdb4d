"""Image-to-map projection: a homography per camera, applied to each box's bottom-centre.

The bottom-centre ``((x1 + x2) / 2, y2)`` is where a standing person touches the ground, the
only point of a box that lies on the map plane (SpotOn did the same: docs/replaced-systems.md).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edgeway.tracker.vision.types import BBox

FloatArray = npt.NDArray[np.float64]

#: SpotOn's ``cv2.findHomography(..., RANSAC, 5.0)``. The threshold is in *map* units (the
#: destination plane): 5.0 suits maps in pixels; a map in metres wants ~0.1-0.5.
SPOTON_RANSAC_THRESHOLD = 5.0


class HomographyError(ValueError):
    """Point pairs from which no homography can be fitted."""


def fit_homography(
    image_points: npt.ArrayLike,
    map_points: npt.ArrayLike,
    *,
    ransac_threshold: float = SPOTON_RANSAC_THRESHOLD,
) -> FloatArray:
    """A 3 x 3 image-to-map homography from at least 4 point pairs, robust to outliers (RANSAC)."""
    src = np.asarray(image_points, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(map_points, dtype=np.float64).reshape(-1, 2)
    if len(src) != len(dst):
        raise HomographyError(f"{len(src)} image points but {len(dst)} map points")
    if len(src) < 4:
        raise HomographyError(f"a homography needs at least 4 point pairs, got {len(src)}")
    matrix, _ = cv2.findHomography(src, dst, cv2.RANSAC, ransac_threshold)
    # OpenCV answers collinear points with a singular matrix rather than none.
    if matrix is None or not np.all(np.isfinite(matrix)) or np.linalg.matrix_rank(matrix) < 3:
        raise HomographyError("the points are degenerate (e.g. collinear): no homography")
    return np.asarray(matrix, dtype=np.float64)


def load_spoton_npz(path: Path, *, ransac_threshold: float = SPOTON_RANSAC_THRESHOLD) -> FloatArray:
    """SpotOn's per-camera file (``homography_points_<cam>_scene_<s>.npz``): arrays
    ``image_points`` and ``map_points``, N x 2 each, N >= 4."""
    with np.load(path) as data:
        missing = {"image_points", "map_points"} - set(data.files)
        if missing:
            raise HomographyError(f"{path.name} lacks {sorted(missing)}")
        return fit_homography(
            data["image_points"], data["map_points"], ransac_threshold=ransac_threshold
        )


def foot_points(boxes: npt.ArrayLike) -> FloatArray:
    """Bottom-centres of N xyxy boxes, N x 2."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2.0, b[:, 3]], axis=1)


def project_points(matrix: FloatArray, points: npt.ArrayLike) -> FloatArray:
    """Map coordinates of N image points (N x 2); rows behind the horizon come out non-finite."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        return np.zeros((0, 2))
    homogeneous = np.hstack([p, np.ones((len(p), 1))]) @ matrix.T
    w = homogeneous[:, 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = homogeneous[:, :2] / w
    out[np.abs(w[:, 0]) < 1e-12] = np.nan
    return out


def project_box(matrix: FloatArray | None, bbox: BBox) -> tuple[float, float] | None:
    """``map_coords`` of one box: ``None`` without a homography or for a point at infinity."""
    if matrix is None:
        return None
    x, y = project_points(matrix, foot_points(bbox))[0]
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    return (float(x), float(y))
