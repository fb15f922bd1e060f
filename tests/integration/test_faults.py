"""Faults with nothing lost (issue 7), on real in-process services.

- kill -9 of a worker mid-stream: a real pool spawns a real `rbee-worker` (llama.cpp on a tiny
  GGUF); the client streaming Generate gets UNAVAILABLE within a second of the kill, the pool
  marks the worker FAILED with its stderr tail and restarts it (policy on-failure) to READY.
- The upstream stalls, or keeps failing, through the whole PullModel path (provisioner and
  catalog): a stall is retried from the offset; a persistent 503 fails the pull with
  UNAVAILABLE / DOWNLOAD_FAILED after the retries, the model FAILED and the partial kept, and a
  pull once the upstream recovers resumes from it. (The transfer engine's own fault tests are in
  test_transfer.py; dropped connections and wrong hashes through PullModel are in
  test_provisioner_pulls.py.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.provisioner.v1 import provisioner_pb2 as ppb
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import load_pb2 as load_pb
from rbee.worker.v1 import pool_pb2 as pool_pb
from rbee.worker.v1 import worker_pb2 as wpb
from rbee.worker.v1 import worker_pb2_grpc
from services.provisioner.transfer import READ_BYTES
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.provisioner_harness import Mesh, running_mesh
from tests.integration.server_harness import error_reason
from tests.integration.test_pool import Hive, alive, register, running_hive, spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# The shared 2-core machine: the issue's "within a second", with room for a busy scheduler.
UNAVAILABLE_WITHIN_S = 1.5


@pytest.fixture
def hive(tmp_path: Path) -> Iterator[Hive]:
    with running_hive(tmp_path / "home") as running:
        yield running


@pytest.mark.llm
@pytest.mark.slow
def test_worker_kill_9_mid_stream_is_unavailable_then_failed_and_restarted(
    hive: Hive, tmp_path: Path
) -> None:
    model = register(hive, write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_ctx=4096), "killed")
    policy = wpb.RestartPolicy(mode=wpb.RESTART_MODE_ON_FAILURE, max_restarts=1)
    policy.initial_backoff.FromMilliseconds(300)
    _, worker = spawn(
        hive,
        model=model,
        restart_policy=policy,
        llm=load_pb.LlmLoadOptions(context_length=4096, threads=1),
    )

    seen: list[wpb.Worker] = []
    watch = hive.pool.WatchWorkers(pool_pb.WatchWorkersRequest(), timeout=120)

    def collect() -> None:
        try:
            for event in watch:
                seen.append(event.worker)
        except grpc.RpcError:
            pass  # cancelled at the end

    threading.Thread(target=collect, daemon=True).start()

    request = gen_pb.GenerateRequest(
        model=model,
        prompt="once upon a time",
        stopping=gen_pb.StoppingCriteria(max_tokens=4000, ignore_eos=True),
    )
    killed_at: float | None = None
    deltas = 0
    with grpc.insecure_channel(worker.endpoint) as channel:
        stream = worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            for message in stream:
                assert not message.HasField("result"), "the generation ended before the kill"
                deltas += 1
                if killed_at is None:
                    os.kill(worker.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        failed_at = time.monotonic()
    assert killed_at is not None
    latency = failed_at - killed_at
    print(f"UNAVAILABLE {latency * 1000:.0f} ms after kill -9 ({deltas} deltas read)")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert latency < UNAVAILABLE_WITHIN_S

    wait_until(lambda: any(w.state == wpb.WORKER_STATE_FAILED for w in seen), 20)
    failed = next(w for w in seen if w.state == wpb.WORKER_STATE_FAILED)
    assert failed.exit_code == -9
    assert "exited unexpectedly with code -9; stderr tail:" in failed.state_message
    assert "worker serving" in failed.state_message  # the tail holds the worker's own lines

    def ready_again() -> bool:
        got = hive.pool.GetWorker(pool_pb.GetWorkerRequest(name=worker.name), timeout=10)
        return bool(got.state == wpb.WORKER_STATE_READY and got.pid != worker.pid)

    wait_until(ready_again, 60)
    watch.cancel()
    again = hive.pool.GetWorker(pool_pb.GetWorkerRequest(name=worker.name), timeout=10)
    assert again.restart_count == 1 and alive(again.pid)
    short = gen_pb.GenerateRequest(
        model=model, prompt="hi", stopping=gen_pb.StoppingCriteria(max_tokens=4, ignore_eos=True)
    )
    with grpc.insecure_channel(again.endpoint) as channel:
        messages = list(worker_pb2_grpc.WorkerServiceStub(channel).Generate(short, timeout=60))
    assert messages[-1].HasField("result")


@pytest.fixture
def big_gguf(tmp_path: Path) -> bytes:
    """About 6 MB: enough bytes for a fault to land mid-transfer."""
    path = tmp_path / "big.gguf"
    return write_tiny_llama_gguf(path, n_vocab=2048, n_embd=256, n_ff=512, n_layer=4).read_bytes()


def _pull(mesh: Mesh, source: str, timeout: float = 60) -> tuple[list[str], cpb.Model]:
    messages: list[str] = []
    request = ppb.PullModelRequest(source=source)
    for message in mesh.provisioner.PullModel(request, timeout=timeout):
        if message.HasField("model"):
            return messages, message.model
        messages.append(message.progress.message)
    raise AssertionError("no terminal model")


def test_upstream_stall_is_retried_through_pull_model(
    tmp_path: Path, hub: FakeHub, big_gguf: bytes
) -> None:
    stall_at = 3_500_000
    hub.add_repo("org/stall-GGUF", {"stall.Q4_K_M.gguf": big_gguf})
    hub.cdn.faults.stall_after_bytes = stall_at
    hub.cdn.faults.stall_seconds = 30.0
    with running_mesh(tmp_path / "home", hf_endpoint=hub.endpoint, stall_timeout=0.5) as mesh:
        started = time.monotonic()
        messages, model = _pull(mesh, "hf:org/stall-GGUF:stall.Q4_K_M.gguf")
        elapsed = time.monotonic() - started
    assert model.state == cpb.MODEL_STATE_READY
    assert model.sha256 == hashlib.sha256(big_gguf).hexdigest()
    assert any("a stall" in m and "retry" in m for m in messages), messages
    assert elapsed < 15  # the stall was cut at stall_timeout, not waited out
    # Resumed after the bytes received before the stall (at most one read's worth is lost).
    (resume,) = [r.range for r in hub.cdn.requests if r.range]
    assert resume is not None
    offset = int(resume.removeprefix("bytes=").removesuffix("-"))
    assert stall_at - READ_BYTES <= offset <= stall_at, resume
    assert hub.cdn.body_bytes_sent() == len(big_gguf) + stall_at - offset


def test_upstream_that_keeps_failing_fails_the_pull_and_a_later_pull_resumes(
    tmp_path: Path, hub: FakeHub, big_gguf: bytes
) -> None:
    hub.add_repo("org/down-GGUF", {"down.Q4_K_M.gguf": big_gguf})
    source = "hf:org/down-GGUF:down.Q4_K_M.gguf"
    with running_mesh(tmp_path / "home", hf_endpoint=hub.endpoint, max_retries=2) as mesh:
        # The first request delivers 2 MB and drops; every later one answers 503.
        hub.cdn.faults.drop_after_bytes = 2_000_000
        hub.cdn.faults.fail_status = 503
        hub.cdn.faults.fail_count = 1_000
        original_take = hub.cdn.take_fail_status
        first = [True]

        def fail_after_first() -> int | None:
            if first[0]:
                first[0] = False
                return None
            return original_take()

        hub.cdn.take_fail_status = fail_after_first  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as info:
            _pull(mesh, source)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(info.value) == "DOWNLOAD_FAILED"
        assert "retries" in (info.value.details() or "")
        (failed,) = mesh.catalog.ListModels(cpb.ListModelsRequest(), timeout=10).models
        assert failed.state == cpb.MODEL_STATE_FAILED
        partials = list(mesh.hf_cache.rglob("*.partial"))
        assert len(partials) == 1 and partials[0].stat().st_size == 2_000_000

        hub.cdn.faults.fail_status = None  # the upstream recovers
        sent_before = hub.cdn.body_bytes_sent()
        _, model = _pull(mesh, source)
    assert model.state == cpb.MODEL_STATE_READY and model.name == failed.name
    assert hub.cdn.body_bytes_sent() - sent_before == len(big_gguf) - 2_000_000
    assert not list(mesh.hf_cache.rglob("*.partial"))
