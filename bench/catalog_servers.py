"""GetModel latency of the catalog's two servers on one database, in alternating rounds.

    python -m bench.catalog_servers [--models 100000] [--rounds 8] [--iterations 1000]
                                    [--threads 32] [--seed 0] [--workdir DIR] [--keep]

One p99 from one run on a shared host says as much about the host's stalls as about the
server: the same code measured 1.3 ms in one bench.catalog run and 5.5 ms in the next. This
populates one catalog database with bench.catalog's models, then starts the real
`rbee-catalog` on it again and again, alternating RBEE_CATALOG_HANDLER_THREADS=`--threads` (the
threaded server, the default) and =0 (the event-loop server), `--rounds` times each. Each start
is measured as bench.catalog measures it: after a warm-up, GetModel of a random id and a bare
grpc.health.v1 Check, one of each per round of `--iterations`, over loopback with sync stubs.
Prints every start's p50 and p99 with the share of CPU time the hypervisor took from this
machine meanwhile (steal, from /proc/stat: stalls no code here can avoid), then per server the
median of those and how many starts met the issue's target (GetModel p99 < 2 ms). Exits 0.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.catalog import (
    RPC_DEADLINE_S,
    bench_workdir,
    build_models,
    catalog_process,
    percentile,
    populate_rbee,
    timed,
    timed_round,
)
from bench.console import Progress, command_line
from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc

TARGET_P99_S = 0.002
SERVERS = ("threaded", "event loop")


@dataclass
class Start:
    """One start of the catalog and what it measured (seconds)."""

    server: str
    index: int
    get: list[float]
    health: list[float]
    steal: float | None = None  # share of CPU time stolen while it ran (None: not on Linux)


def measure(address: str, ids: Sequence[str], iterations: int, rng: random.Random) -> Start:
    """GetModel of random ids and Health.Check, one of each per round, after a warm-up."""
    with grpc.insecure_channel(address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def get() -> None:
            stub.GetModel(
                pb.GetModelRequest(name=f"models/{rng.choice(ids)}"), timeout=RPC_DEADLINE_S
            )

        def check() -> None:
            health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_DEADLINE_S)

        for fn in (get, check):
            timed(fn, max(10, iterations // 10))
        rounds = [timed_round((get, check)) for _ in range(iterations)]
    return Start("", 0, [r[0] for r in rounds], [r[1] for r in rounds])


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Stolen CPU time between two `cpu_times()` readings, as a share of all CPU time."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def render(starts: Sequence[Start], facts: Sequence[tuple[str, str]], command: str) -> str:
    """The report: facts, one line per start, then the summary per server."""
    lines = [f"command:  {command}"]
    lines += [f"{key + ':':<9} {value}" for key, value in facts]
    lines += [
        "",
        f"{'start':<16}  {'steal':>5}  {'GetModel p50':>12}  {'GetModel p99':>12}  "
        f"{'Health p50':>10}  {'Health p99':>10}",
    ]
    for start in starts:
        steal = f"{start.steal:.1%}" if start.steal is not None else "-"
        lines.append(
            f"{start.server + ' ' + str(start.index):<16}  {steal:>5}  "
            f"{_ms(start.get, 0.5):>12}  {_ms(start.get, 0.99):>12}  "
            f"{_ms(start.health, 0.5):>10}  {_ms(start.health, 0.99):>10}"
        )
    lines += ["", "per server (median over its starts; target GetModel p99 < 2 ms):"]
    for server in SERVERS:
        mine = [s for s in starts if s.server == server]
        if not mine:
            continue
        p50 = statistics.median(percentile(s.get, 0.5) for s in mine) * 1000
        p99 = statistics.median(percentile(s.get, 0.99) for s in mine) * 1000
        h99 = statistics.median(percentile(s.health, 0.99) for s in mine) * 1000
        met = sum(percentile(s.get, 0.99) < TARGET_P99_S for s in mine)
        lines.append(
            f"  {server:<10}  GetModel p50 {p50:.3f} ms, p99 {p99:.3f} ms; Health.Check p99 "
            f"{h99:.3f} ms; p99 < 2 ms in {met} of {len(mine)} starts"
        )
    return "\n".join(lines)


def _ms(samples: Sequence[float], fraction: float) -> str:
    return f"{percentile(samples, fraction) * 1000:.3f} ms"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.catalog_servers", description=__doc__)
    parser.add_argument("--models", type=int, default=100_000, help="catalog size")
    parser.add_argument("--rounds", type=int, default=8, help="starts of each server")
    parser.add_argument("--iterations", type=int, default=1000, help="samples per start")
    parser.add_argument("--threads", type=int, default=32, help="the threaded server's threads")
    parser.add_argument("--seed", type=int, default=0, help="seed for models and random ids")
    parser.add_argument("--workdir", type=Path, default=None, help="where to create the store")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Populate, measure both servers in alternating starts, print the report; exits 0."""
    args = parse_args(argv)
    say = Progress()
    rng = random.Random(args.seed)
    with bench_workdir("rbee-bench-servers-", args.workdir, keep=args.keep) as workdir:
        home = workdir / "home"
        say(f"populating the catalog with {args.models} models")
        ids = [m.id for m in build_models(args.models, args.seed)]
        populate_rbee(home / "catalog" / "catalog.db", build_models(args.models, args.seed))
        starts: list[Start] = []
        for index in range(1, args.rounds + 1):
            for server in SERVERS:
                threads = args.threads if server == "threaded" else 0
                say(f"start {index} of the {server} server")
                env = {"RBEE_CATALOG_HANDLER_THREADS": str(threads)}
                with catalog_process(home, env=env) as (address, _pid):
                    before = cpu_times()
                    start = measure(address, ids, args.iterations, rng)
                    start.steal = steal_share(before, cpu_times())
                start.server, start.index = server, index
                starts.append(start)
        facts = [
            ("machine", f"{platform.platform()}, Python {platform.python_version()}"),
            ("models", f"{args.models:,}"),
            (
                "servers",
                f"threaded (RBEE_CATALOG_HANDLER_THREADS={args.threads}) and event loop (=0), "
                f"{args.rounds} alternating starts each, {args.iterations} rounds of "
                "GetModel + Health.Check per start",
            ),
        ]
        print(render(starts, facts, command_line("bench.catalog_servers", argv)))
        say.done(workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
