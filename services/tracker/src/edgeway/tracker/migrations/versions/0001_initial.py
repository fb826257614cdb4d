"""Initial schema: environments, videos, tasks, track_observations.

Revision ID: 0001
Revises:
Create Date: 2025-12-01
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
        "environments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", JSON_DOCUMENT, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    op.create_table(
        "videos",
        sa.Column(
            "environment_id",
            sa.String(64),
            sa.ForeignKey(
                "environments.id", name="fk_videos_environment_id", ondelete="CASCADE"
            ),
            primary_key=True,
        ),
        sa.Column("camera_id", sa.String(64), primary_key=True),
        sa.Column("video_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("object_key", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("fps", sa.Double(), nullable=False),
        sa.Column(
            "uploaded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.UniqueConstraint("video_id", name="uq_videos_video_id"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("environment_id", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("current_step", sa.Text(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("environment", JSON_DOCUMENT, nullable=False),
        sa.Column("live_lock", sa.String(64), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("checkpoint_frame", sa.BigInteger(), nullable=False),
        sa.Column("checkpoint", JSON_DOCUMENT, nullable=True),
        sa.Column("frames_total", sa.BigInteger(), nullable=True),
        sa.Column("frames_done", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("live_lock", name="uq_tasks_live_lock"),
    )
    op.create_index("ix_tasks_environment_id", "tasks", ["environment_id"])
    op.create_index("ix_tasks_status_finished", "tasks", ["status", "finished_at"])
    op.create_table(
        "track_observations",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column(
            "task_id",
            sa.String(36),
            sa.ForeignKey("tasks.id", name="fk_track_observations_task_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("camera_id", sa.String(64), nullable=False),
        sa.Column("frame_index", sa.BigInteger(), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("track_id", sa.Integer(), nullable=False),
        sa.Column("global_id", sa.String(36), nullable=False),
        sa.Column("x1", sa.Double(), nullable=False),
        sa.Column("y1", sa.Double(), nullable=False),
        sa.Column("x2", sa.Double(), nullable=False),
        sa.Column("y2", sa.Double(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("map_x", sa.Double(), nullable=True),
        sa.Column("map_y", sa.Double(), nullable=True),
        sa.UniqueConstraint(
            "task_id", "camera_id", "frame_index", "track_id", name="uq_observation"
        ),
    )
    op.create_index(
        "ix_observations_task_global", "track_observations", ["task_id", "global_id"]
    )
    op.create_index(
        "ix_observations_task_captured", "track_observations", ["task_id", "captured_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_observations_task_captured", table_name="track_observations")
    op.drop_index("ix_observations_task_global", table_name="track_observations")
    op.drop_table("track_observations")
    op.drop_index("ix_tasks_status_finished", table_name="tasks")
    op.drop_index("ix_tasks_environment_id", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("videos")
    op.drop_table("environments")
