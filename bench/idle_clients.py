"""Many idle clients on one gateway: memory per connection, connect time, delivery to all.

    .venv/bin/python -m bench.idle_clients [--clients 10000] [--workers 4] [--seconds 20]

The suite's occupancy path (`edgeway.gateway` + `edgeway.occupancy` on a private RabbitMQ virtual
host and a fresh PostgreSQL database, as `bench.occupancy_fanout` starts it). `--clients`
WebSocket clients connect to `/client/ws/connect`, spread over `--workers` load-generator
processes, and then sit idle; one camera model sends Omega frame results at `--rate` frames/s
(1 by default) for `--seconds`, each to be delivered to every client.

Measured:
- memory per connection: the gateway's RSS (`/proc/<pid>/status`, VmRSS) with every client
  connected and its snapshot received, minus its RSS before the first client, over the connections;
- connect time: from starting the client processes until every connection is open, and until
  every client has received its snapshot (each location gets a state before the clients come, so
  a snapshot is one message per location);
- delivery: client receive time minus the frame's timestamp, p50/p99/max over every delivery,
  and loss (deliveries expected minus received; each client must get every frame once).

Prints a table and writes bench/results/idle_clients.json. It never asserts: the goal columns
are information (bench/README.md).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.cpu import CpuMeter, background
from bench.occupancy_fanout import (
    RESULTS,
    Config,
    Session,
    SuiteTarget,
    interrupts_as_keyboard_interrupt,
    machine_facts,
    occupancy_available,
    table,
    to_json,
)

KB_PER_CONNECTION_GOAL = 25.0
P99_GOAL_MS = 250.0
CONNECT_TIMEOUT = 600.0  # seconds for every client to connect and get its snapshot


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def settled_rss(pid: int, *, seconds: float = 2.0) -> int:
    """RSS once it stops moving (allocator caches and GC settle after a connection storm)."""
    last = rss_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        current = rss_kib(pid)
        if current == last:
            break
        last = current
    return last


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = Config(clients=args.clients, workers=args.workers, drain_max=10.0, drain_idle=3.0)
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    target = SuiteTarget(logs)
    session = Session(target, config)
    report: dict[str, Any] = {"background_cpu": background(1.0)}
    try:
        target.start()
        process = target.front.process
        assert process is not None
        gateway = process.pid
        model_url, client_url = target.urls()

        # Every location gets a state first, so that each client's snapshot is one message per
        # location: the clients count them to know when every snapshot has arrived.
        session.producer = producer = loadgen.Producer(model_url)
        producer.wait_connected()
        for variant, camera in enumerate(loadgen.CAMERAS):
            producer.send(loadgen.frame(camera, variant, time.time()))
        locations = len(set(loadgen.PLACES.values()))
        report["rss_before_kib"] = settled_rss(gateway)

        started = time.monotonic()
        session.pool = pool = loadgen.ClientPool(
            client_url, clients=args.clients, workers=args.workers
        )
        connected = pool.wait_connected(timeout=CONNECT_TIMEOUT)
        report["connect_s"] = round(time.monotonic() - started, 2)
        report["connected"] = connected
        expected = locations * connected["connected"]
        deadline = started + CONNECT_TIMEOUT
        while (received := pool.total()) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        report["snapshots_s"] = round(time.monotonic() - started, 2)
        report["snapshot_messages"] = {"received": received, "expected": expected}
        report["rss_connected_kib"] = settled_rss(gateway)
        grown = report["rss_connected_kib"] - report["rss_before_kib"]
        report["kib_per_connection"] = (
            round(grown / connected["connected"], 2) if connected["connected"] else None
        )

        groups = target.cpu_groups()
        groups["clients"] = lambda: pool.pids
        groups["producer"] = lambda: [pid] if (pid := producer.pid) else []
        session.meter = CpuMeter(groups)
        session.settle()  # the snapshots' messages are all in before the step is armed
        step = session.step("point", args.rate, args.seconds)
        report["step"] = step
        report["rss_after_kib"] = rss_kib(gateway)
        report["metrics"] = target.metrics()
    finally:
        session.stop()
    return report


def render(results: dict[str, Any]) -> str:
    report, machine = results["report"], results["machine"]
    step = report.get("step")
    clients = results["config"]["clients"]
    connected = report.get("connected", {}).get("connected", 0)
    rows = [
        ["clients connected", f"{connected} of {clients}", ""],
        ["connect errors", str(report.get("connected", {}).get("errors") or "none"), "none"],
        ["connect time, all open", f"{report.get('connect_s', float('nan')):.1f} s", ""],
        [
            "connect time, every snapshot received",
            f"{report.get('snapshots_s', float('nan')):.1f} s",
            "",
        ],
        [
            "gateway RSS before / connected",
            f"{report.get('rss_before_kib', 0) / 1024:.1f} / "
            f"{report.get('rss_connected_kib', 0) / 1024:.1f} MiB",
            "",
        ],
        [
            "memory per connection",
            f"{report.get('kib_per_connection') or float('nan'):.1f} KiB",
            f"<= {KB_PER_CONNECTION_GOAL:.0f} KB",
        ],
    ]
    if step is not None:
        rows += [
            [
                "frames sent",
                f"{step.sent} at {step.send_rate:.2f}/s ({step.expected} deliveries expected)",
                "",
            ],
            [
                "delivery p50 / p99 / max",
                f"{step.p50_ms:.1f} / {step.p99_ms:.1f} / {step.max_ms:.1f} ms",
                f"p99 <= {P99_GOAL_MS:.0f} ms",
            ],
            [
                "lost / duplicated / clients short",
                f"{step.loss} / {step.extra} / {step.clients_short}",
                "0 lost",
            ],
            [
                "CPU in the step (% of one core)",
                ", ".join(f"{k} {v:.0f}" for k, v in step.cpu.items() if k != "other"),
                "",
            ],
        ]
    verdict = results["verdict"]
    return "\n".join(
        [
            "",
            f"Idle clients: {clients} on one gateway in {results['config']['workers']} client "
            f"processes, Omega updates at {results['config']['rate']:g} frame/s for "
            f"{results['config']['seconds']:g} s; {machine['cpus']} CPUs, load average at start "
            f"{machine['loadavg_start']}",
            table(["measure", "value", "goal"], rows),
            "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in verdict.items()),
        ]
    )


def verdict(report: dict[str, Any]) -> dict[str, bool]:
    step = report.get("step")
    per_connection = report.get("kib_per_connection")
    return {
        # The goal is in KB (1,000 bytes); RSS is in KiB.
        f"<= {KB_PER_CONNECTION_GOAL:.0f} KB per connection": per_connection is not None
        and per_connection * 1.024 <= KB_PER_CONNECTION_GOAL,
        f"p99 <= {P99_GOAL_MS:.0f} ms": step is not None and step.p99_ms <= P99_GOAL_MS,
        "nothing lost": step is not None and step.received > 0 and step.loss == 0,
    }


def raise_open_files(wanted: int) -> None:
    """The coordinator's own limit (the client processes inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Many idle clients on one gateway")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--rate", type=float, default=1.0, help="frames/s during the step")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the step")
    parser.add_argument("--output", type=Path, default=RESULTS / "idle_clients.json")
    args = parser.parse_args(argv)
    if not occupancy_available():
        print("needs RabbitMQ and PostgreSQL (deploy/local/ensure-services.sh)", file=sys.stderr)
        return 2
    # The gateway holds a descriptor per client; each client process holds its share.
    raise_open_files(args.clients + 1024)
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "config": {k: v for k, v in vars(args).items() if k != "output"},
    }
    with interrupts_as_keyboard_interrupt():
        results["report"] = run(args)
    gc.collect()
    results["verdict"] = verdict(results["report"])
    print(render(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(to_json(results))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
