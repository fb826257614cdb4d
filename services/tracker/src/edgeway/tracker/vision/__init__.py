"""The tracker's computer-vision core: pure, synchronous, no I/O. Run it in a worker thread.

Interface (everything the service needs)::

    from edgeway.tracker.vision import (
        CameraSpec, Detection, HandoffRule, MultiCameraTracker, TrackOutput,
        make_detector, make_embedder, fit_homography, load_spoton_npz,
    )

    detector = make_detector("hog")                 # or "fasterrcnn" / "onnx" + weights_path,
                                                    # or "external" (edge boxes); fails at start
    embedder = make_embedder("mobilenetv2")         # or "osnet" + weights_path, "external", "none"
    cameras = [CameraSpec("c01", (1920, 1080), homography=load_spoton_npz(path),
                          handoff_rules=(HandoffRule("upper_right", "c03"),)), ...]
    mct = MultiCameraTracker(cameras, overlaps=[("c01", "c03")], embedder=embedder)

    per_frame = detector.detect([frames[c] for c in ids])          # one list per frame
    tracks = mct.update(frame_index, dict(zip(ids, per_frame)), frames)
    # tracks["c01"] -> [TrackOutput(track_id, global_id, bbox_xyxy, confidence,
    #                               map_coords, class_id=1)]; .to_wire() is SpotOn's shape
    state = mct.snapshot()      # plain data: persist it with the task
    mct.restore(state)          # after a worker crash: known people keep their global ids

Without torch, ``make_embedder`` raises ``EmbedderUnavailableError`` with the reason; pass
``embedder=None`` and tracking runs on motion (and on any embeddings edge detections carry).
Modules: ``types`` (data), ``detection``, ``embedding`` (+ ``osnet``), ``kalman`` and
``tracking`` (per camera), ``gallery`` (cross-camera Re-ID), ``homography``, ``multicam``.
"""

from edgeway.tracker.vision.detection import (
    Detector,
    DetectorUnavailableError,
    ExternalDetections,
    FasterRCNNDetector,
    HogDetector,
    OnnxDetector,
    make_detector,
)
from edgeway.tracker.vision.embedding import (
    Embedder,
    EmbedderUnavailableError,
    MobileNetV2Embedder,
    OnnxEmbedder,
    OSNetEmbedder,
    make_embedder,
)
from edgeway.tracker.vision.gallery import GallerySettings, ReIDGallery
from edgeway.tracker.vision.homography import (
    HomographyError,
    fit_homography,
    load_spoton_npz,
    project_box,
)
from edgeway.tracker.vision.multicam import MultiCameraSettings, MultiCameraTracker
from edgeway.tracker.vision.tracking import CameraTracker, TrackedBox, TrackerSettings
from edgeway.tracker.vision.types import (
    PERSON_CLASS_ID,
    CameraSpec,
    Detection,
    Frame,
    HandoffRule,
    TrackOutput,
)

__all__ = [
    "PERSON_CLASS_ID",
    "CameraSpec",
    "CameraTracker",
    "Detection",
    "Detector",
    "DetectorUnavailableError",
    "Embedder",
    "EmbedderUnavailableError",
    "ExternalDetections",
    "FasterRCNNDetector",
    "Frame",
    "GallerySettings",
    "HandoffRule",
    "HogDetector",
    "HomographyError",
    "MobileNetV2Embedder",
    "MultiCameraSettings",
    "MultiCameraTracker",
    "OSNetEmbedder",
    "OnnxDetector",
    "OnnxEmbedder",
    "ReIDGallery",
    "TrackOutput",
    "TrackedBox",
    "TrackerSettings",
    "fit_homography",
    "load_spoton_npz",
    "make_detector",
    "make_embedder",
    "project_box",
]
