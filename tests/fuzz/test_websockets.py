"""Every WebSocket endpoint of the real gateway, fed garbage and near-valid messages.

Each example opens a connection (a token with every scope), sends one to four generated
messages, text or binary, then proves the socket still works:
- where the protocol answers what a client sends, with a sentinel message whose error frame can
  be told from any other (an oversized message names its exact size; an unknown type is quoted
  back), read after every reply to the fuzzed messages;
- where the gateway ignores what clients send (the seed protocols), with a WebSocket ping, or
  the video consumers' own "ping" text (answered "pong").
Every frame read on the way must be JSON text (binary only from the two video viewer sockets),
and an error frame must be `{"type": "error", "code", "reason"}`. A close by the gateway fails
the example.

After each endpoint's run, the gateway must settle back: its open connections for the endpoint,
its event-loop tasks and its open descriptors no higher than before (`GatewayWatch`), and no
unhandled exception in its log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

from edgeway.common.testing import TEST_SECRET
from tests.fuzz.conftest import LIMITS, PRODUCER, FuzzStack, token
from tests.fuzz.harness import Tally, fuzz_settings, tally
from tests.fuzz.strategies import (
    JSON,
    SCALARS,
    FuzzToken,
    encoded,
    garbage,
    jwt_tokens,
    mutated,
    near,
    video_packets,
    video_streams,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.connected]

Frame = str | bytes
REPLY_TIMEOUT = 10.0
# Budget weights: a case is a connection, a few messages and a round trip (~40 ms). Endpoints
# whose protocol answers many message kinds get more than those that ignore what they get.
RICH = 4.0
JPEG = (
    Path(__file__).parents[2] / "services" / "gateway" / "tests" / "data" / "24x16.jpg"
).read_bytes()
MAX_MESSAGE = int(LIMITS["EDGEWAY_MAX_MESSAGE_BYTES"])
MAX_VIDEO = int(LIMITS["EDGEWAY_MAX_VIDEO_MESSAGE_BYTES"])
REQUEST_ID = str(uuid.UUID(int=0xF022))
CONSUMER_DEVICE = "fuzz-consumer"


class GatewayClosedError(AssertionError):
    """The gateway closed a socket that the protocol keeps open."""


def recv(ws: ClientConnection, timeout: float) -> Frame:
    try:
        return ws.recv(timeout=timeout)
    except ConnectionClosed as closed:
        raise GatewayClosedError(closing(closed)) from None


def send(ws: ClientConnection, message: Frame) -> None:
    try:
        ws.send(message)
    except ConnectionClosed as closed:
        raise GatewayClosedError(closing(closed)) from None


def closing(closed: ConnectionClosed) -> str:
    if closed.rcvd is None:
        return "the gateway dropped the socket (no close frame)"
    return f"the gateway closed the socket: {closed.rcvd.code} {closed.rcvd.reason}"


# --- what a reply may be ------------------------------------------------------------------------


def error_frame(frame: Frame) -> dict[str, Any] | None:
    """The frame as a checked error frame, or None for any other JSON object."""
    assert isinstance(frame, str), f"a binary frame ({len(frame)} bytes) where JSON text was due"
    try:
        message = json.loads(frame)
    except ValueError:
        raise AssertionError(f"a text frame that is not JSON: {frame[:80]!r}") from None
    assert isinstance(message, dict), f"a JSON frame that is not an object: {frame[:80]!r}"
    if message.get("type") != "error":
        return None
    assert isinstance(message.get("code"), str), f"an error frame without a code: {message}"
    assert message["code"], f"an error frame with an empty code: {message}"
    assert isinstance(message.get("reason"), str), f"an error frame without a reason: {message}"
    return message


# --- probes: proof that the socket still works --------------------------------------------------

Probe = Callable[[ClientConnection], None]


def read_until(ws: ClientConnection, matches: Callable[[dict[str, Any]], bool], what: str) -> None:
    deadline = time.monotonic() + REPLY_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = recv(ws, left)
        except TimeoutError:
            break
        error = error_frame(frame)
        if error is not None and matches(error):
            return
    raise AssertionError(f"no answer to {what} within {REPLY_TIMEOUT} s")


def oversized(size: int, needle: str, *, binary: bool) -> Probe:
    """An over-limit message: its too_large frame names its size, which nothing else sends."""

    def probe(ws: ClientConnection) -> None:
        send(ws, b"\x00" * size if binary else "x" * size)
        read_until(
            ws,
            lambda error: error["code"] == "too_large" and needle in error["reason"],
            f"a {size}-byte sentinel",
        )

    return probe


def unknown_type(ws: ClientConnection) -> None:
    """A message of a type nobody sends: its error frame quotes the type back."""
    sentinel = f"fuzz-sentinel-{uuid.uuid4().hex}"
    send(ws, json.dumps({"type": sentinel}))
    read_until(ws, lambda error: sentinel in error["reason"], "an unknown-type sentinel")


def pong_back(ws: ClientConnection) -> bool:
    """A WebSocket ping answered: True; False as soon as the socket is closed (or no pong came
    within REPLY_TIMEOUT)."""
    try:
        pong = ws.ping()
    except ConnectionClosed:
        return False
    deadline = time.monotonic() + REPLY_TIMEOUT
    while time.monotonic() < deadline:
        if pong.wait(0.02):
            return True
        if ws.protocol.state is not State.OPEN:
            return False
    return False


def ping(ws: ClientConnection) -> None:
    """A WebSocket ping; whatever the gateway sends meanwhile must be JSON objects."""
    if not pong_back(ws):
        code, reason = ws.close_code, ws.close_reason
        raise GatewayClosedError(f"no pong: the gateway closed the socket ({code} {reason})")
    while True:
        try:
            error_frame(recv(ws, 0.01))
        except TimeoutError:
            return


def text_ping(ws: ClientConnection) -> None:
    """The video consumers' keepalive: "ping" text, "pong" back (binary packets may come too)."""
    send(ws, "ping")
    deadline = time.monotonic() + REPLY_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = recv(ws, left)
        except TimeoutError:
            break
        if frame == "pong":
            return
        if isinstance(frame, str):
            error_frame(frame)
    raise AssertionError("no pong")


# --- messages -----------------------------------------------------------------------------------


# An object whose "type" is not a string: mostly an object or a list, which are unhashable (a
# `type in {...}` on one raises TypeError), else any JSON value.
ODD_TYPES = st.builds(
    lambda kind, rest: {**rest, "type": kind},
    st.lists(SCALARS, max_size=2)
    | st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)
    | JSON,
    st.dictionaries(st.text(max_size=8), JSON, max_size=3),
)


def messages(*near_valid: st.SearchStrategy[Frame]) -> st.SearchStrategy[list[Frame]]:
    """One to four messages: mostly near-valid ones, some with an odd type, some garbage."""
    odd = encoded(ODD_TYPES)
    one = st.one_of(*near_valid, *near_valid, odd, odd, garbage())
    return st.lists(one, min_size=1, max_size=4)


SUMMARY = st.fixed_dictionaries(
    {
        "total_people": st.integers(-5, 10**6),
        "free": st.lists(st.text(max_size=10), max_size=4),
        "occupied": st.lists(st.text(max_size=10), max_size=4),
    }
)
SEGMENT = st.fixed_dictionaries(
    {
        "index": st.integers(-1, 5),
        "name": st.text(max_size=10),
        "capacity": st.integers(-1, 10),
        "count": st.integers(-1, 10),
        "status": st.sampled_from(["free", "occupied", "unknown"]),
    }
)
TIMESTAMPS = (
    st.floats(0, 4e9)
    | st.integers(-1, 4 * 10**10)
    | st.sampled_from(
        [
            "2024-11-16T10:00:00Z",
            "2024-11-16",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "yesterday",
        ]
    )
)
FRAME_RESULT = st.fixed_dictionaries(
    {
        "event": st.just("frame_result") | st.text(max_size=12),
        "camera": st.sampled_from(["Flint_1", "SU_3", "Nowhere_9", ""]) | st.text(max_size=20),
        "timestamp": TIMESTAMPS,
        "summary": mutated(SUMMARY),
        "segments": st.lists(mutated(SEGMENT), max_size=3),
    }
)
# What a logger sends on its control socket, one strategy per message kind.
LOGGER_STATUS = st.fixed_dictionaries(
    {
        "type": st.just("status"),
        "running": st.booleans(),
        "offline": st.booleans(),
        "buffered": st.integers(0, 10**6) | st.sampled_from([-1, 1e30, "12"]),
    }
)
LOGGER_ACK = st.fixed_dictionaries(
    {
        "type": st.just("ack"),
        "command_id": st.text(max_size=8),
        "error": st.none() | st.text(max_size=20),
        "running": st.booleans(),
        "buffered": st.integers(0, 10**6),
    }
)
LOGGER_LOG = st.fixed_dictionaries(
    {
        "type": st.just("log"),
        "message": st.text(max_size=200),
        "log_type": st.sampled_from(["info", "success", "warning", "error", "debug"]),
    }
)
AXES = st.fixed_dictionaries({axis: st.floats() | st.integers() for axis in "xyz"})
IMU = st.fixed_dictionaries(
    {
        "type": st.just("imu_data"),
        "timestamp": st.integers(0, 2**63),
        "accelerometer": mutated(AXES),
        "gyroscope": mutated(AXES),
    }
)
ANALYSIS = st.fixed_dictionaries(
    {"type": st.just("analysis_mode"), "data": st.sampled_from(["yolo", "none", "YOLO", "x"])}
)
CSV = st.sampled_from(["a,b\n1,2\n", "t,x\r\n", "<html>", "a,\x00", '"a,b\n']) | st.text(
    max_size=120
)
FILE_NAMES = st.sampled_from(["log.csv", "../../etc/passwd", "", "a" * 300]) | st.text(max_size=20)


@st.composite
def phone_uploads(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A phone's CSV file: whole, or started, chunked (in order or not) and completed."""
    name = draw(FILE_NAMES)
    if draw(st.booleans()):
        return [{"type": "file_upload", "fileName": name, "fileContent": draw(CSV)}]
    chunks = draw(st.lists(CSV, max_size=3))
    indexes = draw(st.permutations(range(len(chunks))) | st.just(list(range(len(chunks)))))
    upload: list[dict[str, Any]] = [{"type": "file_upload_start", "fileName": name}]
    upload += [
        {"type": "file_upload_chunk", "fileName": name, "chunkIndex": index, "chunk": chunks[index]}
        for index in indexes
    ]
    return [*upload, {"type": "file_upload_complete", "fileName": name}]


def phone_frames() -> st.SearchStrategy[bytes]:
    """8-byte big-endian ns timestamp, then a JPEG: whole, cut, or with a byte changed."""

    @st.composite
    def frame(draw: st.DrawFn) -> bytes:
        stamp = draw(st.binary(min_size=8, max_size=8) | st.binary(max_size=7))
        jpeg = bytearray(JPEG)
        action = draw(st.sampled_from(["whole", "cut", "flip", "random"]))
        if action == "cut":
            jpeg = jpeg[: draw(st.integers(0, len(JPEG)))]
        elif action == "flip":
            at = draw(st.integers(0, len(JPEG) - 1))
            jpeg[at] = draw(st.integers(0, 255))
        elif action == "random":
            jpeg = bytearray(draw(st.binary(max_size=300)))
        return stamp + bytes(jpeg)

    return frame()


COMMANDS = ["joystick", "movement", "rotation", "camera", "flightmode"]
VIEWER_COMMAND = st.fixed_dictionaries(
    {
        "type": st.sampled_from(COMMANDS) | st.text(max_size=10),
        "device": st.sampled_from([PRODUCER, "other-phone", "bad device!", ""]),
        "data": JSON,
    }
)


def each(items: st.SearchStrategy[list[dict[str, Any]]]) -> st.SearchStrategy[list[Frame]]:
    return items.map(lambda found: [json.dumps(item) for item in found])


@dataclass(frozen=True)
class Endpoint:
    route: str  # the route, as the gateway's metrics label it
    path: str  # what the client connects to
    messages: st.SearchStrategy[list[Frame]]
    probe: Probe
    weight: float = 1.5  # its share of the budget: more for a protocol with more to check


IGNORED = messages(encoded(JSON))  # endpoints whose protocol ignores what clients send
ENDPOINTS = [
    Endpoint(
        "/model/ws/connect",
        "/model/ws/connect",
        messages(near(FRAME_RESULT)),
        oversized(MAX_MESSAGE + 1, f"message is {MAX_MESSAGE + 1} bytes", binary=False),
        RICH,
    ),
    Endpoint("/client/ws/connect", "/client/ws/connect", IGNORED, ping),
    Endpoint("/ws", "/ws", IGNORED, ping),
    Endpoint(
        "/telemetry/control/ws",
        f"/telemetry/control/ws?vin={PRODUCER}",
        messages(near(LOGGER_STATUS), near(LOGGER_ACK), near(LOGGER_LOG)),
        unknown_type,
        RICH,
    ),
    Endpoint(
        "/ws/phone",
        f"/ws/phone?device={PRODUCER}",
        st.one_of(
            *[messages(near(IMU), near(ANALYSIS), phone_frames(), near(VIEWER_COMMAND))] * 2,
            st.lists(each(phone_uploads()), min_size=1, max_size=2).map(
                lambda uploads: [message for upload in uploads for message in upload]
            ),
        ),
        unknown_type,
        RICH,
    ),
    Endpoint(
        "/ws/video",
        f"/ws/video?device={PRODUCER}",
        messages(video_packets(), video_streams(), encoded(JSON)),
        oversized(MAX_VIDEO + 1, f"message is {MAX_VIDEO + 1} bytes", binary=True),
        2.5,
    ),
    Endpoint(
        "/ws/video/consume",
        f"/ws/video/consume?device={CONSUMER_DEVICE}",
        messages(st.just("ping"), encoded(JSON)),
        text_ping,  # replies may be binary here (its video packets) ...
    ),
    Endpoint(
        "/ws/video/frames",
        f"/ws/video/frames?device={CONSUMER_DEVICE}&timing=1",
        messages(st.just("ping"), encoded(JSON)),
        text_ping,  # ... and here (the relay's JPEGs)
    ),
    Endpoint(
        "/ws/viewer",
        "/ws/viewer",
        messages(near(VIEWER_COMMAND)),
        unknown_type,
        RICH,
    ),
]
# /ws/ingest/{request_id} is not here: it serves only a request that the ingestion service
# says belongs to the caller, and that service is not running (conftest.py). Its handshake is
# fuzzed below, where it answers the documented `unavailable` frame and closes.


def session(stack: FuzzStack, endpoint: Endpoint, sent: list[Frame]) -> None:
    """One connection: the messages, then the probe; every frame read on the way is checked.
    A failure names the unhandled exception the gateway logged meanwhile, if it did."""
    try:
        exchange(stack, endpoint, sent)
    except AssertionError as failure:
        crashes = stack.watch.new_crashes()
        if crashes:
            raise AssertionError(f"{failure}: {crashes[0]}") from None
        raise


def exchange(stack: FuzzStack, endpoint: Endpoint, sent: list[Frame]) -> None:
    with connect(
        stack.ws_url + endpoint.path,
        additional_headers={"Authorization": f"Bearer {stack.all_scopes}"},
        open_timeout=REPLY_TIMEOUT,
        close_timeout=REPLY_TIMEOUT,
        compression=None,
        max_size=None,
    ) as ws:
        for message in sent:
            send(ws, message)
        endpoint.probe(ws)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[endpoint.route for endpoint in ENDPOINTS])
def test_websocket_endpoint_answers_garbage_and_stays_open(
    endpoint: Endpoint, fuzz_stack: FuzzStack
) -> None:
    record = tally(f"ws {endpoint.route}", weight=endpoint.weight)
    watch = fuzz_stack.watch
    watch.new_crashes()  # only what this run causes
    before = watch.baseline(endpoint.route)

    @fuzz_settings(record.target, endpoint.weight)
    @given(endpoint.messages)
    def run(sent: list[Frame]) -> None:
        with record.case(sent):
            session(fuzz_stack, endpoint, sent)

    def settled() -> None:
        watch.assert_settled(endpoint.route, before)
        watch.assert_no_crash()

    record.run(run, after=settled)


# --- handshakes ---------------------------------------------------------------------------------

PARAMETERS = {
    "/ws/phone": "device",
    "/ws/video": "device",
    "/ws/video/consume": "device",
    "/ws/video/frames": "device",
    "/telemetry/control/ws": "vin",
}
SCOPES = {
    "/model/ws/connect": "occupancy:publish",
    "/client/ws/connect": "occupancy:subscribe",
    "/ws": "telemetry:subscribe",
    "/telemetry/control/ws": "telemetry:publish",
    "/ws/phone": "video:publish",
    "/ws/video": "video:publish",
    "/ws/video/consume": "video:subscribe",
    "/ws/video/frames": "video:subscribe",
    "/ws/viewer": "video:subscribe",
    "/ws/ingest/{request_id}": "ingest:read",
}


@dataclass(frozen=True)
class Handshake:
    route: str
    value: str | None  # the route's parameter (device, vin, request id), None: left out
    credential: str  # "all", "none", "scope-less" or "fuzzed"
    fuzzed: FuzzToken | None
    in_query: bool


@st.composite
def handshakes(draw: st.DrawFn) -> Handshake:
    route = draw(st.sampled_from(sorted(SCOPES)))
    value = draw(
        st.none()
        | st.sampled_from([PRODUCER, "phone", "5YJ3E1EA1KF000001", REQUEST_ID, "", "../x"])
        | st.text(max_size=70)
    )
    if route == "/ws/ingest/{request_id}" and value is None:
        value = REQUEST_ID
    credential = draw(st.sampled_from(["all", "none", "scope-less", "fuzzed", "fuzzed"]))
    fuzzed = draw(jwt_tokens(secret=TEST_SECRET)) if credential == "fuzzed" else None
    return Handshake(route, value, credential, fuzzed, draw(st.booleans()))


def in_query(shake: Handshake, credential: str) -> bool:
    """Whether the token goes in `?token=`: as drawn, and always when it is no valid header
    value (the client library refuses to send those)."""
    return shake.in_query or not (credential.isascii() and credential.isprintable())


def handshake_url(stack: FuzzStack, shake: Handshake, credential: str | None) -> str:
    query: dict[str, str] = {}
    path = shake.route
    if shake.route == "/ws/ingest/{request_id}":
        path = path.replace("{request_id}", quote(shake.value or "", safe=""))
    elif shake.value is not None and shake.route in PARAMETERS:
        query[PARAMETERS[shake.route]] = shake.value
    if credential is not None and in_query(shake, credential):
        query["token"] = credential
    encoded_query = "&".join(f"{key}={quote(value, safe='')}" for key, value in query.items())
    return stack.ws_url + path + (f"?{encoded_query}" if encoded_query else "")


def check_handshake(stack: FuzzStack, shake: Handshake, record: Tally) -> None:
    credential = {
        "all": stack.all_scopes,
        "none": None,
        "scope-less": token(),
        "fuzzed": shake.fuzzed.text if shake.fuzzed else None,
    }[shake.credential]
    headers = {}
    if credential is not None and not in_query(shake, credential):
        headers["Authorization"] = f"Bearer {credential}"
    # Who may be let in at all: the token with every scope, or a validly signed fuzzed token,
    # whose scope is occupancy:subscribe, where that scope is enough.
    may_enter = shake.credential == "all" or (
        shake.fuzzed is not None
        and shake.fuzzed.signed
        and SCOPES[shake.route] == "occupancy:subscribe"
    )
    try:
        ws = connect(
            handshake_url(stack, shake, credential),
            additional_headers=headers,
            open_timeout=REPLY_TIMEOUT,
            close_timeout=REPLY_TIMEOUT,
            compression=None,
        )
    except InvalidStatus as refused:
        status = refused.response.status_code
        record.note(f"{shake.route} refused {status}")
        assert 400 <= status < 500, f"the handshake was answered {status}"
        if status in (401, 403) and refused.response.body:
            body = json.loads(refused.response.body)
            assert body.get("type") == "error", body
        return
    with ws:
        assert may_enter, f"{shake.credential} credentials were let into {shake.route}"
        if pong_back(ws):
            record.note(f"{shake.route} open")
            return
        # Closed by the gateway: only after an error frame, with the policy code.
        frames = []
        while True:
            try:
                frames.append(ws.recv(timeout=REPLY_TIMEOUT))
            except (ConnectionClosed, TimeoutError):
                break
        errors = [error for error in map(error_frame, frames) if error is not None]
        assert errors, f"{shake.route}: closed without an error frame"
        code = ws.close_code
        record.note(f"{shake.route} closed {code} after {errors[-1]['code']}")
        if code == 1011:  # the documented answer while a service it must ask is unavailable
            assert errors[-1]["code"] == "unavailable", errors[-1]
            return
        assert code == 1008, f"{shake.route}: closed with {code} {ws.close_reason}"


def test_websocket_handshakes_with_fuzzed_parameters_and_tokens(fuzz_stack: FuzzStack) -> None:
    record: Tally = tally("ws handshakes", weight=3.0)
    watch = fuzz_stack.watch
    watch.new_crashes()

    @fuzz_settings(record.target, 3.0)
    @given(handshakes())
    def run(shake: Handshake) -> None:
        with record.case(shake):
            check_handshake(fuzz_stack, shake, record)

    record.run(run, after=watch.assert_no_crash)
