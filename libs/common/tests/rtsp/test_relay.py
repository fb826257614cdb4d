"""FFmpeg reaches cameras only through the relay: checked addresses, no redirects, no injection.

The attacks of the penetration test, each against a real TCP listener that records what it gets
(`edgeway.common.testing.listener`): a URL with CR/LF that wrote its own lines into the RTSP
request, a host name and a literal address on loopback that FFmpeg connected to, and an RTSP
redirect that FFmpeg followed to a second host. Then `RedirectGuard`, which splits the camera's
answers as FFmpeg does, on the ways an answer can be written to read one way here and another
way there.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeway.common.rtsp.capture import (
    Capture,
    CaptureError,
    CaptureLimits,
    CaptureMode,
    CapturePlan,
)
from edgeway.common.rtsp.destinations import DEFAULT_POLICY, DestinationPolicy
from edgeway.common.rtsp.relay import MAX_LINE, RedirectGuard, RelayRefusedError
from edgeway.common.testing.listener import RecordingListener

FAST = CaptureLimits(
    open_timeout_s=2.0, stall_timeout_s=2.0, reconnect_attempts=2, backoff_initial_s=0.1
)


def rtsp_answer(status: str, *headers: str, body: bytes = b"") -> bytes:
    """What a camera (or an attacker's server) answers to FFmpeg's first request (CSeq 1)."""
    lines = [f"RTSP/1.0 {status}", "CSeq: 1", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(capture: Capture) -> CaptureError:
    """How the capture failed (no frame can come from these listeners)."""

    async def frames() -> list[object]:
        return [frame async for frame in capture.frames()]

    with pytest.raises(CaptureError) as caught:
        await frames()
    return caught.value


# -- the attacks -------------------------------------------------------------------------------


def test_a_url_with_cr_or_lf_never_reaches_the_host() -> None:
    with RecordingListener() as listener:
        for injected in ("\r\nSET x y\r\nX:", "\nSET x y", "\rSET x y", "\tx", " x"):
            url = f"rtsp://127.0.0.1:{listener.port}/cam{injected}"
            with pytest.raises(ValueError, match=r"control character|whitespace"):
                CapturePlan(url, CaptureMode.SINGLE_FRAME)
        time.sleep(0.2)
        assert listener.received == []


async def test_a_redirect_is_not_followed_to_another_host() -> None:
    with RecordingListener() as internal:
        target = f"rtsp://127.0.0.1:{internal.port}/internal"
        with RecordingListener(lambda _: rtsp_answer("302 Found", f"Location: {target}")) as camera:
            # Only the camera is allowed; the redirect points outside the allowlist.
            policy = DestinationPolicy.parse([f"127.0.0.1:{camera.port}"])
            plan = CapturePlan(
                f"rtsp://admin:pw@127.0.0.1:{camera.port}/cam", CaptureMode.SINGLE_FRAME
            )
            started = time.monotonic()
            error = await run(Capture(plan, FAST, destinations=policy))
            assert camera.wait_for(1)[0].startswith(b"OPTIONS ")
        await asyncio.sleep(0.3)
        assert internal.received == []
    assert "redirect (status 302" in error.reason
    assert "no frame after 1 connection attempt" in error.reason  # final: not retried
    assert time.monotonic() - started < 2


async def test_a_location_header_without_a_redirect_status_is_refused_too() -> None:
    answer = rtsp_answer("200 OK", "Location: rtsp://10.0.0.1/x", "Public: DESCRIBE")
    with RecordingListener(lambda _: answer) as camera:
        policy = DestinationPolicy.parse([f"127.0.0.1:{camera.port}"])
        plan = CapturePlan(f"rtsp://127.0.0.1:{camera.port}/cam", CaptureMode.SINGLE_FRAME)
        error = await run(Capture(plan, FAST, destinations=policy))
    assert "a Location header" in error.reason


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "127.1", "2130706433", "[::ffff:127.0.0.1]"]
)
async def test_loopback_is_refused_by_name_and_by_any_spelling_of_its_address(host: str) -> None:
    # The default policy and '*' admit public addresses only: whatever a name or a numeric
    # spelling resolves to is checked, and nothing connects.
    with RecordingListener() as listener:
        for policy in (DEFAULT_POLICY, DestinationPolicy.parse(["*"])):
            plan = CapturePlan(f"rtsp://{host}:{listener.port}/cam", CaptureMode.SINGLE_FRAME)
            error = await run(Capture(plan, FAST, destinations=policy))
            assert "does not admit" in error.reason, error.reason
        await asyncio.sleep(0.2)
        assert listener.received == []


async def test_loopback_listed_in_the_allowlist_is_reached() -> None:
    with RecordingListener(lambda _: rtsp_answer("404 Not Found")) as listener:
        policy = DestinationPolicy.parse(["127.0.0.1"])
        plan = CapturePlan(f"rtsp://127.0.0.1:{listener.port}/cam", CaptureMode.SINGLE_FRAME)
        await run(Capture(plan, FAST, destinations=policy))
        assert listener.wait_for(1)[0].startswith(b"OPTIONS ")


async def test_a_port_outside_the_allowlist_is_refused() -> None:
    with RecordingListener() as listener:
        policy = DestinationPolicy.parse([f"127.0.0.1:{listener.port + 1}-65535"])
        plan = CapturePlan(f"rtsp://127.0.0.1:{listener.port}/cam", CaptureMode.SINGLE_FRAME)
        error = await run(Capture(plan, FAST, destinations=policy))
        await asyncio.sleep(0.2)
        assert listener.received == []
    assert f"port {listener.port}" in error.reason


@pytest.fixture
def tls_camera_context(tmp_path: Path) -> tuple[ssl.SSLContext, list[str | None]]:
    """A server TLS context with a self-signed certificate (as cameras have), and the names
    clients asked for (SNI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "camera")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "camera.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "camera.pem")
    names: list[str | None] = []
    context.sni_callback = lambda _socket, server_name, _context: names.append(server_name)
    return context, names


async def test_rtsps_is_spoken_by_the_relay_and_a_redirect_inside_tls_is_refused_too(
    tls_camera_context: tuple[ssl.SSLContext, list[str | None]],
) -> None:
    context, names = tls_camera_context
    with RecordingListener() as internal:
        target = f"Location: rtsps://127.0.0.1:{internal.port}/internal"
        answer = rtsp_answer("301 Moved Permanently", target)
        with RecordingListener(lambda _: answer, tls=context) as camera:
            policy = DestinationPolicy.parse([f"127.0.0.1:{camera.port}"])
            plan = CapturePlan(f"rtsps://localhost:{camera.port}/cam", CaptureMode.SINGLE_FRAME)
            error = await run(Capture(plan, FAST, destinations=policy))
            (request,) = camera.wait_for(1)
        await asyncio.sleep(0.2)
        assert internal.received == []
    # FFmpeg's plain RTSP, carried inside TLS by the relay, which named the host it was asked.
    assert request.startswith(b"OPTIONS rtsp://127.0.0.1:")
    assert names == ["localhost"]
    assert "redirect (status 301" in error.reason


# -- the guard ---------------------------------------------------------------------------------


def feed_bytewise(data: bytes, passed: bytearray | None = None) -> bytes:
    """What the guard passes of `data` fed one byte at a time (into `passed`, if given)."""
    guard = RedirectGuard()
    out = bytearray() if passed is None else passed
    for index in range(len(data)):
        out += guard.feed(data[index : index + 1])
    return bytes(out)


def test_an_answer_passes_whole_only_once_it_is_complete() -> None:
    sdp = b"v=0\r\nm=video 0 RTP/AVP 96\r\n"
    answer = rtsp_answer("200 OK", "Content-Base: rtsp://cam/x/", body=sdp)
    guard = RedirectGuard()
    assert guard.feed(answer[:-1]) == b""  # one byte short: FFmpeg reads nothing yet
    assert guard.feed(answer[-1:]) == answer
    assert feed_bytewise(answer * 2) == answer * 2


def test_interleaved_packets_pass_between_answers() -> None:
    packet = b"$\x00\x00\x05RTSP/"  # a payload that looks like text is still a payload
    empty = b"$\x01\x00\x00"
    stream = packet + b"\r" + empty + rtsp_answer("200 OK") + packet
    assert feed_bytewise(stream) == stream
    guard = RedirectGuard()
    assert guard.feed(packet[:6]) == b""
    assert guard.feed(packet[6:]) == packet


def test_a_body_is_not_read_as_answers() -> None:
    inner = rtsp_answer("302 Found", "Location: rtsp://10.0.0.1/")
    answer = rtsp_answer("200 OK", body=inner)
    assert feed_bytewise(answer) == answer


@pytest.mark.parametrize(
    "stream",
    [
        rtsp_answer("301 Moved Permanently", "Location: rtsp://10.0.0.1/"),
        rtsp_answer("302 Found"),  # FFmpeg follows even an empty Location
        rtsp_answer("200 OK", "location:rtsp://10.0.0.1/"),
        # Words are split on spaces and tabs only, as FFmpeg's get_word() does.
        b"RTSP/1.0\t305 Use Proxy\r\nCSeq: 1\r\n\r\n",
        # A NUL ends a line's text for FFmpeg: this head ends there, and a 302 follows.
        rtsp_answer("200 OK")[:-2] + b"\0junk\r\n" + rtsp_answer("302 Found"),
        # A packet inside a head is skipped by FFmpeg: its CRLFCRLF ends nothing.
        b"RTSP/1.0 302 Found\r\n$\x00\x00\x04\r\n\r\nLocation: rtsp://10.0.0.1/\r\n\r\n",
        # CR is dropped anywhere: LF alone ends lines.
        b"RTSP/1.0 302 Found\nCSeq: 1\nLocation: rtsp://10.0.0.1/\n\n",
    ],
)
def test_a_redirect_in_any_form_is_refused_and_nothing_of_it_passes(stream: bytes) -> None:
    passed = bytearray()
    with pytest.raises(RelayRefusedError, match="redirect"):
        feed_bytewise(stream, passed)
    assert b"302" not in passed
    assert b"location" not in passed.lower()


@pytest.mark.parametrize(
    "stream",
    [
        b"RTSP/1.0 0302 Found\r\n\r\n",  # atoi() would read 302: only three digits are read
        b"RTSP/1.0 3020 Found\r\n\r\n",
        b"RTSP/1.0\r\n\r\n",
        # FFmpeg keeps Content-Length in an int: 2**32 + 1 would wrap to 1.
        b"RTSP/1.0 200 OK\r\nContent-Length: 4294967297\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nX-Long: " + b"a" * MAX_LINE + b"\r\n\r\n",
    ],
)
def test_what_ffmpeg_could_read_otherwise_is_refused(stream: bytes) -> None:
    with pytest.raises(RelayRefusedError):
        RedirectGuard().feed(stream)


def test_content_length_is_read_as_strtol_reads_it() -> None:
    body = b"RTSP/1.0 302 Found\r\n\r\n"
    answer = b"RTSP/1.0 200 OK\r\nCONTENT-LENGTH:  +%d junk\r\n\r\n" % len(body) + body
    assert feed_bytewise(answer) == answer
