"""The requester of each ingestion request: status and cancel are answered to it (and operators).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 11:40:00.000000
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
    # Nullable: requests opened before have no known owner and stay visible to operators only.
    op.add_column("ingestion_requests", sa.Column("requester", sa.Text(), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite before 3.35 cannot drop a column in place.
    with op.batch_alter_table("ingestion_requests") as batch:
        batch.drop_column("requester")
