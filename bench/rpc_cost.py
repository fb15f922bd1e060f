"""CPU time per catalog RPC, server and client side: where bench.load's catalog capacity goes.

    python -m bench.rpc_cost [--calls 4000] [--concurrency 32] [--models 1000]
                             [--clients aio,sync] [--ops GetModel,ListModels,...]
                             [--token TOKEN] [--pause] [--workdir DIR] [--keep]

Wall-clock rates on a shared 2-core machine say more about the neighbours than about the code;
CPU seconds do not. This starts the real `rbee-catalog` (its own process, `--models` of
bench.catalog's realistic entries, the same data bench.load serves), then for each client kind
and each operation sends `--calls` calls closed-loop with `--concurrency` in flight, after a
warm-up, and reads utime + stime (/proc/PID/stat) of the catalog process and of this client
process before and after. CPU per call = the difference / calls, in microseconds. The client
side counts every thread of this process (grpc's C-core threads included), nothing else.

Operations are bench.load's mix: GetModel (a random model), ListModels (a page of 50, every
other one filtered by state=ready), EvaluateCompatibility (a random READY model with metadata).
Client kinds: `aio` (grpc.aio stubs, tasks on one event loop, as bench.load drives the catalog)
and `sync` (sync stubs on `--concurrency` threads). `--token` starts the catalog with
RBEE_AUTH_TOKEN set and sends it, to price the auth check. `--pause` stops after start-up and
prints the catalog's pid so a profiler can attach (`py-spy record --native -p PID`); press
Enter to go on. Prints a table and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.catalog import bench_workdir, build_models, catalog_process, populate_rbee
from bench.console import Progress, command_line
from bench.processes import cpu_seconds
from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.catalog.v1 import catalog_pb2_grpc
from services.catalog.domain import ModelState
from services.common.channels import ChannelSecurity, open_aio_channel, open_channel

OPERATIONS = ("GetModel", "ListModels", "EvaluateCompatibility")
CLIENT_KINDS = ("aio", "sync")
RPC_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0
SEED = 7
PAGE_SIZE = 50


@dataclass(frozen=True)
class Targets:
    """What the calls ask for: every model, and the ones EvaluateCompatibility can judge."""

    model_names: Sequence[str]
    compat_names: Sequence[str]


def make_request(op: str, targets: Targets, rng: random.Random) -> object:
    """One request of `op`, as bench.load sends it."""
    if op == "GetModel":
        return cpb.GetModelRequest(name=rng.choice(targets.model_names))
    if op == "ListModels":
        state_filter = "state=ready" if rng.random() < 0.5 else ""
        return cpb.ListModelsRequest(page_size=PAGE_SIZE, filter=state_filter)
    if op == "EvaluateCompatibility":
        return cpb.EvaluateCompatibilityRequest(model=rng.choice(targets.compat_names))
    raise ValueError(f"unknown operation {op!r}")


@dataclass
class Cost:
    """One (client kind, operation) measurement."""

    client: str
    op: str
    calls: int
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float

    @property
    def server_us(self) -> float:
        """Catalog CPU per call, microseconds."""
        return self.server_cpu_s / self.calls * 1e6

    @property
    def client_us(self) -> float:
        """Client CPU per call, microseconds."""
        return self.client_cpu_s / self.calls * 1e6


# --- the two client kinds --------------------------------------------------------------------


async def _aio_calls(
    address: str,
    security: ChannelSecurity,
    op: str,
    targets: Targets,
    calls: int,
    concurrency: int,
) -> None:
    async with open_aio_channel(address, security) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        method = getattr(stub, op)
        rng = random.Random(SEED)
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await method(make_request(op, targets, rng), timeout=RPC_TIMEOUT_S)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def run_aio(
    address: str,
    security: ChannelSecurity,
    op: str,
    targets: Targets,
    calls: int,
    concurrency: int,
) -> None:
    """`calls` calls of `op` over grpc.aio, `concurrency` in flight."""
    asyncio.run(_aio_calls(address, security, op, targets, calls, concurrency))


def run_sync(
    address: str,
    security: ChannelSecurity,
    op: str,
    targets: Targets,
    calls: int,
    concurrency: int,
) -> None:
    """`calls` calls of `op` over sync stubs, one blocking call per thread at a time."""
    with open_channel(address, security) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        method = getattr(stub, op)
        lock = threading.Lock()
        remaining = [calls]
        failures: list[BaseException] = []

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while True:
                    with lock:
                        if remaining[0] <= 0:
                            return
                        remaining[0] -= 1
                    method(make_request(op, targets, rng), timeout=RPC_TIMEOUT_S)
            except BaseException as exc:  # reported after the join
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(SEED + i,)) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]


CLIENTS: dict[str, Callable[[str, ChannelSecurity, str, Targets, int, int], None]] = {
    "aio": run_aio,
    "sync": run_sync,
}


def measure(
    client: str,
    op: str,
    address: str,
    security: ChannelSecurity,
    targets: Targets,
    server_pid: int,
    *,
    calls: int,
    concurrency: int,
) -> Cost:
    """Warm up, then CPU of the server and of this process over `calls` calls."""
    run = CLIENTS[client]
    run(address, security, op, targets, max(50, calls // 10), concurrency)
    me = os.getpid()
    server_before, client_before = cpu_seconds(server_pid), cpu_seconds(me)
    started = time.perf_counter()
    run(address, security, op, targets, calls, concurrency)
    wall = time.perf_counter() - started
    server_after, client_after = cpu_seconds(server_pid), cpu_seconds(me)
    return Cost(client, op, calls, wall, server_after - server_before, client_after - client_before)


# --- the catalog process -----------------------------------------------------------------------


# --- the report -------------------------------------------------------------------------------


def render_table(costs: Sequence[Cost], facts: Sequence[tuple[str, str]], command: str) -> str:
    """The plain-text report."""
    header = ("client", "operation", "calls", "wall", "server CPU/call", "client CPU/call")
    rows = [header]
    for cost in costs:
        rows.append(
            (
                cost.client,
                cost.op,
                f"{cost.calls:,}",
                f"{cost.wall_s:.2f} s",
                f"{cost.server_us:,.0f} us",
                f"{cost.client_us:,.0f} us",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join(
        [
            f"command:  {command}",
            f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}",
            *(f"{name + ':':<9} {value}" for name, value in facts),
            "",
            line(header),
            line(["-" * w for w in widths]),
            *(line(row) for row in rows[1:]),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.rpc_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=4000, help="measured calls per row")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--models", type=int, default=1000, help="models in the catalog")
    parser.add_argument("--clients", default=",".join(CLIENT_KINDS), help="aio,sync")
    parser.add_argument("--ops", default=",".join(OPERATIONS), help="operations to measure")
    parser.add_argument("--token", default="", help="turn auth on with this token")
    parser.add_argument("--pause", action="store_true", help="wait for Enter (attach py-spy)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write files")
    parser.add_argument("--keep", action="store_true", help="keep the files and logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the table; exits 0."""
    args = parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    ops = [o for o in args.ops.split(",") if o]
    for name in clients:
        if name not in CLIENTS:
            raise SystemExit(f"unknown client kind {name!r} (choose from {', '.join(CLIENTS)})")
    for name in ops:
        if name not in OPERATIONS:
            raise SystemExit(f"unknown operation {name!r} (choose from {', '.join(OPERATIONS)})")
    progress = Progress()
    costs: list[Cost] = []
    with bench_workdir("rbee-bench-rpc-cost-", args.workdir, keep=args.keep) as workdir:
        generated = list(build_models(max(1, args.models), SEED))
        progress(f"populating the catalog with {len(generated)} models")
        populate_rbee(workdir / "home" / "catalog" / "catalog.db", generated)
        names = [f"models/{m.id}" for m in generated]
        compat = [
            f"models/{m.id}"
            for m in generated
            if m.metadata is not None and m.state is ModelState.READY
        ] or names
        targets = Targets(names, compat)
        security = ChannelSecurity(token=args.token)
        load_before = os.getloadavg()[0]
        with catalog_process(
            workdir / "home",
            log=workdir / "catalog.stderr",
            token=args.token,
            timeout=START_TIMEOUT_S,
        ) as (address, pid):
            if args.pause:
                progress(f"rbee-catalog pid {pid} on {address}; press Enter to measure")
                sys.stdin.readline()
            for client in clients:
                for op in ops:
                    progress(f"{client} {op}: {args.calls} calls, {args.concurrency} in flight")
                    costs.append(
                        measure(
                            client,
                            op,
                            address,
                            security,
                            targets,
                            pid,
                            calls=max(1, args.calls),
                            concurrency=max(1, args.concurrency),
                        )
                    )
        facts = [
            ("catalog", f"rbee-catalog with {len(generated)} models, auth "
                        f"{'on' if args.token else 'off'}, closed loop, "
                        f"{args.concurrency} in flight, after a warm-up"),
            ("cpu", "utime+stime from /proc/PID/stat over the measured calls, per call"),
            ("host load", f"1-min load average {load_before:.1f} before, "
                          f"{os.getloadavg()[0]:.1f} after"),
        ]  # fmt: skip
    print(render_table(costs, facts, command_line("bench.rpc_cost", argv)))
    progress.done(workdir, kept=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
