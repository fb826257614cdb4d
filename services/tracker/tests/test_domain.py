"""The tracker's rules, without I/O: environments, start conditions, messages, live steps."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from edgeway.common.schemas.tracking import EdgeFrame, EnvironmentSpec, TaskMode
from edgeway.tracker import domain
from edgeway.tracker.domain import Refusal, VideoFacts
from edgeway.tracker.vision import TrackOutput

SQUARE = [[0, 0], [640, 0], [640, 480], [0, 480]]
FLOOR = [[0, 0], [8, 0], [8, 6], [0, 6]]


def environment(**camera: Any) -> EnvironmentSpec:
    body = {
        "environment_id": "lab",
        "name": "Lab",
        "cameras": [
            {
                "camera_id": "c01",
                "width": 640,
                "height": 480,
                "source": {"kind": "file"},
                **camera,
            }
        ],
    }
    return EnvironmentSpec.model_validate(body)


def npz(**arrays: Any) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode()


def test_spoton_npz_homographies_are_stored_as_points() -> None:
    spec = environment(
        homography={"npz_base64": npz(image_points=np.array(SQUARE), map_points=np.array(FLOOR))}
    )
    stored = domain.normalise_environment(spec)
    assert isinstance(stored, EnvironmentSpec)
    assert stored.model_dump(mode="json")["cameras"][0]["homography"] == {
        "image_points": SQUARE,
        "map_points": FLOOR,
    }
    (camera,) = domain.camera_specs(stored)
    assert camera.homography is not None


@pytest.mark.parametrize(
    ("homography", "why"),
    [
        ({"npz_base64": "not base64!"}, "not base64"),
        ({"npz_base64": base64.b64encode(b"\x80\x04pickle").decode()}, "not a readable .npz"),
        ({"npz_base64": npz(image_points=np.array(SQUARE))}, "lacks ['map_points']"),
        (  # collinear: no homography
            {"image_points": [[0, 0], [1, 1], [2, 2], [3, 3]], "map_points": FLOOR},
            "degenerate",
        ),
    ],
)
def test_a_homography_that_cannot_be_used_is_refused_with_why(
    homography: dict[str, Any], why: str
) -> None:
    refused = domain.normalise_environment(environment(homography=homography))
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.code) == (400, "invalid_homography")
    assert why in refused.reason


def test_a_pickled_npz_is_never_loaded() -> None:
    objects = np.array([{"evil": 1}], dtype=object)
    spec = environment(homography={"npz_base64": npz(image_points=objects, map_points=objects)})
    refused = domain.normalise_environment(spec)
    assert isinstance(refused, Refusal)
    assert refused.code == "invalid_homography"


def ready(frames: int = 100) -> VideoFacts:
    return VideoFacts("v1", "ready", None, "videos/lab/c01/v1.mp4", 1000, frames, 25.0)


def test_a_batch_task_needs_a_ready_video_for_every_camera() -> None:
    spec = environment()
    assert domain.start_refusals(spec, {"c01": ready()}, TaskMode.BATCH) == []
    (missing,) = domain.start_refusals(spec, {}, TaskMode.BATCH)
    assert "PUT /api/v1/environments/lab/cameras/c01/video" in missing
    refused = VideoFacts("v2", "rejected", "the file has no video stream", None, 5, 0, 0.0)
    (why,) = domain.start_refusals(spec, {"c01": refused}, TaskMode.BATCH)
    assert "no video stream" in why
    (live,) = domain.start_refusals(spec, {"c01": ready()}, TaskMode.LIVE)
    assert "batch task reads it" in live


def test_a_live_task_tracks_external_cameras() -> None:
    spec = environment(source={"kind": "external"})
    assert domain.start_refusals(spec, {}, TaskMode.LIVE) == []
    (batch,) = domain.start_refusals(spec, {}, TaskMode.BATCH)
    assert "live task" in batch


def test_frame_skip_is_spotons() -> None:
    assert domain.frame_skip(25.0, 23.0) == 1
    assert domain.frame_skip(60.0, 23.0) == 3
    assert domain.frame_skip(0.0, 23.0) == 1  # unknown rate: SpotOn's fallback 25
    assert domain.steps_of(100, 3) == 34


def test_tracking_update_has_spotons_shape() -> None:
    track = TrackOutput(7, "9b2f0a56-0000-4000-8000-000000000001", (1, 2, 3, 4), 0.9, (1.5, 2.5))
    message = domain.tracking_update(
        global_frame_index=12,
        scene_id="lab",
        processed_at=datetime(2025, 12, 1, tzinfo=UTC),
        tracks={"c01": [track], "c02": []},
    )
    assert message == {
        "type": "tracking_update",
        "payload": {
            "global_frame_index": 12,
            "scene_id": "lab",
            "timestamp_processed_utc": "2025-12-01T00:00:00+00:00",
            "cameras": {
                "c01": {
                    "image_source": "000012.jpg",
                    "tracks": [
                        {
                            "track_id": 7,
                            "global_id": "9b2f0a56-0000-4000-8000-000000000001",
                            "bbox_xyxy": [1, 2, 3, 4],
                            "confidence": 0.9,
                            "class_id": 1,
                            "map_coords": [1.5, 2.5],
                        }
                    ],
                },
                "c02": {"image_source": "000012.jpg", "tracks": []},
            },
        },
    }


def test_status_updates_come_at_most_twice_a_second_but_at_once_on_a_change() -> None:
    throttle = domain.StatusThrottle(0.5)
    assert throttle.due("PROCESSING", 10.0)
    assert not throttle.due("PROCESSING", 10.2)
    assert throttle.due("COMPLETED", 10.3)  # a change of status: at once
    assert not throttle.due("COMPLETED", 10.5)
    assert throttle.due("COMPLETED", 10.8)


class Row:
    def __init__(self, frame: int, track: int, box: tuple[float, ...], xy: Any) -> None:
        self.id, self.camera_id, self.frame_index, self.track_id = 1, "c01", frame, track
        self.captured_at = datetime(2025, 12, 1, tzinfo=UTC)
        self.global_id = "g"
        self.x1, self.y1, self.x2, self.y2 = box
        self.confidence = 0.87654
        self.map_x, self.map_y = xy if xy else (None, None)


def test_mot_text_counts_frames_from_one_and_gives_width_and_height() -> None:
    text = domain.mot_text(
        [Row(0, 3, (10, 20, 40, 100), (1.5, 2.0)), Row(1, 3, (12, 20, 42, 100), None)]
    )
    assert text == (
        "1,3,10.00,20.00,30.00,80.00,0.8765,1.5000,2.0000,-1\n"
        "2,3,12.00,20.00,30.00,80.00,0.8765,-1.0000,-1.0000,-1\n"
    )


def frame(camera: str, index: int) -> EdgeFrame:
    return EdgeFrame(
        environment_id="lab", camera_id=camera, frame_index=index, timestamp=1.0, detections=[]
    )


def test_a_live_step_waits_for_every_camera_or_its_deadline() -> None:
    assembler = domain.FrameAssembler(["c01", "c02"], wait=0.25)
    assembler.add(frame("c01", 0), now=0.0)
    assert assembler.ready(0.1) == []
    assembler.add(frame("c02", 0), now=0.1)
    (step,) = assembler.ready(0.1)
    assert (step.frame_index, sorted(step.frames)) == (0, ["c01", "c02"])

    assembler.add(frame("c01", 1), now=1.0)  # c02 is silent
    assert assembler.next_deadline() == pytest.approx(1.25)
    assert assembler.ready(1.2) == []
    (late_step,) = assembler.ready(1.25)
    assert sorted(late_step.frames) == ["c01"]


def test_live_steps_never_go_back_and_late_frames_are_counted() -> None:
    assembler = domain.FrameAssembler(["c01", "c02"], wait=10.0)
    assembler.add(frame("c01", 5), now=0.0)
    assembler.add(frame("c01", 6), now=0.0)
    assembler.add(frame("c02", 6), now=0.0)
    steps = assembler.ready(0.0)  # 6 is complete: 5 goes first, with what it has
    assert [s.frame_index for s in steps] == [5, 6]
    assert not assembler.add(frame("c02", 5), now=0.1)
    assert assembler.late == 1


def test_a_resumed_live_task_drops_frames_it_already_tracked() -> None:
    assembler = domain.FrameAssembler(["c01"], wait=0.1, last_index=41)
    assert not assembler.add(frame("c01", 41), now=0.0)
    assert assembler.add(frame("c01", 42), now=0.0)


def relay_environment() -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {
            "environment_id": "lab",
            "name": "Lab",
            "cameras": [
                {
                    "camera_id": "c01",
                    "width": 640,
                    "height": 480,
                    "source": {"kind": "relay", "device": "phone-1"},
                },
                {"camera_id": "c02", "width": 640, "height": 480, "source": {"kind": "external"}},
            ],
        }
    )


def test_a_live_task_tracks_relay_and_external_cameras_together() -> None:
    spec = relay_environment()
    assert domain.start_refusals(spec, {}, TaskMode.LIVE) == []
    assert domain.start_refusals(spec, {}, None) == []  # live is what its sources call for
    batch = domain.start_refusals(spec, {}, TaskMode.BATCH)
    assert batch[0] == "camera c01 is relay: its frames are tracked by a live task"
    with_file = spec.model_copy(update={"cameras": [*spec.cameras, environment().cameras[0]]})
    (mixed,) = domain.start_refusals(with_file, {}, TaskMode.LIVE)
    assert "mix file and live" in mixed


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ({"kind": "relay"}, "device"),
        ({"kind": "relay", "device": "a.b"}, "device"),
        ({"kind": "relay", "device": "p", "url": "x"}, "url"),
    ],
)
def test_a_relay_source_names_one_device(source: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        environment(source=source)


def test_one_device_cannot_be_two_cameras() -> None:
    body = relay_environment().model_dump(mode="json")
    body["cameras"][1]["source"] = {"kind": "relay", "device": "phone-1"}
    with pytest.raises(ValueError, match="one camera each"):
        EnvironmentSpec.model_validate(body)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_relayed_frames_are_read_from_the_relays_headers() -> None:
    ntp = str(1_700_000_000 * 10**9)
    headers = {"x-device": "phone-1", "width": "640", "height": "480", "ntp_time": ntp}
    frame = domain.relay_frame(headers, b"jpeg", NOW)
    assert frame == domain.RelayFrame(
        "phone-1", 640, 480, datetime.fromtimestamp(1_700_000_000, UTC), b"jpeg"
    )
    # The seed's one phone sent no device; bytes headers are text too; no time: now.
    seed = domain.relay_frame({"width": b"640", "height": b"480"}, b"jpeg", NOW)
    assert seed == domain.RelayFrame("phone", 640, 480, NOW, b"jpeg")
    for bad in (
        {"x-device": "a.b", "width": "640", "height": "480"},
        {"x-device": "p", "width": "wide", "height": "480"},
        {"x-device": "p", "height": "480"},
    ):
        assert domain.relay_frame(bad, b"jpeg", NOW) is None
    assert domain.relay_frame({"width": "640", "height": "480"}, b"", NOW) is None


def test_the_newest_relayed_frame_of_a_camera_wins_and_other_devices_are_ignored() -> None:
    latest = domain.LatestFrames(relay_environment())

    def frame(device: str, n: int, size: tuple[int, int] = (640, 480)) -> domain.RelayFrame:
        return domain.RelayFrame(device, *size, NOW, bytes([n]))

    assert latest.put(frame("phone-1", 1)) == "waiting"
    assert latest.put(frame("phone-1", 2)) == "dropped"  # the detector was busy: 1 goes
    assert latest.put(frame("phone-2", 3)) == "ignored"  # not a device of this environment
    # Another size is kept (scaled once decoded): the newest still wins.
    assert latest.put(frame("phone-1", 4, (320, 240))) == "dropped"
    assert len(latest) == 1
    assert latest.take() == {"c01": frame("phone-1", 4, (320, 240))}
    assert latest.take() == {}


def test_media_available_names_each_video_at_the_gateways_media_route() -> None:
    spec = environment()
    message = domain.media_available("t-1", spec, {"c01": ready(frames=120)})
    assert message == {
        "type": "media_available",
        "payload": {
            "sub_video_batch_index": 0,
            "media_urls": [
                {
                    "camera_id": "c01",
                    "sub_video_filename": "v1.mp4",
                    "url": "/api/v1/media/tasks/t-1/environments/lab/cameras/c01/sub_videos/v1.mp4",
                    "start_global_frame_index": 0,
                    "num_frames_in_sub_video": 120,
                }
            ],
        },
    }
    videos = {"c01": ready()}
    assert domain.media_key(videos, camera_id="c01", filename="v1.mp4") == "videos/lab/c01/v1.mp4"
    assert domain.media_key(videos, camera_id="c01", filename="v2.mp4") is None
    assert domain.media_key(videos, camera_id="c02", filename="v1.mp4") is None
    assert domain.content_type("v1.mp4") == "video/mp4"
    assert domain.content_type("v1.bin") == "application/octet-stream"


class Reversing:
    """A stand-in cipher (the real one is Fernet's, tested in libs/common): sealing reverses."""

    def seal(self, url: str) -> str:
        return url[::-1]


def test_an_rtsp_url_is_stored_masked_and_sealed_and_shown_masked_only() -> None:
    url = "rtsp://admin:hunter2@10.0.0.5:554/stream1"
    spec = environment(source={"kind": "rtsp", "url": url, "sealed": "from-a-client"})
    stored = domain.seal_rtsp(spec, Reversing())
    source = stored.cameras[0].source
    assert source.model_dump() == {
        "kind": "rtsp",
        "url": "rtsp://***@10.0.0.5:554/stream1",
        "sealed": url[::-1],  # never what a client sent
    }
    view = domain.environment_view(stored, {})
    assert view["cameras"][0]["source"] == {
        "kind": "rtsp",
        "url": "rtsp://***@10.0.0.5:554/stream1",
    }
    assert "hunter2" not in str(view)
    # The URL sent back as it was read keeps the seal; a new URL is sealed anew.
    again = environment(source={"kind": "rtsp", "url": "rtsp://***@10.0.0.5:554/stream1"})
    assert domain.seal_rtsp(again, Reversing(), stored).cameras[0].source == source
    moved = environment(source={"kind": "rtsp", "url": "rtsp://u:p@10.0.0.6/s"})
    assert domain.seal_rtsp(moved, Reversing(), stored).cameras[0].source.model_dump() == {
        "kind": "rtsp",
        "url": "rtsp://***@10.0.0.6/s",
        "sealed": "rtsp://u:p@10.0.0.6/s"[::-1],
    }
