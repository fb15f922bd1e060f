"""Console scripts as subprocesses: free ports, and the wait on grpc.health.v1 SERVING."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import FAST_RECONNECT_OPTIONS

BIN = Path(sys.executable).parent


def run_rbee(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`rbee ARGS` with `env` over this process's environment, output captured; the exit code
    is the caller's to check."""
    return subprocess.run(
        [str(BIN / "rbee"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    address: str,
    process: subprocess.Popen[bytes],
    *,
    name: str,
    timeout: float = 60,
    stderr: Callable[[], str] = lambda: "",
) -> None:
    """Return once `address` reports SERVING; fail at once if `process` exits first."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=FAST_RECONNECT_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited early with {process.returncode}:\n" + stderr())
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{name} not SERVING within {timeout} s:\n" + stderr())
