"""services.worker.gpu_memory: nvidia-smi's compute apps parsed, and the cached probe."""

from __future__ import annotations

import math

import pytest

from services.worker.gpu_memory import MIB, GpuMemoryProbe, compute_apps, parse_compute_apps

pytestmark = pytest.mark.unit

# `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` as a host
# with two GPUs prints it: pid 4021 on both, and a process whose memory the driver cannot read.
TWO_GPUS = """\
4021, 1536
5120, 800
4021, 512
6000, [N/A]
"""


def test_parse_sums_a_process_over_gpus_and_skips_what_is_not_a_number() -> None:
    assert parse_compute_apps(TWO_GPUS) == {4021: 2048 * MIB, 5120: 800 * MIB}
    assert parse_compute_apps("") == {}  # no process holds a context
    assert parse_compute_apps("No devices were found\n") == {}
    assert parse_compute_apps("pid, used_gpu_memory [MiB]\n12, 3\n") == {12: 3 * MIB}


def test_a_missing_nvidia_smi_means_unknown() -> None:
    assert compute_apps("/nonexistent/nvidia-smi") is None
    probe = GpuMemoryProbe(nvidia_smi="/nonexistent/nvidia-smi")
    assert probe.measure() is None and probe.last is None
    assert math.isnan(probe.gauge_value())  # never a made-up 0


def test_the_probe_reads_its_own_pid_at_most_once_per_max_age() -> None:
    now = [100.0]
    calls: list[int] = []
    readings: list[dict[int, int] | None] = [
        {4021: 7 * MIB, 99: MIB},
        {4021: 9 * MIB},
        {99: MIB},  # the process no longer listed (context gone): unknown, not 0
        None,  # nvidia-smi failed
    ]

    def query() -> dict[int, int] | None:
        calls.append(1)
        return readings[len(calls) - 1]

    probe = GpuMemoryProbe(4021, max_age=2.0, clock=lambda: now[0], query=query)
    assert probe.last is None
    assert probe.measure() == 7 * MIB and probe.last == 7 * MIB
    now[0] += 1.0
    assert probe.measure() == 7 * MIB and len(calls) == 1  # cached
    now[0] += 1.5
    assert probe.measure() == 9 * MIB and len(calls) == 2
    assert probe.gauge_value() == float(9 * MIB)  # still fresh: no third read
    now[0] += 2.0
    assert probe.measure() is None and probe.last is None  # not listed: asked again in 2 s
    now[0] += 2.0
    assert probe.measure() is None and len(calls) == 4  # nvidia-smi failed: back off
    now[0] += 29.0
    assert probe.measure() is None and len(calls) == 4
    readings.append({4021: 5 * MIB})
    now[0] += 1.5
    assert probe.measure() == 5 * MIB and len(calls) == 5
