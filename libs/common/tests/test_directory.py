"""The cached directory: answers from memory, reads a miss from the database, and reads an entry
again after its `ttl`."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import MetaData, String, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgeway.common.directory import CachedDirectory
from edgeway.common.testing import DIALECTS, empty_database


class Base(DeclarativeBase):
    metadata = MetaData()


class Place(Base):
    __tablename__ = "places"

    key: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return empty_database(request, tmp_path, service="directory")


@pytest.fixture
async def tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


class Reads:
    """`find` for the directory, counting the database reads it makes."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def __call__(self, session: AsyncSession, key: str) -> str | None:
        self.keys.append(key)
        name: str | None = await session.scalar(select(Place.name).where(Place.key == key))
        return name


async def put(sessions: async_sessionmaker[AsyncSession], key: str, name: str | None) -> None:
    async with sessions.begin() as session:
        await session.execute(delete(Place).where(Place.key == key))
        if name is not None:
            await session.execute(insert(Place).values(key=key, name=name))


async def test_a_held_entry_is_answered_from_memory_and_a_miss_from_the_database(
    tables: None, sessions: async_sessionmaker[AsyncSession]
) -> None:
    reads = Reads()
    directory = CachedDirectory(reads, {"a": "Alpha"})
    await put(sessions, "b", "Bravo")  # added after the start, by an operator
    async with sessions() as session:
        assert directory.known("a") == "Alpha"
        assert directory.known("b") is None
        assert await directory.lookup("a", session=session) == "Alpha"
        assert await directory.lookup("b", session=session) == "Bravo"
        assert await directory.lookup("b", session=session) == "Bravo"  # held now
        assert await directory.lookup("c", session=session) is None
        assert await directory.lookup("c", session=session) is None  # a miss is always read
    assert reads.keys == ["b", "c", "c"]
    assert directory.known("b") == "Bravo"
    # Without a ttl an entry stays, whatever the table says, until it is replaced or forgotten.
    await put(sessions, "a", None)
    assert directory.known("a") == "Alpha"
    directory.forget("a")
    assert directory.known("a") is None
    directory.replace({"z": "Zulu"})
    assert (directory.known("b"), directory.known("z")) == (None, "Zulu")


async def test_an_entry_is_read_again_after_its_ttl_so_a_change_elsewhere_counts(
    tables: None, sessions: async_sessionmaker[AsyncSession]
) -> None:
    now = [100.0]
    reads = Reads()
    directory = CachedDirectory(reads, {"a": "Alpha"}, ttl=5.0, clock=lambda: now[0])
    await put(sessions, "a", "Alpha, renamed")
    async with sessions() as session:
        now[0] += 4.9
        assert directory.known("a") == "Alpha"
        assert await directory.lookup("a", session=session) == "Alpha"
        now[0] += 0.2  # past the entry's time
        assert directory.known("a") is None
        assert await directory.lookup("a", session=session) == "Alpha, renamed"
        assert directory.known("a") == "Alpha, renamed"  # trusted again from this read
        await put(sessions, "a", None)
        now[0] += 5.1
        assert await directory.lookup("a", session=session) is None  # gone, and dropped
        await put(sessions, "a", "Alpha")
        assert await directory.lookup("a", session=session) == "Alpha"  # back at once
    assert reads.keys == ["a", "a", "a"]
