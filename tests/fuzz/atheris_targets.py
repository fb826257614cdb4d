"""Coverage-guided fuzzing of the byte parsers with atheris (libFuzzer), for `make fuzz`.

    python -m tests.fuzz.atheris_targets TARGET [libFuzzer options] [corpus directory]

TARGET is one of `TARGETS`. Each harness cuts the fuzzer's bytes into a parser's inputs with a
simple framing (below) and calls the same oracle as the Hypothesis tests (oracles.py): the
parser's documented exception is a refusal, anything else (another exception, a broken
property) is a crash that libFuzzer reports, with the input saved under -artifact_prefix.
An empty corpus directory is first given the target's seeds (valid inputs to mutate), and the
JWT target a dictionary of JSON tokens (jwt.dict): libFuzzer gets no comparison feedback from
the C JSON decoder, so it would not find `{"alg": 1}` on its own. `atheris_run.py` runs them all.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # no stubs in the dev group

with atheris.instrument_imports(include=["edgeway"]):
    from edgeway.common.telemetry.predictor import PREDICTOR_VERSION, Packet, Sample
    from edgeway.common.telemetry.wire import encode_batch, encode_packet, encode_sample
    from edgeway.common.video.packets import PacketType, VideoPacket
    from edgeway.gateway.ingest.multipart import UploadLimits
    from tests.fuzz import oracles
    from tests.fuzz.strategies import b64url

MULTIPART_TYPES = [
    "multipart/form-data; boundary=fuzz",
    'multipart/form-data; boundary="fuzz"',
    "multipart/form-data",
    "text/plain",
]
MULTIPART_LIMITS = UploadLimits(
    max_body_bytes=4096,
    max_file_bytes=256,
    max_files=2,
    max_field_bytes=128,
    max_fields=3,
    max_parts=6,
)
DICTIONARY = Path(__file__).with_name("jwt.dict")


def _cuts(raw: bytes) -> tuple[list[int], bytes]:
    """Framing: a count byte (0-4), that many big-endian u16 cut positions, then the data."""
    if not raw:
        return [], b""
    field = raw[1 : 1 + 2 * (raw[0] % 5)]
    field = field[: len(field) // 2 * 2]  # a short input: the whole cuts it has
    cuts = [value for (value,) in struct.iter_unpack(">H", field)]
    return cuts, raw[1 + len(field) :]


# upload: flags byte (bit 0 compressed, bit 1 batch), then the body.
def upload(raw: bytes) -> None:
    flags = raw[0] if raw else 0
    oracles.upload(raw[1:], compressed=bool(flags & 1), batch=bool(flags & 2))


# h264: flags byte (bit 0 in sync), then cuts, then the stream.
def h264(raw: bytes) -> None:
    flags = raw[0] if raw else 0
    cuts, stream = _cuts(raw[1:])
    oracles.h264(stream, cuts, in_sync=bool(flags & 1))


def gop(raw: bytes) -> None:
    oracles.gop(raw)


# multipart: content-type byte, hang-up byte (255: none, else after that many pieces), cuts,
# then the body.
def multipart() -> Callable[[bytes], None]:
    runner = asyncio.Runner()

    def one(raw: bytes) -> None:
        head, rest = raw[:2].ljust(2, b"\xff"), raw[2:]
        content_type = MULTIPART_TYPES[head[0] % len(MULTIPART_TYPES)]
        hang_up = None if head[1] == 0xFF else head[1] % 9
        cuts, body = _cuts(rest)
        form = oracles.Form(content_type, body, str(len(body)))
        oracles.multipart(runner, form, MULTIPART_LIMITS, cuts, hang_up)

    return one


# jwt: mode byte; even: the rest is the token's text; odd: header, claims and signature,
# separated by NUL bytes, each base64url-encoded into a token.
def tokens() -> Callable[[bytes], None]:
    verifiers = oracles.verifiers(Path(tempfile.mkdtemp(prefix="edgeway-fuzz-keys-")))

    def one(raw: bytes) -> None:
        mode, rest = (raw[0], raw[1:]) if raw else (0, b"")
        if mode & 1:
            text = ".".join(b64url(part) for part in rest.split(b"\x00", 2))
        else:
            text = rest.decode("utf-8", "replace")
        for name, verifier in verifiers.items():
            # Nothing here is signed with a configured key: no token may pass.
            oracles.token(verifier, text, signed=False, has_secret="secret" in name)

    return one


def _packet(index: int) -> Packet:
    return Packet(1_731_790_000_000 + index, 1.5, 60.0, 80.0, -10.0, 90, True, index + 1, None)


def seeds(target: str) -> list[bytes]:
    """Valid inputs in each harness's framing, for libFuzzer to mutate."""
    stream = b"".join(
        VideoPacket(kind, 1000 * i, b"\x00\x00\x00\x01" + bytes([i]) * 8, 1).encode()
        for i, kind in enumerate([PacketType.SPS, PacketType.PPS, PacketType.KEYFRAME])
    )
    form = (
        b'--fuzz\r\nContent-Disposition: form-data; name="camera_id"\r\n\r\ncam-1\r\n'
        b'--fuzz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0data\r\n--fuzz--\r\n"
    )
    header, claims = b'{"alg":"HS256","typ":"JWT","kid":"k1"}', b'{"sub":"x","exp":1}'
    return {
        "upload": [
            b"\x01" + encode_packet(_packet(0)),
            b"\x01" + encode_packet(replace(_packet(0), predictor_version=PREDICTOR_VERSION)),
            b"\x03" + encode_batch([_packet(i) for i in range(3)]),
            b"\x00" + encode_sample(Sample(1_731_790_000_000, 65.5, 79.25, -12.75, 15_234.5, 271)),
        ],
        "h264": [b"\x01\x00" + stream, b"\x00\x02\x00\x05\x00\x20" + stream],
        "gop": [b"\x00" * 7 + b"\x03" + stream],
        "multipart": [b"\x00\xff\x00" + form, b"\x01\x02\x01\x00\x30" + form],
        "jwt": [b"\x01" + header + b"\x00" + claims + b"\x00sig", b"\x00a.b.c"],
    }[target]


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "upload": lambda: upload,
    "h264": lambda: h264,
    "gop": lambda: gop,
    "multipart": multipart,
    "jwt": tokens,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.atheris_targets {{{','.join(TARGETS)}}} [options]")
    name, options = sys.argv[1], sys.argv[2:]
    corpus = next((Path(arg) for arg in options if not arg.startswith("-")), None)
    if corpus is not None and corpus.is_dir() and not any(corpus.iterdir()):
        for index, seed in enumerate(seeds(name)):
            (corpus / f"seed-{index}").write_bytes(seed)
    if name == "jwt":
        options = [f"-dict={DICTIONARY}", *options]
    atheris.Setup([sys.argv[0], *options], TARGETS[name]())
    atheris.Fuzz()


if __name__ == "__main__":
    main()
