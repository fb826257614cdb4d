"""A service's rejections table: kept once per message id, bytes or text, with its own columns."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import LargeBinary, MetaData, String, Text, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeway.common.rejections import RejectionColumns, RejectionTable
from edgeway.common.settings import async_database_url
from edgeway.common.testing import DIALECTS

RECEIVED = datetime(2025, 11, 21, 12, 0, 0, 250000, tzinfo=UTC)
PAYLOAD = b"\x00\xffnot utf-8 \xe2\x82"


class Base(DeclarativeBase):
    metadata = MetaData()


class RejectedBytes(RejectionColumns, Base):
    """Bytes kept as they came, and a column of the service's own."""

    __tablename__ = "rejected_bytes"

    vehicle_vin: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class RejectedText(RejectionColumns, Base):
    """Payloads kept as text, for people to read."""

    __tablename__ = "rejected_text"

    payload: Mapped[str] = mapped_column(Text)


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    configured = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    return async_database_url(configured, service="rejections", data_dir=tmp_path)


@pytest.fixture
async def tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


async def test_a_rejection_is_kept_once_with_its_bytes_and_the_services_own_columns(
    tables: None, sessions: async_sessionmaker[AsyncSession]
) -> None:
    rejections = RejectionTable(RejectedBytes)
    async with sessions.begin() as session:
        first = await rejections.add(
            session=session,
            message_id="m-1",
            code="invalid_payload",
            reason="not protobuf",
            payload=PAYLOAD,
            received_at=RECEIVED,
            vehicle_vin="5YJ3E1EA1KF000001",
        )
        again = await rejections.add(
            session=session,
            message_id="m-1",
            code="other",
            reason="a redelivery",
            payload=b"",
            received_at=RECEIVED,
            vehicle_vin=None,
        )
    assert (first, again) == (True, False)
    async with sessions() as session:
        kept = (await session.scalars(select(RejectedBytes))).one()
    assert (kept.message_id, kept.code, kept.reason) == ("m-1", "invalid_payload", "not protobuf")
    assert kept.payload == PAYLOAD
    assert kept.vehicle_vin == "5YJ3E1EA1KF000001"
    assert kept.received_at == RECEIVED


async def test_a_text_payload_is_kept_readable_without_nul(
    tables: None, sessions: async_sessionmaker[AsyncSession]
) -> None:
    rejections = RejectionTable(RejectedText)
    async with sessions.begin() as session:
        assert await rejections.add(
            session=session,
            message_id="m-2",
            code="invalid_shape",
            reason="no frame",
            payload=PAYLOAD,
            received_at=RECEIVED,
        )
    async with sessions() as session:
        kept = (await session.scalars(select(RejectedText))).one()
    assert kept.payload == "\ufffd\ufffdnot utf-8 \ufffd"
