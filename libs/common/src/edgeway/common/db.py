"""Engines, sessions, column types, migrations and outage retries of services that own a schema.

PostgreSQL (psycopg 3) in production; an SQLite file per service as the embedded default.
Each service keeps its Alembic migrations in its own package and applies them at start; its
`migrations/env.py` is one call to `Migrations.run_env`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    pool,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from edgeway.common.logging import get_logger
from edgeway.common.settings import sync_database_url

log = get_logger("edgeway.db")

T = TypeVar("T")


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


# --- column types ---------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz` on PostgreSQL; on SQLite (no time zones) UTC text, read back as aware UTC.

    Normalising to UTC on the way in keeps SQLite's text comparison in time order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# JSONB where there is one (indexable, compact), JSON text on SQLite; None is SQL NULL.
JSONDocument = JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


# --- statements -----------------------------------------------------------------------------------

# The INSERT of the dialects Edgeway runs on: both have ON CONFLICT and RETURNING.
Insert = postgresql.Insert | sqlite.Insert


def table_of(entity: type[DeclarativeBase]) -> Table:
    """A mapped class's table, for Core statements."""
    table = entity.__table__
    assert isinstance(table, Table)
    return table


def dialect_of(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def dialect_insert(session: AsyncSession, target: Table | type[DeclarativeBase]) -> Insert:
    """The session's dialect's INSERT, which has ON CONFLICT."""
    if dialect_of(session) == "postgresql":
        return postgresql.insert(target)
    return sqlite.insert(target)


def per_dialect(build: Callable[[Callable[[Table], Insert]], T]) -> Callable[[AsyncSession], T]:
    """Statements built once per dialect from its INSERT, then picked by a session's dialect.

    For statements run for every message: building one costs more CPU than running it again
    with new parameters.
    """
    built = {"postgresql": build(postgresql.insert), "sqlite": build(sqlite.insert)}
    return lambda session: built[dialect_of(session)]


# --- outages --------------------------------------------------------------------------------------


# What an unreachable database raises: through SQLAlchemy, and from psycopg directly (the
# per-message write paths that skip SQLAlchemy).
_OUTAGES = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)


def is_outage(exc: BaseException) -> bool:
    """The database is unreachable, restarting or refusing connections: nothing the data did."""
    return isinstance(exc, _OUTAGES)


async def with_db_retry(
    work: Callable[[], Awaitable[T]], *, delays: Sequence[float], forever: bool = False
) -> T:
    """Run `work`, again after a pause while the database is unreachable or busy.

    The pauses are `delays`, in turn. Without `forever`, the try after the last pause is the
    last one and its error goes to the caller; with it, the last pause repeats until the
    database answers.
    """
    if not delays:
        raise ValueError("with_db_retry needs at least one delay")
    for attempt in itertools.count():
        try:
            return await work()
        except _OUTAGES as exc:
            if attempt == len(delays) and not forever:
                raise
            delay = delays[min(attempt, len(delays) - 1)]
            reason = exc.orig if isinstance(exc, OperationalError | InterfaceError) else None
            log.warning("database unavailable, retrying", error=str(reason or exc), retry_in=delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# --- migrations -----------------------------------------------------------------------------------


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

    def run_env(self, metadata: MetaData) -> None:
        """All a service's `migrations/env.py` does: migrate its database to `metadata`'s schema.

        Alembic runs env.py; `config()` passes the database URL as the main option
        `sqlalchemy.url` and the version table in `config.attributes["version_table"]` (the
        `alembic` command line passes none: then it is this service's). Every service keeps its
        own version table, so services may share one database.
        """
        version_table: str = context.config.attributes.get("version_table", self.version_table)
        if context.is_offline_mode():
            _migrate_offline(metadata, version_table)
        else:
            _migrate_online(metadata, version_table)


def _alembic_url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("Alembic needs the main option sqlalchemy.url")
    return url


def _migrate_offline(metadata: MetaData, version_table: str) -> None:
    """Emit the SQL instead of running it (`alembic upgrade --sql`)."""
    context.configure(
        url=_alembic_url(),
        target_metadata=metadata,
        version_table=version_table,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate_online(metadata: MetaData, version_table: str) -> None:
    engine = create_engine(_alembic_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table=version_table,
                # SQLite cannot ALTER most things in place; batch mode copies the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Replicas starting together take turns; the second finds the schema at head.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(hashtext(:name))"),
                        {"name": version_table},
                    )
                context.run_migrations()
    finally:
        engine.dispose()
