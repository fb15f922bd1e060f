"""`rbee-worker` as a user (or the pool) runs it: a subprocess on a free port, gated on
grpc.health.v1, driven through the generated stubs, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import worker_pb2 as pb
from rbee.worker.v1 import worker_pb2_grpc
from tests.e2e.processes import BIN, free_port, wait_healthy
from tests.fixtures.gguf_models import write_tiny_llama_gguf

pytestmark = pytest.mark.e2e

RBEE_WORKER = BIN / "rbee-worker"
# The console script once the distribution is (re)installed; the module until then.
WORKER_COMMAND = (
    [str(RBEE_WORKER)] if RBEE_WORKER.exists() else [sys.executable, "-m", "services.worker"]
)
RPC_TIMEOUT = 10
# Far more tokens than the tiny model generates in the time the test takes to send SIGTERM
# (its trained context is 256; llama.cpp runs it with a longer one, output is noise).
LONG_CONTEXT = 65536


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _wait_healthy(worker: Worker, timeout: float = 60) -> None:
    wait_healthy(
        worker.address, worker.process, name="rbee-worker", timeout=timeout, stderr=worker.stderr
    )


def start_worker(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Worker:
    """Start rbee-worker on free ports with `args`; the caller stops it."""
    port, metrics_port = free_port(), free_port()
    stderr_path = tmp_path / f"worker-{port}.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [
                *WORKER_COMMAND,
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                *args,
            ],
            env={**os.environ, "RBEE_HOME": str(tmp_path / "home"), **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return Worker(process, f"127.0.0.1:{port}", metrics_port, stderr_path)


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(timeout=10)


def _stop(worker: Worker) -> int:
    worker.process.send_signal(signal.SIGTERM)
    return worker.process.wait(timeout=30)


def test_fake_worker_load_generate_and_sigterm(
    tmp_path: Path, worker_factory: list[Worker]
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    worker = start_worker(tmp_path, "--engine", "fake", "--device", "cpu", "--queue-size", "2")
    worker_factory.append(worker)
    _wait_healthy(worker)
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        idle = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
        assert idle.state == pb.WORKER_STATE_IDLE and idle.queue_capacity == 2
        assert idle.device.name == "devices/cpu" and idle.pid == 0

        responses = list(
            stub.LoadModel(
                pb.LoadModelRequest(model="models/echo", paths=[str(model)]), timeout=RPC_TIMEOUT
            )
        )
        assert responses[-1].worker.state == pb.WORKER_STATE_READY
        messages = list(
            stub.Generate(gen_pb.GenerateRequest(prompt="hello, wörld"), timeout=RPC_TIMEOUT)
        )
        assert messages[-1].WhichOneof("event") == "result"
        assert "".join(m.delta.text for m in messages[:-1]) == "hello, wörld"  # the fake echoes
        assert messages[-1].result.model == "models/echo"
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5
    ).read()
    assert b"rbee_worker_tokens_generated_total" in body

    assert _stop(worker) == 0, worker.stderr()
    assert "Traceback" not in worker.stderr()


@pytest.mark.llm
def test_sigterm_cancels_the_running_generation(
    tmp_path: Path, worker_factory: list[Worker]
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    worker = start_worker(
        tmp_path,
        "--engine",
        "llama_cpp",
        "--model",
        str(path),
        "--model-name",
        "models/tiny",
        "--context-length",
        str(LONG_CONTEXT),
    )
    worker_factory.append(worker)
    _wait_healthy(worker)  # SERVING only once the --model is loaded
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        ready = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
        assert ready.state == pb.WORKER_STATE_READY and ready.model == "models/tiny"
        assert ready.backend_version.startswith("llama-cpp-python")
        # A generation that would run to the end of a long context: SIGTERM must end it.
        call = stub.Generate(
            gen_pb.GenerateRequest(
                prompt="hello",
                model="models/tiny",
                sampling=gen_pb.SamplingParams(temperature=0.0),
                stopping=gen_pb.StoppingCriteria(ignore_eos=True),
            ),
            timeout=30,
        )
        assert next(call).WhichOneof("event") == "delta"
        worker.process.send_signal(signal.SIGTERM)
        events = list(call)
    # The stream ended with the server's own CANCELLED result, long before the context was full.
    final = events[-1]
    assert final.WhichOneof("event") == "result", events[-3:]
    assert final.result.finish_reason == gen_pb.FINISH_REASON_CANCELLED
    assert final.result.usage.completion_tokens < LONG_CONTEXT // 2
    assert worker.process.wait(timeout=30) == 0, worker.stderr()


def test_bad_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*WORKER_COMMAND, "--engine", "fake", "--device", "tpu:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cpu, cuda:N" in result.stderr and "Traceback" not in result.stderr
