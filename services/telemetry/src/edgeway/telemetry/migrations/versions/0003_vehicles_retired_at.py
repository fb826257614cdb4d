"""vehicles.retired_at: a vehicle is retired, never deleted.

Vehicles are registered and retired through the gateway's `/api/v1/vehicles`. Deleting a row
would orphan what was accepted for it (its records, decoder state, statistics and offline
sessions reference its id) and would give a VIN registered again a new id, cut off from its
own history. A retired vehicle keeps its row and everything that points at it; its uploads are
refused as unknown, and registering its VIN again clears `retired_at` on the same row.

A nullable column with no default: on PostgreSQL a catalogue change only, on SQLite a plain
`ALTER TABLE ... ADD COLUMN` (no table copy).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("vehicles", sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite before 3.35 cannot drop a column, so there the table is copied.
    with op.batch_alter_table("vehicles") as batch:
        batch.drop_column("retired_at")
