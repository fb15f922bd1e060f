"""services.worker.pool.process with real child processes, and nvidia-smi as a real subprocess.

Every child here is `python -c` (or the real rbee-worker), started through WorkerProcess and
stopped by the test; each test takes a few seconds at most.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.catalog.domain import DeviceKind
from services.worker.pool.devices import MIB, detect_devices
from services.worker.pool.process import (
    MAX_LINE_BYTES,
    POOL_PID_ENV,
    LaunchSpec,
    LogLine,
    WorkerProcess,
    parse_log_record,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ON_LINUX = sys.platform.startswith("linux")


def python(code: str) -> LaunchSpec:
    return LaunchSpec(argv=[sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ))


@pytest.fixture
async def started() -> AsyncIterator[list[WorkerProcess]]:
    """Processes a test starts; any still running at the end are killed."""
    processes: list[WorkerProcess] = []
    yield processes
    for process in processes:
        await process.stop(grace=0, force=True)


async def first_line(process: WorkerProcess, text: str) -> LogLine:
    """Wait (10 s at most) until `process` prints the line `text` (already printed counts)."""

    async def wait() -> LogLine:
        follower = process.follow()
        for line in process.tail():
            if line.text == text:
                return line
        async for line in follower:
            if line.text == text:
                return line
        raise AssertionError(f"output ended without {text!r}: {process.tail()}")

    return await asyncio.wait_for(wait(), 10)


def process_state(pid: int) -> str | None:
    """The /proc state letter of `pid` ("Z" for a zombie), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# ---- output, exit codes ----------------------------------------------------------------------


async def test_output_of_both_streams_and_the_exit_code(started: list[WorkerProcess]) -> None:
    process = await WorkerProcess.start(
        python(
            """
            import sys
            print("out 1"); print("out 2")
            print("err 1", file=sys.stderr); print("err 2", file=sys.stderr)
            sys.stdout.write("no newline at the end")
            sys.exit(3)
            """
        )
    )
    started.append(process)
    assert process.pid > 0
    assert await asyncio.wait_for(process.wait(), 10) == 3
    assert process.returncode == 3
    assert [line.text for line in process.tail(stream="stdout")] == [
        "out 1",
        "out 2",
        "no newline at the end",
    ]
    assert [line.text for line in process.tail(stream="stderr")] == ["err 1", "err 2"]
    assert len(process.tail()) == 5
    assert [line.text for line in process.tail(1, stream="stdout")] == ["no newline at the end"]
    assert process.stderr_tail_text() == "err 1\nerr 2"
    assert process.stderr_tail_text(lines=1) == "err 2"
    assert process.stderr_tail_text(max_chars=4) == "…r 2"
    times = [line.time for line in process.tail()]
    assert all(t.tzinfo is not None and t >= process.started_at for t in times)
    assert process.tail(since=max(times)) == [
        line for line in process.tail() if line.time >= max(times)
    ]
    with pytest.raises(ValueError):
        process.tail(stream="stdin")


async def test_the_tail_is_bounded(started: list[WorkerProcess]) -> None:
    process = await WorkerProcess.start(python("for i in range(50): print(i)"), tail_lines=10)
    started.append(process)
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert [line.text for line in process.tail()] == [str(i) for i in range(40, 50)]


async def test_child_environment_and_session(started: list[WorkerProcess]) -> None:
    spec = LaunchSpec(
        argv=[
            sys.executable,
            "-c",
            "import os; print(os.environ['ONLY'], os.environ.get('HOME', '-'), "
            f"os.environ['{POOL_PID_ENV}'], os.getsid(0) == os.getpid(), "
            "os.getpgid(0) == os.getpid())",
        ],
        env={"ONLY": "this"},
    )
    process = await WorkerProcess.start(spec)
    started.append(process)
    assert await asyncio.wait_for(process.wait(), 10) == 0
    # The given environment is the whole environment, plus the pool's pid; own session.
    assert [line.text for line in process.tail()] == [f"this - {os.getpid()} True True"]


async def test_a_command_that_does_not_exist_raises() -> None:
    with pytest.raises(FileNotFoundError):
        await WorkerProcess.start(LaunchSpec(argv=["/nonexistent/rbee-worker"], env={}))


async def test_a_very_long_line_is_split_not_wedged(started: list[WorkerProcess]) -> None:
    # 1 MiB of ASCII without a newline, then 100k two-byte characters (pieces are cut inside
    # a character), then a short line; on stderr meanwhile, a normal line.
    process = await WorkerProcess.start(
        python(
            """
            import sys
            sys.stdout.write("x" * (1024 * 1024) + "\\n")
            sys.stdout.write("é" * 100_000 + "\\n")
            sys.stdout.write("after\\n")
            print("stderr is fine", file=sys.stderr)
            """
        )
    )
    started.append(process)
    assert await asyncio.wait_for(process.wait(), 15) == 0
    out = [line.text for line in process.tail(stream="stdout")]
    assert out[-1] == "after"
    assert all(len(text.encode()) <= MAX_LINE_BYTES for text in out)
    assert "\ufffd" not in "".join(out)  # no character broken at a piece boundary
    joined = "".join(out[:-1])
    assert joined == "x" * (1024 * 1024) + "é" * 100_000
    assert len(out) >= (1024 * 1024 + 200_000) // MAX_LINE_BYTES
    assert [line.text for line in process.tail(stream="stderr")] == ["stderr is fine"]


# ---- follow, log file ------------------------------------------------------------------------


async def test_follow_yields_lines_as_they_come_and_ends_at_exit(
    started: list[WorkerProcess],
) -> None:
    process = await WorkerProcess.start(
        python(
            """
            import sys, time
            for i in range(3):
                print(f"line {i}", flush=True)
                print(f"err {i}", file=sys.stderr, flush=True)
                time.sleep(0.3)
            """
        )
    )
    started.append(process)
    follower = process.follow(stream="stdout")
    received: list[tuple[str, int | None]] = []

    async def collect() -> None:
        async for line in follower:
            received.append((line.text, process.returncode))

    await asyncio.wait_for(collect(), 10)  # ends by itself when the output ends
    assert [text for text, _ in received] == ["line 0", "line 1", "line 2"]
    assert received[0][1] is None  # the first line came while the process still ran
    assert process.returncode == 0
    # A follower created after the end ends at once.
    assert [line async for line in process.follow()] == []


async def test_log_path_receives_every_line(tmp_path: Path, started: list[WorkerProcess]) -> None:
    log_path = tmp_path / "logs" / "workers" / "w1.log"
    for run in (1, 2):  # a restart appends to the same file
        spec = python(
            f"import sys; print('run {run} out'); print('run {run} err', file=sys.stderr)"
        )
        process = await WorkerProcess.start(
            LaunchSpec(argv=spec.argv, env=spec.env, log_path=log_path)
        )
        started.append(process)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    records = [parse_log_record(line) for line in log_path.read_text().splitlines()]
    assert all(record is not None for record in records)
    assert sorted((r.stream, r.text) for r in records if r is not None) == [
        ("stderr", "run 1 err"),
        ("stderr", "run 2 err"),
        ("stdout", "run 1 out"),
        ("stdout", "run 2 out"),
    ]
    # The file holds the same lines, with the same times, as the last run's tail.
    assert [r for r in records if r is not None and r.text.startswith("run 2")] == sorted(
        process.tail(), key=lambda line: line.time
    )


# ---- stop ------------------------------------------------------------------------------------

IGNORES_SIGTERM = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
"""


async def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(
    started: list[WorkerProcess],
) -> None:
    process = await WorkerProcess.start(python(IGNORES_SIGTERM))
    started.append(process)
    await first_line(process, "ready")
    began = time.monotonic()
    code = await asyncio.wait_for(process.stop(grace=0.5), 10)
    elapsed = time.monotonic() - began
    assert code == -signal.SIGKILL
    assert process.returncode == -signal.SIGKILL
    assert elapsed >= 0.5  # it had its grace
    assert elapsed < 5


async def test_stop_terminates_a_well_behaved_child(started: list[WorkerProcess]) -> None:
    process = await WorkerProcess.start(
        python("import time; print('ready', flush=True); time.sleep(60)")
    )
    started.append(process)
    await first_line(process, "ready")
    assert await asyncio.wait_for(process.stop(grace=10), 5) == -signal.SIGTERM


async def test_force_kills_at_once(started: list[WorkerProcess]) -> None:
    process = await WorkerProcess.start(python(IGNORES_SIGTERM))
    started.append(process)
    await first_line(process, "ready")
    began = time.monotonic()
    assert await asyncio.wait_for(process.stop(grace=30, force=True), 10) == -signal.SIGKILL
    assert time.monotonic() - began < 5


async def test_stop_after_exit_returns_the_code_without_a_signal(
    started: list[WorkerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    process = await WorkerProcess.start(python("import sys; sys.exit(7)"))
    started.append(process)
    assert await asyncio.wait_for(process.wait(), 10) == 7
    with caplog.at_level(logging.DEBUG, logger="services.worker.pool.process"):
        assert await process.stop(grace=1) == 7
        assert await process.stop(grace=0, force=True) == 7
    assert not [r for r in caplog.records if r.getMessage().startswith("sending")]


async def test_concurrent_stops_agree(started: list[WorkerProcess]) -> None:
    process = await WorkerProcess.start(python(IGNORES_SIGTERM))
    started.append(process)
    await first_line(process, "ready")
    graceful = asyncio.create_task(process.stop(grace=30))
    await asyncio.sleep(0.2)
    assert not graceful.done()
    # A forced stop cuts the first one's grace short; both see the same exit.
    assert await asyncio.wait_for(process.stop(grace=0, force=True), 5) == -signal.SIGKILL
    assert await asyncio.wait_for(graceful, 5) == -signal.SIGKILL


# ---- dying with the pool ---------------------------------------------------------------------

INTERMEDIATE = """
    import asyncio, os, sys
    from services.worker.pool.process import LaunchSpec, WorkerProcess

    async def main():
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = await WorkerProcess.start(LaunchSpec(argv=sleeper, env=dict(os.environ)))
        print(child.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
"""


@pytest.mark.skipif(not ON_LINUX, reason="PR_SET_PDEATHSIG is Linux only")
def test_the_child_dies_when_its_parent_is_killed() -> None:
    intermediate = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(INTERMEDIATE)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    grandchild = 0
    try:
        assert intermediate.stdout is not None
        line = intermediate.stdout.readline()  # the pool-like parent prints its child's pid
        assert line.strip().isdigit(), intermediate.stderr.read() if intermediate.stderr else ""
        grandchild = int(line)
        assert process_state(grandchild) not in (None, "Z")
        environ = Path(f"/proc/{grandchild}/environ").read_bytes().split(b"\0")
        assert f"{POOL_PID_ENV}={intermediate.pid}".encode() in environ

        intermediate.kill()  # SIGKILL: no cleanup code of the parent runs
        intermediate.wait(timeout=10)
        deadline = time.monotonic() + 2
        while process_state(grandchild) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(grandchild) in (None, "Z"), "the worker outlived its pool"
    finally:
        if intermediate.poll() is None:
            intermediate.kill()
            intermediate.wait(timeout=10)
        if grandchild and process_state(grandchild) not in (None, "Z"):
            os.kill(grandchild, signal.SIGKILL)  # only on failure: our own grandchild
        for stream in (intermediate.stdout, intermediate.stderr):
            if stream is not None:
                stream.close()


# ---- the real worker -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_command() -> list[str]:
    script = Path(sys.executable).parent / "rbee-worker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.worker"]


async def _wait_serving(address: str, process: WorkerProcess, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise AssertionError(
                    f"rbee-worker exited with {process.returncode}:\n{process.stderr_tail_text()}"
                )
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"rbee-worker not SERVING in {limit_s} s:\n{process.stderr_tail_text()}")


async def test_the_real_worker_starts_serves_and_stops_cleanly(
    tmp_path: Path, started: list[WorkerProcess]
) -> None:
    port = _free_port()
    spec = LaunchSpec(
        argv=[
            *_worker_command(),
            "--engine",
            "fake",
            "--device",
            "cpu",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--catalog",
            "",
            "--name",
            "workers/pool-test",
        ],
        env={**os.environ, "RBEE_HOME": str(tmp_path / "home")},
        log_path=tmp_path / "logs" / "pool-test.log",
    )
    process = await WorkerProcess.start(spec)
    started.append(process)
    await _wait_serving(f"127.0.0.1:{port}", process, limit_s=60)
    assert process.returncode is None

    assert await asyncio.wait_for(process.stop(grace=5), 30) == 0  # SIGTERM handled gracefully
    texts = [line.text for line in process.tail()]
    assert any(f"worker serving on port {port}" in text for text in texts), texts
    assert f"worker serving on port {port}" in (tmp_path / "logs" / "pool-test.log").read_text()


# ---- nvidia-smi as a subprocess (devices) ----------------------------------------------------


def _fake_nvidia_smi(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_detect_devices_runs_nvidia_smi_with_the_query(tmp_path: Path) -> None:
    args_file = tmp_path / "args"
    binary = _fake_nvidia_smi(
        tmp_path,
        f"""
        echo "$@" > {args_file}
        echo "1, NVIDIA GeForce RTX 3090, GPU-b, 24576, [N/A], 8.6, 535.183.01"
        echo "0, NVIDIA GeForce RTX 4090, GPU-a, 24564, 23911, 8.9, 535.183.01"
        """,
    )
    devices = detect_devices(nvidia_smi=binary)
    assert args_file.read_text().split() == [
        "--query-gpu=index,name,uuid,memory.total,memory.free,compute_cap,driver_version",
        "--format=csv,noheader,nounits",
    ]
    cpu, first, second = devices
    assert cpu.kind is DeviceKind.CPU
    assert [first.name, second.name] == ["devices/cuda-0", "devices/cuda-1"]
    assert first.free_vram_bytes == 23911 * MIB and second.free_vram_bytes is None
    # GPUs carry the host RAM: a partial offload keeps its other layers there.
    assert first.total_ram_bytes == cpu.total_ram_bytes


def test_an_old_driver_without_compute_cap_is_asked_again(tmp_path: Path) -> None:
    binary = _fake_nvidia_smi(
        tmp_path,
        """
        case "$1" in
          *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2;;
        esac
        echo "0, Tesla K80, GPU-k80, 11441, 11378, 418.226.00"
        """,
    )
    [_, gpu] = detect_devices(nvidia_smi=binary)
    assert (gpu.display_name, gpu.compute_capability, gpu.driver_version) == (
        "Tesla K80",
        "",
        "418.226.00",
    )


@pytest.mark.parametrize(
    "body",
    [
        "echo 'NVIDIA-SMI has failed: could not communicate with the NVIDIA driver.'; exit 9",
        "exec sleep 5",
    ],
    ids=["failing", "hanging"],
)
def test_a_failing_or_hanging_nvidia_smi_means_no_cuda_devices(tmp_path: Path, body: str) -> None:
    binary = _fake_nvidia_smi(tmp_path, body)
    began = time.monotonic()
    devices = detect_devices(nvidia_smi=binary, timeout=0.5)
    assert time.monotonic() - began < 4
    assert [d.kind for d in devices] == [DeviceKind.CPU]
