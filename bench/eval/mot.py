"""MOTChallenge text files and TrackEval's metric classes: the evaluator of ``make eval``.

Only TrackEval's metric classes are used (HOTA, CLEAR, Identity; PyPI ``trackeval``, pinned),
never its dataset runners, so the data path is ours and small: MOT15 rows ``frame, id, x, y, w,
h, conf, wx, wy, wz`` with 1-based frames and top-left boxes. TUD has no classes or distractors
(MOT15), so the only GT filter is MOTChallenge's ``conf == 0`` means "ignore" (tracking.md §6.3).
The data are the TUD-Campus and TUD-Stadtmitte files inside the ``motmetrics`` wheel, which is
installed for them only: its own metrics are broken on numpy 2 (tracking.md §0.5).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

SEQUENCES = ("TUD-Campus", "TUD-Stadtmitte")


@dataclass(frozen=True, slots=True)
class MotRow:
    frame: int
    obj_id: int
    x: float
    y: float
    w: float
    h: float
    conf: float
    world_x: float
    world_y: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.x + self.w, self.y + self.h)


def motmetrics_data_dir() -> Path:
    """The ``data`` folder of the installed ``motmetrics`` wheel, found without importing it."""
    spec = importlib.util.find_spec("motmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the motmetrics wheel (for its TUD files) is not installed: run `make setup`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_mot(path: Path) -> list[MotRow]:
    rows: list[MotRow] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        f = [float(v) for v in line.split(",")]
        rows.append(MotRow(int(f[0]), int(f[1]), f[2], f[3], f[4], f[5], f[6], f[7], f[8]))
    return rows


def load_sequence(name: str) -> tuple[list[MotRow], list[MotRow]]:
    """``(gt, shipped tracker output)`` of one TUD sequence; GT rows with conf 0 dropped."""
    folder = motmetrics_data_dir() / name
    gt = [r for r in load_mot(folder / "gt.txt") if r.conf != 0]
    return gt, load_mot(folder / "test.txt")


def frames_of(rows: Iterable[MotRow]) -> dict[int, list[MotRow]]:
    out: dict[int, list[MotRow]] = {}
    for r in rows:
        out.setdefault(r.frame, []).append(r)
    return out


def _box_ious(gt: FloatArray, tr: FloatArray) -> FloatArray:
    """IoU of xywh boxes: the same rule as TrackEval's ``_calculate_box_ious`` (box_format xywh)."""
    if len(gt) == 0 or len(tr) == 0:
        return np.zeros((len(gt), len(tr)))
    g = gt.copy()
    t = tr.copy()
    g[:, 2:] += g[:, :2]
    t[:, 2:] += t[:, :2]
    ix = np.clip(
        np.minimum(g[:, None, 2], t[None, :, 2]) - np.maximum(g[:, None, 0], t[None, :, 0]), 0, None
    )
    iy = np.clip(
        np.minimum(g[:, None, 3], t[None, :, 3]) - np.maximum(g[:, None, 1], t[None, :, 1]), 0, None
    )
    inter = ix * iy
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    area_t = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    union = area_g[:, None] + area_t[None, :] - inter
    out = np.where(union > np.finfo(float).eps, inter / np.maximum(union, np.finfo(float).eps), 0)
    return np.clip(out, 0.0, 1.0)


def _to_trackeval_data(
    gt: list[MotRow], tracker: list[MotRow], num_frames: int
) -> dict[str, object]:
    """TrackEval's per-sequence ``data`` dict, ids remapped to 0..n-1 as its datasets do."""
    gt_by = frames_of(gt)
    tr_by = frames_of(tracker)
    gt_id_map = {v: i for i, v in enumerate(sorted({r.obj_id for r in gt}))}
    tr_id_map = {v: i for i, v in enumerate(sorted({r.obj_id for r in tracker}))}
    gt_ids, tr_ids, sims = [], [], []
    for frame in range(1, num_frames + 1):
        g = gt_by.get(frame, [])
        t = tr_by.get(frame, [])
        gt_ids.append(np.array([gt_id_map[r.obj_id] for r in g], dtype=int))
        tr_ids.append(np.array([tr_id_map[r.obj_id] for r in t], dtype=int))
        g_boxes = np.array([[r.x, r.y, r.w, r.h] for r in g], dtype=float).reshape(-1, 4)
        t_boxes = np.array([[r.x, r.y, r.w, r.h] for r in t], dtype=float).reshape(-1, 4)
        sims.append(_box_ious(g_boxes, t_boxes))
    return {
        "num_timesteps": num_frames,
        "num_gt_ids": len(gt_id_map),
        "num_tracker_ids": len(tr_id_map),
        "num_gt_dets": len(gt),
        "num_tracker_dets": len(tracker),
        "gt_ids": gt_ids,
        "tracker_ids": tr_ids,
        "similarity_scores": sims,
    }


def evaluate(gt: list[MotRow], tracker: list[MotRow], num_frames: int) -> dict[str, float]:
    """HOTA, DetA, AssA (averaged over alpha), MOTA, IDF1 (percent), IDSW, FP, FN, MT, ML."""
    with warnings.catch_warnings():
        # trackeval.plotting warns that matplotlib is absent; we never plot.
        warnings.simplefilter("ignore")
        from trackeval.metrics import CLEAR, HOTA, Identity  # type: ignore[import-untyped]

    data = _to_trackeval_data(gt, tracker, num_frames)
    config = {"PRINT_CONFIG": False, "THRESHOLD": 0.5}
    hota = HOTA(config).eval_sequence(data)
    clear = CLEAR(config).eval_sequence(data)
    ident = Identity(config).eval_sequence(data)
    return {
        "HOTA": 100 * float(np.mean(hota["HOTA"])),
        "DetA": 100 * float(np.mean(hota["DetA"])),
        "AssA": 100 * float(np.mean(hota["AssA"])),
        "MOTA": 100 * float(clear["MOTA"]),
        "IDF1": 100 * float(ident["IDF1"]),
        "IDSW": float(clear["IDSW"]),
        "FP": float(clear["CLR_FP"]),
        "FN": float(clear["CLR_FN"]),
        "MT": float(clear["MT"]),
        "ML": float(clear["ML"]),
    }


def num_frames(gt: Iterable[MotRow]) -> int:
    return max(r.frame for r in gt)


def rows_from_tracks(
    tracks_by_frame: Mapping[int, Iterable[tuple[int, tuple[float, float, float, float]]]],
) -> list[MotRow]:
    """Tracker output ``{frame: [(id, xyxy), ...]}`` as MOT rows."""
    rows = []
    for frame, items in tracks_by_frame.items():
        for obj_id, (x1, y1, x2, y2) in items:
            rows.append(MotRow(frame, obj_id, x1, y1, x2 - x1, y2 - y1, 1.0, -1.0, -1.0))
    return rows
