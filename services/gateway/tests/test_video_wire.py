"""The video endpoints' pure checks: the relay's GOP reply, device ids, IMU samples."""

from __future__ import annotations

from typing import Any

import pytest

from edgeway.common.video import check_device
from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.gateway.video.consumers import parse_gop
from edgeway.gateway.video.phones import check_imu

GOP = [
    VideoPacket(PacketType.SPS, 1, b"\x00\x00\x00\x01\x67sps"),
    VideoPacket(PacketType.PPS, 2, b"\x00\x00\x00\x01\x68pps"),
    VideoPacket(PacketType.KEYFRAME, 3, b"\x00\x00\x00\x01\x65key", flags=1),
    VideoPacket(PacketType.FRAME, 4, b"\x00\x00\x00\x01\x41frame"),
]


def reply(last_seq: int, packets: list[VideoPacket]) -> bytes:
    return last_seq.to_bytes(8, "big") + b"".join(p.encode() for p in packets)


def test_a_gop_reply_gives_each_payload_with_its_kind_and_the_last_seq() -> None:
    packets, last_seq = parse_gop(reply(4242, GOP))
    assert last_seq == 4242
    assert [(p.kind, p.payload) for p in packets] == [
        ("sps", GOP[0].payload),
        ("pps", GOP[1].payload),
        ("keyframe", GOP[2].payload),
        ("frame", GOP[3].payload),
    ]


def test_an_empty_gop_is_no_packets() -> None:
    assert parse_gop(reply(0, [])) == ([], 0)


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00",  # no last_seq
        reply(4, GOP)[:-3],  # the last packet cut short
        reply(4, GOP) + b"\xff" * 30,  # garbage after the packets
    ],
)
def test_a_broken_gop_reply_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="GOP reply"):
        parse_gop(body)


@pytest.mark.parametrize("device", ["phone", "drone-7", "A_b-9", "x" * 64])
def test_device_ids_that_are_accepted(device: str) -> None:
    assert check_device(device) is None


@pytest.mark.parametrize("device", ["", "x" * 65, "a.b", "a*", "a#", "ph one", "télé"])
def test_device_ids_that_could_break_a_routing_key_are_refused(device: str) -> None:
    assert check_device(device) is not None


SAMPLE: dict[str, Any] = {
    "type": "imu_data",
    "timestamp": 1_763_000_000_000_000_000,
    "accelerometer": {"x": 0.1, "y": -9.81, "z": 0},
    "gyroscope": {"x": 0.0, "y": 0.0, "z": 0.0},
}


def test_a_seed_imu_sample_is_accepted() -> None:
    assert check_imu(SAMPLE) is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": 1.5}, "timestamp"),
        ({"timestamp": True}, "timestamp"),
        ({"timestamp": None}, "timestamp"),
        ({"accelerometer": [0, 0, 0]}, "accelerometer"),
        ({"accelerometer": {"x": 0, "y": 0}}, "accelerometer"),
        ({"gyroscope": {"x": "0", "y": 0, "z": 0}}, "gyroscope"),
        ({"gyroscope": {"x": False, "y": 0, "z": 0}}, "gyroscope"),
    ],
)
def test_an_imu_sample_the_relay_could_not_order_is_refused(
    change: dict[str, Any], field: str
) -> None:
    reason = check_imu({**SAMPLE, **change})
    assert reason is not None
    assert field in reason
