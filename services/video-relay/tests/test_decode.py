"""H.264 to JPEG with PyAV: rate, start at a keyframe, holes, and a decoder that falls behind."""

from __future__ import annotations

import asyncio
import functools

import av
import pytest
from av.video.frame import VideoFrame

from edgeway.common.video.packets import PacketType, VideoPacket
from edgeway.edge.phone.media import frame_number, synthetic_stream
from edgeway.video_relay.decode import RESYNC, DecodeWorker, FrameDecoder, Jpeg, h264_available
from edgeway.video_relay.stream import Relayed

FPS = 30
WIDTH, HEIGHT = 320, 240


@functools.cache
def packets(seconds: float = 2.0) -> tuple[VideoPacket, ...]:
    """The phone's stream: a keyframe (after SPS and PPS) every second, 30 fps."""
    return tuple(synthetic_stream(WIDTH, HEIGHT, FPS, seconds, gop_s=1.0, bitrate=500_000))


def relayed(stream: tuple[VideoPacket, ...]) -> list[Relayed]:
    return [Relayed(seq, packet, 1_000 + seq, 0) for seq, packet in enumerate(stream, start=1)]


def number_of(frame_index_us: int) -> int:
    return round(frame_index_us * FPS / 1_000_000)


def picture(jpeg: Jpeg) -> int:
    """The frame number a JPEG shows, decoded by PyAV's JPEG decoder."""
    codec = av.CodecContext.create("mjpeg", "r")
    (frame,) = codec.decode(av.Packet(jpeg.data))
    assert isinstance(frame, VideoFrame)
    assert (frame.width, frame.height) == (jpeg.width, jpeg.height)
    return frame_number(frame.to_ndarray(format="gray"))


def test_pyav_has_an_h264_decoder() -> None:
    assert h264_available()


def test_at_most_decode_fps_jpegs_per_second_of_video_each_the_right_frame() -> None:
    decoder = FrameDecoder(fps=5, qscale=5)
    jpegs = decoder.decode(relayed(packets()))
    # 60 frames at 30 fps, one JPEG every 200 ms of video: frames 0, 6, 12, ... 54.
    assert [number_of(jpeg.timestamp_us) for jpeg in jpegs] == list(range(0, 60, 6))
    assert [picture(jpeg) for jpeg in jpegs] == list(range(0, 60, 6))
    assert all(jpeg.data.startswith(b"\xff\xd8") for jpeg in jpegs)
    assert {(jpeg.width, jpeg.height) for jpeg in jpegs} == {(WIDTH, HEIGHT)}
    assert decoder.decoded == 60
    assert decoder.errors == 0
    # Each JPEG carries the receive time of the packet its frame came from.
    by_time = {item.packet.timestamp_us: item.received_ns for item in relayed(packets())}
    assert all(jpeg.received_ns == by_time[jpeg.timestamp_us] for jpeg in jpegs)


def test_a_decoder_that_joins_mid_stream_starts_at_the_next_keyframe() -> None:
    items = relayed(packets())
    keyframes = [i for i, item in enumerate(items) if item.type is PacketType.KEYFRAME]
    assert len(keyframes) == 2
    middle = keyframes[0] + 10  # frame 10: no parameter sets, no keyframe yet
    decoder = FrameDecoder(fps=30, qscale=5)
    jpegs = decoder.decode(items[middle:])
    assert [picture(jpeg) for jpeg in jpegs] == list(range(30, 60))
    assert decoder.errors == 0


def test_after_a_hole_decoding_resumes_at_the_next_keyframe() -> None:
    items = relayed(packets())
    decoder = FrameDecoder(fps=30, qscale=5)
    first = decoder.decode(items[:15])
    # Frames 14 to 20 are lost: the relay marks the hole, the decoder waits for frame 30.
    after = decoder.decode([RESYNC, *items[23:]])
    assert [picture(jpeg) for jpeg in first] == list(range(13))
    assert [picture(jpeg) for jpeg in after] == list(range(30, 60))


def test_new_parameter_sets_reopen_the_decoder() -> None:
    small = relayed(tuple(synthetic_stream(192, 144, FPS, 0.5, gop_s=1.0, bitrate=200_000)))
    decoder = FrameDecoder(fps=30, qscale=5)
    big = decoder.decode(relayed(packets(1.0)))
    resized = decoder.decode(small)  # the phone changed resolution: new SPS, PPS, keyframe
    assert {(jpeg.width, jpeg.height) for jpeg in big} == {(WIDTH, HEIGHT)}
    assert {(jpeg.width, jpeg.height) for jpeg in resized} == {(192, 144)}
    assert [picture(jpeg) for jpeg in resized] == list(range(15))


def test_garbage_payloads_are_counted_and_decoding_recovers() -> None:
    items = relayed(packets())
    broken = VideoPacket(
        PacketType.FRAME, items[5].packet.timestamp_us, b"\x00\x00\x01\x41" + b"\xff" * 64
    )
    decoder = FrameDecoder(fps=30, qscale=5)
    jpegs = decoder.decode([*items[:5], Relayed(99, broken, 0, 0), *items[6:]])
    # Frames 0 to 2 decode; the decoder refuses the broken frame and, rather than decode the
    # rest of that GOP without it, waits for the keyframe at frame 30.
    assert [picture(jpeg) for jpeg in jpegs] == [0, 1, 2, *range(30, 60)]
    assert decoder.errors == 1


async def test_a_worker_that_falls_behind_skips_to_the_next_keyframe() -> None:
    items = relayed(packets(3.0))  # keyframes at frames 0, 30 and 60
    third_gop = next(i for i, item in enumerate(items) if item.type is PacketType.SPS and i > 40)
    jpegs: list[Jpeg] = []
    skipped: list[int] = []

    async def collect(jpeg: Jpeg) -> None:
        jpegs.append(jpeg)

    worker = DecodeWorker(
        FrameDecoder(fps=30, qscale=5), backlog=40, on_jpeg=collect, on_skip=skipped.append
    )
    # Two GOPs arrive before the worker runs once: more than its backlog of 40 packets.
    for item in items[:third_gop]:
        worker.submit([item], discontinuity=False)
    assert len(worker._pending) <= 40
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.05)  # it takes what waits
    worker.submit(items[third_gop:], discontinuity=False)
    for _ in range(500):
        if len(jpegs) >= 30:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    # What was left of the second GOP had lost its keyframe: nothing of it is decoded (it
    # would be garbage); decoding resumes at the third keyframe.
    assert [picture(jpeg) for jpeg in jpegs] == list(range(60, 90))
    # Dropped: everything up to where the second overflow cut, less the parameter sets kept.
    assert sum(skipped) == 40 - 2


@pytest.mark.parametrize("fps", [1, 5, 15])
def test_the_rate_follows_decode_fps(fps: int) -> None:
    jpegs = FrameDecoder(fps=fps, qscale=10).decode(relayed(packets()))
    assert len(jpegs) == 2 * fps
