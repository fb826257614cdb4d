"""Whether a service's migrated database has the schema its models describe."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, MetaData
from sqlalchemy.ext.asyncio import AsyncEngine


async def schema_differences(
    engine: AsyncEngine, metadata: MetaData, *, version_table: str
) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match `metadata`.

    Empty when the migrations and the models describe the same schema. Alembic leaves out only
    `version_table`: a version table under any other name counts as a table to remove.
    """

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"version_table": version_table})
        return list(compare_metadata(context, metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(differences)
