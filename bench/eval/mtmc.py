"""Multi-camera scenes for ``make eval``: people on a floor, three cameras, global ids scored.

Everything is generated from a seed (``scenes.py`` geometry and rendering), so no data is
committed. The knobs are fixed here, before any run:

* Floor 24 x 6 m, 10 fps, 30 s. Cameras (``CAMERAS``): c1 and c2 overlap (their views share
  the floor around x 5-8 m, both with homographies, so new tracks take ids by map position);
  c3 sees x 15-23 m, out of sight of c2 (no overlap: people reach it through an unseen gap and
  are re-identified by appearance; SpotOn's quadrant hand-off rules are configured, but with
  homographies on both sides the gallery asks the map whether the walk was possible instead).
  c3 has a 16:9 frame.
* 10 people (``people``): some on the floor at the start, the rest walk in from an end of the
  room later; each walks through random waypoints at 0.9-1.5 m/s, pauses now and then, and
  some leave. Two pairs are dressed alike (same clothes; in the simulated embeddings their
  looks have cosine ~0.9, above the gallery's 0.65 threshold: the Re-ID trap). Occlusion
  comes from the drawing order: visibility is the share of a box no nearer person covers; GT
  boxes under ``MIN_VISIBILITY`` are "ignore" rows (conf 0, ``mot.without_ignored``).
* Settings: ``external`` (GT boxes through ``simulate.noisy_detections``, ``CLEAN`` or the
  default ``NoiseModel``, with simulated embeddings, clean or noisy) and ``pipeline`` (HOG +
  MobileNetV2 on the rendered frames, as the service runs them).

Seeds: ``TUNING_SEEDS`` are the only ones the vision core was ever tuned on; ``make eval``
reports ``REPORT_SEEDS`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.eval.mot import (
    MotRow,
    evaluate_cameras,
    frames_of,
    identity_links,
    with_true_ids,
)
from bench.eval.simulate import CLEAN, MIN_VISIBILITY, NoiseModel, noisy_detections
from edgeway.tracker.scenes import Colour, Scene, SceneCamera, Wanderer, strip_camera
from edgeway.tracker.vision.detection import Detector
from edgeway.tracker.vision.embedding import Embedder
from edgeway.tracker.vision.homography import fit_homography
from edgeway.tracker.vision.multicam import MultiCameraTracker
from edgeway.tracker.vision.types import BBox, CameraSpec, Detection, Frame, HandoffRule

TUNING_SEEDS = (1100, 1101, 1102)
REPORT_SEEDS = (1000, 1001, 1002)

FPS = 10.0
NUM_FRAMES = 300  # 30 s at 10 fps
ROOM = (24.0, 6.0)
PEOPLE = 10
ALIKE_PAIRS = ((1, 2), (3, 4))  # person ids dressed alike
#: Strips of the floor each camera frames (``strip_camera``: near edge at the image bottom).
#: The views widen with depth, so c1's and c2's share x ~4-8 m, while c2 sees no further than
#: x ~13.3 m and c3 no nearer than x ~14.7 m: c2 and c3 never see one place.
CAMERAS = (
    ("c1", 0.0, 6.0, 640, 480),
    ("c2", 5.0, 11.0, 640, 480),
    ("c3", 17.0, 23.0, 800, 450),
)
OVERLAPS = (("c1", "c2"),)
HANDOFFS = {
    "c2": (HandoffRule("upper_right", "c3"), HandoffRule("lower_right", "c3")),
    "c3": (HandoffRule("upper_left", "c2"), HandoffRule("lower_left", "c2")),
}
#: Simulated appearance: 128-d per-person looks; noise std (as a share of the unit vector) of
#: one view: 0.2 gives a view-to-look cosine ~0.98, 0.6 ~0.86 (two views of one person ~0.74).
EMBEDDING_DIM = 128
EMBEDDING_NOISE = {"clean": 0.2, "noisy": 0.6}
#: Alike pairs: the second look is the first plus this much noise, cosine ~0.91.
ALIKE_SPREAD = 0.45
#: A split or merge counts a (GT id, global id) pair only if it lasted 1 s (10 frames): a
#: one-off bad box is a tracking error, not a hand-off error.
MIN_LINK_FRAMES = 10


def scene_cameras() -> list[SceneCamera]:
    return [strip_camera(c, x0, x1, w, h) for c, x0, x1, w, h in CAMERAS]


def camera_specs(cameras: Sequence[SceneCamera]) -> list[CameraSpec]:
    """What the service is configured with: frame size, homography fitted from the four
    floor points (as the environment's ``homography`` gives them), hand-off rules."""
    return [
        CameraSpec(
            c.camera_id,
            (c.width, c.height),
            homography=fit_homography(c.image_points, c.map_points),
            handoff_rules=HANDOFFS.get(c.camera_id, ()),
        )
        for c in cameras
    ]


def _colour(rng: np.random.Generator) -> Colour:
    r, g, b = (int(v) for v in rng.integers(20, 235, 3))
    return (r, g, b)


def people(rng: np.random.Generator, duration_s: float) -> list[Wanderer]:
    """``PEOPLE`` wanderers: six on the floor at t = 0, the others walking in from either end
    within the first half; each then heads for random waypoints (pausing 1-4 s at 30 % of
    them) until the end, or leaves through an end of the room (a third of them)."""
    width, depth = ROOM
    out: list[Wanderer] = []
    clothes: dict[int, tuple[Colour, Colour]] = {}
    for pid in range(1, PEOPLE + 1):
        if pid <= 6:
            t = 0.0
            x, y = float(rng.uniform(0, width)), float(rng.uniform(0.3, depth - 0.3))
        else:
            t = float(rng.uniform(0, duration_s / 2))
            x, y = (0.0 if rng.random() < 0.5 else width), float(rng.uniform(0.3, depth - 0.3))
        keys = [(t, x, y)]
        leaves = rng.random() < 1 / 3
        speed = float(rng.uniform(0.9, 1.5))
        while t < duration_s:
            if leaves and t > duration_s / 2:
                nx, ny = (0.0 if x < width / 2 else width), y
            else:
                nx, ny = float(rng.uniform(0, width)), float(rng.uniform(0.3, depth - 0.3))
            t += float(np.hypot(nx - x, ny - y)) / speed
            x, y = nx, ny
            keys.append((t, x, y))
            if leaves and x in (0.0, width) and t > duration_s / 2:
                break
            if rng.random() < 0.3:
                t += float(rng.uniform(1, 4))
                keys.append((t, x, y))
        alike = next((a for a, b in ALIKE_PAIRS if b == pid), None)
        clothes[pid] = clothes[alike] if alike is not None else (_colour(rng), _colour(rng))
        out.append(Wanderer(pid, tuple(keys), clothes[pid][0], legs=clothes[pid][1]))
    return out


def build_scene(seed: int, num_frames: int = NUM_FRAMES) -> Scene:
    rng = np.random.default_rng(seed)
    return Scene(scene_cameras(), people(rng, num_frames / FPS), room=ROOM, fps=FPS, seed=seed)


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """Per camera: MOT rows (1-based frames; conf 0 = ignore) and each row's visibility."""

    rows: dict[str, list[MotRow]]
    visibility: dict[str, dict[tuple[int, int], float]]


def ground_truth(scene: Scene, num_frames: int) -> GroundTruth:
    rows: dict[str, list[MotRow]] = {}
    visibility: dict[str, dict[tuple[int, int], float]] = {}
    for camera in scene.cameras:
        cam_rows, cam_vis = [], {}
        for f in range(num_frames):
            for s in scene.sightings(camera, f):
                x1, y1, x2, y2 = s.bbox_xyxy
                conf = 1.0 if s.visibility >= MIN_VISIBILITY else 0.0
                cam_rows.append(
                    MotRow(f + 1, s.person_id, x1, y1, x2 - x1, y2 - y1, conf, *s.map_xy)
                )
                cam_vis[(f + 1, s.person_id)] = s.visibility
        rows[camera.camera_id] = cam_rows
        visibility[camera.camera_id] = cam_vis
    return GroundTruth(rows, visibility)


def person_looks(seed: int) -> dict[int, npt.NDArray[np.float64]]:
    """One unit vector per person; the second of an alike pair is close to the first."""
    rng = np.random.default_rng(seed + 20_000)
    looks: dict[int, npt.NDArray[np.float64]] = {}
    for pid in range(1, PEOPLE + 1):
        alike = next((a for a, b in ALIKE_PAIRS if b == pid), None)
        if alike is None:
            v = rng.normal(size=EMBEDDING_DIM)
        else:
            v = looks[alike] + rng.normal(0, ALIKE_SPREAD / np.sqrt(EMBEDDING_DIM), EMBEDDING_DIM)
        looks[pid] = v / np.linalg.norm(v)
    return looks


def _occluder(row: MotRow, others: Iterable[MotRow]) -> int | None:
    """The nearer person (lower box bottom on the image) covering most of ``row``'s box."""
    best, best_area = None, 0.0
    x1, y1, x2, y2 = row.xyxy
    for o in others:
        if o.obj_id == row.obj_id or o.y + o.h <= y2:
            continue
        a1, b1, a2, b2 = o.xyxy
        area = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
        if area > best_area:
            best, best_area = o.obj_id, area
    return best


def simulated_detections(
    gt: GroundTruth, cameras: Sequence[SceneCamera], seed: int, variant: str, num_frames: int
) -> dict[str, dict[int, list[Detection]]]:
    """``external`` detections with embeddings: ``clean`` (GT boxes, ``CLEAN``, embedding noise
    0.2) or ``noisy`` (the default ``NoiseModel`` with the occlusion rule, noise 0.6). A box's
    vector is its person's look blended with its occluder's by visibility (an occluded crop
    shows the person in front), plus noise; false boxes get random vectors."""
    noise_model = CLEAN if variant == "clean" else NoiseModel()
    sigma = EMBEDDING_NOISE[variant] / np.sqrt(EMBEDDING_DIM)
    looks = person_looks(seed)
    rng = np.random.default_rng(seed + 30_000)
    out: dict[str, dict[int, list[Detection]]] = {}
    for k, camera in enumerate(cameras):
        cid = camera.camera_id
        rows = gt.rows[cid]
        by_frame = frames_of(rows)
        sims = noisy_detections(
            rows,
            num_frames,
            seed * 10 + k,
            noise_model,
            (camera.width, camera.height),
            visibility=gt.visibility[cid],
        )
        out[cid] = {}
        for frame, dets in sims.items():
            batch = []
            for d in dets:
                if d.gt_id < 0:
                    vec = rng.normal(size=EMBEDDING_DIM)
                else:
                    vis = gt.visibility[cid][(frame, d.gt_id)]
                    row = next(r for r in by_frame[frame] if r.obj_id == d.gt_id)
                    front = _occluder(row, by_frame[frame])
                    vec = looks[d.gt_id] * (vis if front is not None else 1.0)
                    if front is not None:
                        vec = vec + looks[front] * (1.0 - vis)
                    vec = vec / np.linalg.norm(vec) + rng.normal(0, sigma, EMBEDDING_DIM)
                vec = vec / np.linalg.norm(vec)
                batch.append(Detection(d.xyxy, d.confidence, vec.astype(np.float32)))
            out[cid][frame] = batch
    return out


class _Ids:
    """Integer ids for global id strings, in order of first appearance."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def __call__(self, key: str) -> int:
        return self._ids.setdefault(key, len(self._ids) + 1)


@dataclass(slots=True)
class Outputs:
    """What the tracker said, as MOT rows per camera: by global id (world x, y = its map
    coordinates) and, for the no-Re-ID baseline, by per-camera track id."""

    by_global_id: dict[str, list[MotRow]]
    by_track_id: dict[str, list[MotRow]]


class TrackerRun:
    """One ``MultiCameraTracker`` fed frame by frame, its answers kept as MOT rows."""

    def __init__(self, cameras: Sequence[SceneCamera], embedder: Embedder | None = None):
        self._mct = MultiCameraTracker(camera_specs(cameras), OVERLAPS, embedder=embedder)
        self._ids = _Ids()
        self._camera_rank = {c.camera_id: k + 1 for k, c in enumerate(cameras)}
        self.outputs = Outputs(
            {c.camera_id: [] for c in cameras}, {c.camera_id: [] for c in cameras}
        )

    def step(
        self,
        frame: int,
        detections: Mapping[str, Sequence[Detection]],
        frames: Mapping[str, Frame] | None = None,
    ) -> None:
        for cid, items in self._mct.update(frame, detections, frames).items():
            for t in items:
                x1, y1, x2, y2 = t.bbox_xyxy
                wx, wy = t.map_coords if t.map_coords is not None else (-1.0, -1.0)
                box = (x1, y1, x2 - x1, y2 - y1)
                gid = self._ids(t.global_id)
                self.outputs.by_global_id[cid].append(MotRow(frame, gid, *box, 1.0, wx, wy))
                # One id space for the per-camera track ids too, never shared by two cameras.
                local = self._camera_rank[cid] * 1_000_000 + t.track_id
                self.outputs.by_track_id[cid].append(MotRow(frame, local, *box, 1.0, -1.0, -1.0))


def run_tracker(
    cameras: Sequence[SceneCamera],
    detections: Mapping[str, Mapping[int, Sequence[Detection]]],
    num_frames: int,
) -> Outputs:
    run = TrackerRun(cameras)
    for f in range(1, num_frames + 1):
        run.step(f, {cid: detections[cid].get(f, []) for cid in detections})
    return run.outputs


def score(gt: GroundTruth, outputs: Outputs, num_frames: int) -> dict[str, Any]:
    """Per-camera and global metrics with global ids; the global IDF1 of per-camera track ids
    (what the same run scores without cross-camera Re-ID) and of the same boxes with true ids
    (the ceiling the detections leave); hand-off errors; map error."""
    ours = evaluate_cameras(gt.rows, outputs.by_global_id, num_frames)
    local = evaluate_cameras(gt.rows, outputs.by_track_id, num_frames)
    ceiling = evaluate_cameras(gt.rows, with_true_ids(gt.rows, outputs.by_global_id), num_frames)
    links = identity_links(gt.rows, outputs.by_global_id)
    people_seen = {r.obj_id for rows in gt.rows.values() for r in rows if r.conf != 0}
    return {
        "per_camera": {cid: m for cid, m in ours.items() if cid != "global"},
        "global": ours["global"],
        "global_idf1_without_reid": local["global"]["IDF1"],
        "global_idf1_true_ids": ceiling["global"]["IDF1"],
        "people": len(people_seen),
        "global_ids": len({r.obj_id for rows in outputs.by_global_id.values() for r in rows}),
        "split_people": links.splits(MIN_LINK_FRAMES),
        "merged_ids": links.merges(MIN_LINK_FRAMES),
        "map_error_median_m": float(np.median(links.map_errors)) if links.map_errors else None,
    }


def run_external(seed: int, variant: str, num_frames: int = NUM_FRAMES) -> dict[str, Any]:
    scene = build_scene(seed, num_frames)
    gt = ground_truth(scene, num_frames)
    dets = simulated_detections(gt, scene.cameras, seed, variant, num_frames)
    return score(gt, run_tracker(scene.cameras, dets, num_frames), num_frames)


def run_pipeline(
    seed: int,
    num_frames: int,
    detector: Detector,
    embedder: Embedder | None,
    box_rules: Mapping[str, Callable[[BBox], BBox]],
) -> dict[str, dict[str, Any]]:
    """The service's path on rendered frames: ``detector`` on every camera's frame at once,
    then ``MultiCameraTracker`` with ``embedder`` cropping from the frames; once per box rule
    (e.g. HOG's window as it is, and tightened), on the same detections."""
    scene = build_scene(seed, num_frames)
    gt = ground_truth(scene, num_frames)
    runs = {name: TrackerRun(scene.cameras, embedder) for name in box_rules}
    for f in range(1, num_frames + 1):
        frames = {c.camera_id: scene.render(c, f - 1)[0] for c in scene.cameras}
        found = detector.detect(list(frames.values()))
        for name, rule in box_rules.items():
            dets = {
                cid: [replace(d, bbox_xyxy=rule(d.bbox_xyxy)) for d in batch]
                for cid, batch in zip(frames, found, strict=True)
            }
            runs[name].step(f, dets, frames)
    return {name: score(gt, run.outputs, num_frames) for name, run in runs.items()}
