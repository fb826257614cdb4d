"""Per-camera tracker: identities survive crossings, misses and weak boxes; ids never repeat."""

from __future__ import annotations

import numpy as np

from edgeway.tracker.vision import kalman
from edgeway.tracker.vision.tracking import CameraTracker, TrackerSettings, occluded
from edgeway.tracker.vision.types import Detection


def _box(
    cx: float, cy: float = 200.0, w: float = 40.0, h: float = 100.0
) -> tuple[float, float, float, float]:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def test_two_people_crossing_keep_their_ids() -> None:
    """A walks right, B walks left, their boxes overlap mid-way; motion keeps them apart."""
    tracker = CameraTracker()
    seen: dict[str, set[int]] = {"A": set(), "B": set()}
    for t in range(60):
        a, b = 100 + 6 * t, 460 - 6 * t
        out = tracker.update([Detection(_box(a), 0.9), Detection(_box(b, 205), 0.9)])
        for o in out:
            cx = (o.bbox_xyxy[0] + o.bbox_xyxy[2]) / 2
            if abs(a - b) > 40:  # outside the moment of full overlap, tell who is who
                seen["A" if abs(cx - a) < abs(cx - b) else "B"].add(o.track_id)
    assert len(seen["A"]) == 1
    assert len(seen["B"]) == 1
    assert seen["A"] != seen["B"]


def test_track_survives_missed_frames_and_weak_boxes() -> None:
    tracker = CameraTracker()
    ids = set()
    for t in range(40):
        cx = 100 + 5 * t
        if 10 <= t < 15:  # missed entirely for five frames: the Kalman prediction carries it
            tracker.update([])
            continue
        score = 0.3 if 20 <= t < 25 else 0.9  # occluded: scored low, ByteTrack's second stage
        out = tracker.update([Detection(_box(cx), score)])
        assert len(out) == 1, f"lost at frame {t}"
        ids.add(out[0].track_id)
    assert ids == {1}


def test_weak_box_never_starts_a_track() -> None:
    tracker = CameraTracker()
    for _ in range(5):
        assert tracker.update([Detection(_box(100), 0.3)]) == []


def test_new_track_needs_two_hits_after_the_first_frame() -> None:
    tracker = CameraTracker()
    tracker.update([])
    assert tracker.update([Detection(_box(100), 0.9)]) == []  # unconfirmed
    assert [o.track_id for o in tracker.update([Detection(_box(102), 0.9)])] == [1]


def test_reset_never_reuses_a_track_id() -> None:
    tracker = CameraTracker()
    first = tracker.update([Detection(_box(100), 0.9), Detection(_box(300), 0.9)])
    tracker.reset()
    after = tracker.update([Detection(_box(100), 0.9)])
    assert {o.track_id for o in first} == {1, 2}
    assert [o.track_id for o in after] == [3]


def test_lost_track_is_dropped_after_the_buffer() -> None:
    tracker = CameraTracker(TrackerSettings(lost_buffer_frames=3))
    tracker.update([Detection(_box(100), 0.9)])
    for _ in range(4):
        tracker.update([])
    assert tracker.live_track_ids == set()
    assert [
        o.track_id for o in tracker.update([Detection(_box(100), 0.9)])
    ] == []  # new, unconfirmed


def test_appearance_resolves_what_iou_cannot() -> None:
    """Two people half-overlapping swap places during a one-frame gap; only their looks tell
    (BoT-SORT lets appearance decide only between boxes with IoU >= 0.5)."""
    look_a = np.eye(8, dtype=np.float32)[0]
    look_b = np.eye(8, dtype=np.float32)[1]
    tracker = CameraTracker()
    for _ in range(5):
        out = tracker.update([Detection(_box(100), 0.9, look_a), Detection(_box(110), 0.9, look_b)])
    id_a = next(o.track_id for o in out if o.detection_index == 0)
    tracker.update([])
    out = tracker.update([Detection(_box(110), 0.9, look_a), Detection(_box(100), 0.9, look_b)])
    assert next(o.track_id for o in out if o.detection_index == 0) == id_a

    # The same scene without looks: IoU alone keeps each track at its old place (the swap is lost).
    blind = CameraTracker()
    for _ in range(5):
        out = blind.update([Detection(_box(100), 0.9), Detection(_box(110), 0.9)])
    id_a = next(o.track_id for o in out if o.detection_index == 0)
    blind.update([])
    out = blind.update([Detection(_box(110), 0.9), Detection(_box(100), 0.9)])
    assert next(o.track_id for o in out if o.detection_index == 0) != id_a


def _ids_after_a_gap(settings: TrackerSettings | None, second_look: int) -> tuple[int, int]:
    """A walks 10 frames with look 0 and vanishes for 3; then a box appears where A's track
    predicts, with look ``second_look``. Returns (A's id, the newcomer's id)."""
    tracker = CameraTracker(settings)
    look = np.eye(8, dtype=np.float32)
    first = 0
    for t in range(10):
        (o,) = tracker.update([Detection(_box(100 + 5 * t), 0.9, look[0])])
        first = o.track_id
    for _ in range(3):
        tracker.update([])
    later = tracker.update([Detection(_box(165), 0.9, look[second_look])])
    later += tracker.update([Detection(_box(170), 0.9, look[second_look])])
    return first, later[-1].track_id


def test_a_lost_track_never_takes_a_box_that_looks_like_someone_else() -> None:
    same_id, same_look_id = _ids_after_a_gap(None, second_look=0)
    assert same_look_id == same_id  # the same person back: same track
    first, other = _ids_after_a_gap(None, second_look=3)
    assert other != first  # a different-looking person on the same spot: a new track
    # BoT-SORT's rule alone (appearance can only lower a cost) would have given it A's id.
    first, other = _ids_after_a_gap(TrackerSettings(appearance_veto=1.0), second_look=3)
    assert other == first


def test_occluded_means_under_a_nearer_box() -> None:
    behind = (260.0, 180.0, 340.0, 300.0)
    front = (270.0, 220.0, 350.0, 340.0)  # lower bottom edge: nearer the camera
    apart = (500.0, 100.0, 540.0, 200.0)
    assert occluded([behind, front, apart], 0.3) == [True, False, False]
    assert occluded([behind, front], 0.7) == [False, False]  # 58 % covered


def test_kalman_predicts_constant_velocity() -> None:
    mean, cov = kalman.initiate(np.array([100.0, 200.0, 40.0, 100.0]))
    means, covs = mean[None], cov[None]
    for x in (110.0, 120.0, 130.0, 140.0, 150.0):
        means, covs = kalman.predict(means, covs)
        means, covs = kalman.update(means, covs, np.array([[x, 200.0, 40.0, 100.0]]))
    means, _ = kalman.predict(means, covs)
    assert abs(means[0, 0] - 160.0) < 3.0
