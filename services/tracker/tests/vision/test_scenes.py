"""The synthetic scenes (edgeway.tracker.scenes) that `make eval` scores against: people who
come and go, and occlusion known from the drawing order."""

from __future__ import annotations

import pytest

from edgeway.tracker.scenes import Scene, Walker, Wanderer, strip_camera


def test_a_wanderer_follows_its_keyframes_and_is_absent_outside_them() -> None:
    w = Wanderer(1, ((2.0, 0.0, 1.0), (4.0, 2.0, 1.0), (6.0, 2.0, 1.0)), (200, 0, 0))
    room = (10.0, 6.0)
    assert w.position(1.9, room) is None
    assert w.position(3.0, room) == pytest.approx((1.0, 1.0))
    assert w.position(5.0, room) == pytest.approx((2.0, 1.0))  # a pause
    assert w.position(6.1, room) is None
    with pytest.raises(ValueError, match="time order"):
        Wanderer(2, ((1.0, 0.0, 0.0), (0.5, 1.0, 1.0)), (0, 0, 0))


def test_visibility_is_the_share_no_nearer_person_covers() -> None:
    camera = strip_camera("c1", 0.0, 6.0, 640, 480)
    standing = [
        Walker(1, (3.0, 3.0), (0.0, 0.0), (200, 0, 0)),  # further away ...
        Walker(2, (3.0, 2.0), (0.0, 0.0), (0, 200, 0)),  # ... right in front of 1
        Walker(3, (0.6, 1.0), (0.0, 0.0), (0, 0, 200)),  # off to the side
    ]
    scene = Scene([camera], standing, room=(6.0, 6.0), fps=10.0, seed=1)
    image, drawn = scene.render(camera, 0)
    seen = {s.person_id: s for s in drawn}
    assert set(seen) == {1, 2, 3}
    assert 0.0 < seen[1].visibility < 0.7
    assert seen[2].visibility == 1.0
    assert seen[3].visibility == 1.0
    assert scene.sightings(camera, 0) == drawn
    assert image.shape == (480, 640, 3)
    assert seen[2].map_xy == pytest.approx((3.0, 2.0))
