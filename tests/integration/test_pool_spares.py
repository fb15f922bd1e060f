"""Warm spares: the pool starts a worker process ahead, and the next spawn like it takes it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from rbee.worker.v1 import pool_pb2 as pb
from rbee.worker.v1 import worker_pb2 as wpb
from services.worker.pool.process import LaunchSpec, WorkerProcess
from services.worker.spare import EXIT_MISMATCH, SPARE_FLAG
from services.worker.stdout_lines import SERVING, SPARE_READY
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.test_pool import (
    Hive,
    alive,
    generate,
    register,
    running_hive,
    spawn,
    wait_until,
)

pytestmark = pytest.mark.integration

STARTING = pb.SPAWN_STAGE_STARTING


def starting_message(events: list[pb.SpawnProgress]) -> str:
    return next(e.message for e in events if e.stage == STARTING)


def ready_spare(hive: Hive) -> int:
    """The pid of the one warm spare, once it is ready."""
    wait_until(lambda: hive.metric("rbee_pool_spare_workers") == 1, 30)
    pids = hive.service.spares.pids()
    assert len(pids) == 1
    return pids[0]


def test_the_next_spawn_starts_from_a_warm_spare(tmp_path: Path) -> None:
    with running_hive(tmp_path / "home") as hive:
        first_model = register(hive, write_tiny_llama_gguf(tmp_path / "a.gguf"), "a")
        second_model = register(hive, write_tiny_llama_gguf(tmp_path / "b.gguf"), "b")
        assert hive.metric("rbee_pool_spare_workers") == 0

        events, first = spawn(hive, model=first_model)
        assert "warm spare" not in starting_message(events)
        assert hive.metric("rbee_pool_worker_starts_total", start="cold") == 1
        spare = ready_spare(hive)
        assert spare != first.pid and alive(spare)
        hive.pool.StopWorker(pb.StopWorkerRequest(name=first.name), timeout=30)

        events, second = spawn(hive, model=second_model)
        assert starting_message(events).endswith("(from a warm spare)")
        assert second.pid == spare
        assert hive.metric("rbee_pool_worker_starts_total", start="warm") == 1
        assert generate(second, second_model)

        # Its log is the worker's own: in the file and in GetWorkerLogs, without the spare's
        # ready line.
        logs = list(hive.pool.GetWorkerLogs(pb.GetWorkerLogsRequest(name=second.name), timeout=10))
        texts = [line.text for msg in logs for line in msg.lines]
        assert any("worker serving" in text for text in texts)
        assert SPARE_READY not in texts
        # The line the pool watches for (at once, not at its next health poll).
        assert SERVING in texts
        log_file = hive.home / "pool" / "logs" / f"{second.name.removeprefix('workers/')}.log"
        assert "worker serving" in log_file.read_text()

        # A crash and restart of the worker is warm as well, from the next spare.
        next_spare = ready_spare(hive)
        assert next_spare != spare
        os.kill(second.pid, 9)
        wait_until(lambda: not alive(second.pid), 10)
        wait_until(
            lambda: (
                hive.pool.GetWorker(pb.GetWorkerRequest(name=second.name), timeout=10).state
                == wpb.WORKER_STATE_FAILED
            ),
            20,
        )
        hive.pool.DeleteWorker(pb.DeleteWorkerRequest(name=second.name), timeout=10)
        _, third = spawn(hive, model=second_model)
        assert third.pid == next_spare
        last_spare = ready_spare(hive)
    # The pool's close stops its spares like its workers.
    wait_until(lambda: not alive(last_spare) and not alive(third.pid), 15)


def test_a_dead_spare_means_a_cold_start(tmp_path: Path) -> None:
    with running_hive(tmp_path / "home") as hive:
        model = register(hive, write_tiny_llama_gguf(tmp_path / "a.gguf"), "a")
        _, first = spawn(hive, model=model)
        hive.pool.StopWorker(pb.StopWorkerRequest(name=first.name), timeout=30)
        spare = ready_spare(hive)
        os.kill(spare, 9)
        wait_until(lambda: not alive(spare) and hive.service.spares.pids() == [], 10)
        events, second = spawn(hive, model=model)
        assert "warm spare" not in starting_message(events)
        assert second.pid != spare and generate(second, model)
        assert hive.metric("rbee_pool_worker_starts_total", start="cold") == 2


def test_no_spares_when_none_are_wanted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_POOL_SPARE_DEVICE_KINDS", "[]")
    with running_hive(tmp_path / "home") as hive:
        model = register(hive, write_tiny_llama_gguf(tmp_path / "a.gguf"), "a")
        spawn(hive, model=model)
        time.sleep(3)  # past the refill delay
        assert hive.service.spares.pids() == []
        assert hive.metric("rbee_pool_spare_workers") == 0


async def test_a_spare_refuses_an_argv_for_another_device_or_engine(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "services.worker"]
    for argv in (
        ["--engine", "fake", "--device", "cuda:0", "--listen", "127.0.0.1:0"],
        ["--engine", "llama_cpp", "--device", "cpu", "--listen", "127.0.0.1:0"],
    ):
        process = await WorkerProcess.start(
            LaunchSpec(
                argv=[*command, SPARE_FLAG, "--engine", "fake", "--device", "cpu"],
                env=dict(os.environ),
                stdin_pipe=True,
            )
        )
        await process.send_launch(argv, log_path=tmp_path / "spare.log")
        assert await process.wait() == EXIT_MISMATCH
        assert "error: spare: this spare" in process.stderr_tail_text()


async def test_a_spare_whose_input_ends_exits_without_starting() -> None:
    command = [sys.executable, "-m", "services.worker"]
    process = await WorkerProcess.start(
        LaunchSpec(
            argv=[*command, SPARE_FLAG, "--engine", "fake", "--device", "cpu"],
            env=dict(os.environ),
            stdin_pipe=True,
        )
    )
    lines = process.follow(stream="stdout")
    first = await anext(lines)
    assert first.text == SPARE_READY
    process.close_stdin()
    assert await process.wait() == 0
