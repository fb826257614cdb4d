"""`python -m edgeway.video_relay`: the video relay with its operations endpoints."""

from __future__ import annotations

from edgeway.common.service import serve
from edgeway.video_relay.app import build_app
from edgeway.video_relay.publishing import SERVICE
from edgeway.video_relay.settings import VideoRelaySettings


def main() -> None:
    serve(SERVICE, VideoRelaySettings(), build_app)


if __name__ == "__main__":
    main()
