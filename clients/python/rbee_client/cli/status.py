"""`rbee status`: every service's health and version, in one table.

For the catalog, the provisioner, the pool and each of the pool's running workers: grpc.health.v1
Check (the server as a whole) and rbee.common.v1.InfoService.GetServiceInfo (version, uptime,
auth). Each check has a short deadline (`--timeout`, default 3 s) so a dead address costs
seconds, not the CLI's usual 30.

Exit codes: 0 every service SERVING; 1 one answered but is not SERVING; 3 one could not be
reached (the pool unreachable also means its workers are unknown). `--format json` prints
`{"services": [...], "exit_code": N}`.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.common.v1 import info_pb2, info_pb2_grpc
from rbee.worker.v1 import pool_pb2, pool_pb2_grpc
from rbee.worker.v1 import worker_pb2 as wpb
from rbee_client.cli.main import client_security
from rbee_client.cli.output import print_json, print_table
from services.common.channels import ChannelSecurity, open_channel

STATUS_TIMEOUT = 3.0
# Workers in these states have a live process worth asking; the others are records only.
_LIVE_WORKER_STATES = {
    wpb.WORKER_STATE_STARTING,
    wpb.WORKER_STATE_IDLE,
    wpb.WORKER_STATE_LOADING,
    wpb.WORKER_STATE_READY,
    wpb.WORKER_STATE_BUSY,
}


@dataclass
class ServiceStatus:
    """One row of `rbee status`."""

    service: str  # catalog, provisioner, pool, workers/ID
    address: str
    health: str  # serving, not_serving, unreachable, unknown, or the pool's worker state
    version: str = ""
    uptime_seconds: float | None = None
    auth_required: bool | None = None
    metrics_url: str = ""
    note: str = ""

    @property
    def reachable(self) -> bool:
        return self.health != "unreachable"


def _uptime(info: info_pb2.ServiceInfo) -> float | None:
    if not info.HasField("start_time"):
        return None
    started = info.start_time.ToDatetime(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - started).total_seconds())


def check_service(
    name: str, address: str, *, security: ChannelSecurity, timeout: float
) -> ServiceStatus:
    """Health, then the version: one short-deadline call each on one channel."""
    status = ServiceStatus(name, address, "unknown")
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                status.health = "unreachable"
            status.note = f"health: {code.name.lower() if code else 'error'}"
            return status
        status.health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower()
        try:
            info = info_pb2_grpc.InfoServiceStub(channel).GetServiceInfo(
                info_pb2.GetServiceInfoRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            status.note = "no version: " + (
                "InfoService not served" if code is grpc.StatusCode.UNIMPLEMENTED else str(code)
            )
            return status
        status.version = info.version
        status.uptime_seconds = _uptime(info)
        status.auth_required = info.auth_required
        status.metrics_url = info.metrics_url
    return status


def pool_workers(
    address: str, *, security: ChannelSecurity, timeout: float
) -> list[wpb.Worker] | None:
    """The pool's workers (all pages); None when the pool cannot say."""
    workers: list[wpb.Worker] = []
    token = ""
    with open_channel(address, security) as channel:
        stub = pool_pb2_grpc.PoolServiceStub(channel)
        try:
            while True:
                response = stub.ListWorkers(
                    pool_pb2.ListWorkersRequest(page_token=token), timeout=timeout
                )
                workers.extend(response.workers)
                token = response.next_page_token
                if not token:
                    return workers
        except grpc.RpcError:
            return None


def collect_status(
    services: dict[str, str], *, security: ChannelSecurity, timeout: float
) -> list[ServiceStatus]:
    """Every service in `services` (name -> address) and, behind "pool", its workers."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(
            pool.map(
                lambda item: check_service(item[0], item[1], security=security, timeout=timeout),
                services.items(),
            )
        )
        pool_row = next((r for r in rows if r.service == "pool"), None)
        if pool_row is None or pool_row.health != "serving":
            return rows
        workers = pool_workers(pool_row.address, security=security, timeout=timeout)
        if workers is None:
            pool_row.note = (pool_row.note + "; " if pool_row.note else "") + "workers unknown"
            return rows
        live = [w for w in workers if w.state in _LIVE_WORKER_STATES and w.endpoint]
        rows.extend(
            pool.map(
                lambda w: check_service(w.name, w.endpoint, security=security, timeout=timeout),
                live,
            )
        )
        for w in workers:
            if w not in live:
                state = wpb.WorkerState.Name(w.state).removeprefix("WORKER_STATE_").lower()
                rows.append(
                    ServiceStatus(
                        w.name, w.endpoint or "-", state, note="not running (pool record)"
                    )
                )
    return rows


def status_exit_code(rows: list[ServiceStatus]) -> int:
    """3 when anything is unreachable, 1 when anything answered but is not serving, else 0.
    Workers the pool lists as stopped or failed are records, not services: they count for
    nothing here (`rbee workers ls` shows them)."""
    from rbee_client.cli.main import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE

    checked = [r for r in rows if r.note != "not running (pool record)"]
    if any(not r.reachable for r in checked):
        return EXIT_UNREACHABLE
    if any(r.health != "serving" for r in checked):
        return EXIT_FAILED
    return EXIT_OK


def _uptime_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = int(seconds)
    if whole >= 86400:
        return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


def cmd_status(args: argparse.Namespace) -> int:
    services = {"catalog": args.catalog, "provisioner": args.provisioner, "pool": args.pool}
    rows = collect_status(services, security=client_security(), timeout=args.timeout)
    code = status_exit_code(rows)
    if args.format == "json":
        print_json({"services": [asdict(r) for r in rows], "exit_code": code})
        return code
    print_table(
        ("SERVICE", "ADDRESS", "HEALTH", "VERSION", "UPTIME", "AUTH", "METRICS", "NOTE"),
        [
            (
                r.service,
                r.address,
                r.health,
                r.version or "-",
                _uptime_text(r.uptime_seconds),
                "" if r.auth_required is None else ("token" if r.auth_required else "none"),
                r.metrics_url or "-",
                r.note,
            )
            for r in rows
        ],
    )
    return code


def add_commands(sub: Any) -> None:
    """Register `rbee status` (its own options: a short default deadline per check)."""
    from rbee_client.cli.main import DEFAULT_CATALOG
    from rbee_client.cli.pool import DEFAULT_POOL
    from rbee_client.cli.pull import add_provisioner_argument

    p = sub.add_parser(
        "status",
        help="every service's health and version (exit 3 when one is unreachable)",
        description=(
            "Health (grpc.health.v1) and version (rbee.common.v1.InfoService) of the catalog, "
            "the provisioner, the pool and the pool's running workers. Exit 0: all serving; "
            "1: one answered but is not serving; 3: one could not be reached."
        ),
    )
    p.add_argument("--format", choices=("human", "json"), default="human", help="output format")
    p.add_argument(
        "--timeout", type=float, default=STATUS_TIMEOUT, help="deadline per check, seconds"
    )
    p.add_argument(
        "--catalog",
        default=os.environ.get("RBEE_CATALOG_ADDR", DEFAULT_CATALOG),
        help="catalog address host:port (env RBEE_CATALOG_ADDR)",
    )
    add_provisioner_argument(p)
    p.add_argument(
        "--pool",
        default=os.environ.get("RBEE_POOL_ADDR", DEFAULT_POOL),
        help="pool address host:port (env RBEE_POOL_ADDR)",
    )
    p.set_defaults(func=cmd_status)
