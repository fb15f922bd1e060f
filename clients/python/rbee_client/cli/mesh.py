"""`rbee up` and `rbee down`: the local mesh (catalog, provisioner, pool) as separate processes.

`rbee up` starts the three services on loopback, waits until each reports SERVING on
grpc.health.v1, prints the endpoints, and stops them all (SIGTERM, in reverse order) on Ctrl-C.
With `--background` it returns once they serve, leaving them running; `rbee down` stops that
mesh. The processes are recorded in RBEE_HOME/mesh.json (pid and command line each), and `down`
signals a pid only while its command line is still the one recorded (a reused pid is left
alone).

Ports: the documented defaults (catalog 50061, provisioner 50081, pool 50091; metrics 9461,
9481, 9491), so every client finds the mesh with no flags. `--base-port N` moves them to N, N+1,
N+2 (metrics off); then point clients at them (RBEE_CATALOG_ADDR, RBEE_PROVISIONER_ADDR,
RBEE_POOL_ADDR, printed by `rbee up`).

Access: the services read the hive-wide access variables (RBEE_AUTH_TOKEN_FILE or
RBEE_AUTH_TOKEN, RBEE_TLS_CERT_FILE, ...; services.common.settings) from the environment `rbee
up` runs in, and `rbee up` probes their health the way they call one another (the same token,
CA and certificate), so the gating works with auth and TLS on. Clients then need RBEE_TOKEN (and
RBEE_TLS_CA ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import ChannelSecurity, open_channel
from services.common.settings import (
    DEFAULT_HOME,
    FAST_RECONNECT_OPTIONS,
    ServiceSettings,
    SettingsError,
    load_settings,
)

DEFAULT_PORTS = {"catalog": (50061, 9461), "provisioner": (50081, 9481), "pool": (50091, 9491)}
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class Service:
    name: str  # catalog, provisioner, pool
    port: int
    metrics_port: int | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [str(Path(sys.executable).parent / f"rbee-{self.name}")]


def plan(base_port: int | None) -> list[Service]:
    if base_port is None:
        return [Service(n, p, m) for n, (p, m) in DEFAULT_PORTS.items()]
    return [Service(n, base_port + i, None) for i, n in enumerate(DEFAULT_PORTS)]


def environment(services: list[Service], home: Path) -> dict[str, str]:
    by_name = {s.name: s for s in services}
    env = {"RBEE_HOME": str(home)}
    for s in services:
        prefix = f"RBEE_{s.name.upper()}"
        env[f"{prefix}_LISTEN"] = s.address
        env[f"{prefix}_METRICS_LISTEN"] = f"127.0.0.1:{s.metrics_port}" if s.metrics_port else ""
        env[f"{prefix}_ADDR"] = s.address  # what the CLI reads
    env["RBEE_PROVISIONER_CATALOG_ADDRESS"] = by_name["catalog"].address
    env["RBEE_POOL_CATALOG_ADDRESS"] = by_name["catalog"].address
    env["RBEE_POOL_PROVISIONER_ADDRESS"] = by_name["provisioner"].address
    return env


def probe_security() -> ChannelSecurity:
    """How the services call one another, from the environment they start in (token, CA,
    certificate): `rbee up` probes their health with it. SettingsError when misconfigured."""
    return load_settings(ServiceSettings).client_security()


def wait_serving(
    service: Service,
    process: subprocess.Popen[bytes],
    log: Path,
    security: ChannelSecurity | None = None,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with open_channel(service.address, security, options=FAST_RECONNECT_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(
                    f"rbee-{service.name} exited with {process.returncode}: " + " | ".join(tail)
                )
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"rbee-{service.name} was not SERVING within {START_TIMEOUT:.0f} s")


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stop(records: list[dict[str, Any]]) -> list[str]:
    """SIGTERM each recorded process (reverse order) that is still the recorded command, then
    wait; SIGKILL after STOP_TIMEOUT. Returns the names stopped."""
    stopped: list[str] = []
    for record in reversed(records):
        pid, command = int(record["pid"]), list(record["command"])
        current = _cmdline(pid)
        if current is None or command[-1] not in " ".join(current):
            continue  # gone, or the pid now belongs to another program
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _cmdline(pid) is not None:
            _reap(pid)
            time.sleep(0.05)
        if _cmdline(pid) is not None:
            os.kill(pid, signal.SIGKILL)
        stopped.append(str(record["name"]))
    return stopped


def _reap(pid: int) -> None:
    """Reap `pid` if it is our exited child (the foreground `rbee up`), so it leaves /proc."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def cmd_up(args: argparse.Namespace) -> int:
    from rbee_client.cli.main import EXIT_INTERRUPTED, EXIT_USAGE, CliError

    home = Path(args.home or os.environ.get("RBEE_HOME") or DEFAULT_HOME).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    state = home / "mesh.json"
    if state.exists() and any(_cmdline(int(r["pid"])) for r in json.loads(state.read_text())):
        raise CliError(
            f"a mesh recorded in {state} is still running", hint="stop it with `rbee down`"
        )
    try:
        security = probe_security()  # before anything starts: a bad setting is one line
    except SettingsError as exc:
        raise CliError(
            str(exc), code=EXIT_USAGE, hint="check the RBEE_AUTH_* and RBEE_TLS_* variables"
        ) from None
    services = plan(args.base_port)
    env = {**os.environ, **environment(services, home)}
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    started: list[tuple[Service, subprocess.Popen[bytes]]] = []
    records: list[dict[str, Any]] = []
    try:
        for service in services:
            log = logs / f"{service.name}.log"
            process = subprocess.Popen(
                service.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log.open("ab"),
                start_new_session=args.background,  # detached: Ctrl-C here must not reach it
            )
            started.append((service, process))
            records.append({"name": service.name, "pid": process.pid, "command": service.command})
            wait_serving(service, process, log, security)
            print(f"{service.name:<12} {service.address}", flush=True)
    except (RuntimeError, OSError) as exc:
        _stop(records)
        raise CliError(str(exc), hint=f"see the logs in {logs}") from None
    except KeyboardInterrupt:
        _stop(records)
        print("interrupted while starting; stopped what had started", file=sys.stderr)
        return EXIT_INTERRUPTED
    state.write_text(json.dumps(records))
    if args.background:
        _print_endpoints(env)
        print("the mesh runs in the background; stop it with `rbee down`", file=sys.stderr)
        return 0
    # From here a Ctrl-C, whenever it comes, stops the whole mesh.
    try:
        _print_endpoints(env)
        print("serving; Ctrl-C stops the mesh", file=sys.stderr, flush=True)
        while all(p.poll() is None for _, p in started):
            time.sleep(0.5)
        gone = [s.name for s, p in started if p.poll() is not None]
        print(f"{', '.join(gone)} exited; stopping the mesh", file=sys.stderr)
    except KeyboardInterrupt:
        print("stopping the mesh", file=sys.stderr)
    _stop(records)
    state.unlink(missing_ok=True)
    return 0


def _print_endpoints(env: dict[str, str]) -> None:
    for key in ("RBEE_CATALOG_ADDR", "RBEE_PROVISIONER_ADDR", "RBEE_POOL_ADDR"):
        print(f"export {key}={env[key]}", flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    home = Path(args.home or os.environ.get("RBEE_HOME") or DEFAULT_HOME).expanduser()
    state = home / "mesh.json"
    if not state.exists():
        print(f"no mesh recorded in {state}", file=sys.stderr)
        return 0
    stopped = _stop(json.loads(state.read_text()))
    state.unlink(missing_ok=True)
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("up", help="start catalog, provisioner and pool on loopback")
    p.add_argument(
        "--home", help="RBEE_HOME for the mesh (default: $RBEE_HOME or ~/.local/share/rbee)"
    )
    p.add_argument("--base-port", type=int, help="ports N, N+1, N+2 instead of the defaults")
    p.add_argument("--background", action="store_true", help="return once serving")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop a mesh started with `rbee up --background`")
    p.add_argument("--home", help="the mesh's RBEE_HOME")
    p.set_defaults(func=cmd_down)
