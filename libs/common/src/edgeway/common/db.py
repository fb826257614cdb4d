"""Database engines, sessions and migrations for services that own a schema.

PostgreSQL (psycopg 3) in production; an SQLite file per service as the embedded default.
Each service keeps its Alembic migrations in its own package and applies them at start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from edgeway.common.settings import sync_database_url


def make_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """An async engine; SQLite gets WAL and a busy timeout so readers never block the writer."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=pool_size, pool_pre_ping=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


class Migrations:
    """One service's Alembic migrations: where they live and which table records them."""

    def __init__(self, script_location: Path, *, version_table: str) -> None:
        self.script_location = script_location
        self.version_table = version_table

    def config(self, async_url: str) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(self.script_location))
        cfg.set_main_option("sqlalchemy.url", sync_database_url(async_url))
        cfg.attributes["version_table"] = self.version_table
        return cfg

    def head(self) -> str | None:
        return ScriptDirectory.from_config(self.config("sqlite://")).get_current_head()

    def upgrade(self, async_url: str) -> None:
        command.upgrade(self.config(async_url), "head")

    def current(self, async_url: str) -> str | None:
        engine = create_engine(sync_database_url(async_url))
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(
                    connection, opts={"version_table": self.version_table}
                )
                return context.get_current_revision()
        finally:
            engine.dispose()

    async def upgrade_async(self, async_url: str) -> None:
        """Apply at start, off the event loop (Alembic is synchronous)."""
        await asyncio.to_thread(self.upgrade, async_url)

    async def at_head(self, async_url: str) -> bool:
        return await asyncio.to_thread(self.current, async_url) == self.head()
