"""The GPU memory a process holds, as the driver sees it (nvidia-smi's compute apps).

A CUDA worker's "device memory in use" is measured, not estimated: the model's weights are only
part of it (the CUDA context, the KV cache or activations, the allocator's reserve are the
rest). nvidia-smi lists every process with a CUDA context and what it holds on each GPU:

    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits

One line per process and GPU, "PID, MiB". A process on two GPUs has two lines (summed here).
Where nvidia-smi is missing, fails, is too slow, or does not list this process (a container
whose PID namespace differs from the driver's, a platform that prints "[N/A]"), the answer is
None: callers fall back to their estimate and say so rather than report 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

MIB = 1024 * 1024
QUERY = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")


def parse_compute_apps(text: str) -> dict[int, int]:
    """pid -> bytes held, summed over GPUs, from the query's output. Lines that are not
    "PID, MiB" (a message, "[N/A]" memory) are skipped."""
    held: dict[int, int] = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        pid, mib = int(parts[0]), int(parts[1])
        held[pid] = held.get(pid, 0) + mib * MIB
    return held


def run_nvidia_smi(binary: str, args: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run nvidia-smi with `args`: (exit code, stdout; stdout + stderr when it failed).
    Raises OSError or subprocess.TimeoutExpired as subprocess.run does."""
    done = subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout if done.returncode == 0 else done.stdout + done.stderr


def compute_apps(nvidia_smi: str = "nvidia-smi", *, timeout: float = 2.0) -> dict[int, int] | None:
    """Every process's GPU memory now; None when nvidia-smi cannot tell."""
    binary = shutil.which(nvidia_smi)
    if binary is None:
        return None
    try:
        code, output = run_nvidia_smi(binary, QUERY, timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s: %s", binary, exc)
        return None
    if code != 0:
        log.debug("%s exited %d: %s", binary, code, output.strip()[:300])
        return None
    return parse_compute_apps(output)


class GpuMemoryProbe:
    """One process's GPU memory (default: this one), measured at most every `max_age` seconds.

    `measure()` blocks on nvidia-smi when the last reading is older than `max_age` (call it from
    a thread, not the event loop); `last` is the latest reading without waiting. Thread-safe:
    concurrent callers share one nvidia-smi run."""

    def __init__(
        self,
        pid: int | None = None,
        *,
        nvidia_smi: str = "nvidia-smi",
        max_age: float = 2.0,
        timeout: float = 2.0,
        failure_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        query: Callable[[], dict[int, int] | None] | None = None,
    ) -> None:
        """`query`: what reads every process's GPU memory (default: nvidia-smi, `timeout`).
        After nvidia-smi fails or times out, it is not asked again for `failure_backoff`
        seconds: a hung driver must not make every GetWorker wait `timeout`."""
        self._pid = os.getpid() if pid is None else pid
        self._query = query or (lambda: compute_apps(nvidia_smi, timeout=timeout))
        self._max_age = max_age
        self._failure_backoff = max(failure_backoff, max_age)
        self._clock = clock
        self._valid_for = max_age
        self._lock = threading.Lock()
        self._measured_at: float | None = None
        self._last: int | None = None

    @property
    def last(self) -> int | None:
        """The latest reading in bytes; None before the first or when it could not be measured."""
        return self._last

    def measure(self) -> int | None:
        """Bytes this process holds on its GPUs, at most `max_age` old; None when unknown."""
        with self._lock:
            now = self._clock()
            if self._measured_at is not None and now - self._measured_at < self._valid_for:
                return self._last
            apps = self._query()
            self._last = None if apps is None else apps.get(self._pid)
            self._measured_at = self._clock()
            # Not listed (no CUDA context yet) is an answer; no answer at all backs off.
            self._valid_for = self._max_age if apps is not None else self._failure_backoff
            return self._last

    def gauge_value(self) -> float:
        """For a metrics gauge: the reading, NaN when unknown (never a made-up 0)."""
        measured = self.measure()
        return float("nan") if measured is None else float(measured)
