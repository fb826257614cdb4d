"""Run every atheris harness for a bounded time and record what each did (for `make fuzz`).

    python -m tests.fuzz.atheris_run [--seconds N] [TARGET ...]

Each target runs in its own process (libFuzzer exits when it is done) for N seconds
(`EDGEWAY_FUZZ_SECONDS`, default 30), keeping its corpus in var/fuzz/atheris/corpus/TARGET so
that the next run starts where this one stopped; a crashing input is saved next to it. Its cases
and failures go to var/fuzz/atheris_TARGET.json, which `python -m tests.fuzz.summary` prints.
Exits 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from tests.fuzz.harness import RESULTS, ROOT, Tally

# atheris_targets.TARGETS (not imported here: importing it instruments the parsers).
TARGETS = ("upload", "h264", "gop", "multipart", "jwt")

WORK = RESULTS / "atheris"
EXECUTED = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
DONE = re.compile(rb"Done (\d+) runs")
CRASH_LINE = re.compile(rb"^\s*(\w+(?:Error|Exception)\b.*)$", re.MULTILINE)


def run_target(name: str, seconds: int) -> Tally:
    corpus = WORK / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    record = Tally(f"atheris {name}", engine="atheris", budget=seconds)
    started = time.monotonic()
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.atheris_targets",
            name,
            f"-max_total_time={seconds}",
            f"-artifact_prefix={WORK}/{name}-",
            "-print_final_stats=1",
            "-max_len=4096",
            "-timeout=20",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=seconds + 120,
        check=False,
    )
    output = finished.stdout + finished.stderr
    counts = EXECUTED.findall(output) or DONE.findall(output)
    record.tried = int(counts[-1]) if counts else 0
    if finished.returncode != 0:
        found = CRASH_LINE.findall(output)
        kind = found[-1].decode(errors="replace") if found else f"exit {finished.returncode}"
        record.fail(kind, f"input saved under {WORK}/{name}-*")
        log = WORK / f"{name}.log"
        log.write_bytes(output)
        print(f"atheris {name}: crashed; its output is in {log}", file=sys.stderr)
    record.notes["seconds"] = round(time.monotonic() - started)
    record.finish()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=int, default=int(os.environ.get("EDGEWAY_FUZZ_SECONDS", "30"))
    )
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    results = [run_target(name, args.seconds) for name in args.targets or TARGETS]
    return 1 if any(result.failures for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
