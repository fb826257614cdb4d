"""Background tasks that do not fail in silence.

asyncio reports a task's exception only when the task is garbage-collected without anyone
having retrieved it, if ever: a per-device publisher or a broadcaster that died would just stop.
`spawn` logs the end of a task that ended on an error, at once, with the task's name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from edgeway.common.logging import get_logger

log = get_logger("edgeway.tasks")


def spawn(coroutine: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
    """Run `coroutine` as a task named `name`; if it ends on an error, the log says so."""
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(_log_crash)
    return task


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task ended", task=task.get_name(), error=repr(task.exception()))
