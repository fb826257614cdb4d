"""Riding out a database outage: how many tries `with_db_retry` makes, with what pauses."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError
from structlog.testing import capture_logs

from edgeway.common.db import is_outage, with_db_retry

DELAYS = (0.001, 0.002)


class Flaky:
    """Database work that fails `failures` times with `error`, then answers."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or OperationalError("SELECT 1", {}, ConnectionRefusedError())
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answered"


def pauses(logs: list[dict[str, object]]) -> list[object]:
    return [
        entry["retry_in"] for entry in logs if entry["event"] == "database unavailable, retrying"
    ]


async def test_an_outage_shorter_than_the_delays_is_ridden_out() -> None:
    work = Flaky(failures=2)
    with capture_logs() as logs:
        assert await with_db_retry(work, delays=DELAYS) == "answered"
    assert work.calls == 3
    assert pauses(logs) == [0.001, 0.002]


async def test_after_the_last_delay_one_more_try_and_its_error_goes_to_the_caller() -> None:
    work = Flaky(failures=10)
    with capture_logs() as logs, pytest.raises(OperationalError):
        await with_db_retry(work, delays=DELAYS)
    assert work.calls == len(DELAYS) + 1
    assert pauses(logs) == list(DELAYS)


async def test_forever_repeats_the_last_delay_until_the_database_answers() -> None:
    work = Flaky(failures=5)
    with capture_logs() as logs:
        assert await with_db_retry(work, delays=DELAYS, forever=True) == "answered"
    assert work.calls == 6
    assert pauses(logs) == [0.001, 0.002, 0.002, 0.002, 0.002]


async def test_errors_of_the_data_are_not_retried() -> None:
    conflict = IntegrityError("INSERT", {}, ValueError("duplicate key"))
    work = Flaky(failures=1, error=conflict)
    with pytest.raises(IntegrityError):
        await with_db_retry(work, delays=DELAYS, forever=True)
    assert work.calls == 1
    assert not is_outage(conflict)
    assert is_outage(OperationalError("SELECT 1", {}, ConnectionRefusedError()))
