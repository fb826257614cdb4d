"""Settings of the video relay (`EDGEWAY_` environment variables)."""

from __future__ import annotations

from pydantic import Field

from edgeway.common.settings import CommonSettings


class VideoRelaySettings(CommonSettings):
    """What the video relay reads from its environment. Every bound on memory is here."""

    http_port: int = 8083
    # Decoded frames turned into JPEGs for the tracker, per device and second of video
    # (0: no decoding at all). The seed's tracker side (SLAM3R) runs at about 15 fps.
    decode_fps: float = Field(default=5.0, ge=0, le=60)
    # JPEG quantizer on FFmpeg's `-q:v` scale: 2 (best, largest) to 31 (worst, smallest).
    jpeg_qscale: int = Field(default=5, ge=2, le=31)
    # The GOP kept for late joiners: the last keyframe and every frame since, per device. A GOP
    # past either cap is dropped (until the next keyframe), never the live stream. 600 frames is
    # 20 s at 30 fps; Android encoders default to a keyframe every 1-2 s.
    gop_max_frames: int = Field(default=600, ge=1)
    gop_max_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    # Streams (devices) held at once; past this the one idle longest is forgotten.
    max_streams: int = Field(default=64, ge=1)
    # A stream with no packet for this long is forgotten (its GOP, decoder and IMU orderer).
    stream_idle_s: float = Field(default=600.0, gt=0)
    # Packets of one device waiting for their publish confirm; past this the relay skips to
    # the next keyframe (about 10 s of a 30 fps stream).
    publish_backlog: int = Field(default=300, ge=1)
    # Packets of one device waiting for its decoder; past this the decoder skips to the next
    # keyframe (about 2 s of a 30 fps stream). The live stream is not affected.
    decode_backlog: int = Field(default=60, ge=1)
    # The seed warns when the average of the last 10 five-second windows is below 3 Mbps.
    low_bandwidth_mbps: float = Field(default=3.0, ge=0)
