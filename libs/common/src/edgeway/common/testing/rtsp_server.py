"""A real RTSP camera for tests: H.264 over RTSP from GStreamer, with mounts of known content.

Run by the system python, which has PyGObject and GstRtspServer (the venv has neither), so this
file imports nothing from edgeway:

    /usr/bin/python3 rtsp_server.py --port 8554 [--user U --password P [--auth basic]] [--fps 10]

Mounts (320x240, keyframe every 10 frames, all shared so several clients watch one pipeline):

- `/moving`: an 8x6 grid of blocks, each a fresh random grey every frame (videotestsrc "snow" at
  8x6, scaled up nearest-neighbour). Any two frames differ by about a third of full scale on a
  small grayscale thumbnail, so every examined frame is a scene change.
- `/static`: SMPTE colour bars that never change.
- `/switch`: black, then white, then black ... swapped every `--switch-interval` seconds (2 s).

Prints `ready` on stdout once listening on 127.0.0.1; exits cleanly on SIGTERM or SIGINT.
`deploy/local/ensure-test-tools.sh` installs the system packages it needs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import gi  # type: ignore[import-not-found,unused-ignore]  # the system python's PyGObject

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import (  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
    GLib,
    Gst,
    GstRtsp,
    GstRtspServer,
)

WIDTH, HEIGHT = 320, 240
KEYFRAME_INTERVAL = 10  # frames: a client that joins or reconnects decodes within ~1 s at 10 fps
SWITCH_PATTERNS = ("black", "white")

# x264 tuned as a live camera: no B-frames, no lookahead, so a frame leaves as soon as it is made.
# A fixed quantizer, not the default bitrate target: under the bitrate cap the first keyframe came
# out washed-out (0.11 of full scale off the next frame), a fake scene change on a static scene.
_ENCODE = (
    "videoconvert ! video/x-raw,format=I420 ! "
    "x264enc tune=zerolatency speed-preset=ultrafast pass=quant quantizer=20 key-int-max={gop} ! "
    "rtph264pay name=pay0 pt=96"
)
_CAPS = "video/x-raw,width={w},height={h},framerate={fps}/1"


def _launch(source: str, fps: int) -> str:
    caps = _CAPS.format(w=WIDTH, h=HEIGHT, fps=fps)
    encode = _ENCODE.format(gop=KEYFRAME_INTERVAL)
    if source == "moving":
        # Snow at 8x6 pixels, blown up without smoothing: 48 large blocks of random grey.
        src = (
            "videotestsrc is-live=true pattern=snow"
            f" ! video/x-raw,width=8,height=6,framerate={fps}/1"
            f" ! videoscale method=nearest-neighbour ! {caps}"
        )
    elif source == "static":
        src = f"videotestsrc is-live=true pattern=smpte ! {caps}"
    else:
        src = f"videotestsrc name=switch is-live=true pattern={SWITCH_PATTERNS[0]} ! {caps}"
    return f"( {src} ! {encode} )"


class SwitchFactory(GstRtspServer.RTSPMediaFactory):  # type: ignore[misc]
    """`/switch`: flips the source's pattern on a timer for as long as its media is alive."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_ms = int(interval_s * 1000)
        self.connect("media-configure", self._on_configure)

    def _on_configure(self, _factory: Any, media: Any) -> None:
        source = media.get_element().get_by_name("switch")
        state = {"index": 0, "alive": True}

        def unprepared(_media: Any) -> None:
            state["alive"] = False

        def flip() -> bool:
            if not state["alive"]:
                return False
            state["index"] = 1 - state["index"]
            source.set_property("pattern", SWITCH_PATTERNS[state["index"]])
            return True

        media.connect("unprepared", unprepared)
        GLib.timeout_add(self.interval_ms, flip)


def _auth(user: str, password: str, method: str) -> Any:
    """One user who may open and play every mount, by basic or by digest auth.

    GstRtspServer can offer both at once, but its Python binding only takes one enum value.
    """
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
    if method == "basic":
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.BASIC)
    else:
        auth.add_digest(user, password, token)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
    return auth


def _role() -> Any:
    structure, _ = Gst.Structure.from_string(
        "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
    )
    return structure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--switch-interval", type=float, default=2.0)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--auth", choices=("digest", "basic"), default="digest")
    args = parser.parse_args()
    if (args.user is None) != (args.password is None):
        parser.error("--user and --password go together")

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    if args.user is not None:
        server.set_auth(_auth(args.user, args.password, args.auth))

    mounts = server.get_mount_points()
    for name in ("moving", "static", "switch"):
        factory = (
            SwitchFactory(args.switch_interval)
            if name == "switch"
            else GstRtspServer.RTSPMediaFactory()
        )
        factory.set_launch(_launch(name, args.fps))
        factory.set_shared(True)
        if args.user is not None:
            factory.add_role_from_structure(_role())
        mounts.add_factory(f"/{name}", factory)

    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        sys.stderr.write(f"cannot listen on 127.0.0.1:{args.port}\n")
        return 1

    def quit_loop() -> bool:
        loop.quit()
        return False  # remove the signal source

    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, quit_loop)
    # The one line the test helper waits for (a protocol, not a log).
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
