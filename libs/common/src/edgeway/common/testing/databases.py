"""A service's own database for its store tests: on both dialects, migrated to head.

A test module parametrizes its `database_url` fixture with `DIALECTS` and returns
`migrated_database(...)` (or `empty_database(...)`, for tables a test makes itself); the
plugin's `engine` and `sessions` fixtures build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeway.common.db import Migrations
from edgeway.common.settings import async_database_url

# The embedded default and production: PostgreSQL needs the machine's server (connected tests).
DIALECTS: list[Any] = ["sqlite", pytest.param("postgresql", marks=pytest.mark.connected)]


def migrated_database(
    request: pytest.FixtureRequest, tmp_path: Path, *, service: str, migrations: Migrations
) -> str:
    """An empty database migrated to head (`empty_database`)."""
    url = empty_database(request, tmp_path, service=service)
    migrations.upgrade(url)
    return url


def empty_database(request: pytest.FixtureRequest, tmp_path: Path, *, service: str) -> str:
    """An empty database for `request.param` of DIALECTS: a temporary SQLite file, or a fresh
    PostgreSQL one (the `postgres_url` fixture, dropped after the test)."""
    configured = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    return async_database_url(configured, service=service, data_dir=tmp_path)
