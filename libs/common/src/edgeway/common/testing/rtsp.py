"""A real RTSP camera for tests: `rtsp_server.py` run by the system python, on a free port.

The server needs PyGObject and GstRtspServer, which live in the system python, not in the venv;
`rtsp_server_available()` says what is missing so a test can fail with the way to fix it
(`deploy/local/ensure-test-tools.sh`) instead of skipping silently.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self
from urllib.parse import quote

from edgeway.common.testing.processes import free_port, terminate

SYSTEM_PYTHON = os.environ.get("EDGEWAY_TEST_SYSTEM_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
FIX_HINT = "run deploy/local/ensure-test-tools.sh to install it"
MOUNTS = ("moving", "static", "switch")

# The GStreamer elements the server's pipelines use, and the package that ships each.
_CHECK = """
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [name for name in ("videotestsrc", "videoscale", "videoconvert", "x264enc",
           "rtph264pay") if Gst.ElementFactory.find(name) is None]
if missing:
    raise SystemExit("missing GStreamer elements: " + ", ".join(missing))
"""


@functools.cache
def rtsp_server_available() -> str | None:
    """None when the test RTSP server can run here; otherwise why not, and how to fix it."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} does not exist: the test RTSP server needs it; {FIX_HINT}"
    try:
        result = subprocess.run(
            [SYSTEM_PYTHON, "-c", _CHECK], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return f"{SYSTEM_PYTHON} took over 60 s to load GStreamer; {FIX_HINT}"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        return f"{SYSTEM_PYTHON} cannot run the GStreamer RTSP server ({detail}); {FIX_HINT}"
    return None


class RtspServer:
    """One test RTSP server process on 127.0.0.1 (see `rtsp_server.py` for its mounts).

    Also a context manager: `with RtspServer() as server: ... server.url("static")`.
    """

    def __init__(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        auth: Literal["digest", "basic"] = "digest",
        fps: int = 10,
        switch_interval_s: float = 2.0,
        port: int | None = None,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        self.user = user
        self.password = password
        self.auth = auth
        self.fps = fps
        self.switch_interval_s = switch_interval_s
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[str] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self._paused = False

    def url(self, mount: str, *, credentials: bool = True) -> str:
        """`rtsp://[user:password@]127.0.0.1:port/mount`, the credentials percent-encoded."""
        userinfo = ""
        if credentials and self.user is not None and self.password is not None:
            userinfo = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@"
        return f"rtsp://{userinfo}127.0.0.1:{self.port}/{mount.lstrip('/')}"

    def start(self, *, timeout: float = 20.0) -> Self:
        reason = rtsp_server_available()
        if reason is not None:
            raise RuntimeError(reason)
        command = [
            SYSTEM_PYTHON,
            str(SERVER_SCRIPT),
            "--port",
            str(self.port),
            "--fps",
            str(self.fps),
            "--switch-interval",
            str(self.switch_interval_s),
        ]
        if self.user is not None and self.password is not None:
            command += ["--user", self.user, "--password", self.password, "--auth", self.auth]
        self._ready.clear()
        self._paused = False
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        # Drained all the time, so GStreamer's warnings never fill the pipe and block the server.
        threading.Thread(
            target=self._drain, args=(self.process.stdout,), name="rtsp-server-output", daemon=True
        ).start()
        self._wait_ready(timeout)
        return self

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            text = line.rstrip("\n")
            self._output.append(text)
            if text == "ready":
                self._ready.set()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the RTSP server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"the RTSP server was not ready in {timeout}s:\n{self.log_tail()}"
                )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not end in time."""
        if not self.running:
            return
        assert self.process is not None
        self.resume()  # a stopped process would hold SIGTERM until continued
        terminate(self.process)

    def kill(self) -> None:
        """SIGKILL: the camera vanishes mid-stream, connections reset, no TEARDOWN."""
        if not self.running:
            return
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self._paused = False

    def restart(self, *, timeout: float = 20.0) -> Self:
        """Stop if running, then start again on the same port."""
        self.stop()
        return self.start(timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing more is sent, like a hung camera."""
        if self.running and not self._paused:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.running and self._paused:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._output)[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
