"""Person detectors: one interface, four plug-ins (``hog``, ``fasterrcnn``, ``onnx``, ``external``).

A detector takes the frames of every camera at once (``detect(frames)``) and returns one list of
person ``Detection`` per frame, in order. Calls are plain blocking functions: the service runs
them in a worker thread so the event loop never waits on inference. Construction does all the
checking (weights file present, runtime importable) so a bad configuration fails at start-up
with a clear message, never at the first frame.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from edgeway.tracker.vision.types import PERSON_CLASS_ID, BBox, Detection, Frame


class DetectorUnavailableError(RuntimeError):
    """A configured detector cannot run here: its weights file or its runtime is missing."""


class Detector(Protocol):
    """What the service calls: ``detect`` on a batch of frames, one result list per frame."""

    name: str

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]: ...


def resolve_device(device: str = "auto") -> str:
    """``auto`` means CUDA when torch sees a GPU, else CPU; anything else is passed through."""
    if device != "auto":
        return device
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return "cpu"
    return "cuda" if bool(torch.cuda.is_available()) else "cpu"


def _clip_box(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int
) -> tuple[float, float, float, float] | None:
    """Clip to the image (SpotOn clipped too) and drop boxes that collapse to nothing."""
    x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
    y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return (x1, y1, x2, y2)


def tight_hog_box(bbox: BBox) -> BBox:
    """HOG's window shrunk to the person, as OpenCV's ``samples/cpp/peopledetect.cpp`` does:
    x + 10 % and 80 % of the width, y + 7 % and 80 % of the height."""
    x1, y1, x2, y2 = bbox
    w, h = x2 - x1, y2 - y1
    return (x1 + 0.1 * w, y1 + 0.07 * h, x1 + 0.9 * w, y1 + 0.87 * h)


class HogDetector:
    """OpenCV 4's HOG + linear SVM people detector (Dalal-Triggs), compiled into the wheel.

    It needs no weights, so it is the default; it is a weak 2005-era detector (upright people of
    at least 64 x 128 pixels). ``confidence`` is the logistic of the SVM margin, so the default
    threshold 0.5 keeps every box with a positive margin, which is what ``detectMultiScale``
    itself reports; it is a ranking score, not a calibrated probability.

    Its boxes are its 64 x 128 window, margins included, so they are larger than the person
    and their bottom lies below the feet. ``tight_boxes`` shrinks them (``tight_hog_box``): on
    ``make eval``'s rendered people the IoU with the drawn figure goes from 0.35 to 0.54 on
    average (none to 85 % at IoU >= 0.5) and the foot error from 29 % to 9 % of the person's
    height. Off by default: the service reports the window as it is.
    """

    name = "hog"

    def __init__(
        self,
        *,
        confidence_threshold: float = 0.5,
        win_stride: int = 8,
        scale: float = 1.05,
        max_width: int | None = None,
        tight_boxes: bool = False,
    ) -> None:
        if not hasattr(cv2, "HOGDescriptor"):
            # opencv-python 5.x removed HOG: the pin is opencv-python-headless<5.
            raise DetectorUnavailableError(
                f"OpenCV {cv2.__version__} has no HOGDescriptor; install opencv-python-headless<5"
            )
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector()))
        self.confidence_threshold = confidence_threshold
        # winStride 8 and scale 1.05: 49.7 ms a 640x480 frame when timed on a 2-core machine.
        self._win_stride = (win_stride, win_stride)
        self._scale = scale
        self._max_width = max_width
        self._tight = tight_boxes

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [self._detect_one(frame) for frame in frames]

    def _detect_one(self, frame: Frame) -> list[Detection]:
        height, width = frame.shape[:2]
        factor = 1.0
        image: npt.NDArray[Any] = frame
        if self._max_width is not None and width > self._max_width:
            factor = width / self._max_width
            image = cv2.resize(frame, (self._max_width, round(height / factor)))
        rects, weights = self._hog.detectMultiScale(
            image, winStride=self._win_stride, padding=(8, 8), scale=self._scale
        )
        out: list[Detection] = []
        for (x, y, w, h), weight in zip(rects, np.ravel(weights), strict=True):
            confidence = 1.0 / (1.0 + math.exp(-float(weight)))
            if confidence < self.confidence_threshold:
                continue
            x1, y1, x2, y2 = float(x), float(y), float(x + w), float(y + h)
            if self._tight:
                x1, y1, x2, y2 = tight_hog_box((x1, y1, x2, y2))
            box = _clip_box(x1 * factor, y1 * factor, x2 * factor, y2 * factor, width, height)
            if box is not None:
                out.append(Detection(box, confidence))
        return out


class FasterRCNNDetector:
    """torchvision ``fasterrcnn_resnet50_fpn_v2`` (COCO, SpotOn's detector) from a weights file.

    The file is a state dict saved with ``torch.save(model.state_dict(), path)``; nothing is
    ever downloaded (``weights=None``). On a CPU-only torch from PyPI, torchvision's compiled ops
    do not load: construction says so instead of failing on the first frame.
    """

    name = "fasterrcnn"

    def __init__(
        self,
        *,
        weights_path: Path,
        confidence_threshold: float = 0.5,
        device: str = "auto",
    ) -> None:
        if not weights_path.is_file():
            raise DetectorUnavailableError(f"Faster R-CNN weights file not found: {weights_path}")
        try:
            torch = importlib.import_module("torch")
            detection_models = importlib.import_module("torchvision.models.detection")
        except (ImportError, RuntimeError) as exc:
            # RuntimeError: "operator torchvision::nms does not exist" with a +cpu torch.
            raise DetectorUnavailableError(
                "the fasterrcnn detector needs torch and a torchvision whose compiled ops match it "
                f"({exc}); use the hog or onnx detector on this machine"
            ) from exc
        self._torch = torch
        self.device = resolve_device(device)
        model = detection_models.fasterrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=91
        )
        state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self._model = model.eval().to(self.device)
        # SpotOn's DETECTION_CONFIDENCE_THRESHOLD = 0.5 (docs/replaced-systems.md, SpotOn).
        self.confidence_threshold = confidence_threshold

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        if not frames:
            return []
        torch = self._torch
        tensors = [
            torch.from_numpy(np.ascontiguousarray(f[:, :, ::-1]))
            .to(self.device)
            .permute(2, 0, 1)
            .float()
            .div_(255.0)
            for f in frames
        ]
        with torch.inference_mode():
            outputs = self._model(tensors)
        results: list[list[Detection]] = []
        for frame, output in zip(frames, outputs, strict=True):
            height, width = frame.shape[:2]
            boxes = output["boxes"].cpu().numpy()
            labels = output["labels"].cpu().numpy()
            scores = output["scores"].cpu().numpy()
            keep = (labels == PERSON_CLASS_ID) & (scores >= self.confidence_threshold)
            results.append(_to_detections(boxes[keep], scores[keep], width, height))
        return results


OnnxLayout = Literal["xyxy", "tf_od_api"]


@dataclass(frozen=True, slots=True)
class _OnnxIO:
    layout: OnnxLayout
    input_name: str
    input_size: tuple[int, int]  # (width, height) the model is fed
    output_names: tuple[str, ...]


class OnnxDetector:
    """A person detector as an ONNX file, run by onnxruntime (CPU, or the CUDA provider).

    Two layouts are understood; the detector picks one from the model's output names:

    ``tf_od_api`` (TensorFlow Object Detection API exports, e.g. the SSDLite graph converted with
    tf2onnx): input ``uint8 [N, H, W, 3]`` RGB; outputs ``detection_boxes [N, K, 4]`` as
    normalised ``(ymin, xmin, ymax, xmax)``, ``detection_scores [N, K]``,
    ``detection_classes [N, K]`` (COCO ids, person = 1) and ``num_detections [N]``.

    ``xyxy`` (anything else; one output): input ``float32 [N, 3, H, W]`` RGB scaled to 0..1;
    output ``[N, K, 6]`` rows ``(x1, y1, x2, y2, score, class_id)`` in the input's pixels,
    person = 1, padding rows with score 0. A torchvision detector wrapped to emit that tensor
    exports to this layout.

    ``H`` and ``W`` come from the model's input shape; a dynamic size needs ``input_size``.
    Frames are resized to it, and boxes are scaled back to each frame's own size.
    """

    name = "onnx"

    def __init__(
        self,
        *,
        model_path: Path,
        confidence_threshold: float = 0.5,
        input_size: tuple[int, int] | None = None,
        device: str = "auto",
    ) -> None:
        if not model_path.is_file():
            raise DetectorUnavailableError(f"ONNX detector file not found: {model_path}")
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise DetectorUnavailableError("the onnx detector needs onnxruntime installed") from exc
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and (
            "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self._session: Any = ort.InferenceSession(
            str(model_path), sess_options=options, providers=providers
        )
        self.providers: list[str] = list(self._session.get_providers())
        self._io = _inspect_onnx(self._session, input_size)
        self.confidence_threshold = confidence_threshold

    @property
    def layout(self) -> OnnxLayout:
        return self._io.layout

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        if not frames:
            return []
        io = self._io
        resized = np.stack([cv2.resize(f, io.input_size)[:, :, ::-1] for f in frames])
        feed: npt.NDArray[Any]
        if io.layout == "tf_od_api":
            feed = np.ascontiguousarray(resized, dtype=np.uint8)
        else:
            feed = np.ascontiguousarray(resized.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        outputs = dict(
            zip(io.output_names, self._session.run(None, {io.input_name: feed}), strict=True)
        )
        results: list[list[Detection]] = []
        in_w, in_h = io.input_size
        for i, frame in enumerate(frames):
            height, width = frame.shape[:2]
            if io.layout == "tf_od_api":
                n = int(np.ravel(outputs[_output_named(io, "num_detections")][i])[0])
                yx = np.asarray(outputs[_output_named(io, "detection_boxes")][i][:n])
                scores = np.asarray(outputs[_output_named(io, "detection_scores")][i][:n])
                classes = np.asarray(outputs[_output_named(io, "detection_classes")][i][:n])
                boxes = yx[:, [1, 0, 3, 2]] * np.array([width, height, width, height])
            else:
                rows = np.asarray(outputs[io.output_names[0]][i])
                boxes = rows[:, :4] * np.array(
                    [width / in_w, height / in_h, width / in_w, height / in_h]
                )
                scores, classes = rows[:, 4], rows[:, 5]
            keep = (np.rint(classes) == PERSON_CLASS_ID) & (scores >= self.confidence_threshold)
            results.append(_to_detections(boxes[keep], scores[keep], width, height))
        return results


def _output_named(io: _OnnxIO, suffix: str) -> str:
    return next(n for n in io.output_names if n.split(":")[0].endswith(suffix))


def _inspect_onnx(session: Any, input_size: tuple[int, int] | None) -> _OnnxIO:
    """Work out the layout and the input size from the model, or refuse it clearly."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise DetectorUnavailableError(f"ONNX detector must have one input, has {len(inputs)}")
    model_input = inputs[0]
    output_names = tuple(o.name for o in session.get_outputs())
    stems = {n.split(":")[0].rsplit("/", 1)[-1] for n in output_names}
    tf_names = {"detection_boxes", "detection_scores", "detection_classes", "num_detections"}
    layout: OnnxLayout = "tf_od_api" if tf_names <= stems else "xyxy"
    shape = list(model_input.shape)
    if len(shape) != 4:
        raise DetectorUnavailableError(f"ONNX detector input must be 4-d, is {shape}")
    h_dim, w_dim = (shape[1], shape[2]) if layout == "tf_od_api" else (shape[2], shape[3])
    if input_size is None:
        if not (isinstance(h_dim, int) and isinstance(w_dim, int)):
            raise DetectorUnavailableError(
                f"ONNX detector input {model_input.name} has a dynamic size {shape}: "
                "configure input_size=(width, height)"
            )
        input_size = (w_dim, h_dim)
    if layout == "xyxy" and len(output_names) != 1:
        raise DetectorUnavailableError(
            "ONNX detector outputs are neither the TF Object Detection API set "
            f"({sorted(tf_names)}) nor one [N, K, 6] tensor: {list(output_names)}"
        )
    return _OnnxIO(layout, model_input.name, input_size, output_names)


def _to_detections(
    boxes: npt.NDArray[Any], scores: npt.NDArray[Any], width: int, height: int
) -> list[Detection]:
    out: list[Detection] = []
    for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist(), strict=True):
        box = _clip_box(x1, y1, x2, y2, width, height)
        if box is not None:
            out.append(Detection(box, float(score)))
    return out


class ExternalDetections:
    """No detector runs: the edge device already sent its person boxes (and maybe embeddings).

    ``detect`` is not meant to be called for this kind; the service passes the device's
    detections straight to ``MultiCameraTracker.update``. ``filter`` applies the same
    confidence threshold the other plug-ins apply, so every source is held to one rule.
    """

    name = "external"

    def __init__(self, *, confidence_threshold: float = 0.5) -> None:
        self.confidence_threshold = confidence_threshold

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        raise TypeError("the external detector runs nothing: pass the device's detections")

    def filter(self, detections: Sequence[Detection]) -> list[Detection]:
        return [d for d in detections if d.confidence >= self.confidence_threshold]


DetectorKind = Literal["hog", "fasterrcnn", "onnx", "external"]


def make_detector(
    kind: DetectorKind,
    *,
    confidence_threshold: float = 0.5,
    weights_path: Path | None = None,
    device: str = "auto",
) -> HogDetector | FasterRCNNDetector | OnnxDetector | ExternalDetections:
    """Build the configured plug-in; every problem surfaces here, at the service's start."""
    if kind == "hog":
        return HogDetector(confidence_threshold=confidence_threshold)
    if kind == "external":
        return ExternalDetections(confidence_threshold=confidence_threshold)
    if weights_path is None:
        raise DetectorUnavailableError(f"the {kind} detector needs a weights/model file path")
    if kind == "fasterrcnn":
        return FasterRCNNDetector(
            weights_path=weights_path, confidence_threshold=confidence_threshold, device=device
        )
    if kind == "onnx":
        return OnnxDetector(
            model_path=weights_path, confidence_threshold=confidence_threshold, device=device
        )
    raise ValueError(f"unknown detector kind {kind!r}")
