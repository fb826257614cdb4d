"""Per-camera multi-object tracker: ByteTrack's two-stage association, BoT-SORT's appearance cue.

Why our own code and not a library: Roboflow's ``trackers`` (Apache-2.0) has a clean ByteTrack,
but its BoT-SORT associates by IoU only (no appearance), and it depends on ``supervision``, which
pulls ``opencv-python`` 5 (no HOG) over our ``opencv-python-headless`` 4. It has not been run
beside this tracker yet (see the README's "Not done"); ``make eval`` compares against an IoU-only
baseline on the same detections.

One frame (``update``):

1. Kalman-predict every track (``kalman.py``).
2. High-confidence detections against tracked and recently lost tracks. Cost is ``1 - IoU``,
   fused with the detection score (ByteTrack); with embeddings, BoT-SORT's rule: the cosine
   distance (halved) replaces the IoU distance where the boxes overlap enough and the appearance
   is close enough, and the smaller of the two wins; and, unlike BoT-SORT, a pair whose looks
   are far apart is never matched (``appearance_veto``).
3. Low-confidence detections against the still-unmatched tracked tracks, IoU only (ByteTrack's
   second stage: occluded people score low, and dropping those boxes is what breaks tracks).
4. Unconfirmed (one-frame) tracks against what is left of the high detections; unmatched ones die.
5. New tracks from the remaining detections above ``new_track_threshold``.

Track ids come from a counter that ``reset`` does not rewind, so an id is never reused within a
tracker's life: a reset cannot make a new person look like an old one downstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from edgeway.tracker.vision import kalman
from edgeway.tracker.vision.types import BBox, Detection, Embedding

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    """Association thresholds. Defaults are ByteTrack's and BoT-SORT's published defaults
    (ifzhang/ByteTrack and NirAharon/BoT-SORT ``tools/*`` arguments) except where ``make eval``'s
    tuning seed (never a reported seed) said otherwise; each says which.
    """

    #: ByteTrack's ``track_thresh`` 0.5 (BoT-SORT uses 0.6 and 0.7 for the two thresholds; on
    #: ``make eval``'s tuning seeds 100-102, ByteTrack's pair gave mean HOTA 64.5 against 57.5).
    high_threshold: float = 0.5
    #: ByteTrack/BoT-SORT ``track_low_thresh``: boxes below are noise, never matched.
    low_threshold: float = 0.1
    #: ByteTrack's ``det_thresh`` = ``track_thresh + 0.1``: tracks start from confident boxes.
    new_track_threshold: float = 0.6
    #: ``match_thresh`` 0.8 (cost ``1 - IoU`` fused with the score) in both repositories.
    match_threshold: float = 0.8
    #: second stage (low boxes, IoU only) cost limit 0.5, as in both repositories.
    low_match_threshold: float = 0.5
    #: unconfirmed-track stage cost limit 0.7, as in both repositories.
    unconfirmed_match_threshold: float = 0.7
    #: ``track_buffer`` 30 frames (one second at 30 fps) before a lost track is dropped.
    lost_buffer_frames: int = 30
    #: BoT-SORT ``proximity_thresh``: appearance may only decide between boxes with IoU >= 0.5.
    proximity_threshold: float = 0.5
    #: BoT-SORT ``appearance_thresh``: cosine distance / 2 above 0.25 means "not the same look".
    appearance_threshold: float = 0.25
    #: BoT-SORT's feature EMA: 0.9 of the old appearance, 0.1 of the new one.
    embedding_momentum: float = 0.9
    #: Not in BoT-SORT, where appearance can only lower a cost: a track and a box whose
    #: cosine distance / 2 is above this (cosine below 0.5: what BoT-SORT's
    #: ``appearance_thresh`` calls "not the same look") are never matched, however well they
    #: overlap (DeepSORT gates on appearance too). Without it a lost track's predicted box
    #: handed its id to the next person walking through the same spot, or to one coming out
    #: from behind its person (``make eval``'s multi-camera tuning seeds 1100-1102: 0.4, cosine
    #: 0.2, fixed 3 of 5 clean-detection id errors on seed 1100; 0.25 raised the worst seed's
    #: global IDF1 from 91.9 to 97.1 with clean detections, 74.1 to 74.8 with noisy ones).
    appearance_veto: float = 0.25
    #: A box with this share of its area under a nearer box (lower bottom edge, so in front)
    #: is occluded: its crop shows the person in front too, so its embedding does not update
    #: the track's look (nor, in ``multicam``, match or update the Re-ID gallery). 0.3:
    #: ``make eval``'s multi-camera tuning seeds.
    occlusion_share: float = 0.3


@dataclass(slots=True)
class _Track:
    track_id: int
    mean: FloatArray
    cov: FloatArray
    confidence: float
    embedding: Embedding | None
    confirmed: bool
    frames_since_update: int = 0
    last_detection_index: int = -1


@dataclass(frozen=True, slots=True)
class TrackedBox:
    """A track that was matched in this frame, as ``CameraTracker.update`` reports it.

    ``detection_index`` is the position of the matched box in the ``detections`` passed in, so
    the caller can find its embedding or any data it attached. ``bbox_xyxy`` is the Kalman-filtered
    box (smoother than the raw detection), ``embedding`` the track's smoothed appearance.
    """

    track_id: int
    bbox_xyxy: BBox
    confidence: float
    detection_index: int
    embedding: Embedding | None = field(compare=False)


def iou_matrix(a: FloatArray, b: FloatArray) -> FloatArray:
    """IoU of every box in ``a`` (N x 4, xyxy) with every box in ``b`` (M x 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def occluded(boxes: Sequence[BBox], share: float) -> list[bool]:
    """For each box of one frame: is ``share`` or more of its area under a single nearer box
    (one whose bottom edge is lower on the image, so closer to the camera)?"""
    out = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
        covered = 0.0
        for j, (a1, b1, a2, b2) in enumerate(boxes):
            if j == i or b2 <= y2:
                continue
            inter = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
            covered = max(covered, inter)
        out.append(area > 0 and covered >= share * area)
    return out


def normalise(vector: npt.NDArray[np.floating]) -> Embedding:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)


def assign(cost: FloatArray, limit: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Minimum-cost assignment, keeping only pairs with ``cost <= limit``."""
    n_rows, n_cols = cost.shape
    if n_rows == 0 or n_cols == 0:
        return [], list(range(n_rows)), list(range(n_cols))
    rows, cols = linear_sum_assignment(cost)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if cost[r, c] <= limit]
    matched_rows = {r for r, _ in pairs}
    matched_cols = {c for _, c in pairs}
    return (
        pairs,
        [r for r in range(n_rows) if r not in matched_rows],
        [c for c in range(n_cols) if c not in matched_cols],
    )


class CameraTracker:
    """The tracker for one camera. ``update`` once per frame, in frame order."""

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self.settings = settings or TrackerSettings()
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._frames_seen = 0

    def reset(self) -> None:
        """Forget every track; ids keep counting up, so none is ever handed out twice."""
        self._tracks = []
        self._frames_seen = 0

    @property
    def next_track_id(self) -> int:
        """The id the next new track gets (what a snapshot keeps so a resume never reuses one)."""
        return self._next_id

    def continue_ids_from(self, next_id: int) -> None:
        """Hand out ids from `next_id` on (never below the ones already handed out)."""
        self._next_id = max(self._next_id, next_id)

    def drop(self, track_id: int) -> None:
        """Forget one track (a lost one that turned out to be a new track's person)."""
        self._tracks = [t for t in self._tracks if t.track_id != track_id]

    @property
    def live_track_ids(self) -> set[int]:
        """Ids of tracks that may still be matched (tracked or lost within the buffer)."""
        return {t.track_id for t in self._tracks if t.confirmed}

    def update(self, detections: Sequence[Detection]) -> list[TrackedBox]:
        s = self.settings
        self._frames_seen += 1
        tracks = self._tracks
        if tracks:
            means, covs = kalman.predict(
                np.stack([t.mean for t in tracks]), np.stack([t.cov for t in tracks])
            )
            for i, t in enumerate(tracks):
                t.mean, t.cov = means[i], covs[i]
                t.frames_since_update += 1

        boxes = np.array([d.bbox_xyxy for d in detections], dtype=np.float64).reshape(-1, 4)
        scores = np.array([d.confidence for d in detections], dtype=np.float64)
        high = [i for i in range(len(detections)) if scores[i] >= s.high_threshold]
        low = [i for i in range(len(detections)) if s.low_threshold <= scores[i] < s.high_threshold]
        embeddings = [
            normalise(d.embedding) if d.embedding is not None else None for d in detections
        ]
        hidden = occluded([d.bbox_xyxy for d in detections], s.occlusion_share)

        confirmed = [t for t in tracks if t.confirmed]
        unconfirmed = [t for t in tracks if not t.confirmed]
        matched: list[tuple[_Track, int]] = []

        # Stage 1: confident boxes against every confirmed track (tracked or lost).
        cost = self._first_stage_cost(confirmed, high, boxes, scores, embeddings)
        pairs, left_tracks, left_high = assign(cost, s.match_threshold)
        matched += [(confirmed[r], high[c]) for r, c in pairs]
        remaining_high = [high[c] for c in left_high]

        # Stage 2: weak boxes against tracks seen last frame, IoU only.
        recent = [confirmed[r] for r in left_tracks if confirmed[r].frames_since_update == 1]
        cost = 1.0 - iou_matrix(self._boxes(recent), boxes[low])
        pairs, _, _ = assign(cost, s.low_match_threshold)
        matched += [(recent[r], low[c]) for r, c in pairs]

        # Stage 3: one-frame tracks against what is left of the confident boxes.
        cost = self._fused_iou_cost(unconfirmed, remaining_high, boxes, scores)
        pairs, _, left_new = assign(cost, s.unconfirmed_match_threshold)
        matched += [(unconfirmed[r], remaining_high[c]) for r, c in pairs]
        # ByteTrack removes a one-frame track that found no second box.
        dead = {id(t) for t in unconfirmed if all(t is not m for m, _ in matched)}
        starters = [remaining_high[c] for c in left_new]

        if matched:
            self._correct(matched, boxes, scores, embeddings, hidden)

        first_frame = self._frames_seen == 1
        for i in starters:
            if scores[i] < s.new_track_threshold:
                continue
            mean, cov = kalman.initiate(kalman.xyxy_to_cxcywh(boxes[i]))
            track = _Track(
                track_id=self._next_id,
                mean=mean,
                cov=cov,
                confidence=float(scores[i]),
                embedding=embeddings[i],
                # ByteTrack confirms first-frame tracks at once; later ones need a second hit.
                confirmed=first_frame,
                last_detection_index=i,
            )
            self._next_id += 1
            self._tracks.append(track)
            matched.append((track, i))

        self._tracks = [
            t
            for t in self._tracks
            if id(t) not in dead and t.frames_since_update <= s.lost_buffer_frames
        ]
        out: list[TrackedBox] = []
        for track, det_index in matched:
            if not track.confirmed:
                continue
            box = kalman.cxcywh_to_xyxy(track.mean[:4])
            out.append(
                TrackedBox(
                    track_id=track.track_id,
                    bbox_xyxy=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                    confidence=float(scores[det_index]),
                    detection_index=det_index,
                    embedding=track.embedding,
                )
            )
        out.sort(key=lambda b: b.track_id)
        return out

    @staticmethod
    def _boxes(tracks: Sequence[_Track]) -> FloatArray:
        if not tracks:
            return np.zeros((0, 4))
        return kalman.cxcywh_to_xyxy(np.stack([t.mean[:4] for t in tracks]))

    def _fused_iou_cost(
        self,
        tracks: Sequence[_Track],
        det_indices: Sequence[int],
        boxes: FloatArray,
        scores: FloatArray,
    ) -> FloatArray:
        """ByteTrack's ``fuse_score``: similarity ``IoU * score``, so a weak box wins less."""
        ious = iou_matrix(self._boxes(tracks), boxes[list(det_indices)])
        return 1.0 - ious * scores[list(det_indices)][None, :]

    def _first_stage_cost(
        self,
        tracks: Sequence[_Track],
        det_indices: Sequence[int],
        boxes: FloatArray,
        scores: FloatArray,
        embeddings: Sequence[Embedding | None],
    ) -> FloatArray:
        s = self.settings
        ious = iou_matrix(self._boxes(tracks), boxes[list(det_indices)])
        cost = 1.0 - ious * scores[list(det_indices)][None, :]
        if not tracks or not det_indices:
            return cost
        track_emb = [t.embedding for t in tracks]
        det_emb = [embeddings[i] for i in det_indices]
        if all(e is None for e in track_emb) or all(e is None for e in det_emb):
            return cost
        dim = next(e for e in det_emb if e is not None).shape[0]
        zeros = np.zeros(dim, dtype=np.float32)
        t_mat: FloatArray = np.stack([zeros if e is None else e for e in track_emb]).astype(float)
        d_mat: FloatArray = np.stack([zeros if e is None else e for e in det_emb]).astype(float)
        # Cosine distance halved (0..1), as BoT-SORT does; a missing vector gives distance 0.5.
        emb_cost = (1.0 - t_mat @ d_mat.T) / 2.0
        both = np.outer(
            [e is not None for e in track_emb], [e is not None for e in det_emb]
        ).astype(bool)
        veto = both & (emb_cost > s.appearance_veto)
        emb_cost[emb_cost > s.appearance_threshold] = 1.0
        emb_cost[(1.0 - ious) > s.proximity_threshold] = 1.0
        fused = np.minimum(cost, emb_cost)
        fused[veto] = 1.0  # above every limit: never a pair
        return np.asarray(fused, dtype=np.float64)

    def _correct(
        self,
        matched: Sequence[tuple[_Track, int]],
        boxes: FloatArray,
        scores: FloatArray,
        embeddings: Sequence[Embedding | None],
        hidden: Sequence[bool],
    ) -> None:
        s = self.settings
        means, covs = kalman.update(
            np.stack([t.mean for t, _ in matched]),
            np.stack([t.cov for t, _ in matched]),
            kalman.xyxy_to_cxcywh(boxes[[i for _, i in matched]]),
        )
        for k, (track, i) in enumerate(matched):
            track.mean, track.cov = means[k], covs[k]
            track.frames_since_update = 0
            track.confirmed = True
            track.confidence = float(scores[i])
            track.last_detection_index = i
            emb = embeddings[i]
            if emb is not None and (not hidden[i] or track.embedding is None):
                if track.embedding is None:
                    track.embedding = emb
                else:
                    mixed = (
                        s.embedding_momentum * track.embedding + (1 - s.embedding_momentum) * emb
                    )
                    track.embedding = normalise(mixed)
