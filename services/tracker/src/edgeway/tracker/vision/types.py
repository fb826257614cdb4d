"""Plain data that crosses the vision core's boundary: frames, detections, cameras, outputs.

Everything here is a frozen dataclass of built-in types (plus numpy arrays for pixels and
embeddings), so the service can log, serialise or hand it to a thread without surprises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

#: A BGR uint8 image, H x W x 3, as OpenCV and PyAV (``to_ndarray(format="bgr24")``) give it.
Frame = npt.NDArray[np.uint8]
#: A float32 appearance vector; the gallery and the tracker L2-normalise it themselves.
Embedding = npt.NDArray[np.float32]
BBox = tuple[float, float, float, float]
"""Pixel box ``(x1, y1, x2, y2)``: top-left and bottom-right corners, x to the right, y down."""

#: COCO's label for a person, as torchvision and SpotOn's ``PERSON_CLASS_ID=1`` use it.
PERSON_CLASS_ID = 1

Quadrant = Literal["upper_left", "upper_right", "lower_left", "lower_right"]


@dataclass(frozen=True, slots=True)
class Detection:
    """One person box in one frame, from a detector or from an edge device.

    ``embedding`` is set when the detection came with an appearance vector (an edge device
    that runs its own Re-ID model, or the embedder after cropping); ``None`` otherwise.
    """

    bbox_xyxy: BBox
    confidence: float
    embedding: Embedding | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class HandoffRule:
    """SpotOn's exit rule: a person leaving ``camera_id`` through ``quadrant`` shows up next in
    ``target_camera_id`` (docs/replaced-systems.md, SpotOn: ``CAMERA_HANDOFF_DETAILS``).

    The quadrant is one of the four image halves' intersections (W/2, H/2); a track is "in" it
    when at least ``min_overlap`` of its box area lies inside (SpotOn's 0.40).
    """

    quadrant: Quadrant
    target_camera_id: str
    min_overlap: float = 0.40


@dataclass(frozen=True, slots=True)
class CameraSpec:
    """A camera the tracker knows: its id, frame size, exit rules and optional homography.

    ``homography`` is a 3 x 3 image-to-map matrix (see ``homography.fit_homography``); a camera
    without one reports ``map_coords=None``. ``frame_size`` is ``(width, height)`` in pixels and
    is needed for the quadrant hand-off rules.
    """

    camera_id: str
    frame_size: tuple[int, int]
    homography: npt.NDArray[np.float64] | None = field(default=None, compare=False)
    handoff_rules: tuple[HandoffRule, ...] = ()


@dataclass(frozen=True, slots=True)
class TrackOutput:
    """One tracked person in one camera at one frame: SpotOn's ``tracking_update`` track item.

    ``track_id`` is per camera and never reused within a ``MultiCameraTracker``'s life, even
    across tracker resets; ``global_id`` is a UUID string shared by every camera that sees the
    same person; ``map_coords`` is ``(X, Y)`` in map units or ``None`` without a homography.
    """

    track_id: int
    global_id: str
    bbox_xyxy: BBox
    confidence: float
    map_coords: tuple[float, float] | None
    class_id: int = PERSON_CLASS_ID

    def to_wire(self) -> dict[str, object]:
        """The SpotOn wire shape (``tracks[]`` of ``tracking_update``, docs/replaced-systems.md)."""
        return {
            "track_id": self.track_id,
            "global_id": self.global_id,
            "bbox_xyxy": list(self.bbox_xyxy),
            "confidence": self.confidence,
            "class_id": self.class_id,
            "map_coords": None if self.map_coords is None else list(self.map_coords),
        }
