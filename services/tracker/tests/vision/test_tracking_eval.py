"""The evaluator of `make eval` (bench/eval/mot.py): TrackEval reproduces known answers.

TUD-Campus and TUD-Stadtmitte GT against the tracker output shipped beside them in the
motmetrics wheel; expected values are motmetrics' own published ones (MOTA, IDF1) and the
HOTA values TrackEval gave when first verified (tracking research, section 6).
"""

from __future__ import annotations

import pytest

from bench.eval.mot import evaluate, load_sequence, num_frames

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
