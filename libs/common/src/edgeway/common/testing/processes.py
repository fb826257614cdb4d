"""Real service processes for connected tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(process: subprocess.Popen[Any], *, grace: float = 10) -> None:
    """SIGTERM and wait; SIGKILL if it has not ended within `grace` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class ServiceProcess:
    """One `python -m <module>` process with its own environment and log file.

    `python`: the interpreter (default: this one); another checkout's, to run its version of a
    service beside this one's (`bench.occupancy_fanout --before`).
    """

    def __init__(
        self,
        module: str,
        *,
        env: Mapping[str, str],
        port: int,
        log_path: Path,
        ready_path: str = "/readyz",
        python: str | None = None,
    ) -> None:
        self.module = module
        self.python = python or sys.executable
        # Test and benchmark processes run the development profile unless they say otherwise:
        # the default, production, wants real keys and credentials.
        self.env = {
            "EDGEWAY_ENVIRONMENT": "development",
            **os.environ,
            **env,
            "EDGEWAY_HTTP_PORT": str(port),
        }
        self.port = port
        self.log_path = log_path
        self.ready_path = ready_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: float = 60.0) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.python, "-m", self.module], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait:
            self.wait_ready(wait)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(self.url + self.ready_path, timeout=2)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` and wait for the process to end (SIGKILL: no cleanup at all)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM, as an orchestrator does; SIGKILL if it does not end in time."""
        if self.process is not None:
            terminate(self.process, grace=20)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
