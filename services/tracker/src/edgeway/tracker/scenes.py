"""Synthetic multi-camera scenes with known ground-plane tracks, rendered from a fixed seed.

People walk on a flat floor (map coordinates in metres) and each camera sees a part of it
through a known homography, so every rendered box has a true map position and a true identity.
`make run` renders its demo environment's videos from here, the end-to-end tests render theirs,
and `make eval` draws its detector frames with the same silhouette (`draw_person`).

The silhouettes are cartoons: HOG finds them (its kind of edges), a detector trained on photos
does not (README, SSDLite). The scene is for exercising the pipeline with a known answer, not
for measuring a detector.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt

from edgeway.tracker.vision.homography import project_points

Colour = tuple[int, int, int]
Box = tuple[float, float, float, float]

# How tall the rendered people are, in map units (metres). Taller than life so that the far
# side of a 640 x 480 view still gives HOG its 128-pixel window's worth of person.
PERSON_HEIGHT_M = 2.2


def person_box(x: float, y: float, h: float) -> Box:
    """The tight xyxy box of `draw_person`'s silhouette with its top at (x, y), `h` tall."""
    w = h * 0.28
    return (x - w / 2 - h * 0.06, y, x + w / 2 + h * 0.06, y + h)


def draw_person(
    img: npt.NDArray[np.uint8],
    x: float,
    y: float,
    h: float,
    colour: Colour,
    legs: Colour = (40, 40, 40),
) -> Box:
    """A standing silhouette (head, torso, arms, legs) with its top at (x, y), `h` pixels
    tall, wearing `colour` above and `legs` below; returns its tight xyxy box."""
    w = h * 0.28
    cv2.ellipse(
        img,
        (int(x), int(y + h * 0.07)),
        (int(h * 0.055), int(h * 0.07)),
        0,
        0,
        360,
        (60, 70, 90),
        -1,
    )
    cv2.rectangle(
        img, (int(x - w / 2), int(y + h * 0.15)), (int(x + w / 2), int(y + h * 0.52)), colour, -1
    )
    for side in (-1, 1):
        cv2.line(
            img,
            (int(x + side * w / 2), int(y + h * 0.17)),
            (int(x + side * (w / 2 + h * 0.06)), int(y + h * 0.5)),
            colour,
            max(1, int(h * 0.06)),
        )
        cv2.line(
            img,
            (int(x + side * w / 4), int(y + h * 0.52)),
            (int(x + side * w / 3), int(y + h)),
            legs,
            max(1, int(h * 0.09)),
        )
    return person_box(x, y, h)


@dataclass(frozen=True, slots=True)
class SceneCamera:
    """A camera looking at the floor: four image points and the map points under them."""

    camera_id: str
    width: int
    height: int
    image_points: tuple[tuple[float, float], ...]
    map_points: tuple[tuple[float, float], ...]

    @property
    def to_image(self) -> npt.NDArray[np.float64]:
        """The map-to-image homography (exact: four pairs)."""
        matrix = cv2.getPerspectiveTransform(
            np.asarray(self.map_points, dtype=np.float32),
            np.asarray(self.image_points, dtype=np.float32),
        )
        return np.asarray(matrix, dtype=np.float64)

    def environment_camera(self) -> dict[str, Any]:
        """This camera in `POST /api/v1/environments`'s shape, as a video file source."""
        return {
            "camera_id": self.camera_id,
            "width": self.width,
            "height": self.height,
            "source": {"kind": "file"},
            "homography": {
                "image_points": [list(p) for p in self.image_points],
                "map_points": [list(p) for p in self.map_points],
            },
        }


@dataclass(frozen=True, slots=True)
class Walker:
    """A person crossing the floor at a constant velocity, turning back at the room's walls."""

    person_id: int
    start: tuple[float, float]
    velocity: tuple[float, float]  # metres per second
    colour: Colour
    legs: Colour = (40, 40, 40)

    def position(self, t: float, room: tuple[float, float]) -> tuple[float, float] | None:
        return (
            _bounce(self.start[0] + self.velocity[0] * t, 0.0, room[0]),
            _bounce(self.start[1] + self.velocity[1] * t, 0.0, room[1]),
        )


@dataclass(frozen=True, slots=True)
class Wanderer:
    """A person following `keyframes` ``(t seconds, x, y)`` in time order, in a straight line
    between them (two keyframes at one place make a pause); absent before the first and after
    the last, so people can enter and leave the floor."""

    person_id: int
    keyframes: tuple[tuple[float, float, float], ...]
    colour: Colour
    legs: Colour = (40, 40, 40)

    def __post_init__(self) -> None:
        times = [k[0] for k in self.keyframes]
        if len(times) < 2 or any(b < a for a, b in itertools.pairwise(times)):
            raise ValueError("a Wanderer needs two or more keyframes in time order")

    def position(self, t: float, room: tuple[float, float]) -> tuple[float, float] | None:
        times = [k[0] for k in self.keyframes]
        if not times[0] <= t <= times[-1]:
            return None
        x = float(np.interp(t, times, [k[1] for k in self.keyframes]))
        y = float(np.interp(t, times, [k[2] for k in self.keyframes]))
        return (x, y)


Person = Walker | Wanderer


@dataclass(frozen=True, slots=True)
class Sighting:
    """One person in one rendered frame: who, the drawn box, where they stand on the map, and
    the share of the box that no nearer person's box covers (1.0: nobody in front)."""

    person_id: int
    bbox_xyxy: Box
    map_xy: tuple[float, float]
    visibility: float = 1.0


def _bounce(position: float, low: float, high: float) -> float:
    span = high - low
    phase = (position - low) % (2 * span)
    return low + (phase if phase <= span else 2 * span - phase)


def _visibility(box: Box, nearer: Sequence[Box]) -> float:
    """Share of `box` outside the union of the `nearer` boxes (a pixel grid over the box)."""
    x1, y1, x2, y2 = (round(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return 0.0
    covered = np.zeros((y2 - y1, x2 - x1), dtype=bool)
    for a1, b1, a2, b2 in nearer:
        cx1, cy1 = max(round(a1), x1), max(round(b1), y1)
        cx2, cy2 = min(round(a2), x2), min(round(b2), y2)
        if cx2 > cx1 and cy2 > cy1:
            covered[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1] = True
    return 1.0 - float(covered.mean())


#: (person, map position, foot x, foot y, pixel height) for everyone on the floor, far first.
_Layout = list[tuple[Person, tuple[float, float], float, float, float]]


class Scene:
    """People on a floor `room` = (width, depth) metres, seen by `cameras`, at `fps`."""

    def __init__(
        self,
        cameras: Sequence[SceneCamera],
        walkers: Sequence[Person],
        *,
        room: tuple[float, float],
        fps: float,
        seed: int,
    ) -> None:
        self.cameras = list(cameras)
        self.walkers = list(walkers)
        self.room = room
        self.fps = fps
        rng = np.random.default_rng(seed)
        self._backgrounds = {c.camera_id: _background(c, rng) for c in self.cameras}

    def positions(self, frame: int) -> dict[int, tuple[float, float]]:
        """Where everyone on the floor stands at a frame, in metres."""
        t = frame / self.fps
        out = {}
        for walker in self.walkers:
            position = walker.position(t, self.room)
            if position is not None:
                out[walker.person_id] = position
        return out

    def _layout(self, camera: SceneCamera, frame: int) -> _Layout:
        """Everyone on the floor as (person, map position, foot x, foot y, pixel height) in
        this camera, far ones (smaller foot y) first: the order they are drawn in."""
        to_image = camera.to_image
        positions = self.positions(frame)
        people = []
        for walker in self.walkers:
            position = positions.get(walker.person_id)
            if position is None:
                continue
            foot = project_points(to_image, [position])[0]
            # Pixels per metre at the foot, across the floor: the person's scale there.
            left, right = project_points(
                to_image, [(position[0] - 0.5, position[1]), (position[0] + 0.5, position[1])]
            )
            height = float(np.linalg.norm(right - left)) * PERSON_HEIGHT_M
            people.append((walker, position, float(foot[0]), float(foot[1]), height))
        return sorted(people, key=lambda p: p[3])

    def sightings(self, camera: SceneCamera, frame: int) -> list[Sighting]:
        """The people in view of one camera at a frame: `render`'s list, without drawing."""
        return _in_view(camera, self._layout(camera, frame))

    def render(
        self, camera: SceneCamera, frame: int
    ) -> tuple[npt.NDArray[np.uint8], list[Sighting]]:
        """One camera's frame (BGR) and the people in view in it, far ones drawn first."""
        image = self._backgrounds[camera.camera_id].copy()
        layout = self._layout(camera, frame)
        for walker, _, foot_x, foot_y, height in layout:
            draw_person(image, foot_x, foot_y - height, height, walker.colour, walker.legs)
        return image, _in_view(camera, layout)

    def frames(self, camera: SceneCamera, count: int) -> Iterator[npt.NDArray[np.uint8]]:
        for frame in range(count):
            yield self.render(camera, frame)[0]

    def write_video(self, camera: SceneCamera, path: Path, frames: int) -> None:
        """Encode `frames` frames of one camera as H.264 in MP4 (PyAV)."""
        write_video(path, self.frames(camera, frames), fps=self.fps)


def _in_view(camera: SceneCamera, layout: _Layout) -> list[Sighting]:
    """The people of a layout in view: the feet on the image and most of the body inside it.
    Visibility counts every nearer person drawn, in view or not."""
    boxes = [person_box(fx, fy - h, h) for _, _, fx, fy, h in layout]
    out = []
    for k, (walker, position, foot_x, foot_y, _) in enumerate(layout):
        x1, y1, x2, y2 = boxes[k]
        if 0 <= foot_x < camera.width and 0 <= foot_y <= camera.height and y1 >= 0:
            clipped = (max(0.0, x1), y1, min(float(camera.width), x2), y2)
            if clipped[2] - clipped[0] > 0.6 * (x2 - x1):
                visibility = _visibility(clipped, boxes[k + 1 :])
                out.append(Sighting(walker.person_id, clipped, position, visibility))
    return out


def _background(camera: SceneCamera, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """A textured wall and floor with the floor's outline and some clutter that is no one."""
    base = rng.uniform(120, 200, 3)
    noise = rng.normal(0, 8, (camera.height, camera.width, 3))
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    floor = np.asarray(camera.image_points, dtype=np.int32)
    cv2.fillConvexPoly(image, floor, tuple(int(c) for c in rng.uniform(90, 140, 3)))
    cv2.polylines(image, [floor], True, (70, 70, 70), 2)
    for _ in range(3):
        x, y = int(rng.integers(0, camera.width - 60)), int(rng.integers(0, camera.height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(image, (x, y), (x + int(rng.integers(20, 60)), y + 20), colour, -1)
    return image


def write_video(
    path: Path,
    frames: Iterator[npt.NDArray[np.uint8]] | Sequence[npt.NDArray[np.uint8]],
    *,
    fps: float,
) -> None:
    """BGR frames to an H.264 MP4 file (yuv420p, so any player opens it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for image in frames:
            if stream.width != image.shape[1]:
                stream.width, stream.height = image.shape[1], image.shape[0]
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --- the demo environment --------------------------------------------------------------------

DEMO_ENVIRONMENT_ID = "demo-lab"
DEMO_SEED = 20251201


def strip_camera(camera_id: str, x0: float, x1: float, width: int, height: int) -> SceneCamera:
    """A camera above the floor's near edge looking across it: the strip x0..x1 of the floor,
    y 0 (near, the image's bottom) to 6 m (far), as a trapezoid."""
    w, h = float(width), float(height)
    return SceneCamera(
        camera_id,
        width,
        height,
        image_points=(
            (0.02 * w, 0.98 * h),
            (0.98 * w, 0.98 * h),
            (0.8 * w, 0.45 * h),
            (0.2 * w, 0.45 * h),
        ),
        map_points=((x0, 0.0), (x1, 0.0), (x1, 6.0), (x0, 6.0)),
    )


def demo_scene(*, width: int = 640, height: int = 480, fps: float = 10.0) -> Scene:
    """Three cameras along a 13 m room: c01 sees 0-5 m, c02 4-9 m, c03 8-13 m (c01 and c02,
    c02 and c03 overlap by a metre), and four people walking across."""
    cameras = [
        strip_camera("c01", 0.0, 5.0, width, height),
        strip_camera("c02", 4.0, 9.0, width, height),
        strip_camera("c03", 8.0, 13.0, width, height),
    ]
    walkers = [
        Walker(1, (1.0, 1.5), (1.1, 0.0), (200, 40, 40)),
        Walker(2, (4.6, 3.5), (0.9, 0.1), (40, 160, 40)),
        Walker(3, (9.5, 2.5), (-1.0, 0.0), (40, 40, 200)),
        Walker(4, (12.0, 4.5), (-0.8, -0.1), (160, 40, 160)),
    ]
    return Scene(cameras, walkers, room=(13.0, 6.0), fps=fps, seed=DEMO_SEED)


def demo_environment(scene: Scene, *, environment_id: str = DEMO_ENVIRONMENT_ID) -> dict[str, Any]:
    """`POST /api/v1/environments`'s body for a scene: its cameras as video files, with their
    homographies, and the pairs that overlap."""
    ids = [camera.camera_id for camera in scene.cameras]
    return {
        "environment_id": environment_id,
        "name": "Edgeway demo lab (synthetic)",
        "cameras": [camera.environment_camera() for camera in scene.cameras],
        "overlaps": [[a, b] for a, b in itertools.pairwise(ids)],
    }
