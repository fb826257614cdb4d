"""Pytest fixtures for connected tests (loaded by the root conftest.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from edgeway.common.db import make_engine, make_sessionmaker
from edgeway.common.testing.resources import (
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
)
from edgeway.common.testing.s3 import s3_server

__all__ = ["amqp_url", "engine", "postgres_url", "s3_server", "sessions"]

# Settings built in the tests' own process are development ones, as the service processes
# they start are (`ServiceProcess`); a test of the production profile says so itself.
os.environ.setdefault("EDGEWAY_ENVIRONMENT", "development")


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


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test module's `database_url` (see `edgeway.common.testing.databases`)."""
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)
