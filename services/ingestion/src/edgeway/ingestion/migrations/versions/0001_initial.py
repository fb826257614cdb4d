"""Initial schema: ingestion_requests, frames, rejected_files, phone_files, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 22:42:52.722278
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

JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ingestion_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("camera_id", sa.String(length=100), nullable=False),
        sa.Column("source_type", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rtsp_url", sa.Text(), nullable=True),
        sa.Column("rtsp_url_sealed", sa.Text(), nullable=True),
        sa.Column("capture_mode", sa.String(length=16), nullable=True),
        sa.Column("capture_duration", sa.Double(), nullable=True),
        sa.Column("fps", sa.Double(), nullable=True),
        sa.Column("frame_timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("meta_info", JSON_DOCUMENT, nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error_details", JSON_DOCUMENT, nullable=True),
        sa.Column("files_expected", sa.Integer(), nullable=True),
        sa.Column("frames_stored", sa.Integer(), nullable=False),
        sa.Column("files_rejected", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_ingestion_requests_camera_id_created_at"),
        "ingestion_requests",
        ["camera_id", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_ingestion_requests_status_created_at"),
        "ingestion_requests",
        ["status", "created_at"],
        unique=False,
    )

    op.create_table(
        "outbox",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("routing_key", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "phone_files",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("storage_path", sa.String(length=512), nullable=False),
        sa.Column("storage_bucket", sa.String(length=63), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("storage_path", name=op.f("uq_phone_files_storage_path")),
    )
    op.create_index(
        op.f("ix_phone_files_device_created_at"),
        "phone_files",
        ["device", "created_at"],
        unique=False,
    )

    op.create_table(
        "frames",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("camera_id", sa.String(length=100), nullable=False),
        sa.Column("source_type", sa.String(length=16), nullable=False),
        sa.Column("storage_path", sa.String(length=512), nullable=False),
        sa.Column("storage_bucket", sa.String(length=63), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("capture_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("exposure", sa.Double(), nullable=True),
        sa.Column("sensor_info", JSON_DOCUMENT, nullable=True),
        sa.Column("meta_info", JSON_DOCUMENT, nullable=True),
        sa.Column("original_name", sa.String(length=255), nullable=True),
        sa.Column("change_score", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["ingestion_requests.id"], name=op.f("fk_frames_request_id")
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("storage_path", name=op.f("uq_frames_storage_path")),
    )
    op.create_index(
        op.f("ix_frames_camera_id_capture_timestamp"),
        "frames",
        ["camera_id", "capture_timestamp"],
        unique=False,
    )
    op.create_index(op.f("ix_frames_created_at"), "frames", ["created_at"], unique=False)
    op.create_index(
        op.f("ix_frames_request_id_created_at"),
        "frames",
        ["request_id", "created_at"],
        unique=False,
    )

    op.create_table(
        "rejected_files",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("file_id", sa.String(length=36), nullable=True),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["ingestion_requests.id"], name=op.f("fk_rejected_files_request_id")
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("file_id", name=op.f("uq_rejected_files_file_id")),
    )
    op.create_index(
        op.f("ix_rejected_files_request_id"), "rejected_files", ["request_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_rejected_files_request_id"), table_name="rejected_files")

    op.drop_table("rejected_files")
    op.drop_index(op.f("ix_frames_request_id_created_at"), table_name="frames")
    op.drop_index(op.f("ix_frames_created_at"), table_name="frames")
    op.drop_index(op.f("ix_frames_camera_id_capture_timestamp"), table_name="frames")

    op.drop_table("frames")
    op.drop_index(op.f("ix_phone_files_device_created_at"), table_name="phone_files")

    op.drop_table("phone_files")
    op.drop_table("outbox")
    op.drop_index(op.f("ix_ingestion_requests_status_created_at"), table_name="ingestion_requests")
    op.drop_index(
        op.f("ix_ingestion_requests_camera_id_created_at"), table_name="ingestion_requests"
    )

    op.drop_table("ingestion_requests")
