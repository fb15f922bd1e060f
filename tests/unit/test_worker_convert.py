"""services.worker.convert: enum tables complete both ways, messages round-trip, refusals."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from rbee.common.v1 import device_pb2, runtime_pb2
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import image_pb2, load_pb2
from rbee.worker.v1 import worker_pb2 as pb
from services.catalog.domain import Backend, DeviceKind, KvCacheType
from services.common.errors import InvalidArgument
from services.worker import convert
from services.worker.devices import DeviceSpec
from services.worker.engines.base import (
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationResult,
    LlmLoadOptions,
    LoadedModel,
    LogprobOptions,
    SamplingParams,
    StoppingCriteria,
    TokenDelta,
    TokenLogprob,
    TopLogprob,
)
from services.worker.engines.image_base import ImageLoadOptions, LoraWeight
from services.worker.service import (
    ChatGenerationRequest,
    CompletedGeneration,
    GenerationRequest,
    LoadedModelInfo,
    LoadProgressEvent,
    LoadRequest,
    LoadStage,
    OptionsKind,
    WorkerCounters,
    WorkerInfo,
    WorkerState,
)

pytestmark = pytest.mark.unit

TABLES: list[tuple[type[enum.Enum], Mapping[Any, int], Any]] = [
    (WorkerState, convert.WORKER_STATE_TO_PB, pb.WorkerState),
    (LoadStage, convert.LOAD_STAGE_TO_PB, pb.LoadStage),
    (FinishReason, convert.FINISH_REASON_TO_PB, gen_pb.FinishReason),
    (ChatRole, convert.CHAT_ROLE_TO_PB, gen_pb.ChatRole),
]


@pytest.mark.parametrize(
    ("domain_enum", "table", "wire_enum"), TABLES, ids=lambda x: getattr(x, "__name__", "")
)
def test_every_domain_value_maps_to_a_distinct_nonzero_wire_value(
    domain_enum: type[enum.Enum], table: Mapping[Any, int], wire_enum: Any
) -> None:
    assert set(table) == set(domain_enum)
    values = list(table.values())
    assert 0 not in values and len(set(values)) == len(values)
    assert set(values) <= set(wire_enum.values())


def test_wire_values_without_a_domain_value_are_the_documented_exceptions() -> None:
    # The pool's states, and tool calls (not produced by this engine yet).
    unmapped_states = set(pb.WorkerState.values()) - set(convert.WORKER_STATE_TO_PB.values())
    assert unmapped_states == {
        pb.WORKER_STATE_UNSPECIFIED,
        pb.WORKER_STATE_STARTING,
        pb.WORKER_STATE_STOPPED,
        pb.WORKER_STATE_FAILED,
    }
    unmapped_reasons = set(gen_pb.FinishReason.values()) - set(convert.FINISH_REASON_TO_PB.values())
    assert unmapped_reasons == {gen_pb.FINISH_REASON_UNSPECIFIED, gen_pb.FINISH_REASON_TOOL_CALLS}
    assert set(load_pb2.FlashAttention.values()) == {0, 1, 2, 3}  # all handled by the converter


def _full_sampling() -> SamplingParams:
    # Values exact in float32 (the wire type), so the round trip is exact.
    return SamplingParams(
        temperature=0.5,
        top_k=20,
        top_p=0.875,
        min_p=0.0625,
        typical_p=0.75,
        repeat_penalty=1.125,
        repeat_last_n=-1,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        seed=2**63 + 5,
        logit_bias={3: -100.0, 7: 2.5},
        grammar='root ::= "a"',
    )


def test_sampling_round_trip_and_unset_means_default() -> None:
    full = _full_sampling()
    assert convert.sampling_from_pb(convert.sampling_to_pb(full)) == full
    schema = SamplingParams(json_schema='{"type": "object"}')
    assert convert.sampling_from_pb(convert.sampling_to_pb(schema)) == schema
    assert convert.sampling_from_pb(gen_pb.SamplingParams()) == SamplingParams()
    # 0 is a value, not "unset": temperature 0 is greedy.
    zero = convert.sampling_from_pb(gen_pb.SamplingParams(temperature=0.0, top_k=0))
    assert zero.temperature == 0.0 and zero.top_k == 0 and zero.top_p is None


def test_generate_request_round_trip() -> None:
    request = GenerationRequest(
        model="models/tiny",
        prompt="héllo",
        sampling=_full_sampling(),
        stopping=StoppingCriteria(max_tokens=16, stop=["\n\n", "END"], ignore_eos=True),
        add_special=False,
        parse_special=True,
    )
    assert convert.generate_request_from_pb(convert.generate_request_to_pb(request)) == request
    defaults = convert.generate_request_from_pb(gen_pb.GenerateRequest(prompt="x"))
    assert defaults.add_special is True and defaults.stopping == StoppingCriteria()


def test_chat_request_round_trip_and_roles() -> None:
    request = ChatGenerationRequest(
        model="models/tiny",
        messages=[ChatMessage(role=role, content=f"{role.value} says hi") for role in ChatRole],
        chat_template="{{ messages }}",
        sampling=SamplingParams(seed=1),
        stopping=StoppingCriteria(max_tokens=3),
    )
    assert convert.chat_request_from_pb(convert.chat_request_to_pb(request)) == request


def test_chat_refuses_unset_roles_and_tools() -> None:
    with pytest.raises(InvalidArgument, match=r"messages\[0\]\.role"):
        convert.chat_request_from_pb(gen_pb.ChatRequest(messages=[gen_pb.ChatMessage(content="x")]))
    with pytest.raises(InvalidArgument, match="tools"):
        convert.chat_request_from_pb(gen_pb.ChatRequest(tools=[gen_pb.Tool(name="f")]))
    with pytest.raises(InvalidArgument, match="stop"):
        convert.stopping_from_pb(gen_pb.StoppingCriteria(stop=["ok", ""]))


def test_logprob_options_reach_the_engine_sampling_of_both_requests() -> None:
    on = gen_pb.LogprobOptions(enabled=True, top_logprobs=5)
    generate = convert.generate_request_from_pb(gen_pb.GenerateRequest(prompt="x", logprobs=on))
    chat = convert.chat_request_from_pb(
        gen_pb.ChatRequest(
            messages=[gen_pb.ChatMessage(role=gen_pb.CHAT_ROLE_USER, content="x")], logprobs=on
        )
    )
    assert generate.sampling.logprobs == chat.sampling.logprobs == LogprobOptions(top_logprobs=5)
    only_sampled = gen_pb.LogprobOptions(enabled=True)
    assert convert.logprob_options_from_pb(only_sampled) == LogprobOptions(top_logprobs=0)
    # Off by default: unset options are None (no log probabilities), with other sampling kept.
    off = convert.generate_request_from_pb(
        gen_pb.GenerateRequest(prompt="x", sampling=gen_pb.SamplingParams(seed=3))
    )
    assert off.sampling.logprobs is None and off.sampling.seed == 3
    for options in (None, LogprobOptions(), LogprobOptions(top_logprobs=20)):
        assert convert.logprob_options_from_pb(convert.logprob_options_to_pb(options)) == options
    request = GenerationRequest(
        prompt="x", sampling=SamplingParams(seed=1, logprobs=LogprobOptions(top_logprobs=2))
    )
    assert convert.generate_request_from_pb(convert.generate_request_to_pb(request)) == request


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (gen_pb.LogprobOptions(enabled=True, top_logprobs=21), "logprobs.top_logprobs"),
        (gen_pb.LogprobOptions(enabled=False, top_logprobs=3), "logprobs.top_logprobs"),
    ],
)
def test_logprob_options_beyond_the_bounds_are_invalid(
    options: gen_pb.LogprobOptions, field: str
) -> None:
    with pytest.raises(InvalidArgument) as generate:
        convert.generate_request_from_pb(gen_pb.GenerateRequest(prompt="x", logprobs=options))
    with pytest.raises(InvalidArgument) as chat:
        convert.chat_request_from_pb(gen_pb.ChatRequest(logprobs=options))
    for error in (generate.value, chat.value):
        assert [v.field for v in error.field_violations] == [field]


def test_llm_load_options_round_trip() -> None:
    options = LlmLoadOptions(
        context_length=2048,
        gpu_layers=-1,
        threads=4,
        batch_size=256,
        ubatch_size=128,
        kv_cache_type=KvCacheType.Q8_0,
        flash_attention=True,
        use_mmap=False,
    )
    msg = convert.llm_load_options_to_pb(options, default_seed=42, chat_template="T")
    assert convert.llm_load_options_from_pb(msg) == (options, 42, "T")
    default = convert.llm_load_options_from_pb(load_pb2.LlmLoadOptions())
    assert default == (LlmLoadOptions(), None, "")
    # gpu_layers 0 is "none", distinct from unset
    zero, _, _ = convert.llm_load_options_from_pb(load_pb2.LlmLoadOptions(gpu_layers=0))
    assert zero.gpu_layers == 0
    auto, _, _ = convert.llm_load_options_from_pb(
        load_pb2.LlmLoadOptions(flash_attention=load_pb2.FLASH_ATTENTION_AUTO)
    )
    assert auto.flash_attention is False


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (load_pb2.LlmLoadOptions(adapters=[load_pb2.LoraAdapter(path="/a")]), "llm.adapters"),
        (load_pb2.LlmLoadOptions(projector="/p.gguf"), "llm.projector"),
        (load_pb2.LlmLoadOptions(rope_freq_base=10000.0), "llm.rope_freq_base"),
        (load_pb2.LlmLoadOptions(use_mlock=True), "llm.use_mlock"),
        (load_pb2.LlmLoadOptions(threads=2, threads_batch=8), "llm.threads_batch"),
        (load_pb2.LlmLoadOptions(gpu_layers=-2), "llm.gpu_layers"),
        (load_pb2.LlmLoadOptions(kv_cache_type=99), "llm.kv_cache_type"),  # type: ignore[arg-type]
    ],
)
def test_unsupported_load_options_are_refused_not_ignored(
    msg: load_pb2.LlmLoadOptions, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        convert.llm_load_options_from_pb(msg)
    assert caught.value.field_violations[0].field == field


def test_load_request_keeps_which_options_were_given() -> None:
    llm = LoadRequest(
        model="models/tiny",
        paths=["/m/tiny.gguf"],
        options_kind=OptionsKind.LLM,
        options=LlmLoadOptions(context_length=128),
        default_seed=7,
        chat_template="T",
    )
    assert convert.load_request_from_pb(convert.load_request_to_pb(llm)) == llm
    image = LoadRequest(paths=["/m/sd"], options_kind=OptionsKind.IMAGE)
    assert convert.load_request_from_pb(convert.load_request_to_pb(image)) == image
    bare = LoadRequest(model="models/x")
    assert convert.load_request_from_pb(convert.load_request_to_pb(bare)) == bare


def test_load_progress_round_trip() -> None:
    event = LoadProgressEvent(
        stage=LoadStage.READING, fraction=0.5, message="reading", elapsed_s=1.25
    )
    msg = convert.load_progress_to_pb(event)
    assert msg.WhichOneof("event") == "progress"
    assert convert.load_progress_from_pb(msg.progress) == event
    unknown = convert.load_progress_from_pb(
        convert.load_progress_to_pb(LoadProgressEvent(stage=LoadStage.CHECKING)).progress
    )
    assert unknown.fraction is None


def test_stream_events_round_trip_and_result_fields() -> None:
    delta = TokenDelta(text="ü", token_ids=[195, 188])
    assert convert.stream_event_from_pb(convert.stream_event_to_pb(delta)) == delta
    done = CompletedGeneration(
        result=GenerationResult(
            finish_reason=FinishReason.STOP_SEQUENCE,
            stop_sequence="END",
            prompt_tokens=12,
            cached_prompt_tokens=4,
            completion_tokens=30,
            seed=2**64 - 1,
            time_to_first_token_s=0.015625,
            prompt_time_s=0.5,
            total_time_s=2.25,
            tokens_per_second=14.5,
        ),
        model="models/tiny",
        queue_seconds=0.125,
    )
    msg = convert.stream_event_to_pb(done)
    assert convert.stream_event_from_pb(msg) == done
    result = msg.result
    assert result.usage.total_tokens == 42 and result.usage.cached_prompt_tokens == 4
    assert result.timings.prompt_tokens_per_second == pytest.approx(24.0)
    assert result.finish_reason == gen_pb.FINISH_REASON_STOP_SEQUENCE


def test_delta_logprobs_map_one_entry_per_token_with_alternatives_in_order() -> None:
    # "é" split across two byte tokens: one delta, two ids, two log probabilities.
    first = TokenLogprob(
        token_id=198,
        token=b"\xc3",
        logprob=-0.25,
        top_logprobs=[
            TopLogprob(token_id=198, token=b"\xc3", logprob=-0.25),
            TopLogprob(token_id=2, token=b"", logprob=-1.5),
        ],
    )
    second = TokenLogprob(token_id=172, token=b"\xa9", logprob=-3.0)
    delta = TokenDelta(text="é", token_ids=[198, 172], logprobs=[first, second])
    msg = convert.stream_event_to_pb(delta)
    wire = msg.delta.logprobs
    assert [e.token_id for e in wire] == [198, 172] and wire[0].token + wire[1].token == b"\xc3\xa9"
    assert [(t.token_id, t.token, t.logprob) for t in wire[0].top_logprobs] == [
        (198, b"\xc3", -0.25),
        (2, b"", -1.5),
    ]
    assert not wire[1].top_logprobs
    # Dyadic values: exact in float32, so the round trip is exact.
    assert convert.stream_event_from_pb(msg) == delta
    # The wire is float32: other values come back within float32's precision.
    precise = TokenDelta(
        text="a", token_ids=[4], logprobs=[TokenLogprob(token_id=4, token=b"a", logprob=-0.1)]
    )
    back = convert.stream_event_from_pb(convert.stream_event_to_pb(precise))
    assert isinstance(back, TokenDelta)
    assert back.logprobs[0].logprob == pytest.approx(-0.1, rel=1e-7)
    # Without logprobs the message has none (off by default).
    plain = convert.stream_event_to_pb(TokenDelta(text="a", token_ids=[4]))
    assert not plain.delta.logprobs


def test_joined_deltas_keep_every_log_probability() -> None:
    deltas = [
        TokenDelta(
            text=text,
            token_ids=[i],
            logprobs=[TokenLogprob(token_id=i, token=text.encode(), logprob=-float(i))],
        )
        for i, text in enumerate("abc", start=4)
    ]
    joined = TokenDelta.joined(deltas)
    assert joined.text == "abc" and joined.token_ids == [4, 5, 6]
    assert [lp.logprob for lp in joined.logprobs] == [-4.0, -5.0, -6.0]


def test_durations_never_go_negative_or_overflow_nanos() -> None:
    assert convert.duration_from_pb(convert.duration_to_pb(-1.0)) == 0.0
    almost = convert.duration_to_pb(2.9999999999)
    assert 0 <= almost.nanos <= 999_999_999


def _worker_info(*, device: DeviceSpec, loaded: bool) -> WorkerInfo:
    moment = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    info = (
        LoadedModelInfo(
            model="models/tiny",
            paths=["/m/tiny.gguf"],
            options=LlmLoadOptions(context_length=256, gpu_layers=0),
            default_seed=None,
            chat_template="",
            engine_model=LoadedModel(
                path="/m/tiny.gguf",
                name="tiny",
                context_length=256,
                gpu_layers=0,
                memory_bytes=1_000_000,
                has_chat_template=True,
                load_seconds=0.5,
            ),
            load_time=moment,
        )
        if loaded
        else None
    )
    return WorkerInfo(
        name="workers/w1",
        device=device,
        backend=Backend.LLAMA_CPP,
        engine="llama_cpp",
        worker_type=f"{device.kind.value}-llm",
        state=WorkerState.READY if loaded else WorkerState.IDLE,
        model="models/tiny" if loaded else "",
        loaded=info,
        ram_bytes=123,
        vram_bytes=0,
        queue_depth=2,
        queue_capacity=8,
        counters=WorkerCounters(
            requests_succeeded=3,
            requests_failed=1,
            requests_cancelled=2,
            prompt_tokens=40,
            completion_tokens=50,
        ),
        version="0.1.0",
        backend_version="llama-cpp-python 0.3.36",
        start_time=moment,
        update_time=moment,
    )


def test_worker_to_pb_fills_every_field_the_worker_knows() -> None:
    msg = convert.worker_to_pb(
        _worker_info(device=DeviceSpec(kind=DeviceKind.CUDA, index=1), loaded=True)
    )
    assert msg.name == "workers/w1"
    assert msg.device.name == "devices/cuda-1" and msg.device.index == 1
    assert msg.device.kind == device_pb2.DEVICE_KIND_CUDA
    assert msg.backend == runtime_pb2.BACKEND_LLAMA_CPP
    assert msg.worker_type == "worker-types/cuda-llm"
    assert msg.state == pb.WORKER_STATE_READY and msg.model == "models/tiny"
    assert (msg.queue_depth, msg.queue_capacity) == (2, 8)
    counters = msg.counters
    assert (counters.requests_succeeded, counters.requests_failed) == (3, 1)
    assert (counters.requests_cancelled, counters.prompt_tokens) == (2, 40)
    assert counters.completion_tokens == 50
    assert msg.memory.ram_bytes == 123
    assert msg.labels["engine"] == "llama_cpp"
    assert msg.start_time.seconds == int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert msg.start_time.nanos == 600_000_000
    loaded = msg.loaded_model
    assert loaded.model == "models/tiny" and list(loaded.paths) == ["/m/tiny.gguf"]
    assert loaded.context_length == 256 and loaded.has_chat_template
    assert loaded.vram_bytes == 1_000_000 and loaded.ram_bytes == 0  # on a GPU worker
    assert loaded.load_duration.nanos == 500_000_000
    assert loaded.llm.context_length == 256 and loaded.llm.gpu_layers == 0


def test_worker_to_pb_without_a_model_and_on_cpu() -> None:
    msg = convert.worker_to_pb(_worker_info(device=DeviceSpec(kind=DeviceKind.CPU), loaded=False))
    assert not msg.HasField("loaded_model") and msg.model == ""
    assert msg.state == pb.WORKER_STATE_IDLE and msg.device.name == "devices/cpu"
    response = convert.load_response_to_pb(
        _worker_info(device=DeviceSpec(kind=DeviceKind.CPU), loaded=True)
    )
    assert response.WhichOneof("event") == "worker"
    assert response.worker.loaded_model.ram_bytes == 1_000_000


# ---- image LoRAs -------------------------------------------------------------------------------


def image_request_with(*loras: load_pb2.LoraAdapter) -> image_pb2.GenerateImageRequest:
    return image_pb2.GenerateImageRequest(params=image_pb2.ImageParams(prompt="x", loras=loras))


def test_image_request_loras_by_path_keep_their_weights_and_unset_is_one() -> None:
    request = convert.image_request_from_pb(
        image_request_with(
            load_pb2.LoraAdapter(path="/l/a.safetensors", weight=0.5),
            load_pb2.LoraAdapter(path="/l/b.safetensors"),
            load_pb2.LoraAdapter(path="/l/c.safetensors", weight=0.0),  # set: not the default
        )
    )
    assert request.params.loras == [
        LoraWeight(path="/l/a.safetensors", scale=0.5),
        LoraWeight(path="/l/b.safetensors", scale=1.0),
        LoraWeight(path="/l/c.safetensors", scale=0.0),
    ]
    assert convert.image_request_from_pb(image_request_with()).params.loras == []


def test_image_load_options_loras_round_trip() -> None:
    options = ImageLoadOptions(
        dtype="float16",
        loras=[
            LoraWeight(path="/l/a.safetensors", scale=-0.75),
            LoraWeight(path="/l/b.safetensors", scale=1.0),
        ],
    )
    msg = convert.image_load_options_to_pb(options)
    assert [(lora.path, lora.weight) for lora in msg.loras] == [
        ("/l/a.safetensors", -0.75),
        ("/l/b.safetensors", 1.0),
    ]
    assert convert.image_load_options_from_pb(msg) == options
    assert convert.image_load_options_from_pb(load_pb2.ImageLoadOptions()).loras == []


@pytest.mark.parametrize(
    ("lora", "field", "says"),
    [
        (load_pb2.LoraAdapter(model="models/style", weight=0.8), "loras[1].model", "models/style"),
        (load_pb2.LoraAdapter(weight=0.8), "loras[1].path", "absolute path"),
    ],
)
def test_catalog_loras_and_loras_without_a_target_are_refused(
    lora: load_pb2.LoraAdapter, field: str, says: str
) -> None:
    good = load_pb2.LoraAdapter(path="/l/a.safetensors")
    with pytest.raises(InvalidArgument) as in_request:
        convert.image_request_from_pb(image_request_with(good, lora))
    assert in_request.value.field_violations[0].field == f"params.{field}"
    assert says in str(in_request.value)
    with pytest.raises(InvalidArgument) as at_load:
        convert.image_load_options_from_pb(load_pb2.ImageLoadOptions(loras=[good, lora]))
    assert at_load.value.field_violations[0].field == f"image.{field}"
