"""What each byte parser may do with any input, as functions both fuzz engines call (Hypothesis
in test_parsers.py, atheris in atheris_targets.py): run the parser, let only its documented
exception through as a refusal, and check what it accepted. Anything else propagates: an
unexpected exception, or an AssertionError naming the broken property.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.requests import Request

from edgeway.common.telemetry.predictor import PREDICTOR_VERSION, Packet
from edgeway.common.telemetry.wire import (
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    WireError,
    encode_batch,
    parse_upload,
)
from edgeway.common.video.packets import MAX_PACKET_BYTES, PacketParser, PacketType
from edgeway.gateway.auth import AuthError, Principal, Verifier
from edgeway.gateway.ingest.multipart import FormError, ParsedForm, UploadLimits, read_form
from edgeway.gateway.settings import GatewaySettings
from edgeway.gateway.video.consumers import parse_gop

RANGES = {
    "odometer": (0.0, 2_000_000.0),
    "speed": (0.0, 300.0),
    "battery": (0.0, 100.0),
    "power": (-1000.0, 1500.0),
}
TOKEN_SECRET = "parser-fuzz-secret-that-is-long-enough-for-hs256"


# --- telemetry uploads --------------------------------------------------------------------------


def upload(body: bytes, *, compressed: bool, batch: bool) -> None:
    """`parse_upload`: in-range packets that survive re-encoding, or WireError with a reason."""
    try:
        packets = parse_upload(body, compressed=compressed, batch=batch)
    except WireError as error:
        refused = error
    else:
        check_packets(packets, compressed=compressed)
        return
    assert refused.reason, "a WireError without a reason"
    assert str(refused) == refused.reason


def check_packets(packets: list[Packet], *, compressed: bool) -> None:
    assert packets, "parse_upload accepted an upload without a record"
    for packet in packets:
        assert MIN_TIMESTAMP_MS <= packet.timestamp_ms < MAX_TIMESTAMP_MS, packet
        for name, (low, high) in RANGES.items():
            value = getattr(packet, name)
            if value is not None:
                assert math.isfinite(value), (name, packet)
                assert low <= value <= high, (name, packet)
        assert packet.heading is None or 0 <= packet.heading < 360, packet
        assert packet.sequence is None or packet.sequence >= 1, packet
        assert packet.predictor_version in (None, PREDICTOR_VERSION), packet
        if not compressed:
            assert packet.is_resync, packet
    # What was accepted is accepted again, unchanged, once re-encoded: the gateway forwards the
    # body and the telemetry service parses it again; both must read the same packets.
    assert parse_upload(encode_batch(packets), compressed=True, batch=True) == packets


# --- H.264 --------------------------------------------------------------------------------------


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def _parse(stream: bytes, cuts: list[int], *, in_sync: bool) -> tuple[Any, ...]:
    parser = PacketParser(in_sync=in_sync)
    packets = []
    for piece in _cut(stream, cuts):
        packets += parser.feed(piece)
    return packets, parser.corrupt, parser.buffered


def h264(stream: bytes, cuts: list[int], *, in_sync: bool) -> None:
    """`PacketParser`: never raises, and what it reads does not depend on where the stream
    was cut into messages (its documented property)."""
    whole = _parse(stream, [], in_sync=in_sync)
    pieces = _parse(stream, cuts, in_sync=in_sync)
    assert whole == pieces, "the packets depend on where the stream was cut"
    packets, _, buffered = whole
    assert buffered <= MAX_PACKET_BYTES
    for packet in packets:
        assert packet.type in PacketType
        assert packet.type is not PacketType.CONFIG


def gop(body: bytes) -> None:
    """`video.parse_gop` (the relay's GOP reply): packets and a sequence, or ValueError."""
    try:
        packets, last_seq = parse_gop(body)
    except ValueError:
        return
    assert last_seq >= 0
    assert all(packet.kind in ("sps", "pps", "keyframe", "frame") for packet in packets)


# --- multipart ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    content_type: str | None
    body: bytes
    declared_length: str | None  # the Content-Length header, if any (it may lie)


def _header(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


async def _read_form(
    form: Form, limits: UploadLimits, cuts: list[int], hang_up: int | None
) -> ParsedForm | FormError:
    """`read_form` on a real Starlette Request whose ASGI receive hands over the body in the
    given pieces (and a disconnect after `hang_up` of them, if set)."""
    headers = []
    if form.content_type is not None:
        headers.append((b"content-type", _header(form.content_type)))
    if form.declared_length is not None:
        headers.append((b"content-length", _header(form.declared_length)))
    chunks = _cut(form.body, cuts) or [b""]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    if hang_up is not None:  # the client leaves before the body is complete
        messages = messages[: hang_up % len(messages)]
    queue = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(queue, {"type": "http.disconnect"})

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/ingest/upload",
        "headers": headers,
        "query_string": b"",
    }
    try:
        return await read_form(Request(scope, receive), limits)
    except FormError as refused:
        return refused


def multipart(
    runner: asyncio.Runner,
    form: Form,
    limits: UploadLimits,
    cuts: list[int],
    hang_up: int | None = None,
) -> None:
    """`read_form`: a form within every limit, or FormError 400, 413 or 415 with a reason."""
    result = runner.run(_read_form(form, limits, cuts, hang_up))
    if isinstance(result, FormError):
        assert result.status in (400, 413, 415), result.status
        assert isinstance(result.reason, str)
        assert result.reason
        return
    assert hang_up is None, "a form whose client left before its end was accepted"
    assert len(result.files) <= limits.max_files
    assert all(0 < len(file.data) <= limits.max_file_bytes for file in result.files)
    assert len(result.fields) <= limits.max_fields
    assert all(len(value.encode()) <= limits.max_field_bytes for value in result.fields.values())
    assert {item.code for item in result.rejected} <= {"too_large", "batch_limit", "empty"}


# --- tokens -------------------------------------------------------------------------------------


def verifiers(folder: Path) -> dict[str, Verifier]:
    """Verifiers as the gateway builds them: shared secret, PEM public key, JWKS, secret+JWKS."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = folder / "public.pem"
    pem.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    keys = [
        {
            **jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True),
            "kid": "k1",
            "alg": "RS256",
        },
        {
            **jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True),
            "kid": "k2",
            "alg": "ES256",
        },
    ]
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    secret: Any = TOKEN_SECRET  # GatewaySettings takes a str for its SecretStr
    return {
        "secret": Verifier(GatewaySettings(jwt_secret=secret)),
        "pem": Verifier(GatewaySettings(jwt_public_key_file=pem)),
        "jwks": Verifier(GatewaySettings(jwks_file=jwks)),
        "secret+jwks": Verifier(GatewaySettings(jwt_secret=secret, jwks_file=jwks)),
    }


def token(verifier: Verifier, text: str, *, signed: bool, has_secret: bool) -> None:
    """`Verifier.verify`: a Principal only for a token signed with a configured key (the
    anonymous one for no token at all), AuthError 401 for anything else."""
    try:
        principal = verifier.verify(text)
    except AuthError as error:
        refused = error
    else:
        check_principal(principal, text, signed=signed, has_secret=has_secret)
        return
    assert refused.status == 401, refused.status
    assert refused.reason.startswith("invalid token"), refused.reason


def check_principal(principal: Principal, text: str, *, signed: bool, has_secret: bool) -> None:
    if not text:
        assert principal.anonymous
        return
    assert signed, "a token that no configured key signed was accepted"
    assert has_secret, "an HMAC token was accepted without a shared secret"
    assert not principal.anonymous
    assert isinstance(principal.subject, str)
    assert all(isinstance(scope, str) for scope in principal.scopes)
