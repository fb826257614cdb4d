"""Settings built in a test from what the test sets, not from the machine's environment."""

from __future__ import annotations

import os

import pytest


def isolate_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the machine's own `EDGEWAY_` variables (and a bare `DATABASE_URL`, which no
    setting may read) for this test, and say development, as every test process does (the
    default is production): a test of another environment sets it."""
    for name in list(os.environ):
        if name.startswith("EDGEWAY_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", "development")
