"""An image worker over real gRPC: WorkerService around the real DiffusersEngine on a tiny random
StableDiffusionPipeline (CPU, float32), served by a grpc.aio server on 127.0.0.1:0 in its own
thread, called with sync stubs."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from rbee.common.v1 import runtime_pb2
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import image_pb2, load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from services.worker.__main__ import create_engine, settings_from_args
from services.worker.engines.base import LlmEngine
from services.worker.engines.diffusers_engine import DiffusersEngine
from services.worker.engines.fake import FakeEngine
from services.worker.engines.image_base import ImageEngine
from services.worker.service import WorkerService
from tests.fixtures.sd_models import tiny_sd_pipeline_under, write_foreign_lora, write_tiny_lora
from tests.integration.server_harness import error_reason, serve_worker

pytestmark = [pytest.mark.integration, pytest.mark.sd]

RPC_TIMEOUT = 30
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The engines here use one torch thread (see DiffusersEngine); restored afterwards, since
    the setting is process-wide."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@dataclass
class ImageWorker:
    address: str
    service: WorkerService
    registry: CollectorRegistry
    load_responses: list[pb.LoadModelResponse] = field(default_factory=list)


@contextmanager
def running_worker(engine: LlmEngine | ImageEngine, engine_name: str) -> Iterator[ImageWorker]:
    """Serve a WorkerService around `engine` on 127.0.0.1:0; stop it on exit (bounded)."""
    registry = CollectorRegistry()
    with serve_worker(
        engine, engine_name=engine_name, queue_size=2, metrics_listen=None, registry=registry
    ) as (running, service):
        yield ImageWorker(f"127.0.0.1:{running.port}", service, registry)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_pipeline_under(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def worker(sd_folder: Path) -> Iterator[ImageWorker]:
    with running_worker(DiffusersEngine("cpu", threads=1), "diffusers") as worker:
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            worker.load_responses = list(
                stub.LoadModel(
                    pb.LoadModelRequest(
                        model="models/tiny-sd",
                        paths=[str(sd_folder)],
                        image=load_pb2.ImageLoadOptions(dtype="float32", attention_slicing=True),
                    ),
                    timeout=RPC_TIMEOUT,
                )
            )
        yield worker


@pytest.fixture
def stub(worker: ImageWorker) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    with grpc.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def imagine(
    stub: worker_pb2_grpc.WorkerServiceStub, **fields: Any
) -> tuple[list[image_pb2.ImageProgress], image_pb2.ImageResult]:
    """GenerateImage with `fields` over small defaults: (progress events, the one result)."""
    params = image_pb2.ImageParams(
        **{"prompt": "a red cube", "steps": STEPS, "width": 64, "height": 64, **fields}
    )
    progress: list[image_pb2.ImageProgress] = []
    results: list[image_pb2.ImageResult] = []
    request = image_pb2.GenerateImageRequest(params=params)
    for message in stub.GenerateImage(request, timeout=RPC_TIMEOUT):
        assert not results, "nothing may follow the result"
        if message.WhichOneof("event") == "progress":
            progress.append(message.progress)
        else:
            results.append(message.result)
    assert len(results) == 1
    return progress, results[0]


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def wait_for(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# ---- tests -----------------------------------------------------------------------------------


def test_load_streams_progress_then_a_ready_sd_worker(
    stub: Any, worker: ImageWorker, sd_folder: Path
) -> None:
    kinds = [r.WhichOneof("event") for r in worker.load_responses]
    assert kinds[-1] == "worker" and set(kinds[:-1]) == {"progress"} and len(kinds) >= 3
    assert worker.load_responses[-1].worker.state == pb.WORKER_STATE_READY
    info = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
    assert info.state == pb.WORKER_STATE_READY and info.model == "models/tiny-sd"
    assert info.worker_type == "worker-types/cpu-sd" and info.labels["engine"] == "diffusers"
    assert info.backend == runtime_pb2.BACKEND_DIFFUSERS
    loaded = info.loaded_model
    assert loaded.WhichOneof("options") == "image" and list(loaded.paths) == [str(sd_folder)]
    assert loaded.image.dtype == "float32" and loaded.image.attention_slicing
    assert loaded.ram_bytes > 10_000


def test_generate_image_streams_every_step_then_the_pngs(stub: Any, worker: ImageWorker) -> None:
    before = worker.registry.get_sample_value("rbee_worker_image_steps_total") or 0.0
    progress, result = imagine(stub, width=96, height=64, count=2, seed=5, preview_interval=3)
    assert [(p.image_index, p.step) for p in progress] == [
        (i, s) for i in range(2) for s in range(1, STEPS + 1)
    ]
    assert all(p.total_steps == STEPS and p.image_count == 2 for p in progress)
    previews = [p for p in progress if p.preview]
    assert [p.step for p in previews] == [3, 3]
    assert previews[0].preview_format == image_pb2.IMAGE_FORMAT_PNG
    assert pixels(previews[0].preview).ndim == 3
    assert [(i.index, i.seed, i.width, i.height) for i in result.images] == [
        (0, 5, 96, 64),
        (1, 6, 96, 64),
    ]
    assert all(pixels(i.data).shape == (64, 96, 3) for i in result.images)
    assert result.model == "models/tiny-sd" and result.steps == STEPS
    assert result.scheduler == "euler" and result.timings.steps_per_second > 0
    after = worker.registry.get_sample_value("rbee_worker_image_steps_total")
    assert after == before + 2 * STEPS
    assert worker.registry.get_sample_value("rbee_worker_image_steps_per_second_count")
    assert worker.registry.get_sample_value(
        "rbee_worker_requests_total", {"finish_reason": "completed"}
    )


def test_same_seed_same_image_and_another_seed_differs(stub: Any) -> None:
    _, first = imagine(stub, seed=11, scheduler="dpm++2m_karras")
    _, again = imagine(stub, seed=11, scheduler="dpm++2m_karras")
    _, other = imagine(stub, seed=12, scheduler="dpm++2m_karras")
    assert np.array_equal(pixels(first.images[0].data), pixels(again.images[0].data))
    assert not np.array_equal(pixels(first.images[0].data), pixels(other.images[0].data))
    _, unset = imagine(stub)
    _, unset_again = imagine(stub)
    assert unset.images[0].seed != unset_again.images[0].seed  # random, and reported
    _, replay = imagine(stub, seed=unset.images[0].seed)
    assert replay.images[0].data == unset.images[0].data


def test_cancel_mid_image_stops_the_work_and_the_next_request_works(
    stub: Any, worker: ImageWorker
) -> None:
    cancelled_before = worker.service.counters.requests_cancelled
    request = image_pb2.GenerateImageRequest(
        params=image_pb2.ImageParams(prompt="slow", steps=200, width=64, height=64, count=8)
    )
    call = stub.GenerateImage(request, timeout=RPC_TIMEOUT)
    first = next(call)
    assert first.progress.step == 1
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    # The engine stops within a step: the worker is READY (its engine thread done) long before
    # the 8 x 200 steps could have run (about 30 s here).
    wait_for(lambda: worker.service.counters.requests_cancelled == cancelled_before + 1, 5.0)
    wait_for(lambda: worker.service.state.value == "ready", 5.0)
    progress, result = imagine(stub, seed=1)
    assert len(progress) == STEPS and len(result.images) == 1


def test_bad_requests_are_invalid_argument(stub: Any) -> None:
    for fields, bad_field in (
        ({"width": 100}, "params.width"),
        ({"height": 4096}, "params.height"),
        ({"steps": 500}, "params.steps"),
        ({"scheduler": "warp"}, "params.scheduler"),
        ({"clip_skip": 2}, "params.clip_skip"),
        (
            {"loras": [load_pb2.LoraAdapter(path="/x.safetensors", weight=9)]},
            "params.loras[0].weight",
        ),
        ({"loras": [load_pb2.LoraAdapter(path="x.safetensors")]}, "params.loras[0].path"),
        ({"loras": [load_pb2.LoraAdapter(model="models/style")]}, "params.loras[0].model"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            imagine(stub, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert bad_field in (caught.value.details() or ""), fields
    with pytest.raises(grpc.RpcError) as empty:
        list(stub.GenerateImage(image_pb2.GenerateImageRequest(), timeout=RPC_TIMEOUT))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_llm_calls_on_the_image_worker_are_unimplemented(stub: Any, sd_folder: Path) -> None:
    calls: list[Callable[[], object]] = [
        lambda: list(stub.Generate(gen_pb.GenerateRequest(prompt="hi"), timeout=RPC_TIMEOUT)),
        lambda: list(
            stub.Chat(
                gen_pb.ChatRequest(
                    messages=[gen_pb.ChatMessage(role=gen_pb.CHAT_ROLE_USER, content="hi")]
                ),
                timeout=RPC_TIMEOUT,
            )
        ),
        lambda: stub.Tokenize(gen_pb.TokenizeRequest(text="hi"), timeout=RPC_TIMEOUT),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert error_reason(caught.value) == "WRONG_ENGINE"
        assert "cpu-llm" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as llm_options:
        list(
            stub.LoadModel(
                pb.LoadModelRequest(
                    paths=[str(sd_folder)], llm=load_pb2.LlmLoadOptions(context_length=64)
                ),
                timeout=RPC_TIMEOUT,
            )
        )
    assert llm_options.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(llm_options.value) == "WRONG_ENGINE"


def test_image_load_options_the_engine_cannot_honour_are_refused(
    stub: Any, sd_folder: Path
) -> None:
    for options, bad_field in (
        (load_pb2.ImageLoadOptions(variant="fp16"), "image.variant"),
        (load_pb2.ImageLoadOptions(cpu_offload=load_pb2.CPU_OFFLOAD_MODEL), "image.cpu_offload"),
        (load_pb2.ImageLoadOptions(vae="/a/vae"), "image.vae"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            list(
                stub.LoadModel(
                    pb.LoadModelRequest(paths=[str(sd_folder)], image=options),
                    timeout=RPC_TIMEOUT,
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field in (caught.value.details() or "")
    # Refused before anything happened: the model is still loaded.
    info = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
    assert info.state == pb.WORKER_STATE_READY and info.model == "models/tiny-sd"


def test_generate_image_on_an_llm_worker_is_unimplemented() -> None:
    # width=100 would be INVALID_ARGUMENT on an image worker: the engine check comes first.
    request = image_pb2.GenerateImageRequest(params=image_pb2.ImageParams(prompt="x", width=100))
    with (
        running_worker(FakeEngine(), "fake") as llm_worker,
        grpc.insecure_channel(llm_worker.address) as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GenerateImage(request, timeout=RPC_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_reason(caught.value) == "WRONG_ENGINE"
    assert "cpu-sd" in (caught.value.details() or "")


def test_the_command_line_makes_a_diffusers_worker() -> None:
    settings = settings_from_args(
        [
            "--engine",
            "diffusers",
            "--dtype",
            "float32",
            "--scheduler",
            "ddim",
            "--attention-slicing",
            "--threads",
            "1",
        ]
    )
    options = settings.image_load_options()
    assert options.dtype == "float32" and options.scheduler == "ddim" and options.attention_slicing
    engine = create_engine(settings.engine, settings.device_spec, threads=settings.threads)
    assert isinstance(engine, DiffusersEngine) and engine.loaded is None


def test_queue_overflow_and_model_mismatch(stub: Any, worker: ImageWorker) -> None:
    with pytest.raises(grpc.RpcError) as mismatch:
        list(
            stub.GenerateImage(
                image_pb2.GenerateImageRequest(
                    model="models/other", params=image_pb2.ImageParams(prompt="x", steps=1)
                ),
                timeout=RPC_TIMEOUT,
            )
        )
    assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(mismatch.value) == "MODEL_MISMATCH"

    slow = image_pb2.GenerateImageRequest(
        params=image_pb2.ImageParams(prompt="slow", steps=200, width=64, height=64, count=8)
    )
    running = stub.GenerateImage(slow, timeout=RPC_TIMEOUT)
    waiting = []
    try:
        assert next(running).progress.step == 1
        # The worker's queue holds 2 behind the running request; the next one is refused.
        waiting = [stub.GenerateImage(slow, timeout=RPC_TIMEOUT) for _ in range(2)]
        wait_for(lambda: worker.service.queue_depth == 2, 5.0)
        with pytest.raises(grpc.RpcError) as full:
            list(stub.GenerateImage(slow, timeout=RPC_TIMEOUT))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(full.value) == "QUEUE_FULL"
    finally:
        for call in [*waiting, running]:
            call.cancel()
    wait_for(lambda: worker.service.queue_depth == 0, 5.0)
    wait_for(lambda: worker.service.state.value == "ready", 5.0)
    progress, _ = imagine(stub, seed=2)
    assert len(progress) == STEPS


# ---- LoRAs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(sd_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worker-loras")
    write_tiny_lora(folder / "style.safetensors", sd_folder, seed=1, with_text_encoder=True)
    write_foreign_lora(folder / "foreign.safetensors")
    return folder


def test_a_lora_applies_to_its_request_only(stub: Any, lora_dir: Path) -> None:
    style = str(lora_dir / "style.safetensors")
    _, base = imagine(stub, seed=21)
    progress, styled = imagine(stub, seed=21, loras=[load_pb2.LoraAdapter(path=style, weight=1.5)])
    _, after = imagine(stub, seed=21)
    _, at_zero = imagine(stub, seed=21, loras=[load_pb2.LoraAdapter(path=style, weight=0.0)])
    assert [p.step for p in progress] == list(range(1, STEPS + 1))
    assert styled.images[0].data != base.images[0].data
    assert after.images[0].data == base.images[0].data
    assert at_zero.images[0].data == base.images[0].data


def test_missing_and_incompatible_loras(stub: Any, worker: ImageWorker, lora_dir: Path) -> None:
    missing = load_pb2.LoraAdapter(path=str(lora_dir / "missing.safetensors"))
    with pytest.raises(grpc.RpcError) as not_found:
        imagine(stub, loras=[missing])
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(not_found.value) == "FILE_NOT_FOUND"
    foreign = load_pb2.LoraAdapter(path=str(lora_dir / "foreign.safetensors"))
    with pytest.raises(grpc.RpcError) as incompatible:
        imagine(stub, seed=3, loras=[foreign])
    assert incompatible.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(incompatible.value) == "INCOMPATIBLE_MODEL"
    assert "size mismatch" in (incompatible.value.details() or "")
    wait_for(lambda: worker.service.state.value == "ready", 5.0)
    progress, result = imagine(stub, seed=3)
    assert len(progress) == STEPS and len(result.images) == 1


def test_loras_at_load_are_fused_and_reported(stub: Any, sd_folder: Path, lora_dir: Path) -> None:
    _, base = imagine(stub, seed=31)
    style = load_pb2.LoraAdapter(path=str(lora_dir / "style.safetensors"), weight=-0.5)
    options = load_pb2.ImageLoadOptions(dtype="float32", attention_slicing=True)
    try:
        list(
            stub.LoadModel(
                pb.LoadModelRequest(
                    model="models/tiny-sd",
                    paths=[str(sd_folder)],
                    image=load_pb2.ImageLoadOptions(
                        dtype="float32", attention_slicing=True, loras=[style]
                    ),
                ),
                timeout=RPC_TIMEOUT,
            )
        )
        info = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
        assert [(x.path, x.weight) for x in info.loaded_model.image.loras] == [(style.path, -0.5)]
        _, fused = imagine(stub, seed=31)
        assert fused.images[0].data != base.images[0].data
        with pytest.raises(grpc.RpcError) as catalog:
            list(
                stub.LoadModel(
                    pb.LoadModelRequest(
                        paths=[str(sd_folder)],
                        image=load_pb2.ImageLoadOptions(
                            loras=[load_pb2.LoraAdapter(model="models/style")]
                        ),
                    ),
                    timeout=RPC_TIMEOUT,
                )
            )
        assert catalog.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image.loras[0].model" in (catalog.value.details() or "")
    finally:
        list(
            stub.LoadModel(
                pb.LoadModelRequest(model="models/tiny-sd", paths=[str(sd_folder)], image=options),
                timeout=RPC_TIMEOUT,
            )
        )
    _, reloaded = imagine(stub, seed=31)
    assert reloaded.images[0].data == base.images[0].data
