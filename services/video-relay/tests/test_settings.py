"""Video relay settings: the contract's defaults, overridable from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeway.video_relay.settings import VideoRelaySettings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EDGEWAY_HTTP_PORT", "EDGEWAY_DECODE_FPS", "EDGEWAY_GOP_MAX_FRAMES"):
        monkeypatch.delenv(name, raising=False)
    settings = VideoRelaySettings()
    assert settings.http_port == 8083
    assert settings.decode_fps == 5.0
    assert settings.gop_max_frames == 600
    assert settings.gop_max_bytes == 32 * 1024 * 1024
    assert settings.exchanges.video_stream == "video_stream_exchange"


def test_the_environment_sets_rates_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWAY_DECODE_FPS", "0")
    monkeypatch.setenv("EDGEWAY_GOP_MAX_FRAMES", "90")
    monkeypatch.setenv("EDGEWAY_MAX_STREAMS", "8")
    monkeypatch.setenv("EDGEWAY_NTP_SERVERS", "[]")
    settings = VideoRelaySettings()
    assert (settings.decode_fps, settings.gop_max_frames, settings.max_streams) == (0, 90, 8)
    assert settings.ntp_servers == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("EDGEWAY_DECODE_FPS", "-1"), ("EDGEWAY_JPEG_QSCALE", "1"), ("EDGEWAY_GOP_MAX_FRAMES", "0")],
)
def test_nonsense_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        VideoRelaySettings()
