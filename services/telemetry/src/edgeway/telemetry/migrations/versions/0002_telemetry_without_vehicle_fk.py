"""telemetry.vehicle_id without its foreign key.

A foreign key is checked by a trigger per inserted row: on PostgreSQL it was 3.7 of the 6.1 us a
row costs the server during a COPY. This service is the only writer of `telemetry`, it takes the
vehicle id from `vehicles` in the same transaction, and vehicles are never deleted. The other
tables keep theirs: they get a row per upload or per vehicle, not per record.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot drop a constraint, so there the table is copied without it.
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_constraint("fk_telemetry_vehicle_id", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.create_foreign_key("fk_telemetry_vehicle_id", "vehicles", ["vehicle_id"], ["id"])
