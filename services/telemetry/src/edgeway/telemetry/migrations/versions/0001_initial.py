"""Initial schema: vehicles, telemetry, offline_sessions, vehicle_state, compression_stats,
rejections.

Revision ID: 0001
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _vehicle(table: str) -> sa.Column[int]:
    return sa.Column(
        "vehicle_id",
        sa.Integer(),
        sa.ForeignKey("vehicles.id", name=f"fk_{table}_vehicle_id"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "vehicles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("vin", sa.String(17), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.UniqueConstraint("vin", name="uq_vehicles_vin"),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        _vehicle("telemetry"),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("speed", sa.Double(), nullable=False),
        sa.Column("battery", sa.Double(), nullable=False),
        sa.Column("power", sa.Double(), nullable=False),
        sa.Column("odometer", sa.Double(), nullable=False),
        sa.Column("heading", sa.Double(), nullable=False),
        sa.Column("reconstructed", sa.SmallInteger(), nullable=False),
        sa.Column("uncertain", sa.Boolean(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("predictor_version", sa.Integer(), nullable=True),
        sa.Column("compressed", sa.Boolean(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "vehicle_id", "timestamp_ms", name="uq_telemetry_vehicle_id_timestamp_ms"
        ),
    )
    op.create_table(
        "offline_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        _vehicle("offline_sessions"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("records_buffered", sa.BigInteger(), nullable=False),
        sa.Column("records_uploaded", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_index(
        "ix_offline_sessions_vehicle_started", "offline_sessions", ["vehicle_id", "started_at"]
    )
    op.create_table(
        "vehicle_state",
        sa.Column(
            "vehicle_id",
            sa.Integer(),
            sa.ForeignKey("vehicles.id", name="fk_vehicle_state_vehicle_id"),
            primary_key=True,
        ),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("predictor", JSON_DOCUMENT, nullable=False),
        sa.Column(
            "offline_session_id",
            sa.Integer(),
            sa.ForeignKey("offline_sessions.id", name="fk_vehicle_state_offline_session_id"),
            nullable=True,
        ),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("speed", sa.Double(), nullable=False),
        sa.Column("battery", sa.Double(), nullable=False),
        sa.Column("power", sa.Double(), nullable=False),
        sa.Column("odometer", sa.Double(), nullable=False),
        sa.Column("heading", sa.Double(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    op.create_table(
        "compression_stats",
        sa.Column("id", sa.Integer(), primary_key=True),
        _vehicle("compression_stats"),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("total_packets", sa.BigInteger(), nullable=False),
        sa.Column("transmitted_fields", sa.BigInteger(), nullable=False),
        sa.Column("skipped_fields", sa.BigInteger(), nullable=False),
        sa.Column("bandwidth_saved_percent", sa.Double(), nullable=False),
        sa.UniqueConstraint("vehicle_id", "day", name="uq_compression_stats_vehicle_id_day"),
    )
    op.create_table(
        "rejections",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("vehicle_vin", sa.String(64), nullable=True),
        sa.Column("code", sa.String(50), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("message_id", name="uq_rejections_message_id"),
    )


def downgrade() -> None:
    op.drop_table("rejections")
    op.drop_table("compression_stats")
    op.drop_table("vehicle_state")
    op.drop_index("ix_offline_sessions_vehicle_started", table_name="offline_sessions")
    op.drop_table("offline_sessions")
    op.drop_table("telemetry")
    op.drop_table("vehicles")
