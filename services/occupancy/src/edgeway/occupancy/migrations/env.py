"""Alembic environment of the occupancy service: its models, in its own version table."""

from __future__ import annotations

from edgeway.occupancy.store import MIGRATIONS, Base

MIGRATIONS.run_env(Base.metadata)
