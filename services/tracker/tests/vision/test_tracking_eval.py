"""The evaluator of `make eval` (bench/eval/mot.py): TrackEval reproduces known answers, and
the multi-camera scoring gives the known answers of small hand-made cases.

TUD-Campus and TUD-Stadtmitte GT against the tracker output shipped beside them in the
motmetrics wheel; expected values are motmetrics' own published ones (MOTA, IDF1) and the
HOTA values TrackEval gave when first verified.
"""

from __future__ import annotations

import pytest

from bench.eval.mot import (
    MotRow,
    concatenate_cameras,
    evaluate,
    evaluate_cameras,
    identity_links,
    load_sequence,
    num_frames,
    with_true_ids,
    without_ignored,
)

KNOWN = {
    "TUD-Campus": {
        "HOTA": 39.14,
        "DetA": 41.80,
        "AssA": 36.91,
        "MOTA": 52.65,
        "IDF1": 55.77,
        "IDSW": 7,
        "FP": 13,
        "FN": 150,
        "MT": 1,
        "ML": 1,
    },
    "TUD-Stadtmitte": {
        "HOTA": 39.78,
        "DetA": 39.23,
        "AssA": 40.88,
        "MOTA": 56.40,
        "IDF1": 64.46,
        "IDSW": 7,
        "FP": 45,
        "FN": 452,
        "MT": 5,
        "ML": 1,
    },
}


@pytest.mark.parametrize("sequence", sorted(KNOWN))
def test_trackeval_reproduces_the_known_answer(sequence: str) -> None:
    gt, shipped = load_sequence(sequence)
    got = evaluate(gt, shipped, num_frames(gt))
    for key, value in KNOWN[sequence].items():
        assert got[key] == pytest.approx(value, abs=0.01), key


def test_ground_truth_against_itself_scores_100() -> None:
    gt, _ = load_sequence("TUD-Campus")
    got = evaluate(gt, gt, num_frames(gt))
    for key in ("HOTA", "DetA", "AssA", "MOTA", "IDF1"):
        assert got[key] == pytest.approx(100.0)
    assert got["IDSW"] == 0


# --- several cameras: global IDF1 (mot.evaluate_cameras), ignore rows, hand-off errors -----


def _row(frame: int, obj_id: int, x: float = 100.0, conf: float = 1.0) -> MotRow:
    return MotRow(frame, obj_id, x, 50.0, 40.0, 100.0, conf, -1.0, -1.0)


def _walk(obj_id: int, frames: range, x: float = 100.0) -> list[MotRow]:
    return [_row(f, obj_id, x) for f in frames]


def test_one_person_with_two_global_ids_scores_half_global_idf1() -> None:
    # Person 1 walks through c1 and then c2 (4 frames each). The tracker gets every box right
    # but gives the person id 7 in c1 and id 8 in c2: perfect per camera, half right globally
    # (IDTP 4 of 8 GT boxes and of 8 tracker boxes).
    gt = {"c1": _walk(1, range(1, 5)), "c2": _walk(1, range(5, 9))}
    tracker = {"c1": _walk(7, range(1, 5)), "c2": _walk(8, range(5, 9))}
    got = evaluate_cameras(gt, tracker, 8)
    assert got["c1"]["IDF1"] == pytest.approx(100.0)
    assert got["c2"]["IDF1"] == pytest.approx(100.0)
    assert got["global"]["IDF1"] == pytest.approx(50.0)
    same = evaluate_cameras(gt, {"c1": _walk(7, range(1, 5)), "c2": _walk(7, range(5, 9))}, 8)
    assert same["global"]["IDF1"] == pytest.approx(100.0)


def test_two_people_sharing_one_global_id_score_half_even_in_the_same_frames() -> None:
    # Persons 1 (c1) and 2 (c2) are seen at the same frames in different cameras and the
    # tracker calls both 7: one id space means 7 can match only one of them.
    gt = {"c1": _walk(1, range(1, 5)), "c2": _walk(2, range(1, 5))}
    tracker = {"c1": _walk(7, range(1, 5)), "c2": _walk(7, range(1, 5))}
    assert evaluate_cameras(gt, tracker, 4)["global"]["IDF1"] == pytest.approx(50.0)


def test_global_idf1_counts_the_longer_match() -> None:
    # 6 frames in c1 as id 7, 2 in c2 as id 8: IDTP 6, IDFN 2, IDFP 2, IDF1 = 12 / 16.
    gt = {"c1": _walk(1, range(1, 7)), "c2": _walk(1, range(1, 3))}
    tracker = {"c1": _walk(7, range(1, 7)), "c2": _walk(8, range(1, 3))}
    assert evaluate_cameras(gt, tracker, 6)["global"]["IDF1"] == pytest.approx(75.0)


def test_concatenation_keeps_cameras_apart_and_refuses_frames_out_of_range() -> None:
    rows = concatenate_cameras({"a": _walk(1, range(1, 3)), "b": _walk(1, range(1, 3))}, "ab", 5)
    assert [r.frame for r in rows] == [1, 2, 6, 7]
    with pytest.raises(ValueError, match="outside"):
        concatenate_cameras({"a": [_row(6, 1)]}, "a", 5)


def test_boxes_on_ignored_people_are_neither_hits_nor_false_positives() -> None:
    # Person 2 is ignored (conf 0, e.g. barely visible); a tracker box on them is dropped, a
    # tracker box on nobody stays a false positive.
    gt = [_row(1, 1), _row(1, 2, x=300.0, conf=0.0)]
    tracker = [_row(1, 5), _row(1, 6, x=300.0), _row(1, 7, x=500.0)]
    kept_gt, kept_tr = without_ignored(gt, tracker)
    assert [r.obj_id for r in kept_gt] == [1]
    assert [r.obj_id for r in kept_tr] == [5, 7]
    got = evaluate(kept_gt, kept_tr, 1)
    assert (got["FP"], got["FN"]) == (1.0, 0.0)


def test_identity_links_count_splits_merges_and_map_error() -> None:
    gt = {
        "c1": [MotRow(f, 1, 100.0, 50.0, 40.0, 100.0, 1.0, 1.0, 2.0) for f in range(1, 13)]
        + _walk(2, range(1, 13), x=300.0),
        "c2": _walk(1, range(1, 13)),
    }
    tracker = {
        # person 1: id 7 in c1 (with a map position 0.5 m off), id 8 in c2: a split
        "c1": [MotRow(f, 7, 100.0, 50.0, 40.0, 100.0, 1.0, 1.0, 2.5) for f in range(1, 13)]
        # person 2 also gets id 8 for 12 frames: a merge, and a 3-frame blip of id 9
        + _walk(8, range(1, 13), x=300.0),
        "c2": _walk(8, range(1, 13)) + _walk(9, range(1, 4), x=600.0),
    }
    links = identity_links(gt, tracker)
    assert links.frames == {(1, 7): 12, (2, 8): 12, (1, 8): 12}
    assert links.splits(10) == 1
    assert links.merges(10) == 1
    assert links.splits(13) == 0
    assert links.map_errors == pytest.approx([0.5] * 12)


def test_true_ids_keep_the_boxes_and_fix_only_the_identities() -> None:
    # Person 1 in both cameras, tracked as 7 then 8 (a lost hand-off), plus a false box: with
    # true ids the hand-off is perfect and the false box stays false.
    gt = {"c1": _walk(1, range(1, 5)), "c2": _walk(1, range(5, 9))}
    tracker = {
        "c1": [*_walk(7, range(1, 5)), _row(2, 9, x=500.0)],
        "c2": _walk(8, range(5, 9)),
    }
    fixed = with_true_ids(gt, tracker)
    assert sorted({r.obj_id for r in fixed["c1"] + fixed["c2"]}) == [-1, 1]
    assert sorted(r.xyxy for r in fixed["c1"]) == sorted(r.xyxy for r in tracker["c1"])
    got = evaluate_cameras(gt, fixed, 8)["global"]
    # IDTP 8, IDFP 1 (the false box), IDFN 0: IDF1 = 16 / 17
    assert got["IDF1"] == pytest.approx(100 * 16 / 17)
    assert evaluate_cameras(gt, tracker, 8)["global"]["IDF1"] < got["IDF1"]
