"""The one place that maps rbee.worker.v1 messages <-> worker domain types.

Named by direction: `*_to_pb` builds a message, `*_from_pb` reads one. Enum tables are checked
for completeness by the unit tests. Device kinds, backends and KV cache types reuse the
catalog's tables (one mapping per wire enum in the code base).

Request fields the LLM engine cannot honour yet are refused with INVALID_ARGUMENT rather than
ignored: LoRA adapters, projectors, RoPE overrides, mlock, a separate batch thread count and
tools. `ChatMessage.name` is dropped (templates have no place for it). Image
requests likewise refuse what the diffusers engine does not do yet: CPU offload, variants,
VAE overrides, single-file families, the safety checker, catalog LoRAs (at load and per
request; LoRAs by path are served); per request SDXL's second prompts, guidance rescale, CLIP
skip, eta and non-PNG output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from rbee.common.v1 import device_pb2
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import image_pb2, load_pb2
from rbee.worker.v1 import worker_pb2 as pb
from services.catalog.convert import (
    BACKEND_TO_PB,
    DEVICE_KIND_TO_PB,
    KV_TYPE_FROM_PB,
    KV_TYPE_TO_PB,
)
from services.catalog.domain import DeviceKind, KvCacheType
from services.common.enum_mapping import enum_from_pb, inverse
from services.common.errors import InvalidArgument
from services.worker.engines.base import (
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationResult,
    LlmLoadOptions,
    LogprobOptions,
    SamplingParams,
    StoppingCriteria,
    TokenDelta,
    TokenLogprob,
    TopLogprob,
    check_logprob_options,
)
from services.worker.engines.image_base import (
    DEFAULT_PREVIEW_SIZE,
    ImageLoadOptions,
    ImageParams,
    ImageProgress,
    LoraWeight,
)
from services.worker.service import (
    ChatGenerationRequest,
    CompletedGeneration,
    CompletedImages,
    GenerationRequest,
    ImageGenerationRequest,
    ImageStreamEvent,
    LoadedModelInfo,
    LoadProgressEvent,
    LoadRequest,
    LoadStage,
    OptionsKind,
    StreamEvent,
    WorkerInfo,
    WorkerState,
)

WORKER_STATE_TO_PB = {
    WorkerState.IDLE: pb.WORKER_STATE_IDLE,
    WorkerState.LOADING: pb.WORKER_STATE_LOADING,
    WorkerState.READY: pb.WORKER_STATE_READY,
    WorkerState.BUSY: pb.WORKER_STATE_BUSY,
    WorkerState.STOPPING: pb.WORKER_STATE_STOPPING,
}
LOAD_STAGE_TO_PB = {
    LoadStage.CHECKING: pb.LOAD_STAGE_CHECKING,
    LoadStage.UNLOADING: pb.LOAD_STAGE_UNLOADING,
    LoadStage.READING: pb.LOAD_STAGE_READING,
    LoadStage.ALLOCATING: pb.LOAD_STAGE_ALLOCATING,
    LoadStage.WARMING_UP: pb.LOAD_STAGE_WARMING_UP,
}
FINISH_REASON_TO_PB = {
    FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: gen_pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.END_OF_SEQUENCE: gen_pb.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.CONTEXT_FULL: gen_pb.FINISH_REASON_CONTEXT_FULL,
    FinishReason.CANCELLED: gen_pb.FINISH_REASON_CANCELLED,
}
CHAT_ROLE_TO_PB = {
    ChatRole.SYSTEM: gen_pb.CHAT_ROLE_SYSTEM,
    ChatRole.USER: gen_pb.CHAT_ROLE_USER,
    ChatRole.ASSISTANT: gen_pb.CHAT_ROLE_ASSISTANT,
    ChatRole.TOOL: gen_pb.CHAT_ROLE_TOOL,
}


WORKER_STATE_FROM_PB = inverse(WORKER_STATE_TO_PB)
LOAD_STAGE_FROM_PB = inverse(LOAD_STAGE_TO_PB)
FINISH_REASON_FROM_PB = inverse(FINISH_REASON_TO_PB)
CHAT_ROLE_FROM_PB = inverse(CHAT_ROLE_TO_PB)


# ---- durations and timestamps (hot path: set the fields, skip the helper methods) ----------


def _fill_duration(msg: Duration, seconds: float) -> None:
    seconds = max(0.0, seconds)
    whole = math.floor(seconds)
    msg.seconds = whole
    msg.nanos = min(999_999_999, round((seconds - whole) * 1e9))


def duration_to_pb(seconds: float) -> Duration:
    msg = Duration()
    _fill_duration(msg, seconds)
    return msg


def duration_from_pb(msg: Duration) -> float:
    return msg.seconds + msg.nanos / 1e9


def _fill_timestamp(msg: Timestamp, moment: datetime) -> None:
    msg.seconds = int(moment.timestamp())
    msg.nanos = moment.microsecond * 1000


# ---- load ------------------------------------------------------------------------------------


def _refuse(field: str, what: str) -> InvalidArgument:
    return InvalidArgument.for_field(field, f"{what} is not supported by this worker yet")


def llm_load_options_from_pb(
    msg: load_pb2.LlmLoadOptions,
) -> tuple[LlmLoadOptions, int | None, str]:
    """(engine options, the default request seed, the default chat template)."""
    if msg.adapters:
        raise _refuse("llm.adapters", "LoRA adapters")
    if msg.projector:
        raise _refuse("llm.projector", "a multimodal projector")
    if msg.HasField("rope_freq_base") or msg.HasField("rope_freq_scale"):
        raise _refuse("llm.rope_freq_base", "a RoPE override")
    if msg.use_mlock:
        raise _refuse("llm.use_mlock", "mlock")
    if msg.threads_batch and msg.threads_batch != msg.threads:
        raise _refuse("llm.threads_batch", "a separate prompt thread count")
    kv = (
        KvCacheType.F16
        if msg.kv_cache_type == 0
        else enum_from_pb(KV_TYPE_FROM_PB, msg.kv_cache_type, "llm.kv_cache_type")
    )
    if msg.flash_attention not in load_pb2.FlashAttention.values():
        raise InvalidArgument.for_field("llm.flash_attention", "unknown value")
    gpu_layers = msg.gpu_layers if msg.HasField("gpu_layers") else None
    if gpu_layers is not None and gpu_layers < -1:
        raise InvalidArgument.for_field("llm.gpu_layers", "must be -1 (auto), 0 or more")
    options = LlmLoadOptions(
        context_length=msg.context_length or None,
        gpu_layers=gpu_layers,
        threads=msg.threads or None,
        batch_size=msg.batch_size or None,
        ubatch_size=msg.ubatch_size or None,
        kv_cache_type=kv,
        # The engine takes a bool: AUTO (and unset) means off here.
        flash_attention=msg.flash_attention == load_pb2.FLASH_ATTENTION_ENABLED,
        use_mmap=msg.use_mmap if msg.HasField("use_mmap") else True,
    )
    seed = msg.seed if msg.HasField("seed") else None
    return options, seed, msg.chat_template


def llm_load_options_to_pb(
    options: LlmLoadOptions, *, default_seed: int | None = None, chat_template: str = ""
) -> load_pb2.LlmLoadOptions:
    """The inverse of llm_load_options_from_pb."""
    msg = load_pb2.LlmLoadOptions(
        context_length=options.context_length or 0,
        threads=options.threads or 0,
        batch_size=options.batch_size or 0,
        ubatch_size=options.ubatch_size or 0,
        kv_cache_type=KV_TYPE_TO_PB[options.kv_cache_type],
        flash_attention=(
            load_pb2.FLASH_ATTENTION_ENABLED
            if options.flash_attention
            else load_pb2.FLASH_ATTENTION_DISABLED
        ),
        use_mmap=options.use_mmap,
        chat_template=chat_template,
    )
    if options.gpu_layers is not None:
        msg.gpu_layers = options.gpu_layers
    if default_seed is not None:
        msg.seed = default_seed
    return msg


def image_load_options_from_pb(msg: load_pb2.ImageLoadOptions) -> ImageLoadOptions:
    """Image load options; what the engine cannot honour yet is refused, never ignored."""
    if msg.cpu_offload not in (load_pb2.CPU_OFFLOAD_UNSPECIFIED, load_pb2.CPU_OFFLOAD_NONE):
        raise _refuse("image.cpu_offload", "CPU offloading")
    if msg.variant:
        raise _refuse("image.variant", "a weights variant")
    loras = loras_from_pb(msg.loras, "image.loras")
    if msg.vae:
        raise _refuse("image.vae", "a VAE override")
    if msg.safety_checker:
        raise _refuse("image.safety_checker", "the safety checker")
    return ImageLoadOptions(
        dtype=msg.dtype or None,
        scheduler=msg.scheduler or None,
        attention_slicing=msg.attention_slicing,
        vae_tiling=msg.vae_tiling,
        vae_slicing=msg.vae_slicing,
        loras=loras,
        family=msg.family or None,
        config=msg.config or None,
    )


def image_load_options_to_pb(options: ImageLoadOptions) -> load_pb2.ImageLoadOptions:
    """The inverse of image_load_options_from_pb."""
    return load_pb2.ImageLoadOptions(
        dtype=options.dtype or "",
        scheduler=options.scheduler or "",
        attention_slicing=options.attention_slicing,
        vae_tiling=options.vae_tiling,
        vae_slicing=options.vae_slicing,
        loras=[load_pb2.LoraAdapter(path=lora.path, weight=lora.scale) for lora in options.loras],
        family=options.family or "",
        config=options.config or "",
    )


def loras_from_pb(loras: Sequence[load_pb2.LoraAdapter], field: str) -> list[LoraWeight]:
    """LoRAs by path with their weights (unset: 1.0); the engine checks the paths and bounds.
    A catalog LoRA (`model`) is refused: this worker does not resolve catalog names yet."""
    out = []
    for index, lora in enumerate(loras):
        target = lora.WhichOneof("target")
        if target is None:
            raise InvalidArgument.for_field(
                f"{field}[{index}].path", "give the LoRA's absolute path on the worker host"
            )
        if target == "model":
            raise InvalidArgument.for_field(
                f"{field}[{index}].model",
                f"catalog LoRAs ({lora.model!r}) are not resolved by this worker yet; give the "
                "LoRA file's absolute path on the worker host in `path`",
            )
        out.append(
            LoraWeight(path=lora.path, scale=lora.weight if lora.HasField("weight") else 1.0)
        )
    return out


def load_request_from_pb(msg: pb.LoadModelRequest) -> LoadRequest:
    """A LoadModel request; which options were given is kept, the service checks it."""
    which = msg.WhichOneof("options")
    if which == "image":
        return LoadRequest(
            model=msg.model,
            paths=list(msg.paths),
            options_kind=OptionsKind.IMAGE,
            image_options=image_load_options_from_pb(msg.image),
        )
    if which == "llm":
        options, seed, template = llm_load_options_from_pb(msg.llm)
        return LoadRequest(
            model=msg.model,
            paths=list(msg.paths),
            options_kind=OptionsKind.LLM,
            options=options,
            default_seed=seed,
            chat_template=template,
        )
    return LoadRequest(model=msg.model, paths=list(msg.paths), options_kind=None)


def load_request_to_pb(request: LoadRequest) -> pb.LoadModelRequest:
    """A LoadModel request message."""
    msg = pb.LoadModelRequest(model=request.model, paths=request.paths)
    if request.options_kind is OptionsKind.LLM:
        msg.llm.CopyFrom(
            llm_load_options_to_pb(
                request.options,
                default_seed=request.default_seed,
                chat_template=request.chat_template,
            )
        )
    elif request.options_kind is OptionsKind.IMAGE:
        msg.image.CopyFrom(image_load_options_to_pb(request.image_options))
    return msg


def load_progress_to_pb(event: LoadProgressEvent) -> pb.LoadModelResponse:
    """One progress message of the LoadModel stream."""
    msg = pb.LoadModelResponse()
    progress = msg.progress
    progress.stage = LOAD_STAGE_TO_PB[event.stage]
    if event.fraction is not None:
        progress.fraction = event.fraction
    progress.message = event.message
    _fill_duration(progress.elapsed, event.elapsed_s)
    return msg


def load_progress_from_pb(msg: pb.LoadProgress) -> LoadProgressEvent:
    return LoadProgressEvent(
        stage=enum_from_pb(LOAD_STAGE_FROM_PB, msg.stage, "stage"),
        fraction=msg.fraction if msg.HasField("fraction") else None,
        message=msg.message,
        elapsed_s=duration_from_pb(msg.elapsed),
    )


def loaded_model_to_pb(info: LoadedModelInfo, *, on_gpu: bool) -> pb.LoadedModel:
    """The loaded model; its memory counts as VRAM on a GPU worker, RAM on a CPU worker."""
    engine = info.engine_model
    msg = pb.LoadedModel(
        model=info.model,
        paths=info.paths,
        context_length=engine.context_length,
        gpu_layers=max(0, engine.gpu_layers),
        has_chat_template=engine.has_chat_template or bool(info.chat_template),
    )
    if info.image_options is not None:
        msg.image.CopyFrom(image_load_options_to_pb(info.image_options))
    else:
        msg.llm.CopyFrom(
            llm_load_options_to_pb(
                info.options, default_seed=info.default_seed, chat_template=info.chat_template
            )
        )
    if on_gpu:
        msg.vram_bytes = engine.memory_bytes
    else:
        msg.ram_bytes = engine.memory_bytes
    _fill_duration(msg.load_duration, engine.load_seconds)
    _fill_timestamp(msg.load_time, info.load_time)
    return msg


def worker_to_pb(info: WorkerInfo) -> pb.Worker:
    """The worker's own view (GetWorker; the end of LoadModel; UnloadModel)."""
    device = info.device
    msg = pb.Worker(
        name=info.name,
        device=device_pb2.Device(
            name=device.resource_name,
            kind=DEVICE_KIND_TO_PB[device.kind],
            index=device.index,
        ),
        worker_type=f"worker-types/{info.worker_type}",
        model=info.model,
        state=WORKER_STATE_TO_PB[info.state],
        queue_depth=info.queue_depth,
        queue_capacity=info.queue_capacity,
        version=info.version,
        backend_version=info.backend_version,
        # No field for it in Worker: the engine ("llama_cpp", "fake") is a label.
        labels={"engine": info.engine},
    )
    if info.backend is not None:
        msg.backend = BACKEND_TO_PB[info.backend]
    msg.memory.ram_bytes = info.ram_bytes
    msg.memory.vram_bytes = info.vram_bytes
    counters = info.counters
    msg.counters.requests_succeeded = counters.requests_succeeded
    msg.counters.requests_failed = counters.requests_failed
    msg.counters.requests_cancelled = counters.requests_cancelled
    msg.counters.prompt_tokens = counters.prompt_tokens
    msg.counters.completion_tokens = counters.completion_tokens
    if info.loaded is not None:
        msg.loaded_model.CopyFrom(
            loaded_model_to_pb(info.loaded, on_gpu=device.kind is not DeviceKind.CPU)
        )
    _fill_timestamp(msg.start_time, info.start_time)
    _fill_timestamp(msg.update_time, info.update_time)
    return msg


def load_response_to_pb(event: LoadProgressEvent | WorkerInfo) -> pb.LoadModelResponse:
    """One message of the LoadModel stream."""
    if isinstance(event, LoadProgressEvent):
        return load_progress_to_pb(event)
    return pb.LoadModelResponse(worker=worker_to_pb(event))


# ---- generation requests ---------------------------------------------------------------------


def sampling_from_pb(
    msg: gen_pb.SamplingParams, *, logprobs: LogprobOptions | None = None
) -> SamplingParams:
    """Per-request sampling; unset fields stay None (the engine's defaults). `logprobs` (a
    field of the request, not of this message) rides along in the domain's SamplingParams."""

    constraint = msg.WhichOneof("constraint")
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        min_p=msg.min_p if msg.HasField("min_p") else None,
        typical_p=msg.typical_p if msg.HasField("typical_p") else None,
        repeat_penalty=msg.repeat_penalty if msg.HasField("repeat_penalty") else None,
        repeat_last_n=msg.repeat_last_n if msg.HasField("repeat_last_n") else None,
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else None,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        logit_bias=dict(msg.logit_bias),
        grammar=msg.grammar if constraint == "grammar" else None,
        json_schema=msg.json_schema if constraint == "json_schema" else None,
        logprobs=logprobs,
    )


_SAMPLING_OPTIONAL = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


def sampling_to_pb(params: SamplingParams) -> gen_pb.SamplingParams:
    """The sampling message (`params.logprobs` goes to the request: logprob_options_to_pb)."""
    msg = gen_pb.SamplingParams(logit_bias=params.logit_bias)
    for name in _SAMPLING_OPTIONAL:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    if params.grammar is not None:
        msg.grammar = params.grammar
    elif params.json_schema is not None:
        msg.json_schema = params.json_schema
    return msg


def stopping_from_pb(msg: gen_pb.StoppingCriteria) -> StoppingCriteria:
    if any(not stop for stop in msg.stop):
        raise InvalidArgument.for_field("stopping.stop", "stop sequences must not be empty")
    return StoppingCriteria(
        max_tokens=msg.max_tokens or None, stop=list(msg.stop), ignore_eos=msg.ignore_eos
    )


def stopping_to_pb(stopping: StoppingCriteria) -> gen_pb.StoppingCriteria:
    return gen_pb.StoppingCriteria(
        max_tokens=stopping.max_tokens or 0, stop=stopping.stop, ignore_eos=stopping.ignore_eos
    )


def logprob_options_from_pb(msg: gen_pb.LogprobOptions) -> LogprobOptions | None:
    """None when log probabilities are off. `top_logprobs` without `enabled` is refused (the
    alternatives come "also", with the generated token's own), as is N beyond 20."""
    if not msg.enabled:
        if msg.top_logprobs:
            raise InvalidArgument.for_field(
                "logprobs.top_logprobs", "needs logprobs.enabled (alternatives come with it)"
            )
        return None
    options = LogprobOptions(top_logprobs=msg.top_logprobs)
    check_logprob_options(options)
    return options


def logprob_options_to_pb(options: LogprobOptions | None) -> gen_pb.LogprobOptions:
    """The inverse of logprob_options_from_pb."""
    if options is None:
        return gen_pb.LogprobOptions()
    return gen_pb.LogprobOptions(enabled=True, top_logprobs=options.top_logprobs)


def generate_request_from_pb(msg: gen_pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        model=msg.model,
        prompt=msg.prompt,
        sampling=sampling_from_pb(msg.sampling, logprobs=logprob_options_from_pb(msg.logprobs)),
        stopping=stopping_from_pb(msg.stopping),
        add_special=msg.add_special if msg.HasField("add_special") else True,
        parse_special=msg.parse_special,
    )


def generate_request_to_pb(request: GenerationRequest) -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(
        model=request.model,
        prompt=request.prompt,
        sampling=sampling_to_pb(request.sampling),
        stopping=stopping_to_pb(request.stopping),
        logprobs=logprob_options_to_pb(request.sampling.logprobs),
        add_special=request.add_special,
        parse_special=request.parse_special,
    )


def chat_message_from_pb(msg: gen_pb.ChatMessage, index: int) -> ChatMessage:
    if msg.tool_calls or msg.tool_call_id:
        raise _refuse(f"messages[{index}].tool_calls", "tool calling")
    role = enum_from_pb(CHAT_ROLE_FROM_PB, msg.role, f"messages[{index}].role")
    return ChatMessage(role=role, content=msg.content)


def chat_request_from_pb(msg: gen_pb.ChatRequest) -> ChatGenerationRequest:
    if msg.tools or msg.tool_choice not in ("", "auto", "none"):
        raise _refuse("tools", "tool calling")
    return ChatGenerationRequest(
        model=msg.model,
        messages=[chat_message_from_pb(m, i) for i, m in enumerate(msg.messages)],
        chat_template=msg.chat_template,
        sampling=sampling_from_pb(msg.sampling, logprobs=logprob_options_from_pb(msg.logprobs)),
        stopping=stopping_from_pb(msg.stopping),
    )


def chat_request_to_pb(request: ChatGenerationRequest) -> gen_pb.ChatRequest:
    return gen_pb.ChatRequest(
        model=request.model,
        messages=[
            gen_pb.ChatMessage(role=CHAT_ROLE_TO_PB[m.role], content=m.content)
            for m in request.messages
        ],
        chat_template=request.chat_template,
        sampling=sampling_to_pb(request.sampling),
        stopping=stopping_to_pb(request.stopping),
        logprobs=logprob_options_to_pb(request.sampling.logprobs),
    )


# ---- generation stream -----------------------------------------------------------------------


def token_delta_to_pb(delta: TokenDelta) -> gen_pb.GenerateResponse:
    """One delta message; on the per-token path, so it builds the message directly."""
    msg = gen_pb.GenerateResponse()
    out = msg.delta
    out.text = delta.text
    out.token_ids.extend(delta.token_ids)
    if delta.logprobs:
        for logprob in delta.logprobs:
            entry = out.logprobs.add(
                token_id=logprob.token_id, token=logprob.token, logprob=logprob.logprob
            )
            for top in logprob.top_logprobs:
                entry.top_logprobs.add(token_id=top.token_id, token=top.token, logprob=top.logprob)
    return msg


def token_logprob_from_pb(msg: gen_pb.TokenLogprob) -> TokenLogprob:
    """One generated token's log probability (the wire carries float32)."""
    return TokenLogprob(
        token_id=msg.token_id,
        token=msg.token,
        logprob=msg.logprob,
        top_logprobs=[
            TopLogprob(token_id=top.token_id, token=top.token, logprob=top.logprob)
            for top in msg.top_logprobs
        ],
    )


def completed_generation_to_pb(done: CompletedGeneration) -> gen_pb.GenerateResponse:
    """The final message: finish reason, usage, timings, seed, model."""
    result = done.result
    msg = gen_pb.GenerateResponse()
    out = msg.result
    out.finish_reason = FINISH_REASON_TO_PB[result.finish_reason]
    out.stop_sequence = result.stop_sequence
    out.usage.prompt_tokens = result.prompt_tokens
    out.usage.completion_tokens = result.completion_tokens
    out.usage.total_tokens = result.prompt_tokens + result.completion_tokens
    out.usage.cached_prompt_tokens = result.cached_prompt_tokens
    timings = out.timings
    _fill_duration(timings.queue_time, done.queue_seconds)
    _fill_duration(timings.time_to_first_token, result.time_to_first_token_s)
    _fill_duration(timings.prompt_time, result.prompt_time_s)
    if result.prompt_time_s > 0:
        timings.prompt_tokens_per_second = result.prompt_tokens / result.prompt_time_s
    timings.tokens_per_second = result.tokens_per_second
    _fill_duration(timings.total_time, result.total_time_s)
    out.seed = result.seed
    out.model = done.model
    return msg


def stream_event_to_pb(event: StreamEvent) -> gen_pb.GenerateResponse:
    """One message of the Generate / Chat stream."""
    if isinstance(event, TokenDelta):
        return token_delta_to_pb(event)
    return completed_generation_to_pb(event)


def stream_event_from_pb(msg: gen_pb.GenerateResponse) -> StreamEvent:
    """The inverse of stream_event_to_pb (for clients and tests)."""
    if msg.WhichOneof("event") == "delta":
        delta = msg.delta
        return TokenDelta(
            text=delta.text,
            token_ids=list(delta.token_ids),
            logprobs=[token_logprob_from_pb(logprob) for logprob in delta.logprobs],
        )
    out = msg.result
    timings = out.timings
    return CompletedGeneration(
        result=GenerationResult(
            finish_reason=enum_from_pb(FINISH_REASON_FROM_PB, out.finish_reason, "finish_reason"),
            stop_sequence=out.stop_sequence,
            prompt_tokens=out.usage.prompt_tokens,
            cached_prompt_tokens=out.usage.cached_prompt_tokens,
            completion_tokens=out.usage.completion_tokens,
            seed=out.seed,
            time_to_first_token_s=duration_from_pb(timings.time_to_first_token),
            prompt_time_s=duration_from_pb(timings.prompt_time),
            total_time_s=duration_from_pb(timings.total_time),
            tokens_per_second=timings.tokens_per_second,
        ),
        model=out.model,
        queue_seconds=duration_from_pb(timings.queue_time),
    )


# ---- images ----------------------------------------------------------------------------------


def image_request_from_pb(msg: image_pb2.GenerateImageRequest) -> ImageGenerationRequest:
    """A GenerateImage request; unset fields stay None (the engine's defaults)."""
    params = msg.params
    if params.prompt_2 or params.negative_prompt_2:
        raise _refuse("params.prompt_2", "a second (SDXL) prompt")
    if params.HasField("guidance_rescale"):
        raise _refuse("params.guidance_rescale", "guidance rescale")
    if params.HasField("clip_skip"):
        raise _refuse("params.clip_skip", "CLIP skip")
    if params.HasField("eta"):
        raise _refuse("params.eta", "eta")
    if params.output_format not in (image_pb2.IMAGE_FORMAT_UNSPECIFIED, image_pb2.IMAGE_FORMAT_PNG):
        raise _refuse("params.output_format", "an output format other than PNG")
    loras = loras_from_pb(params.loras, "params.loras")
    return ImageGenerationRequest(
        model=msg.model,
        params=ImageParams(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            steps=params.steps or None,
            guidance_scale=params.guidance_scale if params.HasField("guidance_scale") else None,
            width=params.width or None,
            height=params.height or None,
            seed=params.seed if params.HasField("seed") else None,
            scheduler=params.scheduler or None,
            count=params.count or 1,
            preview_interval=params.preview_interval,
            preview_size=params.preview_size or DEFAULT_PREVIEW_SIZE,
            loras=loras,
        ),
    )


def image_progress_to_pb(event: ImageProgress) -> image_pb2.GenerateImageResponse:
    """One step of the GenerateImage stream."""
    msg = image_pb2.GenerateImageResponse()
    out = msg.progress
    out.step = event.step
    out.total_steps = event.total_steps
    out.image_index = event.image_index
    out.image_count = event.image_count
    if event.preview_png is not None:
        out.preview = event.preview_png
        out.preview_format = image_pb2.IMAGE_FORMAT_PNG
    _fill_duration(out.elapsed, event.elapsed_s)
    out.steps_per_second = event.steps_per_second
    return msg


def completed_images_to_pb(done: CompletedImages) -> image_pb2.GenerateImageResponse:
    """The final message of GenerateImage: the PNGs with their seeds, and timings."""
    result = done.result
    msg = image_pb2.GenerateImageResponse()
    out = msg.result
    for image in result.images:
        out.images.add(
            data=image.png,
            format=image_pb2.IMAGE_FORMAT_PNG,
            seed=image.seed,
            width=image.width,
            height=image.height,
            index=image.index,
        )
    _fill_duration(out.timings.queue_time, done.queue_seconds)
    _fill_duration(out.timings.total_time, result.total_time_s)
    out.timings.steps_per_second = result.steps_per_second
    out.model = done.model
    out.scheduler = result.scheduler
    out.steps = result.steps
    out.guidance_scale = result.guidance_scale
    return msg


def image_stream_event_to_pb(event: ImageStreamEvent) -> image_pb2.GenerateImageResponse:
    """One message of the GenerateImage stream."""
    if isinstance(event, ImageProgress):
        return image_progress_to_pb(event)
    return completed_images_to_pb(event)
