"""offline_sessions.arrived_at: when a store-and-forward replay reached the gateway.

A session's `started_at` and `ended_at` are record times (the vehicle's clock); the console
also shows when the logger came back and its buffer arrived: the `received_at` of the
session's first late record, written with the session from now on.

Existing sessions are filled in from that record, found by its key (vehicle, record time =
`started_at`); one that cannot be found stays null. Sessions are few (a handful per vehicle and
dead zone), so they are read and written one by one, the same way on both databases.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SESSIONS = sa.table(
    "offline_sessions",
    sa.column("id", sa.Integer()),
    sa.column("vehicle_id", sa.Integer()),
    sa.column("started_at", sa.DateTime(timezone=True)),
    sa.column("arrived_at", sa.DateTime(timezone=True)),
)
TELEMETRY = sa.table(
    "telemetry",
    sa.column("vehicle_id", sa.Integer()),
    sa.column("timestamp_ms", sa.BigInteger()),
    sa.column("received_at", sa.DateTime(timezone=True)),
)


def _ms(at: datetime) -> int:
    """A stored time as ms since the epoch (SQLite gives it back without its zone: UTC)."""
    return round((at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp() * 1000)


def upgrade() -> None:
    op.add_column(
        "offline_sessions", sa.Column("arrived_at", sa.DateTime(timezone=True), nullable=True)
    )
    bind = op.get_bind()
    for session_id, vehicle_id, started_at in bind.execute(
        sa.select(SESSIONS.c.id, SESSIONS.c.vehicle_id, SESSIONS.c.started_at)
    ).all():
        arrived = bind.scalar(
            sa.select(TELEMETRY.c.received_at).where(
                TELEMETRY.c.vehicle_id == vehicle_id,
                TELEMETRY.c.timestamp_ms == _ms(started_at),
            )
        )
        if arrived is not None:
            bind.execute(
                sa.update(SESSIONS).where(SESSIONS.c.id == session_id).values(arrived_at=arrived)
            )


def downgrade() -> None:
    # Batch mode: SQLite before 3.35 cannot drop a column, so there the table is copied.
    with op.batch_alter_table("offline_sessions") as batch:
        batch.drop_column("arrived_at")
