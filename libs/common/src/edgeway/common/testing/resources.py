"""Private RabbitMQ virtual hosts and PostgreSQL databases on the machine's real servers."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import psycopg

AMQP_HOST = os.environ.get("EDGEWAY_TEST_AMQP_HOST", "127.0.0.1:5672")
POSTGRES_ADMIN_URL = os.environ.get(
    "EDGEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("rabbitmqctl is not installed: connected tests need a local RabbitMQ")
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(prefix: str = "edgeway-test") -> tuple[str, str]:
    """A fresh virtual host open to guest; returns (name, AMQP URL)."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name, f"amqp://guest:guest@{AMQP_HOST}/{name}"


def drop_vhost(name: str) -> None:
    _rabbitmqctl("delete_vhost", name)


def create_postgres_database(prefix: str = "edgeway_test") -> str:
    """A fresh, empty database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
