"""A service's rejections table: each message it could not take, kept once with its payload.

Every service that refuses messages keeps them the same way, so nothing a producer sent is
lost and a redelivery of a refused message is not kept twice (idempotent on `message_id`).
The columns they share come from `RejectionColumns`; a service adds its `payload` column
(bytes, or text for people to read) and any columns of its own, and writes through
`RejectionTable`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, String, Text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeway.common.db import BigId, UTCDateTime, per_dialect, table_of

MESSAGE_ID_LENGTH = 255  # what AMQP allows a message id (short string)
CODE_LENGTH = 50


class RejectionColumns:
    """The columns every rejections table has (a declarative mixin): the service's model adds
    `__tablename__`, `payload` and its own columns."""

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(MESSAGE_ID_LENGTH), unique=True)
    code: Mapped[str] = mapped_column(String(CODE_LENGTH))
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RejectionTable:
    """Writes to one service's rejections table, with a statement built once per dialect."""

    def __init__(self, entity: type[DeclarativeBase]) -> None:
        table = table_of(entity)
        self._statement = per_dialect(
            lambda insert: (
                insert(table)
                .on_conflict_do_nothing(index_elements=["message_id"])
                .returning(table.c.id)
            )
        )
        # A text payload (kept for people, not replayed byte by byte) is decoded on the way in.
        self._payload_as_text = not isinstance(table.c.payload.type, LargeBinary)

    async def add(
        self,
        *,
        session: AsyncSession,
        message_id: str,
        code: str,
        reason: str,
        payload: bytes,
        received_at: datetime,
        **columns: Any,
    ) -> bool:
        """Keep what could not be taken, in the session's transaction (`columns`: the service's
        own); False if this message was already rejected."""
        stored = await session.scalar(
            self._statement(session),
            {
                "message_id": message_id,
                "code": code,
                "reason": reason,
                "payload": _as_text(payload) if self._payload_as_text else payload,
                "received_at": received_at,
                **columns,
            },
        )
        return stored is not None


def _as_text(payload: bytes) -> str:
    # PostgreSQL text cannot hold NUL.
    return payload.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
