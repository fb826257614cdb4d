"""Alembic environment of the tracker: its models, in its own version table."""

from __future__ import annotations

from edgeway.tracker.store import MIGRATIONS, Base

MIGRATIONS.run_env(Base.metadata)
