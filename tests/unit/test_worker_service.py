"""services.worker.service with the FakeEngine: states, streams, queue, cancellation, counters."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.catalog.domain import DeviceKind
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from services.worker.devices import DeviceSpec
from services.worker.engines.base import (
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationEvent,
    LlmLoadOptions,
    SamplingParams,
    StoppingCriteria,
    TokenDelta,
)
from services.worker.engines.fake import FakeEngine
from services.worker.metrics import WorkerMetrics
from services.worker.service import (
    ChatGenerationRequest,
    CompletedGeneration,
    GenerationRequest,
    LoadProgressEvent,
    LoadRequest,
    LoadStage,
    OptionsKind,
    StreamEvent,
    WorkerInfo,
    WorkerService,
    WorkerState,
)

pytestmark = pytest.mark.unit

# Long enough that a generation is still running when the test acts, short enough that a
# test never waits long: a cancel is seen at once (the fake waits on the cancel event).
SLOW_TOKEN_S = 0.02
ENDLESS = StoppingCriteria(ignore_eos=True, max_tokens=10_000)


class RecordingFake(FakeEngine):
    """FakeEngine that keeps the cancel events and sampling it was given."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cancels: list[threading.Event] = []
        self.samplings: list[SamplingParams] = []
        self.load_options: list[LlmLoadOptions] = []
        self.finished = threading.Event()

    def load(self, path: Path, options: LlmLoadOptions, **kwargs: Any) -> Any:
        self.load_options.append(options)
        return super().load(path, options, **kwargs)

    def generate(
        self,
        prompt: str,
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        add_special: bool = True,
        parse_special: bool = False,
    ) -> Iterator[GenerationEvent]:
        self.cancels.append(cancel)
        self.samplings.append(sampling)
        self.finished.clear()
        events = super().generate(
            prompt,
            sampling,
            stopping,
            cancel=cancel,
            add_special=add_special,
            parse_special=parse_special,
        )
        return self._mark_finished(events)

    def chat(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        chat_template: str | None = None,
    ) -> Iterator[GenerationEvent]:
        self.cancels.append(cancel)
        return super().chat(
            messages, sampling, stopping, cancel=cancel, chat_template=chat_template
        )

    def _mark_finished(self, events: Iterator[GenerationEvent]) -> Iterator[GenerationEvent]:
        try:
            yield from events
        finally:
            self.finished.set()


def make_service(
    engine: FakeEngine | None = None,
    *,
    queue_size: int = 8,
    device: DeviceSpec | None = None,
) -> tuple[WorkerService, RecordingFake | FakeEngine, CollectorRegistry]:
    registry = CollectorRegistry()
    engine = engine if engine is not None else RecordingFake()
    service = WorkerService(
        engine,
        device=device or DeviceSpec(kind=DeviceKind.CPU),
        engine_name="fake",
        queue_size=queue_size,
        metrics=WorkerMetrics(registry),
        version="0.1.0",
        backend_version="fake",
    )
    return service, engine, registry


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


async def load(service: WorkerService, path: Path, **kwargs: Any) -> list[Any]:
    fields: dict[str, Any] = {"model": "models/tiny", "options_kind": OptionsKind.LLM, **kwargs}
    request = LoadRequest(paths=[str(path)], **fields)
    return [event async for event in service.load_model(request)]


async def collect(stream: AsyncIterator[StreamEvent]) -> tuple[list[TokenDelta], list[Any]]:
    deltas: list[TokenDelta] = []
    finals: list[Any] = []
    async for event in stream:
        assert not finals, "nothing may follow the final result"
        if isinstance(event, TokenDelta):
            deltas.append(event)
        else:
            finals.append(event)
    return deltas, finals


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def wait_until(predicate: Any, limit_s: float = 5.0) -> None:
    """Poll a state the service exposes no event for (bounded)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# ---- load / unload / state -------------------------------------------------------------------


async def test_load_streams_progress_then_the_ready_worker(model_file: Path) -> None:
    service, _, registry = make_service()
    assert service.state is WorkerState.IDLE and service.get_worker().model == ""
    events = await load(service, model_file)
    progress, final = events[:-1], events[-1]
    assert all(isinstance(e, LoadProgressEvent) for e in progress)
    assert progress[0].stage is LoadStage.CHECKING
    fractions = [e.fraction for e in progress if e.fraction is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert isinstance(final, WorkerInfo)
    assert final.state is WorkerState.READY and final.model == "models/tiny"
    assert final.loaded is not None and final.loaded.engine_model.memory_bytes == 64
    assert final.ram_bytes > 0 and final.queue_capacity == 8
    assert sample(registry, "rbee_worker_model_load_seconds_count") == 1
    assert sample(registry, "rbee_worker_model_memory_bytes") == 64


async def test_reload_unloads_first_and_unload_is_idempotent(model_file: Path) -> None:
    service, _, registry = make_service()
    await load(service, model_file)
    events = await load(service, model_file, model="other")
    stages = [e.stage for e in events if isinstance(e, LoadProgressEvent)]
    assert stages[:2] == [LoadStage.CHECKING, LoadStage.UNLOADING]
    assert service.get_worker().model == "models/other"  # a bare id becomes models/{id}
    with pytest.raises(FailedPrecondition) as caught:
        await service.unload_model("models/tiny")
    assert caught.value.reason == "MODEL_MISMATCH"
    info = await service.unload_model("models/other")
    assert info.state is WorkerState.IDLE and info.loaded is None
    assert (await service.unload_model()).state is WorkerState.IDLE
    assert sample(registry, "rbee_worker_model_memory_bytes") == 0


async def test_cpu_worker_offloads_no_layers_unless_asked(model_file: Path) -> None:
    service, engine, _ = make_service()
    assert isinstance(engine, RecordingFake)
    await load(service, model_file)
    await load(service, model_file, options=LlmLoadOptions(gpu_layers=5))
    assert [o.gpu_layers for o in engine.load_options] == [0, 5]
    gpu_service, gpu_engine, _ = make_service(device=DeviceSpec(kind=DeviceKind.CUDA))
    await load(gpu_service, model_file)
    assert isinstance(gpu_engine, RecordingFake) and gpu_engine.load_options[0].gpu_layers is None


async def test_load_request_checks(model_file: Path, tmp_path: Path) -> None:
    service, _, _ = make_service()
    with pytest.raises(InvalidArgument) as wrong:
        await load(service, model_file, options_kind=OptionsKind.IMAGE)
    assert wrong.value.reason == "WRONG_ENGINE" and "sd" in wrong.value.message
    with pytest.raises(FailedPrecondition, match="paths are required"):
        [e async for e in service.load_model(LoadRequest(model="models/tiny"))]
    with pytest.raises(InvalidArgument):
        [e async for e in service.load_model(LoadRequest())]
    with pytest.raises(InvalidArgument, match="absolute"):
        [e async for e in service.load_model(LoadRequest(paths=["tiny.gguf"]))]
    with pytest.raises(NotFound) as missing:
        await load(service, tmp_path / "nope.gguf")
    assert missing.value.reason == "FILE_NOT_FOUND"
    assert service.state is WorkerState.IDLE


async def test_failed_load_leaves_the_worker_idle_and_usable(model_file: Path) -> None:
    service, _, _ = make_service()
    with pytest.raises(InvalidArgument):  # the fake refuses context_length < 2
        await load(service, model_file, options=LlmLoadOptions(context_length=1))
    assert service.state is WorkerState.IDLE
    await load(service, model_file)
    assert service.get_worker().state is WorkerState.READY


# ---- generation ------------------------------------------------------------------------------


async def test_generate_streams_deltas_then_exactly_one_result(model_file: Path) -> None:
    service, _, registry = make_service()
    await load(service, model_file)
    deltas, finals = await collect(service.generate(GenerationRequest(prompt="héllo wörld")))
    assert "".join(d.text for d in deltas) == "héllo wörld"
    assert len(finals) == 1
    final = finals[0]
    assert isinstance(final, CompletedGeneration)
    assert final.result.finish_reason is FinishReason.END_OF_SEQUENCE
    assert final.model == "models/tiny" and final.queue_seconds >= 0
    completion = final.result.completion_tokens
    assert completion == len("héllo wörld".encode()) == sum(len(d.token_ids) for d in deltas)
    counters = service.counters
    assert counters.requests_succeeded == 1 and counters.completion_tokens == completion
    assert counters.prompt_tokens == final.result.prompt_tokens > 0
    assert sample(registry, "rbee_worker_tokens_generated_total") == completion
    assert sample(registry, "rbee_worker_requests_total", finish_reason="end_of_sequence") == 1
    assert sample(registry, "rbee_worker_time_to_first_token_seconds_count") == 1
    assert sample(registry, "rbee_worker_inter_token_seconds_count") == len(deltas) - 1
    assert service.state is WorkerState.READY


async def test_chat_uses_the_load_time_template_unless_the_request_gives_one(
    model_file: Path,
) -> None:
    engine = RecordingFake(has_chat_template=False)
    service, _, _ = make_service(engine)
    await load(service, model_file)
    messages = [ChatMessage(role=ChatRole.USER, content="hi")]
    with pytest.raises(FailedPrecondition) as caught:
        await collect(service.chat(ChatGenerationRequest(messages=messages)))
    assert caught.value.reason == "NO_CHAT_TEMPLATE"
    assert service.counters.requests_failed == 1

    await load(service, model_file, chat_template="LOAD-TEMPLATE")
    deltas, finals = await collect(service.chat(ChatGenerationRequest(messages=messages)))
    assert "".join(d.text for d in deltas) == "hi" and len(finals) == 1
    assert engine.last_chat_template == "LOAD-TEMPLATE"
    await collect(service.chat(ChatGenerationRequest(messages=messages, chat_template="REQ")))
    assert engine.last_chat_template == "REQ"


async def test_request_checks_before_any_work(model_file: Path) -> None:
    service, _, registry = make_service()
    with pytest.raises(FailedPrecondition) as not_loaded:
        await collect(service.generate(GenerationRequest(prompt="x")))
    assert not_loaded.value.reason == "MODEL_NOT_LOADED"
    await load(service, model_file)
    with pytest.raises(InvalidArgument):
        service.generate(GenerationRequest(prompt=""))
    with pytest.raises(InvalidArgument):
        service.chat(ChatGenerationRequest(messages=[]))
    with pytest.raises(FailedPrecondition) as mismatch:
        await collect(service.generate(GenerationRequest(prompt="x", model="models/other")))
    assert mismatch.value.reason == "MODEL_MISMATCH"
    _, ok = await collect(service.generate(GenerationRequest(prompt="x", model="tiny")))
    assert ok[0].model == "models/tiny"  # a bare id names the same model
    assert service.counters.requests_failed == 2
    assert sample(registry, "rbee_worker_requests_total", finish_reason="rejected") == 2


async def test_engine_errors_pass_through_and_count_as_failed(model_file: Path) -> None:
    service, _, registry = make_service()
    await load(service, model_file, options=LlmLoadOptions(context_length=8))
    with pytest.raises(InvalidArgument) as caught:
        await collect(service.generate(GenerationRequest(prompt="far too long a prompt")))
    assert caught.value.reason == "CONTEXT_TOO_LONG"
    assert service.counters.requests_failed == 1
    assert sample(registry, "rbee_worker_requests_total", finish_reason="error") == 1
    _, finals = await collect(service.generate(GenerationRequest(prompt="ok")))
    assert finals[0].result.finish_reason is FinishReason.END_OF_SEQUENCE


async def test_the_load_time_seed_is_the_default(model_file: Path) -> None:
    service, engine, _ = make_service()
    assert isinstance(engine, RecordingFake)
    await load(service, model_file, default_seed=1234)
    _, finals = await collect(service.generate(GenerationRequest(prompt="a")))
    assert finals[0].result.seed == 1234
    _, finals = await collect(
        service.generate(GenerationRequest(prompt="a", sampling=SamplingParams(seed=9)))
    )
    assert finals[0].result.seed == 9
    assert [s.seed for s in engine.samplings] == [1234, 9]


# ---- queue and cancellation ------------------------------------------------------------------


async def _first_delta(stream: AsyncIterator[StreamEvent]) -> StreamEvent:
    return await anext(stream)


async def test_queue_bound_rejects_at_once_and_queued_requests_run_in_turn(
    model_file: Path,
) -> None:
    engine = RecordingFake(reply="ab", token_delay_s=SLOW_TOKEN_S)
    service, _, registry = make_service(engine, queue_size=1)
    await load(service, model_file)
    running = service.generate(GenerationRequest(prompt="a", stopping=ENDLESS))
    assert isinstance(await _first_delta(running), TokenDelta)
    assert service.state is WorkerState.BUSY

    queued = asyncio.create_task(collect(service.generate(GenerationRequest(prompt="q"))))
    await wait_until(lambda: service.queue_depth == 1)
    assert sample(registry, "rbee_worker_queue_depth") == 1
    assert service.get_worker().queue_depth == 1

    with pytest.raises(ResourceExhausted) as full:
        await collect(service.generate(GenerationRequest(prompt="third")))
    assert full.value.reason == "QUEUE_FULL"
    with pytest.raises(FailedPrecondition) as in_use:  # no reload under queued requests
        await load(service, model_file)
    assert in_use.value.reason == "MODEL_IN_USE"
    assert not queued.done()

    await running.aclose()  # the first caller goes away
    deltas, finals = await asyncio.wait_for(queued, 5)
    assert "".join(d.text for d in deltas) == "ab"
    assert finals[0].result.finish_reason is FinishReason.END_OF_SEQUENCE
    assert finals[0].queue_seconds > 0
    assert service.queue_depth == 0 and service.get_worker().state is WorkerState.READY
    counters = service.counters
    assert (counters.requests_succeeded, counters.requests_failed) == (1, 1)
    assert counters.requests_cancelled == 1


async def test_closing_the_stream_sets_the_cancel_event_and_the_next_request_is_clean(
    model_file: Path,
) -> None:
    engine = RecordingFake(reply="xyz", token_delay_s=SLOW_TOKEN_S)
    service, _, registry = make_service(engine)
    await load(service, model_file)
    stream = service.generate(GenerationRequest(prompt="a", stopping=ENDLESS))
    await _first_delta(stream)
    await stream.aclose()
    assert engine.cancels[0].is_set()
    # The engine thread stops within one token; the turn is released when it has.
    await asyncio.to_thread(engine.finished.wait, 5)
    await wait_until(lambda: service.state is WorkerState.READY)
    assert service.counters.requests_cancelled == 1
    assert sample(registry, "rbee_worker_requests_total", finish_reason="cancelled") == 1

    engine.token_delay_s = 0.0
    deltas, finals = await collect(service.generate(GenerationRequest(prompt="b")))
    assert "".join(d.text for d in deltas) == "xyz"
    assert not engine.cancels[1].is_set()
    assert finals[0].result.finish_reason is FinishReason.END_OF_SEQUENCE


async def test_cancelling_the_consumer_task_stops_the_engine(model_file: Path) -> None:
    engine = RecordingFake(reply="xyz", token_delay_s=SLOW_TOKEN_S)
    service, _, _ = make_service(engine)
    await load(service, model_file)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in service.chat(
            ChatGenerationRequest(
                messages=[ChatMessage(role=ChatRole.USER, content="hi")], stopping=ENDLESS
            )
        ):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancels[0].is_set()
    await wait_until(lambda: service.state is WorkerState.READY)
    assert service.counters.requests_cancelled == 1


async def test_a_waiter_cancelled_in_the_queue_leaves_it(model_file: Path) -> None:
    engine = RecordingFake(reply="ab", token_delay_s=SLOW_TOKEN_S)
    service, _, _ = make_service(engine, queue_size=1)
    await load(service, model_file)
    running = service.generate(GenerationRequest(prompt="a", stopping=ENDLESS))
    await _first_delta(running)
    waiter = asyncio.create_task(collect(service.generate(GenerationRequest(prompt="q"))))
    await wait_until(lambda: service.queue_depth == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert service.queue_depth == 0
    await running.aclose()
    engine.token_delay_s = 0.0
    _, finals = await collect(service.generate(GenerationRequest(prompt="next")))
    assert len(finals) == 1
    assert service.counters.requests_cancelled == 2


# ---- tokenizer, images, stop -----------------------------------------------------------------


async def test_tokenize_and_detokenize(model_file: Path) -> None:
    service, _, _ = make_service()
    with pytest.raises(FailedPrecondition):
        await service.tokenize("a", add_special=True, parse_special=False)
    await load(service, model_file)
    ids = await service.tokenize("hé", add_special=True, parse_special=False)
    assert len(ids) == 1 + len("hé".encode())
    assert await service.detokenize(ids, skip_special=True) == "hé"
    assert service.counters.requests_succeeded == 0  # not generation requests


def test_generate_image_names_the_sd_worker_types() -> None:
    service, _, _ = make_service()
    with pytest.raises(Unimplemented) as caught:
        service.generate_image()
    assert caught.value.reason == "WRONG_ENGINE"
    for worker_type in ("cpu-sd", "cuda-sd", "metal-sd"):
        assert worker_type in caught.value.message


async def test_begin_stop_cancels_the_running_generation_and_refuses_new_work(
    model_file: Path,
) -> None:
    engine = RecordingFake(reply="ab", token_delay_s=SLOW_TOKEN_S)
    service, _, _ = make_service(engine)
    await load(service, model_file)
    stream = service.generate(GenerationRequest(prompt="a", stopping=ENDLESS))
    first = await _first_delta(stream)
    service.begin_stop()
    assert service.state is WorkerState.STOPPING
    _, finals = await asyncio.wait_for(collect(stream), 5)
    assert finals[0].result.finish_reason is FinishReason.CANCELLED  # ended by the server
    assert isinstance(first, TokenDelta)
    with pytest.raises(Unavailable):
        await collect(service.generate(GenerationRequest(prompt="b")))
    with pytest.raises(Unavailable):
        await load(service, model_file)
    await service.close()
    assert engine.loaded is None
    assert service.counters.requests_cancelled == 1


async def test_a_slow_reader_gets_the_piled_up_deltas_merged_in_order(model_file: Path) -> None:
    text = "abc-ü-" * 20
    engine = RecordingFake(reply=text)
    service, _, registry = make_service(engine)
    await load(service, model_file)
    stream = service.generate(GenerationRequest(prompt="a"))
    first = await _first_delta(stream)
    await asyncio.to_thread(engine.finished.wait, 5)  # the engine is done; nothing was read
    deltas, finals = await collect(stream)
    assert isinstance(first, TokenDelta)
    assert first.text + "".join(d.text for d in deltas) == text
    ids = list(first.token_ids) + [i for d in deltas for i in d.token_ids]
    assert len(ids) == len(text.encode()) == finals[0].result.completion_tokens
    assert len(deltas) < len(text) - 1  # merged: fewer messages than characters
    assert sample(registry, "rbee_worker_tokens_generated_total") == len(ids)
