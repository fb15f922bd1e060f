"""The worker over real gRPC: a grpc.aio server on 127.0.0.1:0 in its own thread, sync stubs.

FakeEngine covers the protocol (stream order, cancel, deadline, queue, errors, metrics); one
test (marked llm) runs the real LlamaCppEngine on a tiny generated GGUF.
"""

from __future__ import annotations

import math
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import image_pb2, load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from services.catalog.domain import DeviceKind
from services.worker.devices import DeviceSpec
from services.worker.engines.base import LlmEngine
from services.worker.engines.fake import FakeEngine
from services.worker.gpu_memory import GpuMemoryProbe
from services.worker.service import WorkerService
from services.worker.servicer import SERVICE_NAME
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.server_harness import error_reason, serve_worker

pytestmark = pytest.mark.integration

SLOW_TOKEN_S = 0.02
ENDLESS = gen_pb.StoppingCriteria(ignore_eos=True, max_tokens=100_000)
RPC_TIMEOUT = 10


@dataclass
class WorkerServer:
    address: str
    metrics_port: int
    service: WorkerService
    engine: LlmEngine


@contextmanager
def running_worker(
    engine: LlmEngine, *, queue_size: int = 8, engine_name: str = "fake"
) -> Iterator[WorkerServer]:
    """Serve a WorkerService around `engine` on 127.0.0.1:0; stop it on exit (bounded)."""
    with serve_worker(engine, engine_name=engine_name, queue_size=queue_size) as (running, svc):
        assert running.metrics_port is not None
        yield WorkerServer(f"127.0.0.1:{running.port}", running.metrics_port, svc, engine)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine(reply="héllo, wörld")


@pytest.fixture
def server(fake: FakeEngine) -> Iterator[WorkerServer]:
    with running_worker(fake) as server:
        yield server


@pytest.fixture
def stub(server: WorkerServer) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def load(
    stub: worker_pb2_grpc.WorkerServiceStub, path: Path, **fields: Any
) -> list[pb.LoadModelResponse]:
    request = pb.LoadModelRequest(model="models/tiny", paths=[str(path)], **fields)
    return list(stub.LoadModel(request, timeout=RPC_TIMEOUT))


def generate(
    stub: worker_pb2_grpc.WorkerServiceStub, **fields: Any
) -> tuple[list[gen_pb.TokenDelta], list[gen_pb.GenerationResult]]:
    deltas: list[gen_pb.TokenDelta] = []
    results: list[gen_pb.GenerationResult] = []
    for message in stub.Generate(gen_pb.GenerateRequest(**fields), timeout=RPC_TIMEOUT):
        assert not results, "nothing may follow the result"
        if message.WhichOneof("event") == "delta":
            deltas.append(message.delta)
        else:
            results.append(message.result)
    return deltas, results


def wait_for(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def counters(stub: worker_pb2_grpc.WorkerServiceStub) -> pb.WorkerCounters:
    worker: pb.Worker = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
    return worker.counters


# ---- tests -----------------------------------------------------------------------------------


def test_health_and_an_idle_worker(server: WorkerServer, stub: Any) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    worker = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
    assert worker.state == pb.WORKER_STATE_IDLE and not worker.HasField("loaded_model")
    assert worker.device.name == "devices/cpu" and worker.queue_capacity == 8
    assert worker.worker_type == "worker-types/cpu-llm" and worker.labels["engine"] == "fake"


def test_load_streams_progress_then_the_ready_worker(stub: Any, model_file: Path) -> None:
    responses = load(stub, model_file, llm=load_pb2.LlmLoadOptions(context_length=512))
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[-1] == "worker" and set(kinds[:-1]) == {"progress"} and len(kinds) >= 3
    assert responses[0].progress.stage == pb.LOAD_STAGE_CHECKING
    worker = responses[-1].worker
    assert worker.state == pb.WORKER_STATE_READY and worker.model == "models/tiny"
    loaded = worker.loaded_model
    assert loaded.context_length == 512 and list(loaded.paths) == [str(model_file)]
    assert loaded.ram_bytes == 64 and worker.memory.ram_bytes > 0
    again = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
    assert again.loaded_model == loaded
    unloaded = stub.UnloadModel(pb.UnloadModelRequest(), timeout=RPC_TIMEOUT)
    assert unloaded.state == pb.WORKER_STATE_IDLE and not unloaded.HasField("loaded_model")
    assert stub.UnloadModel(pb.UnloadModelRequest(), timeout=RPC_TIMEOUT).state == (
        pb.WORKER_STATE_IDLE
    )


def test_load_errors(stub: Any, model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as image:
        load(stub, model_file, image=load_pb2.ImageLoadOptions(dtype="float16"))
    assert image.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(image.value) == "WRONG_ENGINE"
    with pytest.raises(grpc.RpcError) as no_paths:
        list(stub.LoadModel(pb.LoadModelRequest(model="models/tiny"), timeout=RPC_TIMEOUT))
    assert no_paths.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "paths are required" in (no_paths.value.details() or "")
    with pytest.raises(grpc.RpcError) as missing:
        load(stub, tmp_path / "missing.gguf")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as lora:
        load(stub, model_file, llm=load_pb2.LlmLoadOptions(projector="/x.gguf"))
    assert lora.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_generate_streams_deltas_then_exactly_one_result(
    stub: Any, fake: FakeEngine, model_file: Path
) -> None:
    with pytest.raises(grpc.RpcError) as not_loaded:
        generate(stub, prompt="hi")
    assert not_loaded.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(not_loaded.value) == "MODEL_NOT_LOADED"
    load(stub, model_file)
    deltas, results = generate(
        stub, prompt="hi", model="models/tiny", sampling=gen_pb.SamplingParams(seed=77)
    )
    assert "".join(d.text for d in deltas) == "héllo, wörld"
    (result,) = results
    assert result.finish_reason == gen_pb.FINISH_REASON_END_OF_SEQUENCE
    assert result.seed == 77 and result.model == "models/tiny"
    assert result.usage.completion_tokens == len("héllo, wörld".encode())
    assert result.usage.total_tokens == result.usage.prompt_tokens + 14
    assert result.timings.HasField("total_time") and result.timings.HasField("queue_time")
    # A reader that keeps up gets every delta as its own message, as the engine made it: one
    # per complete character (two byte tokens for "é" and "ö").
    fake.token_delay_s = 0.005
    deltas, _ = generate(stub, prompt="hi")
    assert [d.text for d in deltas] == list("héllo, wörld")
    assert [len(d.token_ids) for d in deltas] == [len(c.encode()) for c in "héllo, wörld"]
    fake.token_delay_s = 0.0
    stopped, results = generate(stub, prompt="hi", stopping=gen_pb.StoppingCriteria(stop=[", w"]))
    assert "".join(d.text for d in stopped) == "héllo"
    assert results[0].finish_reason == gen_pb.FINISH_REASON_STOP_SEQUENCE
    assert results[0].stop_sequence == ", w"


def test_chat_and_tokenizer(stub: Any, model_file: Path) -> None:
    load(stub, model_file)
    messages = [gen_pb.ChatMessage(role=gen_pb.CHAT_ROLE_USER, content="hi")]
    chunks = list(stub.Chat(gen_pb.ChatRequest(messages=messages), timeout=RPC_TIMEOUT))
    assert [c.WhichOneof("event") for c in chunks][-1] == "result"
    assert "".join(c.delta.text for c in chunks[:-1]) == "héllo, wörld"
    with pytest.raises(grpc.RpcError) as empty:
        list(stub.Chat(gen_pb.ChatRequest(), timeout=RPC_TIMEOUT))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ids = stub.Tokenize(gen_pb.TokenizeRequest(text="ü"), timeout=RPC_TIMEOUT).token_ids
    assert len(ids) == 3  # BOS and two bytes
    text = stub.Detokenize(
        gen_pb.DetokenizeRequest(token_ids=ids, skip_special=True), timeout=RPC_TIMEOUT
    ).text
    assert text == "ü"


def test_request_errors(stub: Any, model_file: Path) -> None:
    load(stub, model_file)
    with pytest.raises(grpc.RpcError) as empty:
        generate(stub, prompt="")
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as mismatch:
        generate(stub, prompt="x", model="models/other")
    assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(mismatch.value) == "MODEL_MISMATCH"
    load(stub, model_file, llm=load_pb2.LlmLoadOptions(context_length=4))
    with pytest.raises(grpc.RpcError) as too_long:
        generate(stub, prompt="a prompt longer than the context")
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(too_long.value) == "CONTEXT_TOO_LONG"


def test_generate_image_is_unimplemented_with_the_sd_hint(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateImage(image_pb2.GenerateImageRequest(), timeout=RPC_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_reason(caught.value) == "WRONG_ENGINE"
    assert "cpu-sd" in (caught.value.details() or "")


def test_client_cancel_mid_stream_stops_the_work_and_the_next_call_works(
    server: WorkerServer, stub: Any, fake: FakeEngine, model_file: Path
) -> None:
    load(stub, model_file)
    fake.token_delay_s = SLOW_TOKEN_S
    call = stub.Generate(gen_pb.GenerateRequest(prompt="x", stopping=ENDLESS), timeout=30)
    assert next(call).WhichOneof("event") == "delta"
    call.cancel()
    with pytest.raises(grpc.RpcError) as cancelled:
        list(call)
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: counters(stub).requests_cancelled == 1)
    wait_for(lambda: server.service.state.value == "ready")
    fake.token_delay_s = 0.0
    _, results = generate(stub, prompt="again")
    assert results[0].finish_reason == gen_pb.FINISH_REASON_END_OF_SEQUENCE
    assert counters(stub).requests_succeeded == 1


def test_deadline_exceeded_stops_the_work(
    server: WorkerServer, stub: Any, fake: FakeEngine, model_file: Path
) -> None:
    load(stub, model_file)
    fake.token_delay_s = SLOW_TOKEN_S
    request = gen_pb.GenerateRequest(prompt="x", stopping=ENDLESS)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        list(stub.Generate(request, timeout=0.3))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: counters(stub).requests_cancelled == 1)
    wait_for(lambda: server.service.state.value == "ready")
    assert time.monotonic() - started < 5  # it stopped; it did not run the 100k tokens
    fake.token_delay_s = 0.0
    _, results = generate(stub, prompt="again")
    assert len(results) == 1


def test_queue_overflow_is_resource_exhausted_at_once(fake: FakeEngine, model_file: Path) -> None:
    with (
        running_worker(fake, queue_size=1) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        load(stub, model_file)
        fake.token_delay_s = SLOW_TOKEN_S
        running = stub.Generate(gen_pb.GenerateRequest(prompt="a", stopping=ENDLESS), timeout=30)
        assert next(running).WhichOneof("event") == "delta"
        queued = stub.Generate(gen_pb.GenerateRequest(prompt="b"), timeout=30)
        wait_for(
            lambda: stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=5).queue_depth == 1
        )
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as full:
            generate(stub, prompt="c")
        assert time.monotonic() - started < 2  # at once, not after the queue drained
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(full.value) == "QUEUE_FULL"
        worker = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=5)
        assert worker.state == pb.WORKER_STATE_BUSY and worker.queue_capacity == 1
        running.cancel()
        fake.token_delay_s = 0.0
        messages = list(queued)
        assert messages[-1].result.finish_reason == gen_pb.FINISH_REASON_END_OF_SEQUENCE
        assert "".join(m.delta.text for m in messages[:-1]) == "héllo, wörld"


def test_metrics_scrape_shows_the_worker_metrics(
    server: WorkerServer, stub: Any, model_file: Path
) -> None:
    load(stub, model_file)
    generate(stub, prompt="x")
    with pytest.raises(grpc.RpcError):
        generate(stub, prompt="x", model="models/other")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "rbee_worker_time_to_first_token_seconds_count 1.0" in body
    assert "rbee_worker_inter_token_seconds_bucket" in body
    assert f"rbee_worker_tokens_generated_total {len('héllo, wörld'.encode())}.0" in body
    assert 'rbee_worker_requests_total{finish_reason="end_of_sequence"} 1.0' in body
    assert 'rbee_worker_requests_total{finish_reason="rejected"} 1.0' in body
    assert "rbee_worker_queue_depth 0.0" in body
    assert "rbee_worker_model_load_seconds_count 1.0" in body
    assert 'method="Generate",service="rbee.worker.v1.WorkerService"' in body
    assert "rbee_worker_device_memory_bytes" not in body  # a CPU worker has no GPU memory


# ---- GPU memory, as the driver reports it -----------------------------------------------------


def fake_nvidia_smi(folder: Path, lines: list[str]) -> Path:
    """An nvidia-smi that answers the compute-apps query with `lines` (the I/O seam: the real
    one needs a GPU; tests/gpu checks it there)."""
    script = folder / "nvidia-smi"
    body = "\n".join(f"echo '{line}'" for line in lines)
    script.write_text(
        f'#!/bin/sh\n[ "$1" = "--query-compute-apps=pid,used_memory" ] || exit 9\n{body}\n'
    )
    script.chmod(0o755)
    return script


def gauge(metrics_port: int, name: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


@contextmanager
def cuda_worker(smi: Path) -> Iterator[tuple[worker_pb2_grpc.WorkerServiceStub, int]]:
    """A fake-engine worker on cuda:0 whose GPU memory probe runs `smi`: (stub, metrics port)."""
    probe = GpuMemoryProbe(nvidia_smi=str(smi), max_age=0)
    cuda = DeviceSpec(kind=DeviceKind.CUDA)
    with (
        serve_worker(FakeEngine(), engine_name="fake", device=cuda, gpu_memory=probe) as (
            running,
            _,
        ),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        assert running.metrics_port is not None
        yield worker_pb2_grpc.WorkerServiceStub(channel), running.metrics_port


def test_a_cuda_worker_reports_the_gpu_memory_the_driver_measures(
    tmp_path: Path, model_file: Path
) -> None:
    me = os.getpid()  # the in-process worker's pid
    smi = fake_nvidia_smi(tmp_path, ["999999, 50", f"{me}, 1200", f"{me}, 34", "4242, [N/A]"])
    with cuda_worker(smi) as (stub, metrics_port):
        idle = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
        assert idle.device.name == "devices/cuda-0"
        assert idle.worker_type == "worker-types/cuda-llm"
        assert idle.memory.vram_bytes == 1234 * 1024 * 1024  # summed over its two GPUs
        ready = load(stub, model_file)[-1].worker
        assert ready.memory.vram_bytes == 1234 * 1024 * 1024
        assert ready.loaded_model.vram_bytes == 64  # the engine's own number for the model
        assert gauge(metrics_port, "rbee_worker_device_memory_bytes") == 1234 * 2**20


def test_a_cuda_worker_the_driver_does_not_list_falls_back_to_the_model_estimate(
    tmp_path: Path, model_file: Path
) -> None:
    # nvidia-smi runs, but not this process (another PID namespace, say): not measured.
    with cuda_worker(fake_nvidia_smi(tmp_path, ["999999, 50"])) as (stub, metrics_port):
        ready = load(stub, model_file)[-1].worker
        assert ready.memory.vram_bytes == 64  # the engine's number, not 0
        value = gauge(metrics_port, "rbee_worker_device_memory_bytes")
        assert value is not None and math.isnan(value)


# ---- the real engine -------------------------------------------------------------------------


@pytest.mark.llm
def test_real_llama_cpp_engine_over_grpc(tmp_path: Path) -> None:
    llama_engine = pytest.importorskip(
        "services.worker.engines.llama_cpp", reason="LlamaCppEngine not built yet"
    )
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    )
    path = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf", chat_template=template)
    with (
        running_worker(llama_engine.LlamaCppEngine(), engine_name="llama_cpp") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        responses = load(stub, path, llm=load_pb2.LlmLoadOptions(context_length=128))
        worker = responses[-1].worker
        assert worker.state == pb.WORKER_STATE_READY
        assert worker.loaded_model.context_length == 128
        assert worker.loaded_model.has_chat_template

        sampling = gen_pb.SamplingParams(seed=42, temperature=0.8)
        stopping = gen_pb.StoppingCriteria(max_tokens=12, ignore_eos=True)
        deltas, results = generate(stub, prompt="hello world", sampling=sampling, stopping=stopping)
        (result,) = results
        assert result.finish_reason == gen_pb.FINISH_REASON_LENGTH
        assert result.usage.completion_tokens == 12 and result.seed == 42
        assert sum(len(d.token_ids) for d in deltas) == 12
        again, _ = generate(stub, prompt="hello world", sampling=sampling, stopping=stopping)
        # The same seed gives the same tokens (message boundaries may differ: deltas that
        # pile up while a message is sent go out together).
        assert [i for d in again for i in d.token_ids] == [i for d in deltas for i in d.token_ids]

        chat = gen_pb.ChatRequest(
            messages=[gen_pb.ChatMessage(role=gen_pb.CHAT_ROLE_USER, content="hello")],
            sampling=sampling,
            stopping=gen_pb.StoppingCriteria(max_tokens=5, ignore_eos=True),
        )
        chunks = list(stub.Chat(chat, timeout=RPC_TIMEOUT))
        final = chunks[-1].result
        assert final.finish_reason == gen_pb.FINISH_REASON_LENGTH
        # The template's text was tokenized: more prompt tokens than "hello" alone.
        assert final.usage.prompt_tokens > 3 and final.usage.completion_tokens == 5
        ids = stub.Tokenize(gen_pb.TokenizeRequest(text="hello"), timeout=RPC_TIMEOUT).token_ids
        assert len(ids) >= 2


def test_logprobs_survive_deltas_merged_behind_a_slow_reader(
    stub: Any, fake: FakeEngine, model_file: Path
) -> None:
    """A reader that falls behind gets queued deltas merged into one message: every token id
    in it still carries its log probability, in order."""
    load(stub, model_file)
    request = gen_pb.GenerateRequest(
        prompt="hi",
        sampling=gen_pb.SamplingParams(seed=1),
        logprobs=gen_pb.LogprobOptions(enabled=True, top_logprobs=3),
    )
    stream = stub.Generate(request, timeout=RPC_TIMEOUT)
    first = next(stream)
    time.sleep(0.3)  # the engine finishes meanwhile: the rest is queued and merged
    deltas = [first.delta] + [m.delta for m in stream if m.WhichOneof("event") == "delta"]
    assert len(deltas) < len("héllo, wörld")  # some were merged
    ids = [i for d in deltas for i in d.token_ids]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in logprobs] == ids
    assert all(len(lp.top_logprobs) == 3 and lp.logprob <= 0 for lp in logprobs)
