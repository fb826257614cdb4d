"""What every service's `build_app` starts from: its broker, its database and its own AMQP link."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from edgeway.common.service import database_service, link_ready
from edgeway.common.settings import CommonSettings


def settings(tmp_path: Path, amqp_url: str = "amqp://guest:guest@127.0.0.1:1/") -> CommonSettings:
    return CommonSettings(amqp_url=amqp_url, data_dir=tmp_path / "var", graceful_timeout=3.5)


async def test_a_database_service_without_a_url_gets_its_sqlite_file_under_the_data_directory(
    tmp_path: Path,
) -> None:
    base = database_service(
        settings(tmp_path),
        service="sample",
        database_url=None,
        tracer_provider=TracerProvider(),
        registry=CollectorRegistry(),
    )
    try:
        assert base.url == f"sqlite+aiosqlite:///{(tmp_path / 'var' / 'sample.sqlite3').resolve()}"
        async with base.sessions() as session:
            assert await session.scalar(text("SELECT 1")) == 1
        assert (tmp_path / "var" / "sample.sqlite3").exists()
        consumer = base.consumer(base.link(), "sample.queue", lambda message: _never())
        assert (consumer.queue_name, consumer.grace) == ("sample.queue", 3.5)
        assert consumer.link.name == "sample"
    finally:
        await base.engine.dispose()


async def _never() -> None:
    raise AssertionError("no message is consumed here")


@pytest.mark.connected
async def test_the_link_check_fails_until_the_services_own_link_is_connected(
    tmp_path: Path, amqp_url: str
) -> None:
    base = database_service(
        settings(tmp_path, amqp_url),
        service="sample",
        database_url=None,
        tracer_provider=TracerProvider(),
        registry=CollectorRegistry(),
    )
    link = base.link()
    check = link_ready(link)
    with pytest.raises(RuntimeError, match="AMQP link is not connected"):
        await check()
    await link.start()
    try:
        await check()  # connected: passes
    finally:
        await link.close()
        await base.engine.dispose()
    with pytest.raises(RuntimeError, match="AMQP link is not connected"):
        await check()
