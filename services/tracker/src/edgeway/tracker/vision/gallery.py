"""The cross-camera Re-ID gallery: one appearance per global id, and who may match whom.

SpotOn's parameters and rules (docs/replaced-systems.md), with its two bugs fixed: features are real
embeddings (SpotOn read the detection index as the feature), and an EMA update takes effect
(SpotOn's raised ``TypeError``). A gallery entry can match a new track in camera C only if it was
last seen in C, in a camera that overlaps C, or leaving through a hand-off quadrant towards C;
and never if a live track in C already holds it, or if it is being seen right now by a camera
that does not overlap C (one person cannot be in two unconnected places at once).

Where both the entry's last sighting and the new track have map positions (cameras with
homographies), the map decides instead of the quadrants: the id may match if a person could
have walked from where it was last seen to where the track is in the frames between
(``reach_per_frame``, plus ``reach_slack`` for two cameras' projection errors), whichever
quadrant it left by. A person missed on their way out of a camera (their last box was not in an
exit quadrant) is still handed over, and one who could not have got there is not.

The gallery is plain data (``snapshot``/``restore``), so the service can persist it with the task
and resume after a worker crash without re-identifying everyone from scratch.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from edgeway.tracker.vision.tracking import normalise
from edgeway.tracker.vision.types import Embedding

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class GallerySettings:
    #: SpotOn ``REID_SIMILARITY_THRESHOLD`` = 0.65 (cosine).
    similarity_threshold: float = 0.65
    #: SpotOn's gallery EMA: 0.9 of the stored vector, 0.1 of the new one, re-normalised.
    ema_momentum: float = 0.9
    #: SpotOn ``REID_LOST_TRACK_BUFFER_FRAMES`` = 200: how long an unseen id can come back.
    lost_buffer_frames: int = 200
    #: Map units a person may cover per frame between two sightings: 0.25 is 2.5 m/s at 10 fps
    #: (a brisk walk is 1.5-2 m/s; the multi-camera scenes walk at 0.9-1.5).
    reach_per_frame: float = 0.25
    #: Map distance allowed on top of the walk: the projection errors of two cameras (twice
    #: ``MultiCameraSettings.map_match_radius``, like its exclusion radius). Map units.
    reach_slack: float = 2.0


@dataclass(slots=True)
class GalleryEntry:
    global_id: str
    embedding: Embedding | None
    last_seen_frame: int
    last_camera_id: str
    exit_targets: frozenset[str] = frozenset()
    #: Where it was last seen on the map (None: that camera has no homography).
    last_map_xy: tuple[float, float] | None = None


class ReIDGallery:
    def __init__(
        self,
        overlaps: Iterable[tuple[str, str]] = (),
        settings: GallerySettings | None = None,
    ) -> None:
        self.settings = settings or GallerySettings()
        self._overlaps = {frozenset(p) for p in overlaps}
        self._entries: dict[str, GalleryEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, global_id: object) -> bool:
        return global_id in self._entries

    def overlapping(self, a: str, b: str) -> bool:
        return a == b or frozenset((a, b)) in self._overlaps

    def entry(self, global_id: str) -> GalleryEntry:
        return self._entries[global_id]

    def new_identity(self, camera_id: str, frame: int, embedding: Embedding | None) -> str:
        """A fresh UUID4 global id, stored with this first look."""
        gid = str(uuid.uuid4())
        emb = normalise(embedding) if embedding is not None else None
        self._entries[gid] = GalleryEntry(gid, emb, frame, camera_id)
        return gid

    def observe(
        self,
        global_id: str,
        camera_id: str,
        frame: int,
        *,
        embedding: Embedding | None = None,
        exit_targets: frozenset[str] = frozenset(),
        map_xy: tuple[float, float] | None = None,
    ) -> None:
        """Record a sighting; with an embedding, fold it in with the EMA."""
        entry = self._entries.get(global_id)
        if entry is None:  # pruned while its track lived on (long occlusion): keep the id
            entry = GalleryEntry(global_id, None, frame, camera_id)
            self._entries[global_id] = entry
        if frame >= entry.last_seen_frame:
            entry.last_seen_frame = frame
            entry.last_camera_id = camera_id
            entry.exit_targets = exit_targets
            entry.last_map_xy = map_xy
        if embedding is not None:
            new = normalise(embedding)
            if entry.embedding is None or entry.embedding.shape != new.shape:
                entry.embedding = new
            else:
                m = self.settings.ema_momentum
                entry.embedding = normalise(m * entry.embedding + (1.0 - m) * new)

    def eligible(
        self,
        global_id: str,
        camera_id: str,
        frame: int,
        position: tuple[float, float] | None = None,
    ) -> bool:
        """May this id re-appear in ``camera_id`` now, at map ``position`` if known? (the map's
        reach where both positions are known, else the overlap and hand-off rules)"""
        e = self._entries[global_id]
        gap = frame - e.last_seen_frame
        if gap > self.settings.lost_buffer_frames:
            return False
        overlapping = self.overlapping(e.last_camera_id, camera_id)
        if gap <= 0 and not overlapping:  # seen this very frame by an unconnected camera
            return False
        if position is not None and e.last_map_xy is not None:
            reach = self.settings.reach_slack + self.settings.reach_per_frame * max(gap, 0)
            return math.dist(position, e.last_map_xy) <= reach
        return overlapping or camera_id in e.exit_targets

    def match(
        self,
        camera_id: str,
        frame: int,
        embeddings: Sequence[Embedding | None],
        exclude: Iterable[str] = (),
        exclude_each: Sequence[Collection[str]] | None = None,
        positions: Sequence[tuple[float, float] | None] | None = None,
    ) -> list[tuple[str, float] | None]:
        """Best gallery id for each new track of one camera, one id per track at most.

        Hungarian assignment on cosine similarity, so when two tracks want the same id the
        closer one wins and the other gets its next best or nothing (SpotOn's "one track per
        (camera, global id)", decided by similarity rather than by order). ``exclude`` holds
        for every track, ``exclude_each[k]`` for the k-th only; ``positions[k]`` is the k-th
        track's map position, if known (``eligible``).
        """
        result: list[tuple[str, float] | None] = [None] * len(embeddings)
        rows = [i for i, emb in enumerate(embeddings) if emb is not None]
        if not rows:
            return result
        rows_all = list(rows)
        queries = [normalise(e) for e in embeddings if e is not None]
        dim = queries[0].shape[0]
        # Vectors of another size come from another embedder: they are not comparable.
        keep = [k for k, q in enumerate(queries) if q.shape[0] == dim]
        rows = [rows[k] for k in keep]
        excluded = set(exclude)
        candidates = [
            e
            for e in self._entries.values()
            if e.embedding is not None
            and e.embedding.shape[0] == dim
            and e.global_id not in excluded
        ]
        where = [None if positions is None else positions[rows_all[k]] for k in keep]
        allowed = np.array(
            [[self.eligible(c.global_id, camera_id, frame, p) for c in candidates] for p in where],
            dtype=bool,
        ).reshape(len(keep), len(candidates))
        if not allowed.any():
            return result
        query = np.stack([queries[k] for k in keep])
        gallery = np.stack([c.embedding for c in candidates if c.embedding is not None])
        sim = np.where(allowed, query @ gallery.T, -1.0)  # -1: below any threshold
        if exclude_each is not None:
            for r, k in enumerate(keep):
                banned = exclude_each[rows_all[k]]
                for c, cand in enumerate(candidates):
                    if cand.global_id in banned:
                        sim[r, c] = -1.0
        r_idx, c_idx = linear_sum_assignment(-sim)
        for r, c in zip(r_idx, c_idx, strict=True):
            if sim[r, c] >= self.settings.similarity_threshold:
                result[rows[r]] = (candidates[c].global_id, float(sim[r, c]))
        return result

    def forget(self, global_id: str) -> None:
        """Drop an id (a provisional one that turned out to be someone known)."""
        self._entries.pop(global_id, None)

    def prune(self, frame: int, keep: Iterable[str] = ()) -> None:
        """Forget ids unseen for longer than the lost buffer, except those still held."""
        held = set(keep)
        limit = self.settings.lost_buffer_frames
        self._entries = {
            gid: e
            for gid, e in self._entries.items()
            if gid in held or frame - e.last_seen_frame <= limit
        }

    def snapshot(self) -> dict[str, object]:
        """Plain JSON-able data: ids, embeddings as lists of floats, last sighting."""
        return {
            "version": SNAPSHOT_VERSION,
            "entries": [
                {
                    "global_id": e.global_id,
                    "embedding": None if e.embedding is None else e.embedding.tolist(),
                    "last_seen_frame": e.last_seen_frame,
                    "last_camera_id": e.last_camera_id,
                    "exit_targets": sorted(e.exit_targets),
                    "last_map_xy": None if e.last_map_xy is None else list(e.last_map_xy),
                }
                for e in self._entries.values()
            ],
        }

    def restore(self, snapshot: Mapping[str, object]) -> None:
        """Replace the contents with a ``snapshot()`` (from this or an earlier process)."""
        if snapshot.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown gallery snapshot version {snapshot.get('version')!r}")
        entries = snapshot.get("entries")
        if not isinstance(entries, list):
            raise ValueError("gallery snapshot has no entry list")
        restored: dict[str, GalleryEntry] = {}
        for item in entries:
            gid = str(uuid.UUID(str(item["global_id"])))
            emb = item.get("embedding")
            xy = item.get("last_map_xy")  # absent in snapshots written before it was kept
            restored[gid] = GalleryEntry(
                global_id=gid,
                embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
                last_seen_frame=int(item["last_seen_frame"]),
                last_camera_id=str(item["last_camera_id"]),
                exit_targets=frozenset(str(t) for t in item.get("exit_targets", [])),
                last_map_xy=None if xy is None else (float(xy[0]), float(xy[1])),
            )
        self._entries = restored
