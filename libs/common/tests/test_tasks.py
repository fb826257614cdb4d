"""`spawn`: a background task that ends on an error says so at once; others say nothing."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from edgeway.common.tasks import spawn


async def fails() -> None:
    raise RuntimeError("the broker went away")


async def settle(task: asyncio.Task[None]) -> None:
    await asyncio.wait([task])
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop


async def test_a_task_that_fails_is_logged_with_its_name_and_error() -> None:
    with capture_logs() as logs:
        await settle(spawn(fails(), name="publisher-phone-1"))
    assert [(e["event"], e["task"], e["log_level"]) for e in logs] == [
        ("background task ended", "publisher-phone-1", "error")
    ]
    assert "the broker went away" in logs[0]["error"]


async def test_a_task_that_ends_or_is_cancelled_is_not_logged() -> None:
    with capture_logs() as logs:
        await settle(spawn(asyncio.sleep(0), name="done"))
        cancelled = spawn(asyncio.sleep(10), name="cancelled")
        await asyncio.sleep(0)
        cancelled.cancel()
        await settle(cancelled)
    assert logs == []
