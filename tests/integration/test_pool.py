"""The pool on a real catalog, spawning real `rbee-worker` processes (llama.cpp on the CPU)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import pool_pb2 as pb
from rbee.worker.v1 import pool_pb2_grpc, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as wpb
from services.common.server import RunningServer
from services.worker.pool.__main__ import start_pool
from services.worker.pool.service import PoolService
from services.worker.pool.settings import PoolSettings
from tests.fixtures.gguf_models import LLAMA3_70B, write_header_only_gguf, write_tiny_llama_gguf
from tests.fixtures.safetensors_models import sdxl_tensors, write_header_only_safetensors
from tests.integration.catalog_harness import running_catalog
from tests.integration.provisioner_harness import provisioner_settings, running_provisioner
from tests.integration.server_harness import error_reason, serve_in_thread

pytestmark = pytest.mark.integration

SPAWN_TIMEOUT = 120


@dataclass
class Hive:
    pool: pool_pb2_grpc.PoolServiceStub
    catalog: catalog_pb2_grpc.CatalogServiceStub
    service: PoolService
    home: Path
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@contextmanager
def running_hive(home: Path) -> Iterator[Hive]:
    """A catalog and a pool (in this process) under `home`; the pool spawns real workers."""
    with (
        running_catalog(home) as catalog,
        running_provisioner(provisioner_settings(home, catalog.address)) as (prov_address, _, _),
    ):
        settings = PoolSettings(
            home=home,
            listen="127.0.0.1:0",
            metrics_listen=None,
            catalog_address=catalog.address,
            provisioner_address=prov_address,
            stop_grace=5.0,
        )

        registry = CollectorRegistry()

        async def build() -> tuple[RunningServer, PoolService]:
            running, service = await start_pool(settings, registry)
            await running.set_serving()
            return running, service

        with (
            serve_in_thread(build, name="pool-test-server") as (running, service),
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as pool_channel,
            grpc.insecure_channel(catalog.address) as catalog_channel,
        ):
            yield Hive(
                pool_pb2_grpc.PoolServiceStub(pool_channel),
                catalog_pb2_grpc.CatalogServiceStub(catalog_channel),
                service,
                home,
                registry,
            )


@pytest.fixture
def hive(tmp_path: Path) -> Iterator[Hive]:
    with running_hive(tmp_path / "home") as running:
        yield running


def register(hive: Hive, path: Path, model_id: str, *, ready: bool = True) -> str:
    model = cpb.Model(
        source=cpb.ModelSource(kind=cpb.SOURCE_KIND_LOCAL, path=str(path)),
        paths=[str(path)],
        state=cpb.MODEL_STATE_READY if ready else cpb.MODEL_STATE_DOWNLOADING,
    )
    created = hive.catalog.CreateModel(
        cpb.CreateModelRequest(model_id=model_id, model=model), timeout=30
    )
    return str(created.name)


def spawn(hive: Hive, **fields: Any) -> tuple[list[pb.SpawnProgress], wpb.Worker]:
    events: list[pb.SpawnProgress] = []
    worker = None
    for msg in hive.pool.SpawnWorker(pb.SpawnWorkerRequest(**fields), timeout=SPAWN_TIMEOUT):
        if msg.HasField("worker"):
            worker = msg.worker
        else:
            events.append(msg.progress)
    assert worker is not None
    return events, worker


def generate(worker: wpb.Worker, model: str, *, max_tokens: int = 3) -> list[str]:
    """The token texts of one Generate on `worker` (greedy length: EOS ignored)."""
    with grpc.insecure_channel(worker.endpoint) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        return [
            m.delta.text
            for m in stub.Generate(
                gen_pb.GenerateRequest(
                    model=model,
                    prompt="hi",
                    stopping=gen_pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
                ),
                timeout=60,
            )
            if m.WhichOneof("event") == "delta"
        ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): check its state.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def wait_until(predicate: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_devices_list_the_cpu(hive: Hive) -> None:
    devices = hive.pool.ListDevices(pb.ListDevicesRequest(), timeout=10).devices
    cpu = devices[0]
    assert cpu.name == "devices/cpu" and cpu.cpu_cores >= 1
    assert cpu.total_ram_bytes > 0 and 0 < cpu.free_ram_bytes <= cpu.total_ram_bytes
    assert hive.pool.GetDevice(pb.GetDeviceRequest(name="devices/cpu"), timeout=10).name == cpu.name
    with pytest.raises(grpc.RpcError) as info:
        hive.pool.GetDevice(pb.GetDeviceRequest(name="devices/cuda-7"), timeout=10)
    assert error_reason(info.value) == "DEVICE_NOT_FOUND"


def test_spawn_generate_list_stop(hive: Hive, tmp_path: Path) -> None:
    model = register(hive, write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "tiny")
    events, worker = spawn(hive, model=model)
    stages = [pb.SpawnStage.Name(e.stage) for e in events]
    for stage in ("VALIDATING", "INSTALLING", "STARTING", "LOADING", "READY"):
        assert f"SPAWN_STAGE_{stage}" in stages
    assert stages.index("SPAWN_STAGE_VALIDATING") < stages.index("SPAWN_STAGE_STARTING")
    validating = events[stages.index("SPAWN_STAGE_VALIDATING")]
    assert validating.worker_type == "worker-types/cpu-llm"
    assert validating.device == "devices/cpu"
    assert validating.compatibility.verdict == cpb.VERDICT_CPU_ONLY
    assert worker.state == wpb.WORKER_STATE_READY
    assert worker.pid > 0 and alive(worker.pid)
    assert worker.memory.claimed_ram_bytes > 0
    assert hive.metric("rbee_pool_workers", state="ready") == 1
    assert hive.metric("rbee_pool_spawn_duration_seconds_count", outcome="succeeded") == 1

    assert generate(worker, model, max_tokens=4)

    listed = hive.pool.ListWorkers(pb.ListWorkersRequest(filter="state=ready"), timeout=10)
    assert [w.name for w in listed.workers] == [worker.name]
    got = hive.pool.GetWorker(pb.GetWorkerRequest(name=worker.name), timeout=10)
    assert got.counters.requests_succeeded == 1
    cpu = hive.pool.GetDevice(pb.GetDeviceRequest(name="devices/cpu"), timeout=10)
    assert list(cpu.workers) == [worker.name] and cpu.claimed_ram_bytes > 0

    logs = list(hive.pool.GetWorkerLogs(pb.GetWorkerLogsRequest(name=worker.name), timeout=10))
    assert any("worker serving" in line.text for msg in logs for line in msg.lines)

    stopped = hive.pool.StopWorker(pb.StopWorkerRequest(name=worker.name), timeout=30)
    assert stopped.state == wpb.WORKER_STATE_STOPPED
    assert stopped.exit_code == 0
    assert hive.metric("rbee_pool_worker_exits_total", exit="expected") == 1
    assert hive.metric("rbee_pool_workers", state="stopped") == 1
    wait_until(lambda: not alive(worker.pid), 10)
    cpu = hive.pool.GetDevice(pb.GetDeviceRequest(name="devices/cpu"), timeout=10)
    assert list(cpu.workers) == [] and cpu.claimed_ram_bytes == 0
    hive.pool.DeleteWorker(pb.DeleteWorkerRequest(name=worker.name), timeout=10)
    assert hive.pool.ListWorkers(pb.ListWorkersRequest(), timeout=10).workers == []


def test_a_killed_worker_is_failed_with_its_stderr_and_restarted(
    hive: Hive, tmp_path: Path
) -> None:
    model = register(hive, write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "crashy")
    policy = wpb.RestartPolicy(mode=wpb.RESTART_MODE_ON_FAILURE, max_restarts=1)
    policy.initial_backoff.FromMilliseconds(100)
    _, worker = spawn(hive, model=model, restart_policy=policy)

    seen: list[wpb.Worker] = []
    watch = hive.pool.WatchWorkers(pb.WatchWorkersRequest(), timeout=120)

    def collect() -> None:
        try:
            for event in watch:
                seen.append(event.worker)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    time.sleep(0.3)
    os.kill(worker.pid, 9)
    wait_until(lambda: any(w.state == wpb.WORKER_STATE_FAILED for w in seen), 20)
    failed = next(w for w in seen if w.state == wpb.WORKER_STATE_FAILED)
    assert failed.exit_code == -9
    assert "exited unexpectedly with code -9" in failed.state_message
    wait_until(
        lambda: (
            hive.pool.GetWorker(pb.GetWorkerRequest(name=worker.name), timeout=10).state
            == wpb.WORKER_STATE_READY
        ),
        60,
    )
    again = hive.pool.GetWorker(pb.GetWorkerRequest(name=worker.name), timeout=10)
    assert again.restart_count == 1 and again.pid != worker.pid and alive(again.pid)
    assert hive.metric("rbee_pool_worker_exits_total", exit="unexpected") == 1
    assert hive.metric("rbee_pool_worker_restarts_total") == 1
    watch.cancel()

    # The restart budget is spent: the next crash stays FAILED.
    os.kill(again.pid, 9)
    wait_until(
        lambda: (
            hive.pool.GetWorker(pb.GetWorkerRequest(name=worker.name), timeout=10).state
            == wpb.WORKER_STATE_FAILED
        ),
        20,
    )
    time.sleep(0.5)
    final = hive.pool.GetWorker(pb.GetWorkerRequest(name=worker.name), timeout=10)
    assert final.state == wpb.WORKER_STATE_FAILED and final.restart_count == 1


def test_spawn_refusals(hive: Hive, tmp_path: Path) -> None:
    def refused(**fields: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            spawn(hive, **fields)
        return info.value

    err = refused(model="models/nope")
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_reason(err) == "MODEL_NOT_FOUND"

    tiny = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    pending = register(hive, tmp_path / "later.gguf", "later", ready=False)
    err = refused(model=pending)
    assert error_reason(err) == "MODEL_NOT_READY"

    model = register(hive, tiny, "tiny")
    err = refused(model=model, device="devices/cuda-3")
    assert error_reason(err) == "DEVICE_NOT_FOUND"
    err = refused(model=model, worker_type="worker-types/cpu-sd")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "INCOMPATIBLE_MODEL"

    sdxl = register(
        hive, write_header_only_safetensors(tmp_path / "xl.safetensors", sdxl_tensors()), "xl"
    )
    err = refused(model=sdxl, worker_type="cpu-llm")
    assert error_reason(err) == "INCOMPATIBLE_MODEL"

    huge = register(
        hive, write_header_only_gguf(tmp_path / "llama-70b.Q8_0.gguf", **LLAMA3_70B), "huge"
    )
    err = refused(model=huge)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(err) == "INSUFFICIENT_MEMORY"
    # validate_only answers without starting anything.
    _, would_be = spawn(hive, model=model, validate_only=True)
    assert would_be.state == wpb.WORKER_STATE_STARTING and would_be.pid == 0
    assert hive.pool.ListWorkers(pb.ListWorkersRequest(), timeout=10).workers == []


def test_stopping_the_pool_stops_its_workers(tmp_path: Path) -> None:
    with running_hive(tmp_path / "home") as hive:
        model = register(hive, write_tiny_llama_gguf(tmp_path / "t.gguf"), "t")
        _, worker = spawn(hive, model=model)
        assert alive(worker.pid)
    wait_until(lambda: not alive(worker.pid), 15)


def test_spawn_with_preload_warms_the_model_first(hive: Hive, tmp_path: Path) -> None:
    model = register(hive, write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "warm")
    events, worker = spawn(hive, model=model, preload=True)
    stages = [pb.SpawnStage.Name(e.stage) for e in events]
    assert "SPAWN_STAGE_PRELOADING" in stages
    assert stages.index("SPAWN_STAGE_PRELOADING") < stages.index("SPAWN_STAGE_STARTING")
    warmed = [e.preload.bytes for e in events if e.HasField("preload")]
    assert warmed and warmed[-1].completed_bytes == warmed[-1].total_bytes > 0
    assert worker.state == wpb.WORKER_STATE_READY
    hive.pool.StopWorker(pb.StopWorkerRequest(name=worker.name), timeout=30)


def test_a_backend_built_from_a_recipe_is_what_the_worker_runs_from(
    hive: Hive, tmp_path: Path
) -> None:
    # An install as `rbee install` leaves it: a directory with venv/bin/python. Here that
    # interpreter is a wrapper around this environment's, which logs that it was used.
    install_dir = tmp_path / "installs" / "cpu-llm-1"
    python = install_dir / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    marker = tmp_path / "used"
    python.write_text(f'#!/bin/sh\necho used > "{marker}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    hive.catalog.CreateInstall(
        cpb.CreateInstallRequest(
            install_id="cpu-llm-1",
            install=cpb.Install(
                worker_type="worker-types/cpu-llm", version="1-1", path=str(install_dir)
            ),
        ),
        timeout=10,
    )
    model = register(hive, write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "built")
    events, worker = spawn(hive, model=model)
    installing = [e.message for e in events if e.stage == pb.SPAWN_STAGE_INSTALLING]
    assert installing == ["runs from installs/cpu-llm-1 (1-1)"]
    assert worker.install == "installs/cpu-llm-1"
    assert worker.state == wpb.WORKER_STATE_READY
    assert marker.exists()
    hive.pool.StopWorker(pb.StopWorkerRequest(name=worker.name), timeout=30)
