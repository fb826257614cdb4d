"""MOTChallenge text files and TrackEval's metric classes: the evaluator of ``make eval``.

Only TrackEval's metric classes are used (HOTA, CLEAR, Identity; PyPI ``trackeval``, pinned),
never its dataset runners, so the data path is ours and small: MOT15 rows ``frame, id, x, y, w,
h, conf, wx, wy, wz`` with 1-based frames and top-left boxes. TUD has no classes or distractors
(MOT15), so the only GT filter is MOTChallenge's ``conf == 0`` means "ignore".
The data are the TUD-Campus and TUD-Stadtmitte files inside the ``motmetrics`` wheel, which is
installed for them only: its own metrics are broken on numpy 2.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

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


def without_ignored(gt: list[MotRow], tracker: list[MotRow]) -> tuple[list[MotRow], list[MotRow]]:
    """Drop GT rows marked ignore (``conf == 0``) and the tracker boxes that cover them.

    TrackEval's ``MotChallenge2DBox`` rule for distractors: per frame, every GT box (kept or
    ignored) is matched to the tracker boxes by Hungarian assignment on IoU >= 0.5, and
    tracker boxes matched to an ignored GT box are removed, so tracking a barely visible
    person is neither a hit nor a false positive.
    """
    gt_by = frames_of(gt)
    tr_by = frames_of(tracker)
    kept: list[MotRow] = []
    for frame, tr_rows in tr_by.items():
        g = gt_by.get(frame, [])
        ignored = [k for k, r in enumerate(g) if r.conf == 0]
        if not ignored:
            kept += tr_rows
            continue
        iou = _box_ious(
            np.array([[r.x, r.y, r.w, r.h] for r in g], dtype=float),
            np.array([[r.x, r.y, r.w, r.h] for r in tr_rows], dtype=float),
        )
        score = np.where(iou >= 0.5 - np.finfo(float).eps, iou, 0.0)
        rows, cols = linear_sum_assignment(-score)
        drop = {c for r, c in zip(rows, cols, strict=True) if score[r, c] > 0 and r in ignored}
        kept += [t for c, t in enumerate(tr_rows) if c not in drop]
    return [r for r in gt if r.conf != 0], kept


def concatenate_cameras(
    rows_by_camera: Mapping[str, Sequence[MotRow]], cameras: Sequence[str], num_frames: int
) -> list[MotRow]:
    """All cameras as one sequence: camera k's frame f becomes ``k * num_frames + f``.

    Global IDF1 (Ristani et al. 2016, AIC23's "IDF1 over all cameras") is IDF1 with one id
    space across cameras: a single bipartite matching of GT identities to tracker identities
    over every camera's boxes. TrackEval's ``Identity`` builds exactly that matching over a
    sequence's timesteps, and boxes are only compared within one timestep, so laying the
    cameras end to end (frames never shared between cameras) makes its IDF1 the global one;
    the ids must already be global (person ids, global ids), not per camera.
    """
    out: list[MotRow] = []
    for k, camera in enumerate(cameras):
        for r in rows_by_camera.get(camera, ()):
            if not 1 <= r.frame <= num_frames:
                raise ValueError(f"{camera}: frame {r.frame} outside 1..{num_frames}")
            out.append(
                MotRow(
                    k * num_frames + r.frame,
                    r.obj_id,
                    r.x,
                    r.y,
                    r.w,
                    r.h,
                    r.conf,
                    r.world_x,
                    r.world_y,
                )
            )
    return out


def evaluate_cameras(
    gt_by_camera: Mapping[str, Sequence[MotRow]],
    tracker_by_camera: Mapping[str, Sequence[MotRow]],
    num_frames: int,
) -> dict[str, dict[str, float]]:
    """Per-camera metrics and ``"global"`` (all cameras in one id space, see
    ``concatenate_cameras``). Ignore rows (``conf == 0``) are applied per camera first."""
    cameras = sorted(gt_by_camera)
    extra = set(tracker_by_camera) - set(cameras)
    if extra:
        raise ValueError(f"tracker output for cameras without GT: {sorted(extra)}")
    gt_kept: dict[str, list[MotRow]] = {}
    tr_kept: dict[str, list[MotRow]] = {}
    out: dict[str, dict[str, float]] = {}
    for camera in cameras:
        gt_kept[camera], tr_kept[camera] = without_ignored(
            list(gt_by_camera[camera]), list(tracker_by_camera.get(camera, ()))
        )
        out[camera] = evaluate(gt_kept[camera], tr_kept[camera], num_frames)
    out["global"] = evaluate(
        concatenate_cameras(gt_kept, cameras, num_frames),
        concatenate_cameras(tr_kept, cameras, num_frames),
        len(cameras) * num_frames,
    )
    return out


@dataclass(frozen=True, slots=True)
class IdentityLinks:
    """Which tracker id covered which GT id, and for how many boxes (IoU >= 0.5, per frame)."""

    frames: dict[tuple[int, int], int]  # (gt id, tracker id) -> matched boxes
    map_errors: list[float]  # distance between GT and tracker world x, y of matched boxes

    def splits(self, min_frames: int) -> int:
        """GT identities covered by more than one tracker id, each for ``min_frames`` or more."""
        return _more_than_one(self.frames, min_frames, side=0)

    def merges(self, min_frames: int) -> int:
        """Tracker ids that covered more than one GT identity, each for ``min_frames`` or more."""
        return _more_than_one(self.frames, min_frames, side=1)


def _more_than_one(frames: Mapping[tuple[int, int], int], min_frames: int, side: int) -> int:
    partners: dict[int, int] = {}
    for pair, count in frames.items():
        if count >= min_frames:
            partners[pair[side]] = partners.get(pair[side], 0) + 1
    return sum(1 for n in partners.values() if n > 1)


def _matches(g: Sequence[MotRow], t: Sequence[MotRow]) -> list[tuple[int, int]]:
    """One-to-one pairs (GT index, tracker index) of one frame: Hungarian on IoU >= 0.5."""
    if not g or not t:
        return []
    iou = _box_ious(
        np.array([[r.x, r.y, r.w, r.h] for r in g], dtype=float),
        np.array([[r.x, r.y, r.w, r.h] for r in t], dtype=float),
    )
    rows, cols = linear_sum_assignment(-iou)
    eps = np.finfo(float).eps
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if iou[i, j] >= 0.5 - eps]


def with_true_ids(
    gt_by_camera: Mapping[str, Sequence[MotRow]],
    tracker_by_camera: Mapping[str, Sequence[MotRow]],
) -> dict[str, list[MotRow]]:
    """The tracker's boxes with perfect identities: each box matched to a GT box (IoU >= 0.5,
    per frame) takes that person's id; the others keep ids of their own, one per box. Scored,
    it is the most the association could reach with these boxes (the detection's ceiling)."""
    out: dict[str, list[MotRow]] = {}
    spare = -1
    for camera, tr_rows in tracker_by_camera.items():
        gt_by = frames_of(r for r in gt_by_camera.get(camera, ()) if r.conf != 0)
        out[camera] = []
        for frame, t in sorted(frames_of(tr_rows).items()):
            g = gt_by.get(frame, [])
            true_id = {j: g[i].obj_id for i, j in _matches(g, t)}
            for j, r in enumerate(t):
                if j not in true_id:
                    true_id[j], spare = spare, spare - 1
                out[camera].append(
                    MotRow(r.frame, true_id[j], r.x, r.y, r.w, r.h, r.conf, r.world_x, r.world_y)
                )
    return out


def identity_links(
    gt_by_camera: Mapping[str, Sequence[MotRow]],
    tracker_by_camera: Mapping[str, Sequence[MotRow]],
) -> IdentityLinks:
    """Per camera and frame, GT boxes (ignore rows left out) matched one-to-one to tracker
    boxes by Hungarian assignment on IoU >= 0.5 (CLEAR's rule, without its carry-over of last
    frame's pairs); hand-off errors (an id changing between cameras) are counted from these pairs.
    Map errors are measured where both rows carry world coordinates (not -1, -1)."""
    frames: dict[tuple[int, int], int] = {}
    errors: list[float] = []
    for camera, gt_rows in gt_by_camera.items():
        tr_by = frames_of(tracker_by_camera.get(camera, ()))
        for frame, g in frames_of(r for r in gt_rows if r.conf != 0).items():
            t = tr_by.get(frame, [])
            for i, j in _matches(g, t):
                key = (g[i].obj_id, t[j].obj_id)
                frames[key] = frames.get(key, 0) + 1
                if (t[j].world_x, t[j].world_y) != (-1.0, -1.0):
                    errors.append(
                        float(np.hypot(g[i].world_x - t[j].world_x, g[i].world_y - t[j].world_y))
                    )
    return IdentityLinks(frames, errors)
