"""Re-ID gallery: SpotOn's threshold, EMA, hand-off and overlap rules, snapshot/restore."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from edgeway.tracker.vision.gallery import GallerySettings, ReIDGallery


def _vec(*xs: float) -> np.ndarray:
    v = np.zeros(8, dtype=np.float32)
    v[: len(xs)] = xs
    return v


def test_match_respects_the_065_cosine_threshold() -> None:
    g = ReIDGallery()
    gid = g.new_identity("c1", 0, _vec(1, 0))
    assert uuid.UUID(gid).version == 4
    # cos = 0.7 passes, cos = 0.6 does not
    close = _vec(0.7, np.sqrt(1 - 0.49))
    far = _vec(0.6, 0.8)
    assert g.match("c1", 5, [close])[0] == (gid, pytest.approx(0.7, abs=1e-5))
    assert g.match("c1", 5, [far]) == [None]


def test_two_new_tracks_cannot_share_one_id_the_closer_wins() -> None:
    g = ReIDGallery()
    gid = g.new_identity("c1", 0, _vec(1, 0))
    out = g.match("c1", 3, [_vec(0.8, 0.6), _vec(0.95, np.sqrt(1 - 0.95**2))])
    assert out[0] is None
    assert out[1] is not None
    assert out[1][0] == gid
    assert g.match("c1", 3, [_vec(1, 0)], exclude=[gid]) == [None]


def test_ema_update_moves_the_stored_look_by_a_tenth() -> None:
    g = ReIDGallery()
    gid = g.new_identity("c1", 0, _vec(1, 0))
    g.observe(gid, "c1", 1, embedding=_vec(0, 1))
    stored = g.entry(gid).embedding
    assert stored is not None
    expected = np.array([0.9, 0.1]) / np.hypot(0.9, 0.1)
    assert np.allclose(stored[:2], expected, atol=1e-6)


def test_handoff_and_overlap_rules_decide_who_may_match() -> None:
    g = ReIDGallery(overlaps=[("c1", "c2")])
    a = g.new_identity("c1", 0, _vec(1, 0))
    b = g.new_identity("c3", 0, _vec(0, 1))
    # c2 overlaps c1: a matches there; c3 neither overlaps nor was handed off to c2
    assert g.match("c2", 1, [_vec(1, 0), _vec(0, 1)]) == [(a, pytest.approx(1.0)), None]
    # b leaves c3 through an exit quadrant that points at c2: now it may appear there
    g.observe(b, "c3", 2, exit_targets=frozenset({"c2"}))
    assert g.match("c2", 3, [_vec(0, 1)])[0] == (b, pytest.approx(1.0))
    # but not while c3 still sees it in the same frame
    g.observe(b, "c3", 4, exit_targets=frozenset({"c2"}))
    assert g.match("c2", 4, [_vec(0, 1)]) == [None]


def test_lost_ids_expire_after_the_buffer() -> None:
    g = ReIDGallery(settings=GallerySettings(lost_buffer_frames=200))
    gid = g.new_identity("c1", 0, _vec(1, 0))
    assert g.match("c1", 200, [_vec(1, 0)])[0] is not None
    assert g.match("c1", 201, [_vec(1, 0)]) == [None]
    g.prune(201)
    assert gid not in g


def test_snapshot_is_plain_json_and_restores_the_same_matches() -> None:
    g = ReIDGallery(overlaps=[("c1", "c2")])
    gid = g.new_identity("c1", 7, _vec(0.6, 0.8))
    g.observe(gid, "c1", 9, exit_targets=frozenset({"c2"}))
    text = json.dumps(g.snapshot())
    restored = ReIDGallery(overlaps=[("c1", "c2")])
    restored.restore(json.loads(text))
    assert restored.match("c2", 10, [_vec(0.6, 0.8)]) == g.match("c2", 10, [_vec(0.6, 0.8)])
    assert restored.entry(gid).exit_targets == frozenset({"c2"})
    with pytest.raises(ValueError, match="version"):
        restored.restore({"version": 99, "entries": []})


def test_where_both_map_positions_are_known_the_walk_decides_not_the_quadrant() -> None:
    g = ReIDGallery(settings=GallerySettings(reach_per_frame=0.25, reach_slack=2.0))
    gid = g.new_identity("c2", 0, _vec(1, 0))
    # Last seen in c2 at x = 12 m, in no exit quadrant (missed on the way out): c3 is neither
    # an overlap nor a hand-off target, but the map says whether they could have walked there.
    g.observe(gid, "c2", 10, map_xy=(12.0, 2.0))
    assert g.match("c3", 30, [_vec(1, 0)], positions=[(16.0, 2.0)])[0] is not None  # 4 <= 7
    assert g.match("c3", 12, [_vec(1, 0)], positions=[(16.0, 2.0)]) == [None]  # 4 > 2.5
    assert g.match("c3", 30, [_vec(1, 0)]) == [None]  # no position: the quadrant rule
    # Nor can an overlapping camera give the id to someone too far away for the time.
    g2 = ReIDGallery(overlaps=[("c1", "c2")])
    a = g2.new_identity("c1", 0, _vec(1, 0))
    g2.observe(a, "c1", 5, map_xy=(3.0, 1.0))
    assert g2.match("c2", 6, [_vec(1, 0)], positions=[(9.0, 1.0)]) == [None]
    assert g2.match("c2", 6, [_vec(1, 0)], positions=[(4.0, 1.0)])[0] == (a, pytest.approx(1.0))


def test_snapshot_keeps_the_last_map_position() -> None:
    g = ReIDGallery()
    gid = g.new_identity("c1", 0, _vec(1, 0))
    g.observe(gid, "c1", 3, map_xy=(1.5, 2.5))
    restored = ReIDGallery()
    restored.restore(json.loads(json.dumps(g.snapshot())))
    assert restored.entry(gid).last_map_xy == (1.5, 2.5)
    # A snapshot written before positions were kept still restores (no position).
    old = g.snapshot()
    for entry in old["entries"]:  # type: ignore[attr-defined]
        del entry["last_map_xy"]
    restored.restore(old)
    assert restored.entry(gid).last_map_xy is None
