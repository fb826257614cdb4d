"""Hypothesis strategies for what reaches the gateway from outside: JSON, tokens, protobuf
uploads, H.264 streams and multipart forms, as garbage and as near-valid inputs (a valid message
with some of its parts broken), which reach further into a parser than random bytes do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import time
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from edgeway.common.telemetry import telemetry_pb2
from edgeway.common.telemetry.predictor import PREDICTOR_VERSION
from edgeway.common.telemetry.wire import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from edgeway.common.video.packets import MAX_PACKET_BYTES, PacketType, VideoPacket
from tests.fuzz.oracles import Form

# --- JSON ---------------------------------------------------------------------------------------

INT64 = (-(2**63), 2**63 - 1)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def json_text(value: Any) -> str:
    """JSON as a careless producer writes it (NaN and Infinity included: not JSON at all)."""
    return json.dumps(value, allow_nan=True)


@st.composite
def broken_json(draw: st.DrawFn, value: Any = None) -> str:
    """Valid JSON cut short, or with a few characters inserted or removed."""
    text = json_text(draw(JSON) if value is None else value)
    cut = draw(st.integers(0, len(text)))
    action = draw(st.sampled_from(["truncate", "insert", "delete"]))
    if action == "truncate":
        return text[:cut]
    if action == "insert":
        return (
            text[:cut]
            + draw(st.sampled_from(['"', "{", "}", "[", ",", ":", "\\", "\x00"]))
            + (text[cut:])
        )
    return text[:cut] + text[cut + 1 :]


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid object with some keys dropped, some values replaced by any JSON, and some keys
    added: near-valid, so that every check after the first few gets its turn."""
    message = dict(draw(valid))
    for key in list(message):
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "replace"]))
        if action == "drop":
            del message[key]
        elif action == "replace":
            message[key] = draw(JSON)
    message.update(draw(st.dictionaries(st.text(max_size=12), JSON, max_size=2)))
    return message


# A value of another JSON type than a field's (objects and lists are unhashable too).
WRONG_TYPES = st.sampled_from([None, [], {}, [1], {"a": 1}, 0, -1, 1.5, True, "", "x"])


@st.composite
def one_wrong(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid object with exactly one field of the wrong type: every check before that
    field's passes, so the one on it is what gets tested."""
    message = dict(draw(valid))
    if message:
        message[draw(st.sampled_from(sorted(message)))] = draw(WRONG_TYPES | JSON)
    return message


def near(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[str | bytes]:
    """Near-valid messages from a valid one: as is, with one field wrong, or mutated."""
    return encoded(valid) | encoded(one_wrong(valid)) | encoded(mutated(valid))


def encoded(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[str | bytes]:
    """JSON documents as text frames or as binary frames."""
    texts = objects.map(json_text)
    return texts | texts.map(lambda text: text.encode("utf-8", "surrogatepass"))


def garbage(max_size: int = 600) -> st.SearchStrategy[str | bytes]:
    return (
        st.text(max_size=max_size)
        | st.binary(max_size=max_size)
        | broken_json()
        | JSON.map(json_text)
        | st.sampled_from(["", "null", "[]", "{}", '""', "0", "ping", "pong", "\x00", "{" * 200])
    )


# --- JWT ----------------------------------------------------------------------------------------

# Claims are relative to this one instant, so that every run of a test draws the same way.
NOW = int(time.time())
HMAC_ALGORITHMS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
ALGORITHMS = [*HMAC_ALGORITHMS, "RS256", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class FuzzToken:
    text: str
    signed: bool  # signed with the test secret (its claims still may be anything)


def _claims(now: int, audience: str, issuer: str) -> st.SearchStrategy[dict[str, Any]]:
    valid = st.fixed_dictionaries(
        {
            "sub": st.just("fuzz"),
            "scope": st.just("occupancy:subscribe"),
            "aud": st.just(audience),
            "iss": st.just(issuer),
            "iat": st.just(now),
            "exp": st.just(now + 600),
        },
        optional={
            "nbf": st.integers(-600, 600).map(lambda offset: now + offset) | JSON,
            "device": st.text(max_size=10) | JSON,
            "vin": st.text(max_size=17) | JSON,
            "jti": JSON,
        },
    )
    return mutated(valid) | st.dictionaries(st.text(max_size=6), JSON, max_size=4)


def _header() -> st.SearchStrategy[Any]:
    algorithms = st.sampled_from([*ALGORITHMS, "none", "None", "", "HS1", "hs256"]) | JSON
    header = st.fixed_dictionaries(
        {"alg": algorithms},
        optional={
            "typ": st.just("JWT") | JSON,
            "kid": st.sampled_from(["k1", "k2", ""]) | JSON,
            "crit": JSON,
            "b64": JSON,
            "jku": st.just("http://127.0.0.1:9/keys") | JSON,
            "x5u": JSON,
        },
    )
    return mutated(header) | JSON


@st.composite
def _segment(draw: st.DrawFn, value: Any) -> str:
    """A token segment: `value` as base64url JSON, mostly; else random base64url or text."""
    how = draw(st.sampled_from(["json", "json", "json", "bytes", "text"]))
    if how == "json":
        return b64url(json_text(value).encode("utf-8", "surrogatepass"))
    if how == "bytes":
        return b64url(draw(st.binary(max_size=40)))
    return draw(st.text(max_size=40))


@st.composite
def jwt_tokens(
    draw: st.DrawFn, *, secret: str, audience: str = "edgeway", issuer: str = "edgeway"
) -> FuzzToken:
    """Tokens whose header is anything (what an attacker without the key controls), some signed
    with the test secret so that their claims are fuzzed as well."""
    shape = draw(st.sampled_from(["signed", "signed", "forged", "forged", "forged", "odd"]))
    now = NOW - draw(st.sampled_from([0, 0, 0, 3600]))  # some expired
    claims = draw(_claims(now, audience, issuer))
    if shape == "signed":  # only the claims and the header's other fields are fuzzed
        algorithm = draw(st.sampled_from(sorted(HMAC_ALGORITHMS)))
        header = {**draw(_header().filter(lambda h: isinstance(h, dict))), "alg": algorithm}
        head = b64url(json_text(header).encode("utf-8", "surrogatepass"))
        body = draw(_segment(claims))
        digest = hmac.new(
            secret.encode(), f"{head}.{body}".encode(), HMAC_ALGORITHMS[algorithm]
        ).digest()
        return FuzzToken(f"{head}.{body}.{b64url(digest)}", signed=True)
    head, body = draw(_segment(draw(_header()))), draw(_segment(claims))
    signature = draw(st.binary(max_size=64).map(b64url) | st.text(max_size=20))
    if shape == "forged":
        return FuzzToken(f"{head}.{body}.{signature}", signed=False)
    segments = draw(st.lists(st.sampled_from([head, body, signature]) | st.text(max_size=8)))
    return FuzzToken(".".join(segments) or draw(st.text(min_size=1)), signed=False)


# --- protobuf uploads ---------------------------------------------------------------------------

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from(
    [0.0, -0.0, 100.0, 100.00001, 300.0, 300.0001, -1000.0, 1500.0, 2_000_000.0, 3.4e38]
)
TIMESTAMPS = st.sampled_from(
    [0, -1, MIN_TIMESTAMP_MS - 1, MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS - 1, MAX_TIMESTAMP_MS]
) | st.integers(*INT64)
HEADINGS = st.integers(-(2**31), 2**31 - 1) | st.sampled_from([-1, 0, 359, 360, 361])


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def wire_fields(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Raw protobuf wire format: known and unknown field numbers, every wire type (the invalid
    ones too), lengths that lie, nested messages."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.integers(1, 10) | st.integers(0, 2**29))
        wire_type = draw(st.sampled_from([0, 0, 1, 2, 2, 5, 3, 4, 6, 7]))
        out += varint((number << 3) | wire_type)
        if wire_type == 0:
            out += varint(draw(st.integers(0, 2**64 - 1)))
        elif wire_type == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire_type == 2:
            payload = draw(wire_fields(depth + 1)) if depth < 2 and draw(st.booleans()) else b""
            payload = payload or draw(st.binary(max_size=20))
            declared = len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1, 1000]))
            out += varint(max(declared, 0)) + payload
    return bytes(out)


def _plain_records() -> st.SearchStrategy[telemetry_pb2.VehicleData]:
    return st.builds(
        telemetry_pb2.VehicleData,
        timestamp=TIMESTAMPS,
        vehicle_speed=FLOATS,
        battery_level=FLOATS,
        power_kw=FLOATS,
        odometer=FLOATS,
        heading=HEADINGS,
        sequence=st.none() | st.integers(0, 2**64 - 1),
    )


def _compressed_records() -> st.SearchStrategy[telemetry_pb2.CompressedVehicleData]:
    optional_float = st.none() | FLOATS
    return st.builds(
        telemetry_pb2.CompressedVehicleData,
        timestamp=TIMESTAMPS,
        vehicle_speed=optional_float,
        battery_level=optional_float,
        power_kw=optional_float,
        odometer=FLOATS,
        heading=st.none() | HEADINGS,
        is_resync=st.booleans(),
        sequence=st.none() | st.integers(0, 2**64 - 1),
        predictor_version=st.none() | st.just(PREDICTOR_VERSION) | st.integers(0, 2**32 - 1),
    )


@st.composite
def upload_bodies(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    """(body, compressed, batch): protobuf messages with any values, their serialization
    mutated, raw wire format, or bytes."""
    compressed, batch = draw(st.booleans()), draw(st.booleans())
    kind = draw(st.sampled_from(["message", "message", "mutated", "wire", "bytes"]))
    if kind in ("message", "mutated"):
        records: st.SearchStrategy[Any] = _compressed_records() if compressed else _plain_records()
        message: Any = draw(records)
        if batch:
            container: Any = (
                telemetry_pb2.CompressedBatch if compressed else telemetry_pb2.TelemetryBatch
            )
            message = container(
                records=draw(st.lists(records, max_size=5)), device_id=draw(st.text(max_size=8))
            )
        body: bytes = message.SerializeToString()
        if kind == "mutated" and body:
            position = draw(st.integers(0, len(body) - 1))
            action = draw(st.sampled_from(["flip", "truncate", "append"]))
            if action == "flip":
                flipped = body[position] ^ (1 << draw(st.integers(0, 7)))
                body = body[:position] + bytes([flipped]) + body[position + 1 :]
            elif action == "truncate":
                body = body[:position]
            else:
                body += draw(wire_fields())
        return body, compressed, batch
    if kind == "wire":
        return draw(wire_fields()), compressed, batch
    return draw(st.binary(max_size=300)), compressed, batch


# --- H.264 packets ------------------------------------------------------------------------------

START_CODE = b"\x00\x00\x00\x01"


@st.composite
def video_packets(draw: st.DrawFn) -> bytes:
    """One packet in the Android wire form, valid or with a header field broken."""
    packet_type = draw(st.sampled_from(list(PacketType)))
    payload = START_CODE + draw(st.binary(max_size=60))
    flags = draw(st.integers(0, 2**32 - 1)) if packet_type >= PacketType.KEYFRAME else 0
    data = bytearray(
        VideoPacket(packet_type, draw(st.integers(0, 2**64 - 1)), payload, flags).encode()
    )
    broken = draw(st.sampled_from(["none", "none", "none", "size", "type", "data_size", "cut"]))
    if broken == "size":
        size = draw(
            st.sampled_from([0, 12, 13, 20, 21, MAX_PACKET_BYTES, MAX_PACKET_BYTES + 1, 2**32 - 1])
            | st.integers(0, 2**32 - 1)
        )
        data[0:4] = struct.pack(">I", size)
    elif broken == "type":
        data[4] = draw(st.integers(0, 255))
    elif broken == "data_size" and len(data) >= 21:
        data[13:17] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    elif broken == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def video_streams() -> st.SearchStrategy[bytes]:
    """Packets and garbage, concatenated as a phone's socket carries them."""
    piece = video_packets() | video_packets() | st.binary(max_size=40)
    return st.lists(piece, max_size=8).map(b"".join)


# --- multipart forms ----------------------------------------------------------------------------

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?"
NAMES = st.sampled_from(["camera_id", "meta", "files", "file", ""]) | st.text(max_size=12)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _part(draw: st.DrawFn) -> bytes:
    disposition = draw(st.sampled_from(["form-data", "form-data", "attachment", "", "FORM-DATA"]))
    params = []
    if draw(st.integers(0, 9)):
        name = draw(NAMES)
        params.append(f"name={_quoted(name) if draw(st.booleans()) else name}")
    if draw(st.booleans()):
        filename = draw(st.text(max_size=16) | st.sampled_from(["a.jpg", "C:\\x\\y.png", ""]))
        params.append(f"filename={_quoted(filename)}")
    if draw(st.integers(0, 9)) == 0:
        params.append("filename*=UTF-8''%E2%82%AC.txt")
    lines = [f"Content-Disposition: {'; '.join([disposition, *params])}"]
    if draw(st.booleans()):
        lines.append(
            "Content-Type: " + draw(st.sampled_from(["image/jpeg", "text/plain", ""]) | st.text())
        )
    if draw(st.integers(0, 5)) == 0:
        encoding = draw(st.sampled_from(["binary", "8bit", "base64", "quoted-printable", "X"]))
        lines.append(f"Content-Transfer-Encoding: {encoding}")
    if draw(st.integers(0, 5)) == 0:
        lines.append(draw(st.text(max_size=30)))
    newline = "\r\n" if draw(st.integers(0, 9)) else "\n"
    head = newline.join(lines).encode("utf-8", "surrogatepass")
    data = draw(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
    return head + b"\r\n\r\n" + data


@st.composite
def multipart_forms(draw: st.DrawFn) -> Form:
    boundary = draw(
        st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=80)
        | st.sampled_from(["edgeway", "a" * 70, "a" * 71, "--", "x y"])
    )
    parts = draw(st.lists(_part(), max_size=6))
    delimiter = b"--" + boundary.encode()
    body = draw(st.sampled_from([b"", b"preamble\r\n"]))
    for part in parts:
        body += delimiter + b"\r\n" + part + b"\r\n"
    ending = draw(st.sampled_from(["close", "close", "none", "epilogue", "other"]))
    if ending == "close":
        body += delimiter + b"--\r\n"
    elif ending == "epilogue":
        body += delimiter + b"--\r\nepilogue" + draw(st.binary(max_size=20))
    elif ending == "other":
        body += b"--" + draw(st.binary(max_size=10)) + b"--\r\n"
    if body and draw(st.integers(0, 4)) == 0:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=8)) + body[cut + draw(st.integers(0, 4)) :]
    shown = _quoted(boundary) if draw(st.booleans()) else boundary
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={shown}",
                f"Multipart/Form-Data; charset=utf-8; boundary={shown}",
                "multipart/form-data",
                "multipart/form-data; boundary=",
                "application/json",
            ]
        )
        | st.none()
        | st.text(max_size=40)
    )
    declared = draw(
        st.sampled_from(["exact", "exact", "none", "more", "less", "text"]).map(
            lambda how: {
                "exact": str(len(body)),
                "none": None,
                "more": str(len(body) + 100),
                "less": str(max(len(body) - 1, 0)),
                "text": "ten",
            }[how]
        )
    )
    return Form(content_type, body, declared)
