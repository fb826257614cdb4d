"""Initial schema: locations, cameras, observations, rejections, location_state.

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


def upgrade() -> None:
    op.create_table(
        "locations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.UniqueConstraint("name", name="uq_locations_name"),
    )
    op.create_table(
        "cameras",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column(
            "location_id",
            sa.Integer(),
            sa.ForeignKey("locations.id", name="fk_cameras_location_id"),
            nullable=False,
        ),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    op.create_table(
        "observations",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column(
            "camera_id",
            sa.String(100),
            sa.ForeignKey("cameras.id", name="fk_observations_camera_id"),
            nullable=False,
        ),
        sa.Column(
            "location_id",
            sa.Integer(),
            sa.ForeignKey("locations.id", name="fk_observations_location_id"),
            nullable=False,
        ),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total_people", sa.Integer(), nullable=False),
        sa.Column("free_zones", sa.Integer(), nullable=False),
        sa.Column("occupied_zones", sa.Integer(), nullable=False),
        sa.Column("occupancy_percent", sa.Double(), nullable=False),
        sa.Column("timestamp_raw", sa.Text(), nullable=False),
        sa.Column("zones", JSON_DOCUMENT, nullable=False),
        sa.Column("segments", JSON_DOCUMENT, nullable=True),
        sa.UniqueConstraint("message_id", name="uq_observations_message_id"),
    )
    op.create_index(
        "ix_observations_location_captured", "observations", ["location_id", "captured_at"]
    )
    op.create_table(
        "rejections",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("code", sa.String(50), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("message_id", name="uq_rejections_message_id"),
    )
    op.create_table(
        "location_state",
        sa.Column(
            "location_id",
            sa.Integer(),
            sa.ForeignKey("locations.id", name="fk_location_state_location_id"),
            primary_key=True,
        ),
        sa.Column("camera_id", sa.String(100), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("people_detected", sa.Integer(), nullable=False),
        sa.Column("occupancy_percent", sa.Double(), nullable=False),
        sa.Column("client_update", sa.Text(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )


def downgrade() -> None:
    op.drop_table("location_state")
    op.drop_table("rejections")
    op.drop_index("ix_observations_location_captured", table_name="observations")
    op.drop_table("observations")
    op.drop_table("cameras")
    op.drop_table("locations")
