"""Pytest fixtures for connected tests (loaded by the root conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgeway.common.testing.resources import (
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
)
from edgeway.common.testing.s3 import s3_server

__all__ = ["amqp_url", "postgres_url", "s3_server"]


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A private RabbitMQ virtual host for this test session."""
    name, url = create_vhost()
    yield url
    drop_vhost(name)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)
