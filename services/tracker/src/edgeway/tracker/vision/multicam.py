"""``MultiCameraTracker``: per-camera tracks, global ids across cameras, map positions.

One ``update`` per global frame index (all cameras in lockstep, as SpotOn reads its videos):

1. Embeddings: detections that carry none are cropped from their frame and embedded, all
   cameras in one batch (only with an embedder and frames).
2. Each camera's ``CameraTracker`` associates its detections.
3. Global ids. A new track takes, in order: the id of a person that an overlapping camera sees
   at the same map position (within ``map_match_radius``, both cameras with homographies; looks
   break ties between people standing together and veto one who looks nothing alike); else
   the best gallery match by appearance under the hand-off rules or, with map positions, the
   walk the person could have made (``gallery.py``), never an id that another camera sees
   elsewhere on the map this frame, and only from an unoccluded look; else a new UUID. A track
   keeps its id, except that one whose id was new may still take a known one in its first
   ``rematch_frames`` (its first look may have been occluded or noisy), never one seen far from
   it or beside it while it lived. A (camera, id) pair is held by one track at a time: a new
   track that takes the id of a lost track of its camera (the person back after a miss)
   replaces it.
4. Gallery upkeep: every sighting refreshes "last seen"; the appearance EMA is folded in every
   ``refresh_interval_frames`` frames (SpotOn's ``REID_REFRESH_INTERVAL_FRAMES`` = 10) and at a
   track's first sighting, never from a box a nearer one half hides (``occluded``); ids unseen
   for ``lost_buffer_frames`` are dropped.

``reset_camera`` (SpotOn reset its trackers at every sub-video batch) forgets the camera's tracks
*and* their id bindings; track ids keep counting up, so a new track can never inherit a stale
global id (SpotOn's bug: its map from local to global ids survived the reset).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from edgeway.tracker.vision.embedding import Embedder, crop
from edgeway.tracker.vision.gallery import GallerySettings, ReIDGallery
from edgeway.tracker.vision.homography import project_box
from edgeway.tracker.vision.tracking import (
    CameraTracker,
    TrackedBox,
    TrackerSettings,
    normalise,
    occluded,
)
from edgeway.tracker.vision.types import (
    BBox,
    CameraSpec,
    Detection,
    Embedding,
    Frame,
    HandoffRule,
    TrackOutput,
)


@dataclass(frozen=True, slots=True)
class MultiCameraSettings:
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    gallery: GallerySettings = field(default_factory=GallerySettings)
    #: SpotOn ``REID_REFRESH_INTERVAL_FRAMES`` = 10.
    refresh_interval_frames: int = 10
    #: Same person seen by two overlapping cameras: map positions within 1 m (SpotOn HEAD's
    #: ``SPATIAL_MATCH_THRESHOLD`` = 100 px at 100 px/m). In map units: metres for a metric map.
    map_match_radius: float = 1.0
    #: An id that another camera sees this frame further away than this on the map cannot be
    #: a new track's (one person, one place), however alike the two look. Twice the match
    #: radius, for the projection error of two cameras. Map units.
    map_exclusion_radius: float = 2.0
    #: A track that got a new id keeps asking the gallery for this many frames (3 s at 10
    #: fps), with the mean of its unoccluded looks so far: a first look that was occluded or
    #: noisy should not make a known person new for good. 0 turns it off.
    rematch_frames: int = 30
    #: ... once it has this many unoccluded looks (their mean is steadier than one look).
    rematch_min_looks: int = 3
    #: Two people close together on the map are told apart by their looks: a new track takes
    #: an overlapping camera's id by map position only if its look (when unoccluded) is at
    #: least this similar to the id's gallery look (cosine). Two views of one person score
    #: ~0.7 with the noisy scene's simulated embeddings, two people ~0.
    map_match_min_similarity: float = 0.3


def quadrant_overlap(bbox: BBox, frame_size: tuple[int, int], quadrant: str) -> float:
    """Share of the box's area inside one image quadrant (halves at W/2, H/2)."""
    width, height = frame_size
    x1, y1, x2, y2 = bbox
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    if area <= 0:
        return 0.0
    qx = (0.0, width / 2) if quadrant.endswith("left") else (width / 2, float(width))
    qy = (0.0, height / 2) if quadrant.startswith("upper") else (height / 2, float(height))
    ix = max(0.0, min(x2, qx[1]) - max(x1, qx[0]))
    iy = max(0.0, min(y2, qy[1]) - max(y1, qy[0]))
    return ix * iy / area


def exit_targets(
    bbox: BBox, frame_size: tuple[int, int], rules: Sequence[HandoffRule]
) -> frozenset[str]:
    """Cameras this box is heading to: SpotOn's first matching exit rule wins."""
    for rule in rules:
        if quadrant_overlap(bbox, frame_size, rule.quadrant) >= rule.min_overlap:
            return frozenset((rule.target_camera_id,))
    return frozenset()


@dataclass(slots=True)
class _Binding:
    global_id: str
    first_frame: int
    #: The id was new when the track got it (no one matched): ``rematch_frames`` applies.
    fresh: bool = False
    #: While fresh: the sum of the track's unoccluded looks (L2-normalised) and their count.
    look_sum: Embedding | None = None
    looks: int = 0
    #: While fresh: ids another camera saw far from this track, or this camera beside it,
    #: while it lived (one person is never in two places: the track cannot take them on a
    #: rematch).
    apart: set[str] = field(default_factory=set)


class MultiCameraTracker:
    """Detections of all cameras in, tracks with global ids and map positions out. No I/O."""

    def __init__(
        self,
        cameras: Sequence[CameraSpec],
        overlaps: Iterable[tuple[str, str]] = (),
        *,
        settings: MultiCameraSettings | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings or MultiCameraSettings()
        self.cameras = {c.camera_id: c for c in cameras}
        if len(self.cameras) != len(cameras):
            raise ValueError("camera ids must be unique")
        pairs = [tuple(p) for p in overlaps]
        unknown = {c for p in pairs for c in p} - set(self.cameras)
        if unknown:
            raise ValueError(f"overlaps name unknown cameras: {sorted(unknown)}")
        self.embedder = embedder
        self.gallery = ReIDGallery(
            overlaps=[(a, b) for a, b in pairs], settings=self.settings.gallery
        )
        self._trackers = {cid: CameraTracker(self.settings.tracker) for cid in self.cameras}
        self._bindings: dict[str, dict[int, _Binding]] = {cid: {} for cid in self.cameras}

    def reset_camera(self, camera_id: str) -> None:
        """Start the camera's tracking afresh; its tracks' global ids are released."""
        self._trackers[camera_id].reset()
        self._bindings[camera_id].clear()

    def reset(self) -> None:
        for camera_id in self.cameras:
            self.reset_camera(camera_id)

    def snapshot(self) -> dict[str, object]:
        """What to persist so a task can resume elsewhere: the gallery and each camera's next
        track id (plain data)."""
        return {
            "gallery": self.gallery.snapshot(),
            "next_track_ids": {cid: t.next_track_id for cid, t in self._trackers.items()},
        }

    def restore(self, snapshot: Mapping[str, object]) -> None:
        """Resume from ``snapshot()``: trackers start empty, known people keep their ids, and
        track ids go on from where the snapshot's run left off (never handed out twice)."""
        gallery = snapshot.get("gallery")
        if not isinstance(gallery, Mapping):
            raise ValueError("snapshot has no gallery")
        self.reset()
        self.gallery.restore(gallery)
        next_ids = snapshot.get("next_track_ids", {})
        if not isinstance(next_ids, Mapping):
            raise ValueError("snapshot's next_track_ids is not a mapping")
        for cid, next_id in next_ids.items():
            if cid in self._trackers:
                self._trackers[cid].continue_ids_from(int(next_id))

    def update(
        self,
        frame_index: int,
        detections_by_camera: Mapping[str, Sequence[Detection]],
        frames_by_camera: Mapping[str, Frame] | None = None,
    ) -> dict[str, list[TrackOutput]]:
        unknown = set(detections_by_camera) - set(self.cameras)
        if unknown:
            raise KeyError(f"detections for unknown cameras: {sorted(unknown)}")
        detections = self._with_embeddings(detections_by_camera, frames_by_camera or {})
        tracked = {cid: self._trackers[cid].update(detections.get(cid, ())) for cid in self.cameras}
        positions = {
            cid: [project_box(self.cameras[cid].homography, b.bbox_xyxy) for b in boxes]
            for cid, boxes in tracked.items()
        }
        self._forget_dead_tracks()
        share = self.settings.tracker.occlusion_share
        hidden = {
            cid: occluded([d.bbox_xyxy for d in dets], share) for cid, dets in detections.items()
        }
        clear = {
            cid: [not hidden[cid][b.detection_index] for b in boxes]
            for cid, boxes in tracked.items()
        }

        # Pass 1: tracks that already have a global id are sighted first, so that pass 2
        # knows who is visible where in this very frame.
        gids: dict[str, list[str | None]] = {}
        for cid, boxes in tracked.items():
            binding = self._bindings[cid]
            gids[cid] = []
            for i, box in enumerate(boxes):
                bound = binding.get(box.track_id)
                gids[cid].append(None if bound is None else bound.global_id)
                if bound is not None:
                    self._observe(
                        frame_index,
                        cid,
                        box,
                        bound,
                        detections[cid],
                        clear[cid][i],
                        positions[cid][i],
                    )
        # Pass 2: new tracks, camera by camera; later cameras see earlier cameras' choices.
        for cid, boxes in tracked.items():
            new = [i for i, g in enumerate(gids[cid]) if g is None]
            if new:
                self._assign_new(frame_index, cid, boxes, new, gids, positions, clear[cid])
                for i in new:
                    bound = self._bindings[cid][boxes[i].track_id]
                    self._observe(
                        frame_index,
                        cid,
                        boxes[i],
                        bound,
                        detections[cid],
                        clear[cid][i],
                        positions[cid][i],
                    )
        # Pass 3: young tracks with a new id try the gallery again with an unoccluded look.
        if self.settings.rematch_frames > 0:
            for cid, boxes in tracked.items():
                if boxes:
                    self._rematch(
                        frame_index, cid, boxes, gids, positions, clear[cid], detections[cid]
                    )

        out: dict[str, list[TrackOutput]] = {}
        for cid, boxes in tracked.items():
            out[cid] = [
                TrackOutput(
                    track_id=box.track_id,
                    global_id=self._bindings[cid][box.track_id].global_id,
                    bbox_xyxy=box.bbox_xyxy,
                    confidence=box.confidence,
                    map_coords=positions[cid][i],
                )
                for i, box in enumerate(boxes)
            ]
        held = {b.global_id for bindings in self._bindings.values() for b in bindings.values()}
        self.gallery.prune(frame_index, keep=held)
        return out

    def _observe(
        self,
        frame_index: int,
        cid: str,
        box: TrackedBox,
        bound: _Binding,
        detections: Sequence[Detection],
        unoccluded: bool,
        position: tuple[float, float] | None,
    ) -> None:
        """A sighting; the look is folded in every ``refresh_interval_frames`` frames, or at
        once while the id has none, and never from an occluded box."""
        spec = self.cameras[cid]
        age = frame_index - bound.first_frame
        refresh = age % self.settings.refresh_interval_frames == 0
        if not refresh and unoccluded and bound.global_id in self.gallery:
            refresh = self.gallery.entry(bound.global_id).embedding is None
        self.gallery.observe(
            bound.global_id,
            cid,
            frame_index,
            embedding=detections[box.detection_index].embedding if refresh and unoccluded else None,
            exit_targets=exit_targets(box.bbox_xyxy, spec.frame_size, spec.handoff_rules),
            map_xy=position,
        )

    def _with_embeddings(
        self,
        detections_by_camera: Mapping[str, Sequence[Detection]],
        frames_by_camera: Mapping[str, Frame],
    ) -> dict[str, list[Detection]]:
        detections = {cid: list(d) for cid, d in detections_by_camera.items()}
        if self.embedder is None:
            return detections
        todo = [
            (cid, i)
            for cid, dets in detections.items()
            if cid in frames_by_camera
            for i, d in enumerate(dets)
            if d.embedding is None
        ]
        if not todo:
            return detections
        crops = [crop(frames_by_camera[cid], detections[cid][i].bbox_xyxy) for cid, i in todo]
        vectors = self.embedder.embed(crops)
        for (cid, i), vec in zip(todo, vectors, strict=True):
            detections[cid][i] = replace(detections[cid][i], embedding=vec)
        return detections

    def _forget_dead_tracks(self) -> None:
        for cid, tracker in self._trackers.items():
            live = tracker.live_track_ids
            binding = self._bindings[cid]
            for tid in [t for t in binding if t not in live]:
                del binding[tid]

    def _assign_new(
        self,
        frame_index: int,
        cid: str,
        boxes: Sequence[TrackedBox],
        new: list[int],
        gids: dict[str, list[str | None]],
        positions: dict[str, list[tuple[float, float] | None]],
        unoccluded: Sequence[bool],
    ) -> None:
        held_here = {g for g in gids[cid] if g is not None}
        # (a) Same map position in an overlapping camera, this frame.
        seen: dict[str, tuple[float, float]] = {}
        for other, other_gids in gids.items():
            if other == cid or not self.gallery.overlapping(cid, other):
                continue
            for g, pos in zip(other_gids, positions[other], strict=True):
                if g is not None and pos is not None and g not in held_here:
                    seen[g] = pos
        chosen: dict[int, str] = {}
        mine = [(i, p) for i in new if (p := positions[cid][i]) is not None]
        if seen and mine:
            cand = list(seen)
            dist = np.array([[math.dist(p, seen[g]) for g in cand] for _, p in mine])
            # Looks break ties between people standing close together, and veto a stranger.
            unlike = np.zeros_like(dist)
            for r, (i, _) in enumerate(mine):
                look = boxes[i].embedding if unoccluded[i] else None
                for c, g in enumerate(cand):
                    known = self.gallery.entry(g).embedding if g in self.gallery else None
                    if look is not None and known is not None and known.shape == look.shape:
                        sim = float(normalise(look) @ known)
                        unlike[r, c] = 1.0 - sim
                        if sim < self.settings.map_match_min_similarity:
                            dist[r, c] = math.inf
            radius = self.settings.map_match_radius
            cost = np.where(np.isfinite(dist), dist / radius + unlike, 1e6)
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols, strict=True):
                if dist[r, c] <= radius:
                    chosen[mine[r][0]] = cand[c]
        # (b) Appearance, under the hand-off rules, from unoccluded looks only.
        rest = [i for i in new if i not in chosen]
        taken = held_here | set(chosen.values())
        matches = self.gallery.match(
            cid,
            frame_index,
            [boxes[i].embedding if unoccluded[i] else None for i in rest],
            exclude=taken,
            exclude_each=[self._elsewhere(cid, positions[cid][i], gids, positions) for i in rest],
            positions=[positions[cid][i] for i in rest],
        )
        for i, m in zip(rest, matches, strict=True):
            if m is not None:
                chosen[i] = m[0]
        # (c) Otherwise a new person (with no look yet if this one was occluded).
        for i in new:
            gid = chosen.get(i)
            if gid is None:
                look = boxes[i].embedding if unoccluded[i] else None
                gid = self.gallery.new_identity(cid, frame_index, look)
            else:
                self._release(cid, gid)
            gids[cid][i] = gid
            self._bindings[cid][boxes[i].track_id] = _Binding(
                gid, frame_index, fresh=i not in chosen
            )

    def _release(self, cid: str, global_id: str) -> None:
        """A new track of camera ``cid`` takes ``global_id``: a lost track of the camera that
        held it is that person's old track, and goes (one track per id in a camera)."""
        bindings = self._bindings[cid]
        for lost in [t for t, b in bindings.items() if b.global_id == global_id]:
            self._trackers[cid].drop(lost)
            del bindings[lost]

    def _elsewhere(
        self,
        cid: str,
        position: tuple[float, float] | None,
        gids: Mapping[str, Sequence[str | None]],
        positions: Mapping[str, Sequence[tuple[float, float] | None]],
    ) -> set[str]:
        """Ids another camera sees this frame too far from ``position`` to be this person."""
        if position is None:
            return set()
        limit = self.settings.map_exclusion_radius
        return {
            g
            for other, other_gids in gids.items()
            if other != cid
            for g, pos in zip(other_gids, positions[other], strict=True)
            if g is not None and pos is not None and math.dist(position, pos) > limit
        }

    def _rematch(
        self,
        frame_index: int,
        cid: str,
        boxes: Sequence[TrackedBox],
        gids: dict[str, list[str | None]],
        positions: dict[str, list[tuple[float, float] | None]],
        unoccluded: Sequence[bool],
        detections: Sequence[Detection],
    ) -> None:
        """Young tracks whose id was new, seen clearly now: if the gallery knows the look, the
        track takes the known id and its own (held by no one else) is dropped."""
        window = self.settings.rematch_frames
        todo = []
        for i, box in enumerate(boxes):
            bound = self._bindings[cid][box.track_id]
            look = detections[box.detection_index].embedding
            if not bound.fresh:
                continue
            if frame_index - bound.first_frame > window:
                bound.fresh, bound.look_sum = False, None
                bound.apart.clear()
                continue
            bound.apart |= self._elsewhere(cid, positions[cid][i], gids, positions)
            # Seen beside this track by this very camera: someone else.
            bound.apart.update(g for k, g in enumerate(gids[cid]) if g is not None and k != i)
            if not unoccluded[i] or look is None:
                continue
            look = normalise(look)
            if bound.look_sum is None or bound.look_sum.shape != look.shape:
                bound.look_sum, bound.looks = look, 1
            else:
                bound.look_sum, bound.looks = bound.look_sum + look, bound.looks + 1
            if bound.looks >= self.settings.rematch_min_looks:
                todo.append((i, bound, bound.look_sum))
        if not todo:
            return
        holders: dict[str, int] = {}
        for bindings in self._bindings.values():
            for b in bindings.values():
                holders[b.global_id] = holders.get(b.global_id, 0) + 1
        # Not the ids of this camera's tracks seen this frame. An id a lost track of this
        # camera holds may be taken: the person came back as a new track (the lost one is
        # dropped, so one track holds the id).
        held_here = {g for g in gids[cid] if g is not None}
        matches = self.gallery.match(
            cid,
            frame_index,
            [look for _, _, look in todo],
            exclude=held_here,
            exclude_each=[bound.apart for _, bound, _ in todo],
            positions=[positions[cid][i] for i, _, _ in todo],
        )
        for (i, bound, _), m in zip(todo, matches, strict=True):
            if m is None or holders.get(bound.global_id, 0) > 1:
                continue
            self.gallery.forget(bound.global_id)
            self._release(cid, m[0])
            bound.global_id, bound.fresh, bound.look_sum = m[0], False, None
            bound.apart.clear()
            gids[cid][i] = m[0]
            held_here.add(m[0])
