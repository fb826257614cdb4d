"""Alembic environment of the ingestion service: its models, in its own version table."""

from __future__ import annotations

from edgeway.ingestion.store import MIGRATIONS, Base

MIGRATIONS.run_env(Base.metadata)
