"""Detector plug-ins: HOG on a rendered frame, the ONNX contract on a hand-built model, and the
start-up errors the service relies on."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeway.tracker.vision.detection import (
    DetectorUnavailableError,
    ExternalDetections,
    FasterRCNNDetector,
    HogDetector,
    OnnxDetector,
    make_detector,
)
from edgeway.tracker.vision.tracking import iou_matrix
from edgeway.tracker.vision.types import Detection


def _draw_person(img: np.ndarray, x: float, y: float, h: float) -> None:
    """A dark standing silhouette, head top at (x, y), ``h`` pixels tall."""
    c = (40, 40, 40)
    w = h * 0.28
    cv2.ellipse(img, (int(x), int(y + h * 0.07)), (int(h * 0.055), int(h * 0.07)), 0, 0, 360, c, -1)
    cv2.rectangle(
        img, (int(x - w / 2), int(y + h * 0.15)), (int(x + w / 2), int(y + h * 0.52)), c, -1
    )
    for side in (-1, 1):
        shoulder = (int(x + side * w / 2), int(y + h * 0.17))
        hand = (int(x + side * (w / 2 + h * 0.06)), int(y + h * 0.5))
        cv2.line(img, shoulder, hand, c, int(h * 0.06))
        cv2.line(
            img,
            (int(x + side * w / 4), int(y + h * 0.52)),
            (int(x + side * w / 3), int(y + h)),
            c,
            int(h * 0.09),
        )


def _background(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(200 + rng.normal(0, 6, (480, 640, 3)), 0, 255).astype(np.uint8)


def test_hog_finds_each_person_in_a_batch_and_nothing_in_an_empty_frame() -> None:
    scene = _background()
    _draw_person(scene, 200, 120, 240)
    _draw_person(scene, 470, 150, 200)
    empty = _background(1)

    with_people, without = HogDetector().detect([scene, empty])

    assert without == []
    assert len(with_people) == 2
    for cx, cy in ((200, 240), (470, 250)):  # each silhouette's middle lies in exactly one box
        inside = [
            d
            for d in with_people
            if d.bbox_xyxy[0] < cx < d.bbox_xyxy[2] and d.bbox_xyxy[1] < cy < d.bbox_xyxy[3]
        ]
        assert len(inside) == 1
        assert 0.5 <= inside[0].confidence <= 1.0


def test_hog_threshold_drops_weak_boxes() -> None:
    scene = _background()
    _draw_person(scene, 200, 120, 240)
    assert HogDetector(confidence_threshold=0.9999).detect([scene]) == [[]]


def _xyxy_model(path: Path) -> None:
    """[N,3,H,W] -> [N,3,6]: fixed boxes, scores = sigmoid(20 * (mean pixel - 0.5)), classes 1,1,3.

    Bright frames score ~1, dark ones ~0, so each frame's result shows it was its own row.
    """
    boxes = np.array([[10, 20, 50, 100], [60, 20, 90, 80], [0, 0, 30, 30]], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0, axes=[1, 2, 3]),
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),  # [N]
        helper.make_node("Unsqueeze", ["score", "axes_1"], ["score_n1"]),  # [N,1]
        helper.make_node("Expand", ["score_n1", "shape_n3"], ["scores"]),  # [N,3]
        helper.make_node("Unsqueeze", ["scores", "axes_2"], ["scores3"]),  # [N,3,1]
        helper.make_node("Shape", ["score_n1"], ["n_shape"]),
        helper.make_node("Slice", ["n_shape", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "three_four"], ["box_shape"], axis=0),
        helper.make_node("Expand", ["boxes", "box_shape"], ["boxes_n"]),
        helper.make_node("Concat", ["n", "three_one"], ["cls_shape"], axis=0),
        helper.make_node("Expand", ["classes", "cls_shape"], ["classes_n"]),
        helper.make_node("Concat", ["boxes_n", "scores3", "classes_n"], ["detections"], axis=2),
    ]
    inits = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0]),
        helper.make_tensor("axes_1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes_2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("shape_n3", TensorProto.INT64, [2], [1, 3]),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("three_four", TensorProto.INT64, [2], [3, 4]),
        helper.make_tensor("three_one", TensorProto.INT64, [2], [3, 1]),
        helper.make_tensor("boxes", TensorProto.FLOAT, [1, 3, 4], boxes.ravel().tolist()),
        helper.make_tensor("classes", TensorProto.FLOAT, [1, 3, 1], [1, 1, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "xyxy_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 100, 100])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 3, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnx_xyxy_layout_batches_frames_filters_class_and_rescales(tmp_path: Path) -> None:
    path = tmp_path / "det.onnx"
    _xyxy_model(path)
    detector = OnnxDetector(model_path=path, confidence_threshold=0.5, device="cpu")
    bright = np.full((200, 400, 3), 250, np.uint8)  # 2x wide, 4x... scaled from 100 x 100
    dark = np.full((100, 100, 3), 5, np.uint8)

    bright_out, dark_out, bright_again = detector.detect([bright, dark, bright])

    assert detector.layout == "xyxy"
    assert dark_out == []  # dark frame scores ~0
    assert bright_again == bright_out
    # class 3 dropped; boxes scaled by (400/100, 200/100) and clipped to the frame
    assert [d.bbox_xyxy for d in bright_out] == [
        (40.0, 40.0, 200.0, 200.0),
        (240.0, 40.0, 360.0, 160.0),
    ]
    assert all(d.confidence > 0.99 for d in bright_out)
    assert detector.detect([]) == []


def test_onnx_dynamic_input_needs_a_size(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])],
        "dyn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DetectorUnavailableError, match="input_size"):
        OnnxDetector(model_path=path)


def test_missing_files_fail_at_construction_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(DetectorUnavailableError, match=r"nope\.pt"):
        FasterRCNNDetector(weights_path=missing)
    with pytest.raises(DetectorUnavailableError, match=r"nope\.pt"):
        make_detector("onnx", weights_path=missing)
    with pytest.raises(DetectorUnavailableError, match="weights"):
        make_detector("fasterrcnn")


def test_fasterrcnn_runs_with_random_weights_or_says_why_it_cannot(tmp_path: Path) -> None:
    """Where torchvision works (the CUDA stack, a GPU machine): shapes and batching with a
    random-initialised model. On the CPU torch from PyPI its compiled ops do not load: the
    detector refuses at construction, saying so."""
    torch = pytest.importorskip("torch")
    try:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
    except Exception:  # noqa: BLE001 - ImportError or RuntimeError, both mean "not usable"
        weights = tmp_path / "w.pt"
        weights.write_bytes(b"x")
        with pytest.raises(DetectorUnavailableError, match="torchvision"):
            FasterRCNNDetector(weights_path=weights)
        return
    model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "frcnn.pt"
    torch.save(model.state_dict(), path)
    detector = FasterRCNNDetector(weights_path=path, confidence_threshold=0.0, device="cpu")
    frames = [np.zeros((120, 160, 3), np.uint8), np.full((90, 100, 3), 128, np.uint8)]
    out = detector.detect(frames)
    assert len(out) == 2
    for frame, dets in zip(frames, out, strict=True):
        for d in dets:
            assert 0 <= d.bbox_xyxy[0] < d.bbox_xyxy[2] <= frame.shape[1]


def test_external_detections_apply_the_same_threshold() -> None:
    external = make_detector("external", confidence_threshold=0.5)
    assert isinstance(external, ExternalDetections)
    kept = external.filter([Detection((0, 0, 1, 1), 0.4), Detection((0, 0, 2, 2), 0.6)])
    assert [d.confidence for d in kept] == [0.6]
    with pytest.raises(TypeError):
        external.detect([np.zeros((4, 4, 3), np.uint8)])


def test_hog_tight_boxes_fit_the_figure_better_than_its_window() -> None:
    scene = _background()
    _draw_person(scene, 320, 120, 240)  # the figure spans x 266..374, y 120..360
    drawn = np.array([[266.0, 120.0, 374.0, 360.0]])
    (window,) = HogDetector().detect([scene])[0]
    (tight,) = HogDetector(tight_boxes=True).detect([scene])[0]
    assert tight.confidence == window.confidence
    x1, y1, x2, y2 = window.bbox_xyxy
    assert tight.bbox_xyxy == pytest.approx(
        (x1 + 0.1 * (x2 - x1), y1 + 0.07 * (y2 - y1), x2 - 0.1 * (x2 - x1), y1 + 0.87 * (y2 - y1))
    )
    iou_window = iou_matrix(drawn, np.array([window.bbox_xyxy]))[0, 0]
    iou_tight = iou_matrix(drawn, np.array([tight.bbox_xyxy]))[0, 0]
    assert iou_tight > iou_window
    assert abs(tight.bbox_xyxy[3] - 360) < abs(window.bbox_xyxy[3] - 360)  # feet closer
