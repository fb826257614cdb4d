"""Alembic environment of the telemetry service: its models, in its own version table."""

from __future__ import annotations

from edgeway.telemetry.tables import MIGRATIONS, Base

MIGRATIONS.run_env(Base.metadata)
