"""A request's frames indexed in the order a status pages through them.

The status lists frames a page at a time, in capture order (capture time, then when stored,
then id: a total order), each page starting after the last one's cursor. This index lets a
page seek straight to its start; it also serves what (request_id, created_at) served (a
request's frames), which it replaces.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 13:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_frames_request_id_capture_timestamp_created_at_id"),
        "frames",
        ["request_id", "capture_timestamp", "created_at", "id"],
        unique=False,
    )
    op.drop_index(op.f("ix_frames_request_id_created_at"), table_name="frames")


def downgrade() -> None:
    op.create_index(
        op.f("ix_frames_request_id_created_at"), "frames", ["request_id", "created_at"], unique=False
    )
    op.drop_index(op.f("ix_frames_request_id_capture_timestamp_created_at_id"), table_name="frames")
