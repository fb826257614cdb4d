"""The parsers that take bytes from outside, fuzzed directly: each may only refuse with its
documented exception, never IndexError, KeyError, TypeError, UnicodeError and the like
(the properties are in oracles.py, shared with the atheris harnesses):

- telemetry uploads (`wire.parse_upload`): in-range packets, or WireError;
- the Android H.264 packet stream (`PacketParser`): never raises, and its output does not depend
  on where the stream was cut; the relay's GOP reply (`video.parse_gop`): ValueError only;
- multipart forms (`multipart.read_form`, on a real Starlette Request fed by an ASGI receive
  channel, with random limits): a form within its limits, or FormError (400, 413, 415);
- tokens (`auth.Verifier`, with a shared secret, a PEM key, a JWKS, or a secret and a JWKS):
  a Principal only for a token signed with a configured key, AuthError (401) otherwise.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeway.gateway.auth import Verifier
from edgeway.gateway.ingest.multipart import UploadLimits
from tests.fuzz import oracles
from tests.fuzz.harness import fuzz_settings, tally
from tests.fuzz.oracles import Form
from tests.fuzz.strategies import (
    FuzzToken,
    jwt_tokens,
    multipart_forms,
    upload_bodies,
    video_streams,
)

pytestmark = pytest.mark.fuzz

WEIGHT = 10.0  # a parser case costs microseconds: ten times the base budget
CUTS = st.lists(st.integers(0, 10_000), max_size=6)
LIMITS = st.builds(
    UploadLimits,
    max_body_bytes=st.integers(1, 3000),
    max_file_bytes=st.integers(1, 300),
    max_files=st.integers(0, 3),
    max_field_bytes=st.integers(1, 200),
    max_fields=st.integers(0, 3),
    max_parts=st.integers(1, 6),
)


def test_protobuf_uploads_parse_or_raise_wire_error() -> None:
    record = tally("parser protobuf wire.parse_upload", weight=WEIGHT)

    @fuzz_settings(record.target, WEIGHT)
    @given(upload_bodies())
    def run(upload: tuple[bytes, bool, bool]) -> None:
        body, compressed, batch = upload
        with record.case(upload):
            oracles.upload(body, compressed=compressed, batch=batch)

    record.run(run)


def test_h264_packet_parser_never_raises_and_ignores_how_the_stream_was_cut() -> None:
    record = tally("parser h264 PacketParser", weight=WEIGHT)

    @fuzz_settings(record.target, WEIGHT)
    @given(video_streams(), CUTS, st.booleans())
    def run(stream: bytes, cuts: list[int], in_sync: bool) -> None:
        with record.case((stream, cuts, in_sync)):
            oracles.h264(stream, cuts, in_sync=in_sync)

    record.run(run)


def test_gop_replies_parse_or_raise_value_error() -> None:
    record = tally("parser h264 video.parse_gop", weight=WEIGHT)

    @fuzz_settings(record.target, WEIGHT)
    @given(st.binary(max_size=8) | video_streams().map(lambda s: b"\x00" * 7 + b"\x05" + s))
    def run(body: bytes) -> None:
        with record.case(body):
            oracles.gop(body)

    record.run(run)


def test_multipart_forms_parse_within_limits_or_raise_form_error() -> None:
    record = tally("parser multipart read_form", weight=WEIGHT)

    @fuzz_settings(record.target, WEIGHT)
    @given(multipart_forms(), LIMITS, CUTS, st.none() | st.none() | st.integers(0, 10))
    def run(form: Form, limits: UploadLimits, cuts: list[int], hang_up: int | None) -> None:
        with record.case((form, limits, cuts, hang_up)):
            oracles.multipart(runner, form, limits, cuts, hang_up)

    with asyncio.Runner() as runner:
        record.run(run)


@pytest.fixture(scope="module")
def verifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Verifier]:
    return oracles.verifiers(tmp_path_factory.mktemp("keys"))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_tokens_verify_or_raise_auth_error(verifiers: dict[str, Verifier]) -> None:
    record = tally("parser jwt Verifier", weight=WEIGHT)

    @fuzz_settings(record.target, WEIGHT)
    @given(jwt_tokens(secret=oracles.TOKEN_SECRET), st.sampled_from(sorted(verifiers)))
    def run(token: FuzzToken, which: str) -> None:
        with record.case((token, which)):
            oracles.token(
                verifiers[which], token.text, signed=token.signed, has_secret="secret" in which
            )

    record.run(run)
