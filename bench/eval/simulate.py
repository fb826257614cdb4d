"""Detections made from ground truth with seeded noise, and the IoU-only baseline tracker.

The noise knobs are fixed here, before any run, and shared by every tracker (the
fairness rules): the same detections go to our tracker, the baseline and any library tracker.
Seeds 100-102 are the tuning seeds; the reported seeds are 0, 1, 2 and are never used for tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from bench.eval.mot import MotRow, frames_of

TUNING_SEEDS = (100, 101, 102)
REPORT_SEEDS = (0, 1, 2)

#: GT boxes less visible than this are "ignore" rows (conf 0) in the multi-camera scenes, the
#: cut the noise levels were calibrated with; detections never come from them.
MIN_VISIBILITY = 0.35


@dataclass(frozen=True, slots=True)
class NoiseModel:
    """What a mediocre person detector does to GT boxes (a synthetic benchmark's "easy" levels).

    ``miss``: each GT box is dropped with this probability; ``burst_miss``: chance a GT person
    starts a run of ``burst_len`` missed frames (occlusion-like gaps, what breaks IoU-only
    trackers); ``jitter``: std of each edge's offset as a fraction of box width/height;
    ``low_conf``: share of true boxes scored low (0.1..0.5, what ByteTrack's second stage uses);
    ``fp_per_frame``: Poisson mean of false boxes per frame, person-sized, scored 0.1..0.75.
    ``occlusion_miss``: where visibilities are known (the multi-camera scenes), an occluded box
    is missed with a chance rising linearly from ``miss`` at visibility 0.7 to 1 at the GT cut
    (0.35, ``mtmc.MIN_VISIBILITY``); off, every box above the cut follows ``miss`` alone.
    """

    miss: float = 0.10
    burst_miss: float = 0.02
    burst_len: int = 8
    jitter: float = 0.05
    low_conf: float = 0.20
    fp_per_frame: float = 0.5
    occlusion_miss: bool = True


#: Clean detections: every GT box above the visibility cut, exact, confident, nothing false.
CLEAN = NoiseModel(
    miss=0.0,
    burst_miss=0.0,
    jitter=0.0,
    low_conf=0.0,
    fp_per_frame=0.0,
    occlusion_miss=False,
)
#: The visibility above which an occluded person is as easy to detect as a lone one.
FULLY_VISIBLE = 0.7


@dataclass(frozen=True, slots=True)
class SimDetection:
    xyxy: tuple[float, float, float, float]
    confidence: float
    gt_id: int  # -1 for a false positive; only the appearance simulation reads it


def noisy_detections(
    gt: list[MotRow],
    num_frames: int,
    seed: int,
    noise: NoiseModel,
    image_size: tuple[int, int],
    visibility: Mapping[tuple[int, int], float] | None = None,
) -> dict[int, list[SimDetection]]:
    """Detections of every frame 1..``num_frames`` from GT rows; rows with ``conf == 0`` (the
    MOTChallenge "ignore" mark) are never detected. ``visibility`` by ``(frame, obj_id)``
    turns on the occlusion rule of ``NoiseModel``; without it (TUD) no draw is spent on it,
    so the TUD detections stay what they were."""
    rng = np.random.default_rng(seed)
    width, height = image_size
    by_frame = frames_of(gt)
    burst_until: dict[int, int] = {}
    heights = np.array([r.h for r in gt])
    out: dict[int, list[SimDetection]] = {}
    for frame in range(1, num_frames + 1):
        dets: list[SimDetection] = []
        for r in by_frame.get(frame, []):
            if r.conf == 0:
                continue
            if visibility is not None and noise.occlusion_miss:
                vis = visibility[(frame, r.obj_id)]
                hard = (FULLY_VISIBLE - vis) / (FULLY_VISIBLE - MIN_VISIBILITY)
                if rng.random() < float(np.clip(hard, 0.0, 1.0)):
                    continue
            if burst_until.get(r.obj_id, 0) >= frame:
                continue
            if rng.random() < noise.burst_miss:
                burst_until[r.obj_id] = frame + noise.burst_len - 1
                continue
            if rng.random() < noise.miss:
                continue
            j = rng.normal(0.0, noise.jitter, 4) * np.array([r.w, r.h, r.w, r.h])
            x1, y1, x2, y2 = np.array(r.xyxy) + j
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            conf = rng.uniform(0.1, 0.5) if rng.random() < noise.low_conf else rng.uniform(0.5, 1.0)
            dets.append(SimDetection((x1, y1, x2, y2), float(conf), r.obj_id))
        for _ in range(rng.poisson(noise.fp_per_frame)):
            h = float(rng.choice(heights))
            w = h * rng.uniform(0.35, 0.5)
            x1 = rng.uniform(0, max(1.0, width - w))
            y1 = rng.uniform(0, max(1.0, height - h))
            dets.append(SimDetection((x1, y1, x1 + w, y1 + h), float(rng.uniform(0.1, 0.75)), -1))
        out[frame] = dets
    return out


def simulated_embeddings(
    dets: dict[int, list[SimDetection]], seed: int, dim: int = 128, noise: float = 0.6
) -> dict[int, list[np.ndarray]]:
    """Per-identity unit vectors plus Gaussian noise (std ``noise`` per unit vector scale).

    A stand-in for a Re-ID model on TUD, which ships no images: with ``noise`` 0.6 at 128-d the
    cosine similarity of two views of one person is about 0.7 and of two people about 0, a
    mid-quality Re-ID cue. False positives get random vectors. Reported as its own row, never
    as the tracker's headline number.
    """
    rng = np.random.default_rng(seed + 10_000)
    ident: dict[int, np.ndarray] = {}
    out: dict[int, list[np.ndarray]] = {}
    for frame, items in dets.items():
        vecs = []
        for d in items:
            if d.gt_id < 0:
                base = rng.normal(size=dim)
            else:
                if d.gt_id not in ident:
                    v = rng.normal(size=dim)
                    ident[d.gt_id] = v / np.linalg.norm(v)
                base = ident[d.gt_id] + rng.normal(0.0, noise / np.sqrt(dim), dim)
            vecs.append((base / np.linalg.norm(base)).astype(np.float32))
        out[frame] = vecs
    return out


class IouBaselineTracker:
    """The baseline: Hungarian matching on IoU with each track's last box; no motion model.

    Same detection filter (confidence >= ``min_confidence``) and the same lost-track buffer as
    ours, so the difference measured is the association, not the inputs.
    """

    def __init__(self, *, min_iou: float = 0.3, min_confidence: float = 0.5, max_age: int = 30):
        self.min_iou = min_iou
        self.min_confidence = min_confidence
        self.max_age = max_age
        self._tracks: dict[int, tuple[np.ndarray, int]] = {}
        self._next = 1

    def update(
        self, boxes: list[tuple[float, float, float, float]], scores: list[float]
    ) -> list[tuple[int, tuple[float, float, float, float]]]:
        keep = [i for i, s in enumerate(scores) if s >= self.min_confidence]
        det = np.array([boxes[i] for i in keep], dtype=float).reshape(-1, 4)
        ids = list(self._tracks)
        prev = np.array([self._tracks[i][0] for i in ids], dtype=float).reshape(-1, 4)
        from edgeway.tracker.vision.tracking import iou_matrix

        iou = iou_matrix(prev, det)
        out: list[tuple[int, tuple[float, float, float, float]]] = []
        used: set[int] = set()
        if iou.size:
            rows, cols = linear_sum_assignment(-iou)
            for r, c in zip(rows, cols, strict=True):
                if iou[r, c] >= self.min_iou:
                    self._tracks[ids[r]] = (det[c], 0)
                    used.add(int(c))
                    out.append((ids[r], tuple(det[c])))
        matched_ids = {tid for tid, _ in out}
        for tid in ids:
            if tid not in matched_ids:
                box, age = self._tracks[tid]
                if age + 1 > self.max_age:
                    del self._tracks[tid]
                else:
                    self._tracks[tid] = (box, age + 1)
        for c in range(len(det)):
            if c not in used:
                self._tracks[self._next] = (det[c], 0)
                out.append((self._next, tuple(det[c])))
                self._next += 1
        return out
