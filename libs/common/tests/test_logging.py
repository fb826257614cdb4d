"""Credentials never reach a log line, however a client spells them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeway.common.logging import mask_secrets

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwaG9uZS0xIn0.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    "line",
    [
        f"GET /ws/phone?token={JWT}&device=p1",
        "GET /ws/phone?device=p1&token=short-secret",
        "GET /ws/phone?%74oken=short-secret",  # the key percent-encoded
        "GET /ws/phone?TOKEN=short-secret",
        "GET /ws/phone?access%5Ftoken=short-secret",
        "GET /ws/phone?to%6Ben=short%2Dsecret",
        "GET /ws/phone?x=1;token=short-secret",
        "Authorization: Bearer short-secret",
        "connect amqp://edgeway:short-secret@rabbit:5672/",
        f"token {JWT.replace('.', '%2E')} in a path",  # a JWT with encoded dots
    ],
)
def test_credentials_are_masked(line: str) -> None:
    masked = mask_secrets(line)
    assert "short-secret" not in masked
    assert "short%2Dsecret" not in masked
    assert "c2lnbmF0dXJlLWJ5dGVz" not in masked
    assert "***" in masked


def test_everything_else_is_left_as_it_was() -> None:
    line = "GET /ws/video/consume?device=phone-1&tokens_left=3 status=200 a==b"
    assert mask_secrets(line) == line


def test_http_clients_do_not_log_every_request() -> None:
    # In a process of its own: configuring logging is process-wide.
    probe = (
        "import logging; from edgeway.common.logging import configure_logging; "
        "configure_logging(service='probe', level='INFO'); "
        "print(logging.getLogger('httpx').isEnabledFor(logging.INFO), "
        "logging.getLogger('httpx').isEnabledFor(logging.WARNING), "
        "logging.getLogger('edgeway.probe').isEnabledFor(logging.INFO))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "True", "True"]
