"""The table of the last fuzz run: `python -m tests.fuzz.summary` (the end of `make fuzz`).

Reads what every target wrote under var/fuzz/ (harness.Tally.save) and prints one row per
target: engine, cases tried, failures, and each failure's kind. Exits 1 if any target failed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.fuzz.harness import RESULTS


def load() -> list[dict[str, Any]]:
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return rows


def main() -> int:
    rows = load()
    if not rows:
        print(f"no fuzz results under {RESULTS}")
        return 1
    width = max(len("target"), *(len(row["target"]) for row in rows))
    print(f"{'target':<{width}}  {'engine':<12} {'cases':>9} {'failures':>8}")
    print("-" * (width + 33))
    for row in rows:
        print(
            f"{row['target']:<{width}}  {row['engine']:<12} {row['tried']:>9} {row['failures']:>8}"
        )
        for kind in row.get("failure_kinds", {}):
            print(f"{'':<{width}}    ! {kind}")
    total = sum(row["tried"] for row in rows)
    failed = [row["target"] for row in rows if row["failures"]]
    print("-" * (width + 33))
    print(f"{len(rows)} targets, {total} cases, {len(failed)} with failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
