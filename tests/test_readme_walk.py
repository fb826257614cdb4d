"""A newcomer's first hour: start what `make run` starts, then do what the README and the banner
say, command by command, and check each answer is what the README says it shows.

The commands are read out of the README's `sh` blocks and the banner `make run` prints, so
neither can drift from what works. A reader's substitutions are made: this stack's ports and
data directory for the defaults (it runs beside a developer's own `make run`, on a virtual host
and ports of its own), the ids earlier answers gave for `<request_id>` and `<task_id>`, the
banner's `export EDGEWAY_OPERATOR=...` in the environment. `curl` and the token commands run in
bash, as typed; `python -m websockets` watches are made with a real WebSocket client. A command
that no check here knows fails the walk: a new README command needs its check.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from edgeway.common.testing import create_vhost, drop_vhost, free_port
from edgeway.common.testing.rtsp import rtsp_server_available

# About 90 s to start the stack and 45 s to walk on a busy 2-core machine; the limit leaves
# room for a machine busier still (pytest's default is 300 s).
pytestmark = [pytest.mark.connected, pytest.mark.slow, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEVSTACK = ROOT / "deploy/local/devstack.py"
BANNER_END = "Ctrl-C stops everything."
STARTUP_S = 240  # the first start renders the demo tracking videos (about a minute here)
# The defaults the README shows, and the settings that move them for this stack.
PORT_SETTINGS = {
    8000: "EDGEWAY_GATEWAY_PORT",
    8081: "EDGEWAY_OCCUPANCY_PORT",
    8082: "EDGEWAY_TELEMETRY_PORT",
    8083: "EDGEWAY_VIDEO_RELAY_PORT",
    8084: "EDGEWAY_INGESTION_PORT",
    8085: "EDGEWAY_TRACKER_PORT",
    8554: "EDGEWAY_RTSP_DEMO_PORT",
}


def logical_lines(text: str) -> list[str]:
    """Shell lines with their `\\` continuations joined."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line.strip()]


def readme_commands(markdown: str) -> list[str]:
    """The commands of the README's `sh` blocks, in order, without comments."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        for line in logical_lines(block):
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def banner_commands(banner: str) -> list[str]:
    """The commands the banner gives: each `curl ...`, `... -m websockets ...` and `export`."""
    commands = []
    for line in logical_lines(banner):
        found = re.search(r"(curl |export |\S+ -m websockets )", line)
        if found:
            commands.append(line[found.start() :])
    return commands


def banner_urls(banner: str) -> list[str]:
    """The plain http:// addresses the banner lists (not those inside a command)."""
    urls = []
    for line in logical_lines(banner):
        if re.search(r"(curl |export |-m websockets )", line):
            continue
        urls += re.findall(r"http://127\.0\.0\.1:\d+/[^\s)]*", line)
    return urls


@dataclass
class Stack:
    """What `deploy/local/devstack.py` started, as its banner tells it."""

    process: subprocess.Popen[str]
    ports: dict[int, int]  # the README's port -> this stack's
    data: Path
    banner: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports[8000]}"

    def reader_sees(self, command: str) -> str:
        """`command` as a reader of the README types it against this stack."""
        for default, port in self.ports.items():
            command = command.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
        return command.replace("var/dev/", f"{self.data}/")


def start(env: dict[str, str], data: Path, ports: dict[int, int]) -> Stack:
    process = subprocess.Popen(
        [sys.executable, str(DEVSTACK)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: `stop` can take everything it started
    )
    stack = Stack(process, ports, data)
    done = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            stack.output.append(line)
            if line.strip() == BANNER_END:
                done.set()
        done.set()

    threading.Thread(target=read, name="devstack-output", daemon=True).start()
    if not done.wait(STARTUP_S) or process.poll() is not None:
        stop(stack)
        raise AssertionError(f"devstack printed no banner:\n{''.join(stack.output)[-4000:]}")
    stack.banner = "".join(stack.output)
    return stack


def stop(stack: Stack) -> None:
    """Ctrl-C, as its banner says; then what it leaves, if anything, is killed (its whole
    process group: the services and producers it started too)."""
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGINT)
        try:
            stack.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            stack.process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(stack.process.pid, signal.SIGKILL)


def settings_of_make_run(commands: list[str]) -> dict[str, str]:
    """The settings the README's `... make run` example gives (its `NAME=value` words)."""
    (example,) = [c for c in commands if c.endswith("make run") and c != "make run"]
    words = shlex.split(example)
    assert words[-2:] == ["make", "run"], example
    return dict(word.split("=", 1) for word in words[:-2])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if reason := rtsp_server_available():
        pytest.fail(f"the README's RTSP example needs the demo camera: {reason}")
    vhost, amqp_url = create_vhost()
    data = tmp_path_factory.mktemp("devstack")
    ports = {default: free_port() for default in PORT_SETTINGS}
    env = {
        **os.environ,
        **settings_of_make_run(readme_commands(README.read_text())),
        "EDGEWAY_AMQP_URL": amqp_url,
        "EDGEWAY_DATA_DIR": str(data),
        **{PORT_SETTINGS[default]: str(port) for default, port in ports.items()},
    }
    stack = start(env, data, ports)
    try:
        yield stack
    finally:
        stop(stack)
        drop_vhost(vhost)


# --- the walk ----------------------------------------------------------------------------------


@dataclass
class Walk:
    """A reader's state: the shell variables they set and the ids answers gave them."""

    stack: Stack
    env: dict[str, str]
    request_ids: list[str] = field(default_factory=list)
    offline: dict[str, bool] = field(default_factory=dict)  # vehicle tag -> its dead zone
    checked: list[str] = field(default_factory=list)

    def shell(self, command: str, *, timeout: float = 60) -> str:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def json(self, command: str) -> Any:
        """A curl command's JSON answer, with its status code (curl's -w)."""
        out = self.shell(f"{command} -s -w '\\n%{{http_code}}'")
        body, _, code = out.rpartition("\n")
        return int(code), json.loads(body)

    def operator(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['EDGEWAY_OPERATOR']}"}

    def websocket(
        self,
        url: str,
        count: int,
        *,
        until: Callable[[Any], bool] | None = None,
        timeout: float = 30,
    ) -> list[Any]:
        """Messages from a watch: the first `count`, then on until one satisfies `until`."""
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        with connect(url, open_timeout=10, proxy=None) as client:
            while time.monotonic() < deadline:
                try:
                    raw = client.recv(timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                messages.append(json.loads(raw) if isinstance(raw, str) else raw)
                if len(messages) >= count and (until is None or until(messages[-1])):
                    return messages
        raise AssertionError(f"{url}: not what the README shows after {timeout} s: {messages}")


def expand(walk: Walk, command: str) -> str:
    """The command once the reader filled in the ids the README leaves to them."""
    if "<request_id>" in command:
        command = command.replace("<request_id>", walk.request_ids[-1])
    if "<task_id>" in command:
        command = command.replace("<task_id>", walk.env["TASK"])
    return command


def check(walk: Walk, command: str) -> None:
    """Run one command as the README or the banner gives it and check its answer."""
    stack = walk.stack
    command = expand(walk, stack.reader_sees(command))
    walk.checked.append(command)
    if command in ("make run", "make test") or command.endswith(" make run"):
        return  # the stack this walk runs in, and the suite it is part of
    if assignment := re.fullmatch(r"(?:export )?([A-Z_]+)=(\S+)", command):
        walk.env[assignment[1]] = assignment[2]
        return
    if assignment := re.fullmatch(r"([A-Z_]+)=\$\((.*)\)", command):
        value = walk.shell(f'{command}; printf %s "${assignment[1]}"').strip()
        assert value, command
        walk.env[assignment[1]] = value
        return
    if "-m websockets" in command:
        # The address as the reader's shell expands it ($TASK, $EDGEWAY_OPERATOR).
        url = walk.shell("printf '%s' " + command.split("-m websockets", 1)[1].strip())
        check_watch(walk, url)
        return
    if "edgeway-token" in command and "telemetry_logger" not in command:
        token = walk.shell(command).strip()
        # The minted token is one the gateway takes: a client of the live occupancy socket.
        ws = stack.gateway.replace("http", "ws")
        walk.websocket(f"{ws}/client/ws/connect?token={token}", 1)
        return
    if "telemetry_logger" in command:
        walk.shell(command, timeout=120)  # it exits once its readings are all taken (202)
        vin = re.findall(r"--vin (\w+)", command)[-1]  # the logger's (the token's is first)
        answer = httpx.get(f"{stack.gateway}/status", timeout=10).json()
        assert answer["total_records"] > 0
        admin = {"Authorization": f"Bearer {walk.env['EDGEWAY_ADMIN']}"}
        vehicles = httpx.get(f"{stack.gateway}/api/v1/vehicles", headers=admin, timeout=10)
        assert vin in vehicles.json()["vehicles"]
        return
    if not command.startswith(("curl ", "TASK=")):
        raise AssertionError(f"a command the walk does not know how to check: {command}")
    path = re.search(r"http://127\.0\.0\.1:\d+(/[^\s\"']*)", command)
    assert path is not None, command
    route = path[1]
    if route == "/model/count":
        code, body = walk.json(command)
        assert (code, body) == (200, {"count": 1})  # the demo camera model
    elif route == "/status":
        code, body = walk.json(command)
        assert code == 200
        assert body["total_records"] > 0
        latest = body["latest"]
        assert latest
        assert all(r["vehicle_vin"] == r["vin"][-6:] for r in latest)
        assert {"timestamp", "speed", "battery", "power", "odometer", "heading"} <= set(latest[0])
        assert {"total_readings", "compression_ratio"} <= set(body["compression_stats"])
    elif route == "/health/video":
        code, body = walk.json(command)
        assert code == 200
        assert body["devices"] == ["phone-1"]
        assert body["has_sps_pps"] is True
    elif route == "/api/v1/ingest/upload":
        code, body = walk.json(command)
        assert code == 202, body
        walk.request_ids.append(body["request_id"])
        final = poll_status(walk, body["request_id"])
        assert len(final["frames"]) == 1
    elif route.startswith("/api/v1/ingest/status/"):
        final = poll_status(walk, route.rsplit("/", 1)[1], command=command)
        check_frames(final)
    elif route == "/api/v1/ingest/rtsp":
        code, body = walk.json(command)
        assert code == 202, body
        walk.request_ids.append(body["request_id"])
        final = poll_status(walk, body["request_id"], timeout=60)
        assert final["source_type"] == "rtsp"
        assert len(final["frames"]) >= 2, final
        check_frames(final)
    elif route == "/api/v1/processing-tasks/start":
        if command.startswith("TASK="):
            task = walk.shell(f'{command}; printf %s "$TASK"').strip()
        else:
            code, body = walk.json(command)
            assert code in (200, 201, 202), body
            task = body["task_id"]
        assert task
        walk.env["TASK"] = task
    elif route.startswith("/toggle_offline"):
        code, body = walk.json(command)
        assert code == 202, body
        tag = re.search(r"vin=(\w+)", route)
        assert tag is not None
        assert body["command"] == "toggle_offline"
        assert body["vin"].endswith(tag[1])
        assert "offline" in body["effect"]
        (logger,) = body["loggers"]
        assert logger["acknowledged"] is True
        # On the first call the car enters the dead zone; the same call brings it back.
        assert logger["offline"] is not walk.offline.get(tag[1], False)
        walk.offline[tag[1]] = logger["offline"]
    elif re.fullmatch(r"/api/v1/processing-tasks/[^/]+/stop", route):
        code, body = walk.json(command)
        assert code in (200, 202), body
        assert body["status"] == "STOPPED", body
    elif route == "/api/v1/vehicles":
        code, body = walk.json(command)
        assert code in (200, 201), body
        assert body["vin"] in command
    else:
        raise AssertionError(f"a command the walk does not know how to check: {command}")


def poll_status(
    walk: Walk, request_id: str, *, command: str | None = None, timeout: float = 30
) -> Any:
    """The request's status once it is final: the README's status command, asked again."""
    url = f"{walk.stack.gateway}/api/v1/ingest/status/{request_id}"
    deadline = time.monotonic() + timeout
    while True:
        if command is not None:
            code, body = walk.json(command)
        else:
            answer = httpx.get(url, headers=walk.operator(), timeout=10)
            code, body = answer.status_code, answer.json()
        assert code == 200, body
        if body["status"] in ("completed", "failed", "cancelled"):
            assert body["status"] == "completed", body
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.5)


def check_frames(status: Any) -> None:
    """The README's "status with presigned frame URLs": each URL gives the frame's JPEG."""
    assert status["frames"]
    for frame in status["frames"]:
        answer = httpx.get(frame["storage_url"], timeout=10)
        assert answer.status_code == 200, frame
        assert answer.headers["content-type"] == "image/jpeg"
        assert answer.content[:2] == b"\xff\xd8"  # a JPEG's start-of-image marker


def check_watch(walk: Walk, url: str) -> None:
    """What a `python -m websockets` watch shows, per the README."""
    path = url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
    if path == "client/ws/connect":
        # Every location's latest state first: Omega's seven and the camera the README's
        # `make run` example added.
        messages = walk.websocket(url, 1, until=lambda m: m["location_name"] == "Library")
        assert set(messages[0]) == {
            "location_name",
            "timestamp",
            "people_detected",
            "occupancy_percent",
        }
    elif path == "ws":
        messages = walk.websocket(url, 4, until=lambda m: m.get("type") == "telemetry")
        assert [m["type"] for m in messages[:3]] == ["log", "history", "log"]
        record = messages[-1]
        assert record["vehicle_vin"] == record["vin"][-6:]
        assert {"timestamp", "speed", "received_at"} <= set(record["data"])
    elif path.startswith("ws/tracking/"):
        messages = walk.websocket(
            url, 2, until=lambda m: m.get("type") == "tracking_update", timeout=90
        )
        update = messages[-1]
        tracks = [t for camera in update["payload"]["cameras"].values() for t in camera["tracks"]]
        assert all("global_id" in t and "map_coords" in t for t in tracks), update
    else:
        raise AssertionError(f"a watch the walk does not know how to check: {url}")


def test_the_readme_and_the_banner_work_as_written(stack: Stack) -> None:
    walk = Walk(stack, {**os.environ})
    banner = banner_commands(stack.banner)
    # The reader takes the banner's operator token first: the README's examples use it.
    (export,) = [c for c in banner if c.startswith("export EDGEWAY_OPERATOR=")]
    check(walk, export)
    readme = README.read_text()
    for command in readme_commands(readme):
        check(walk, command)
    for command in banner:
        check(walk, command)
    for url in banner_urls(stack.banner):
        headers = walk.operator() if "/api/v1/" in url else {}
        # A reader asks again after a 504 (a service slow to answer on a busy machine).
        for _ in range(5):
            answer = httpx.get(url, headers=headers, timeout=10)
            if answer.status_code != 504:
                break
            time.sleep(1)
        assert answer.status_code == 200, f"{url}: {answer.status_code} {answer.text[:200]}"
    # The raw H.264 the README names in a comment: SPS and PPS first, so a late joiner decodes.
    (consume,) = set(re.findall(r"ws://127\.0\.0\.1:8000/ws/video/consume\?device=[\w-]+", readme))
    with connect(stack.reader_sees(consume), open_timeout=10, proxy=None) as video:
        first = video.recv(timeout=10)
    assert isinstance(first, bytes)
    assert first.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))
    nal_types = {header[0] & 0x1F for header in re.findall(rb"\x00\x00\x01(.)", first, re.S)}
    assert 7 in nal_types, nal_types  # a sequence parameter set
    assert any("edgeway-token" in c for c in walk.checked)
    assert any("/api/v1/ingest/rtsp" in c for c in walk.checked)


def test_a_second_make_run_says_which_ports_are_taken_and_starts_nothing(tmp_path: Path) -> None:
    ports = {default: free_port() for default in PORT_SETTINGS}
    env = {
        **os.environ,
        "EDGEWAY_DATA_DIR": str(tmp_path / "dev"),
        **{PORT_SETTINGS[default]: str(port) for default, port in ports.items()},
    }
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[8082]))
        held.listen()
        result = subprocess.run(
            [sys.executable, str(DEVSTACK)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"on port {ports[8082]} (telemetry). Nothing was started." in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "dev").exists()  # not even its data directory


def test_a_second_make_run_beside_a_running_stack_says_so(stack: Stack, tmp_path: Path) -> None:
    """The issue's case: `make run` again while one runs, on the same ports."""
    env = {
        **os.environ,
        "EDGEWAY_DATA_DIR": str(tmp_path / "dev"),
        **{PORT_SETTINGS[default]: str(port) for default, port in stack.ports.items()},
    }
    result = subprocess.run(
        [sys.executable, str(DEVSTACK)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    first_line = result.stderr.splitlines()[0]
    assert first_line.startswith("Another Edgeway stack is running here, on ports ")
    assert f"{stack.ports[8000]} (gateway)" in first_line
    assert f"{stack.ports[8554]} (RTSP demo camera)" in first_line
    assert result.stdout == ""  # no banner, no token
    assert stack.process.poll() is None  # the running one is untouched
