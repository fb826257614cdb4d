"""A real S3-protocol server for tests and benchmarks: moto's server, in its own process.

moto (a dev dependency) answers the S3 REST API over HTTP with SigV4 signatures, so the `minio`
client talks to it exactly as it talks to MinIO. It keeps objects in memory: every test run
starts from an empty store. No MinIO binary can be installed from this machine's registries.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeway.common.testing.processes import free_port, terminate

ACCESS_KEY = "edgeway-test"
SECRET_KEY = "edgeway-test-secret"  # noqa: S105 - a throwaway key for a loopback test server


class S3Server:
    def __init__(self, log_path: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port, as `minio.Minio` and EDGEWAY_STORAGE_ENDPOINT take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The object store settings (`ObjectStoreSettings`) for this server."""
        return {
            "EDGEWAY_STORAGE_ENDPOINT": self.endpoint,
            "EDGEWAY_STORAGE_ACCESS_KEY": ACCESS_KEY,
            "EDGEWAY_STORAGE_SECRET_KEY": SECRET_KEY,
            "EDGEWAY_STORAGE_SECURE": "false",
            "EDGEWAY_STORAGE_REGION": "us-east-1",
        }

    def start(self, timeout: float = 30.0) -> S3Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                httpx.get(f"http://{self.endpoint}/moto-api/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"moto_server not answering on {self.endpoint} after {timeout}s")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server for the test session; tests keep apart by bucket."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()
