"""Test fixtures for real brokers, databases and service processes.

Loaded as a pytest plugin by the repository's root `conftest.py`. Every test session gets its
own RabbitMQ virtual host and its own PostgreSQL databases on the machine's real servers, so runs
never see each other's messages or rows.
"""

from __future__ import annotations

from edgeway.common.testing.databases import DIALECTS, empty_database, migrated_database
from edgeway.common.testing.gateway import (
    TEST_SECRET,
    bearer,
    gateway_fixture,
    make_token,
    start_gateway,
)
from edgeway.common.testing.listener import BrokerListener, RecordingListener
from edgeway.common.testing.processes import ServiceProcess, free_port
from edgeway.common.testing.resources import (
    AMQP_HOST,
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    create_vhost,
    drop_postgres_database,
    drop_vhost,
)
from edgeway.common.testing.schema import schema_differences

__all__ = [
    "AMQP_HOST",
    "DIALECTS",
    "POSTGRES_ADMIN_URL",
    "TEST_SECRET",
    "BrokerListener",
    "RecordingListener",
    "ServiceProcess",
    "bearer",
    "create_postgres_database",
    "create_vhost",
    "drop_postgres_database",
    "drop_vhost",
    "empty_database",
    "free_port",
    "gateway_fixture",
    "make_token",
    "migrated_database",
    "schema_differences",
    "start_gateway",
]
