"""Services as subprocesses for the benchmarks: free ports, the wait on grpc.health.v1 SERVING,
a clean stop, and the resident memory of a process sampled while it works.

The benchmarks meet the services as clients do: the real console scripts in their own
processes, gated on health (never on sleep), stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import FAST_RECONNECT_OPTIONS

POLL_INTERVAL_S = 0.05
STOP_GRACE_S = 30.0


def free_port() -> int:
    """A loopback port free right now (the service binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    address: str,
    process: subprocess.Popen[bytes],
    *,
    name: str,
    timeout: float,
    log: Path | None = None,
) -> None:
    """Return once the gRPC server at `address` reports SERVING on grpc.health.v1.

    Raises RuntimeError at once if `process` exits first (with the tail of `log` when given),
    TimeoutError when `timeout` seconds pass without SERVING.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=FAST_RECONNECT_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                tail = f": {log.read_text(errors='replace')[-2000:]}" if log is not None else ""
                raise RuntimeError(f"{name} exited with {process.returncode}{tail}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet, or NOT_SERVING while it loads
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not SERVING within {timeout} s")
            time.sleep(POLL_INTERVAL_S)


def stop_process(process: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM (the services' graceful stop), then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def resident_bytes(pid: int) -> int:
    """The process's resident set size (VmRSS in /proc/PID/status), in bytes. Linux only."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                if unit != "kB":
                    raise ValueError(f"unexpected VmRSS unit {unit!r}")
                return int(value) * 1024
    raise ValueError(f"no VmRSS for process {pid} (a zombie?)")


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds on a thread, between start and stop.

        with RssSampler(pid) as rss:
            work()
        growth = rss.peak - rss.before

    `before` is read when the sampler starts (just before the work), `peak` is the largest
    sample including `before` and a last one taken at stop.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self.before = 0
        self.peak = 0
        self.samples = 0

    def __enter__(self) -> RssSampler:
        self.before = self.peak = resident_bytes(self._pid)
        self.samples = 1
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    @property
    def growth(self) -> int:
        """Peak resident bytes over the resident bytes at start (never negative)."""
        return max(0, self.peak - self.before)

    def _take(self) -> None:
        try:
            value = resident_bytes(self._pid)
        except (OSError, ValueError):
            return  # the process ended: nothing more to see
        self.samples += 1
        self.peak = max(self.peak, value)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._take()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (/proc/PID/stat). Linux only."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")
