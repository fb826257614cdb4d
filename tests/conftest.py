"""Fixtures shared by the stack tests in this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgeway.common.testing import create_postgres_database, drop_postgres_database


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module's stack, dropped after it."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)
