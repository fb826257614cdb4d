"""MultiCameraTracker: global ids across cameras, map positions, resets, resume after a crash,
occluded looks kept out of Re-ID, one person in one place."""

from __future__ import annotations

import uuid

import numpy as np

from edgeway.tracker.vision.gallery import GallerySettings
from edgeway.tracker.vision.homography import fit_homography
from edgeway.tracker.vision.multicam import (
    MultiCameraSettings,
    MultiCameraTracker,
    exit_targets,
    quadrant_overlap,
)
from edgeway.tracker.vision.types import CameraSpec, Detection, HandoffRule

SIZE = (640, 480)


def _box(cx: float, bottom: float, h: float = 120.0) -> tuple[float, float, float, float]:
    return (cx - h / 5, bottom - h, cx + h / 5, bottom)


def _scale_h(scale: float, dx: float = 0.0) -> np.ndarray:
    """Camera whose image point (u, v) sits at map (u * scale + dx, v * scale)."""
    image = np.array([[0, 0], [640, 0], [640, 480], [0, 480], [320, 240]], float)
    return fit_homography(image, image * scale + [dx, 0.0])


def _look(i: int) -> np.ndarray:
    return np.eye(16, dtype=np.float32)[i]


def test_overlapping_cameras_agree_on_one_global_id_by_map_position() -> None:
    # c2 sees the same floor shifted: image x + 100 px in c1 is image x in c2 (0.01 m/px)
    cams = [
        CameraSpec("c1", SIZE, homography=_scale_h(0.01)),
        CameraSpec("c2", SIZE, homography=_scale_h(0.01, dx=1.0)),
    ]
    mct = MultiCameraTracker(cams, overlaps=[("c1", "c2")])
    for f in range(5):
        out = mct.update(
            f,
            {
                "c1": [Detection(_box(300 + 2 * f, 400), 0.9)],
                "c2": [Detection(_box(200 + 2 * f, 400), 0.9)],  # no embeddings at all
            },
        )
    (t1,), (t2,) = out["c1"], out["c2"]
    assert t1.global_id == t2.global_id
    assert uuid.UUID(t1.global_id)
    assert t1.map_coords is not None
    assert t2.map_coords is not None
    assert np.hypot(*np.subtract(t1.map_coords, t2.map_coords)) < 0.1


def test_people_far_apart_on_the_map_get_different_ids_and_no_homography_gives_none() -> None:
    cams = [
        CameraSpec("c1", SIZE, homography=_scale_h(0.01)),
        CameraSpec("c2", SIZE, homography=_scale_h(0.01, dx=50.0)),
        CameraSpec("c3", SIZE),
    ]
    mct = MultiCameraTracker(cams, overlaps=[("c1", "c2")])
    for f in range(3):
        out = mct.update(
            f,
            {
                "c1": [Detection(_box(300, 400), 0.9)],
                "c2": [Detection(_box(300, 400), 0.9)],
                "c3": [Detection(_box(300, 400), 0.9)],
            },
        )
    ids = {cam: tracks[0].global_id for cam, tracks in out.items()}
    assert len(set(ids.values())) == 3
    assert out["c3"][0].map_coords is None
    assert out["c1"][0].to_wire()["class_id"] == 1


def test_reset_never_lets_a_new_track_inherit_a_stale_global_id() -> None:
    """SpotOn kept its local-to-global map across tracker resets; a new person inherited ids."""
    mct = MultiCameraTracker([CameraSpec("c1", SIZE)])
    for f in range(3):
        before = mct.update(f, {"c1": [Detection(_box(100, 300), 0.9, _look(0))]})
    mct.reset_camera("c1")
    # A different-looking person where the old one was, first thing after the reset
    for f in range(3, 6):
        after = mct.update(f, {"c1": [Detection(_box(100, 300), 0.9, _look(1))]})
    assert after["c1"][0].global_id != before["c1"][0].global_id
    assert after["c1"][0].track_id != before["c1"][0].track_id


def test_same_person_after_a_reset_is_recognised_by_appearance() -> None:
    mct = MultiCameraTracker([CameraSpec("c1", SIZE)])
    for f in range(3):
        before = mct.update(f, {"c1": [Detection(_box(100, 300), 0.9, _look(0))]})
    mct.reset_camera("c1")
    for f in range(3, 6):
        after = mct.update(f, {"c1": [Detection(_box(105, 300), 0.9, _look(0))]})
    assert after["c1"][0].global_id == before["c1"][0].global_id


def test_handoff_quadrant_lets_a_person_reappear_in_the_next_camera() -> None:
    rule = HandoffRule("upper_right", "c2")
    cams = [
        CameraSpec("c1", SIZE, handoff_rules=(rule,)),
        CameraSpec("c2", SIZE),
        CameraSpec("c3", SIZE),
    ]
    mct = MultiCameraTracker(cams)  # no overlaps: only the hand-off rule connects c1 to c2
    for f in range(4):  # walks into c1's upper-right quadrant, then leaves
        out = mct.update(f, {"c1": [Detection((500, 40, 560, 200), 0.9, _look(3))]})
    gid = out["c1"][0].global_id
    for f in range(4, 8):
        mct.update(f, {})
    for f in range(8, 11):
        out = mct.update(
            f,
            {
                "c2": [Detection(_box(100, 400), 0.9, _look(3))],
                "c3": [Detection(_box(100, 400), 0.9, _look(3))],  # same look, unconnected camera
            },
        )
    assert out["c2"][0].global_id == gid
    assert out["c3"][0].global_id != gid


def test_one_track_per_camera_and_global_id() -> None:
    mct = MultiCameraTracker([CameraSpec("c1", SIZE)])
    mct.update(0, {"c1": [Detection(_box(100, 300), 0.9, _look(0))]})
    for f in range(1, 4):
        # A second box with the very same look appears while the first is still tracked
        out = mct.update(
            f,
            {
                "c1": [
                    Detection(_box(100, 300), 0.9, _look(0)),
                    Detection(_box(400, 300), 0.9, _look(0)),
                ]
            },
        )
    assert len({t.global_id for t in out["c1"]}) == 2


def test_snapshot_restore_resumes_with_the_same_global_ids() -> None:
    cams = [CameraSpec("c1", SIZE)]
    first = MultiCameraTracker(cams)
    for f in range(3):
        out = first.update(
            f,
            {
                "c1": [
                    Detection(_box(100, 300), 0.9, _look(0)),
                    Detection(_box(400, 300), 0.9, _look(1)),
                ]
            },
        )
    ids = {tuple(np.round(t.bbox_xyxy)): t.global_id for t in out["c1"]}
    state = first.snapshot()

    worker = MultiCameraTracker(cams)  # another process, after the first one crashed
    worker.restore(state)
    for f in range(3, 6):
        resumed = worker.update(
            f,
            {
                "c1": [
                    Detection(_box(400, 300), 0.9, _look(1)),
                    Detection(_box(100, 300), 0.9, _look(0)),
                ]
            },
        )
    assert {t.global_id for t in resumed["c1"]} == set(ids.values())


def test_a_restored_tracker_never_hands_out_a_track_id_twice() -> None:
    cams = [CameraSpec("c1", SIZE)]
    first = MultiCameraTracker(cams)
    for f in range(3):
        before = first.update(f, {"c1": [Detection(_box(100, 300), 0.9)]})
    worker = MultiCameraTracker(cams)  # the task resumed in another process
    worker.restore(first.snapshot())
    for f in range(3, 6):
        after = worker.update(f, {"c1": [Detection(_box(400, 300), 0.9)]})
    assert after["c1"][0].track_id > before["c1"][0].track_id


def test_embedder_is_fed_crops_of_every_camera_in_one_batch() -> None:
    calls: list[int] = []

    class Recorder:
        name = "recorder"
        dim = 3

        def embed(self, crops):  # type: ignore[no-untyped-def]
            calls.append(len(crops))
            return np.array([[c.mean(), 1.0, 0.0] for c in crops], dtype=np.float32)

    cams = [CameraSpec("c1", SIZE), CameraSpec("c2", SIZE)]
    mct = MultiCameraTracker(cams, embedder=Recorder())
    frames = {c: np.zeros((480, 640, 3), np.uint8) for c in ("c1", "c2")}
    mct.update(
        0,
        {
            "c1": [Detection(_box(100, 300), 0.9), Detection(_box(300, 300), 0.9)],
            "c2": [Detection(_box(100, 300), 0.9, _look(0)[:3])],
        },
        frames,
    )
    assert calls == [2]  # the edge-supplied embedding is kept, not recomputed


def test_quadrant_overlap_and_exit_rule() -> None:
    assert quadrant_overlap((320, 0, 640, 240), SIZE, "upper_right") == 1.0
    assert quadrant_overlap((0, 0, 640, 480), SIZE, "lower_left") == 0.25
    rules = (HandoffRule("lower_left", "c9"),)
    assert exit_targets((0, 0, 640, 480), SIZE, rules) == frozenset()  # 0.25 < 0.40
    assert exit_targets((0, 240, 400, 480), SIZE, rules) == frozenset({"c9"})


def _far_apart_lookalike(settings: MultiCameraSettings | None) -> tuple[str, str]:
    """c1 and c2 overlap; A (look 0) walks in c1 at map x ~3 m. A new person with the very
    same look appears in c2 at map x ~9.5 m while c1 still sees A."""
    cams = [
        CameraSpec("c1", SIZE, homography=_scale_h(0.01)),
        CameraSpec("c2", SIZE, homography=_scale_h(0.01, dx=5.0)),
    ]
    mct = MultiCameraTracker(cams, overlaps=[("c1", "c2")], settings=settings)
    for f in range(3):
        out = mct.update(f, {"c1": [Detection(_box(300, 400), 0.9, _look(0))]})
    for f in range(3, 6):
        out = mct.update(
            f,
            {
                "c1": [Detection(_box(300 + f, 400), 0.9, _look(0))],
                "c2": [Detection(_box(450, 400), 0.9, _look(0))],
            },
        )
    return out["c1"][0].global_id, out["c2"][0].global_id


def test_an_id_seen_elsewhere_on_the_map_is_not_given_to_a_lookalike() -> None:
    a, newcomer = _far_apart_lookalike(None)
    assert newcomer != a
    # Appearance alone (no map exclusion, no walking reach) would have merged the two people.
    free = MultiCameraSettings(map_exclusion_radius=1e9, gallery=GallerySettings(reach_slack=1e9))
    a, newcomer = _far_apart_lookalike(free)
    assert newcomer == a
    # The reach alone keeps them apart too: A was seen 6.5 m away this very frame.
    a, newcomer = _far_apart_lookalike(MultiCameraSettings(map_exclusion_radius=1e9))
    assert newcomer != a


def _occluded_start(settings: MultiCameraSettings | None) -> tuple[str, list[str]]:
    """A (look 0) is seen in c1, then walks into c2 (overlapping, no homographies) behind B
    (look 5), who leaves after a few frames. Returns A's id in c1 and A's ids in c2 by frame."""
    mct = MultiCameraTracker(
        [CameraSpec("c1", SIZE), CameraSpec("c2", SIZE)], overlaps=[("c1", "c2")], settings=settings
    )
    for f in range(5):
        out = mct.update(f, {"c1": [Detection(_box(100, 220), 0.9, _look(0))]})
    a = out["c1"][0].global_id
    behind = Detection((260.0, 180.0, 340.0, 300.0), 0.9, _look(0))
    front = Detection((270.0, 220.0, 350.0, 340.0), 0.9, _look(5))
    in_c2 = []
    for f in range(5, 20):
        out = mct.update(f, {"c2": [behind, front] if f < 9 else [behind]})
        in_c2 += [t.global_id for t in out["c2"] if t.bbox_xyxy[3] < 320]
    return a, in_c2


def test_an_occluded_start_gets_the_known_id_once_seen_clearly() -> None:
    a, in_c2 = _occluded_start(None)
    # While occluded its crop shows B too: no appearance match, a provisional id...
    assert in_c2[0] != a
    # ... until three clear looks match the gallery.
    assert in_c2[-1] == a
    # Without the second chance the provisional id stays.
    a, in_c2 = _occluded_start(MultiCameraSettings(rematch_frames=0))
    assert in_c2[-1] != a


def test_two_people_at_one_map_spot_take_their_own_ids_by_look() -> None:
    """A and B stand together in c1; c2 (overlapping) starts seeing them. Both are within the
    match radius of both; their looks decide who is who."""
    cams = [
        CameraSpec("c1", SIZE, homography=_scale_h(0.01)),
        CameraSpec("c2", SIZE, homography=_scale_h(0.01)),
    ]
    mct = MultiCameraTracker(cams, overlaps=[("c1", "c2")])
    c1 = [Detection(_box(300, 400), 0.9, _look(0)), Detection(_box(340, 410), 0.9, _look(1))]
    for f in range(3):
        out = mct.update(f, {"c1": c1})
    ids = {t.bbox_xyxy[3] // 10: t.global_id for t in out["c1"]}
    # In c2, A's box is where c1 sees B's, and B's where c1 sees A's (0.1-0.4 m off each).
    c2 = [Detection(_box(335, 410), 0.9, _look(0)), Detection(_box(305, 400), 0.9, _look(1))]
    for f in range(3, 6):
        out = mct.update(f, {"c1": c1, "c2": c2})
    by_look = {round(t.bbox_xyxy[3]): t.global_id for t in out["c2"]}
    assert by_look[410] == ids[40]  # A (look 0) in c2 has A's id from c1
    assert by_look[400] == ids[41]


def test_a_track_back_after_a_miss_takes_its_id_and_the_lost_track_goes() -> None:
    """A is tracked in c1, missed for a while, then found again too far from the lost track's
    prediction: a new track, which takes A's id by look, and A's lost track is dropped (one
    track per id in a camera)."""
    mct = MultiCameraTracker([CameraSpec("c1", SIZE)])
    for f in range(5):
        out = mct.update(f, {"c1": [Detection(_box(100, 300), 0.9, _look(0))]})
    a = out["c1"][0].global_id
    for f in range(5, 8):
        mct.update(f, {"c1": []})
    for f in range(8, 14):
        out = mct.update(f, {"c1": [Detection(_box(400, 300), 0.9, _look(0))]})
    (track,) = out["c1"]
    assert track.global_id == a
    assert track.track_id != 1  # a new track, not the old one matched by motion
    assert mct._trackers["c1"].live_track_ids == {track.track_id}  # the lost one went


def test_a_new_track_never_takes_the_id_of_someone_seen_beside_it() -> None:
    """Two lookalikes start together in one camera; when one is missed, the other (whose id
    is new) does not take its id: the camera saw them side by side."""
    mct = MultiCameraTracker([CameraSpec("c1", SIZE)])
    for f in range(2):
        out = mct.update(
            f,
            {
                "c1": [
                    Detection(_box(100, 300), 0.9, _look(0)),
                    Detection(_box(400, 300), 0.9, _look(0)),
                ]
            },
        )
    first, second = (t.global_id for t in out["c1"])
    for f in range(2, 10):
        out = mct.update(f, {"c1": [Detection(_box(400, 300), 0.9, _look(0))]})
    assert out["c1"][0].global_id == second != first
