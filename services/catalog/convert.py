"""The one place that maps rbee.catalog.v1 / rbee.common.v1 messages <-> catalog domain types.

Named by direction: `*_to_pb` builds a message, `*_from_pb` reads one. Enum mapping tables are
checked for completeness by the unit tests, so a value added on either side cannot be missed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.common.v1 import device_pb2, runtime_pb2
from services.catalog.domain import (
    Backend,
    CompatibilityResult,
    Device,
    DeviceKind,
    Install,
    KvCacheType,
    MemoryEstimate,
    Model,
    ModelFormat,
    ModelMetadata,
    ModelSource,
    ModelState,
    ModelType,
    SourceKind,
    SplitInfo,
    Verdict,
    WeightsBreakdown,
    WorkerType,
)
from services.catalog.service import CompatibilityRequest, ModelDraft, ModelPatch
from services.common.enum_mapping import enum_from_pb, inverse
from services.common.errors import InvalidArgument

FORMAT_TO_PB = {
    ModelFormat.GGUF: pb.MODEL_FORMAT_GGUF,
    ModelFormat.SAFETENSORS: pb.MODEL_FORMAT_SAFETENSORS,
    ModelFormat.DIFFUSERS: pb.MODEL_FORMAT_DIFFUSERS,
}
MODEL_TYPE_TO_PB = {
    ModelType.LLM: pb.MODEL_TYPE_LLM,
    ModelType.IMAGE: pb.MODEL_TYPE_IMAGE,
    ModelType.LORA: pb.MODEL_TYPE_LORA,
    ModelType.ADAPTER: pb.MODEL_TYPE_ADAPTER,
    ModelType.PROJECTOR: pb.MODEL_TYPE_PROJECTOR,
    ModelType.VAE: pb.MODEL_TYPE_VAE,
    ModelType.CONTROLNET: pb.MODEL_TYPE_CONTROLNET,
    ModelType.TEXT_ENCODER: pb.MODEL_TYPE_TEXT_ENCODER,
    ModelType.EMBEDDING: pb.MODEL_TYPE_EMBEDDING,
    ModelType.UNKNOWN: pb.MODEL_TYPE_UNKNOWN,
}
SOURCE_KIND_TO_PB = {
    SourceKind.HUGGINGFACE: pb.SOURCE_KIND_HUGGINGFACE,
    SourceKind.CIVITAI: pb.SOURCE_KIND_CIVITAI,
    SourceKind.URL: pb.SOURCE_KIND_URL,
    SourceKind.LOCAL: pb.SOURCE_KIND_LOCAL,
}
STATE_TO_PB = {
    ModelState.DOWNLOADING: pb.MODEL_STATE_DOWNLOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
VERDICT_TO_PB = {
    Verdict.COMPATIBLE: pb.VERDICT_COMPATIBLE,
    Verdict.UNSUPPORTED_FORMAT: pb.VERDICT_UNSUPPORTED_FORMAT,
    Verdict.UNSUPPORTED_ARCH: pb.VERDICT_UNSUPPORTED_ARCH,
    Verdict.UNSUPPORTED_MODEL_TYPE: pb.VERDICT_UNSUPPORTED_MODEL_TYPE,
    Verdict.UNSUPPORTED_DEVICE: pb.VERDICT_UNSUPPORTED_DEVICE,
    Verdict.NEEDS_COMPONENTS: pb.VERDICT_NEEDS_COMPONENTS,
    Verdict.FITS_GPU: pb.VERDICT_FITS_GPU,
    Verdict.PARTIAL_OFFLOAD: pb.VERDICT_PARTIAL_OFFLOAD,
    Verdict.CPU_ONLY: pb.VERDICT_CPU_ONLY,
    Verdict.TOO_LARGE: pb.VERDICT_TOO_LARGE,
}
DEVICE_KIND_TO_PB = {
    DeviceKind.CPU: device_pb2.DEVICE_KIND_CPU,
    DeviceKind.CUDA: device_pb2.DEVICE_KIND_CUDA,
    DeviceKind.METAL: device_pb2.DEVICE_KIND_METAL,
}
BACKEND_TO_PB = {
    Backend.LLAMA_CPP: runtime_pb2.BACKEND_LLAMA_CPP,
    Backend.DIFFUSERS: runtime_pb2.BACKEND_DIFFUSERS,
}
KV_TYPE_TO_PB = {
    KvCacheType.F16: runtime_pb2.KV_CACHE_TYPE_F16,
    KvCacheType.BF16: runtime_pb2.KV_CACHE_TYPE_BF16,
    KvCacheType.F32: runtime_pb2.KV_CACHE_TYPE_F32,
    KvCacheType.Q8_0: runtime_pb2.KV_CACHE_TYPE_Q8_0,
    KvCacheType.Q4_0: runtime_pb2.KV_CACHE_TYPE_Q4_0,
    KvCacheType.Q4_1: runtime_pb2.KV_CACHE_TYPE_Q4_1,
    KvCacheType.Q5_0: runtime_pb2.KV_CACHE_TYPE_Q5_0,
    KvCacheType.Q5_1: runtime_pb2.KV_CACHE_TYPE_Q5_1,
    KvCacheType.IQ4_NL: runtime_pb2.KV_CACHE_TYPE_IQ4_NL,
}


SOURCE_KIND_FROM_PB = inverse(SOURCE_KIND_TO_PB)
STATE_FROM_PB = inverse(STATE_TO_PB)
FORMAT_FROM_PB = inverse(FORMAT_TO_PB)
MODEL_TYPE_FROM_PB = inverse(MODEL_TYPE_TO_PB)
DEVICE_KIND_FROM_PB = inverse(DEVICE_KIND_TO_PB)
KV_TYPE_FROM_PB = inverse(KV_TYPE_TO_PB)


def timestamp_to_pb(moment: datetime) -> Timestamp:
    ts = Timestamp()
    _fill_timestamp(ts, moment)
    return ts


def _fill_timestamp(ts: Timestamp, moment: datetime) -> None:
    # From seconds and nanos: Timestamp.FromDatetime costs ~8 us, a lot per list page.
    ts.seconds = int(moment.timestamp())
    ts.nanos = moment.microsecond * 1000


def timestamp_from_pb(ts: Timestamp, *, field_name: str = "timestamp") -> datetime:
    """The moment `ts` names; InvalidArgument when it is outside what Timestamp allows (years
    1-9999, nanos 0-999,999,999): protobuf's own ToDatetime raises a bare ValueError there."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument.for_field(
            field_name, "not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)"
        ) from exc


# ---- models ---------------------------------------------------------------------------------


def source_to_pb(source: ModelSource) -> pb.ModelSource:
    msg = pb.ModelSource()
    _fill_source(msg, source)
    return msg


def _fill_source(msg: pb.ModelSource, source: ModelSource) -> None:
    # Filled in place, field by field: building sub-messages and passing them to a constructor
    # copies them, and ListModels converts a hundred models per page.
    msg.kind = SOURCE_KIND_TO_PB[source.kind]
    for field in ("repo", "revision", "commit", "base_model", "url", "path"):
        value = getattr(source, field)
        if value:
            setattr(msg, field, value)
    if source.files:
        msg.files.extend(source.files)
    if source.civitai_model_id is not None:
        msg.civitai_model_id = source.civitai_model_id
    if source.civitai_version_id is not None:
        msg.civitai_version_id = source.civitai_version_id


def source_from_pb(msg: pb.ModelSource) -> ModelSource:
    return ModelSource(
        kind=enum_from_pb(SOURCE_KIND_FROM_PB, msg.kind, "model.source.kind"),
        repo=msg.repo or None,
        revision=msg.revision or None,
        commit=msg.commit or None,
        files=list(msg.files),
        civitai_model_id=msg.civitai_model_id if msg.HasField("civitai_model_id") else None,
        civitai_version_id=msg.civitai_version_id if msg.HasField("civitai_version_id") else None,
        base_model=msg.base_model or None,
        url=msg.url or None,
        path=msg.path or None,
    )


_OPTIONAL_METADATA_FIELDS = (
    "name",
    "architecture",
    "family",
    "variant",
    "quantization",
    "file_type",
    "parameter_count",
    "context_length",
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "head_count",
    "head_count_kv",
    "key_length",
    "value_length",
    "expert_count",
    "expert_used_count",
    "vocab_size",
    "sliding_window",
    "tokenizer_model",
    "has_chat_template",
    "kv_cache_bytes_per_token",
    "tensor_count",
)


def metadata_to_pb(md: ModelMetadata) -> pb.ModelMetadata:
    msg = pb.ModelMetadata()
    _fill_metadata(msg, md)
    return msg


def _fill_metadata(msg: pb.ModelMetadata, md: ModelMetadata) -> None:
    msg.format = FORMAT_TO_PB[md.format]
    msg.model_type = MODEL_TYPE_TO_PB[md.model_type]
    for field in _OPTIONAL_METADATA_FIELDS:
        value = getattr(md, field)
        if value is not None:
            setattr(msg, field, value)
    if md.needs_components:
        msg.needs_components.extend(md.needs_components)
    if md.warnings:
        msg.warnings.extend(md.warnings)
    msg.size_bytes = md.size_bytes
    for key, count in md.dtypes.items():
        msg.dtypes[key] = count
    for key, hint in md.hints.items():
        msg.hints[key] = hint
    if md.split is not None:
        split = msg.split
        split.index = md.split.index
        split.count = md.split.count
        split.files_found = md.split.files_found
        if md.split.tensors_total is not None:
            split.tensors_total = md.split.tensors_total
    if md.weights is not None:
        weights = msg.weights
        weights.total_bytes = md.weights.total_bytes
        weights.input_bytes = md.weights.input_bytes
        weights.output_bytes = md.weights.output_bytes
        weights.other_bytes = md.weights.other_bytes
        weights.layer_bytes.extend(md.weights.layer_bytes)


def metadata_from_pb(msg: pb.ModelMetadata) -> ModelMetadata:
    has_field: Any = msg.HasField  # the generated Literal overloads do not take a str variable
    values: dict[str, object] = {
        field: getattr(msg, field) for field in _OPTIONAL_METADATA_FIELDS if has_field(field)
    }
    return ModelMetadata(
        format=enum_from_pb(FORMAT_FROM_PB, msg.format, "metadata.format"),
        model_type=enum_from_pb(
            MODEL_TYPE_FROM_PB, msg.model_type, "metadata.model_type", default=ModelType.UNKNOWN
        ),
        needs_components=list(msg.needs_components),
        dtypes=dict(msg.dtypes),
        size_bytes=msg.size_bytes,
        hints=dict(msg.hints),
        warnings=list(msg.warnings),
        split=SplitInfo(
            index=msg.split.index,
            count=msg.split.count,
            files_found=msg.split.files_found,
            tensors_total=msg.split.tensors_total if msg.split.HasField("tensors_total") else None,
        )
        if msg.HasField("split")
        else None,
        weights=WeightsBreakdown(
            total_bytes=msg.weights.total_bytes,
            input_bytes=msg.weights.input_bytes,
            output_bytes=msg.weights.output_bytes,
            other_bytes=msg.weights.other_bytes,
            layer_bytes=list(msg.weights.layer_bytes),
        )
        if msg.HasField("weights")
        else None,
        **values,  # type: ignore[arg-type]
    )


def model_to_pb(model: Model) -> pb.Model:
    msg = pb.Model(
        name=model.name,
        display_name=model.display_name,
        paths=model.paths,
        size_bytes=model.size_bytes,
        sha256=model.sha256 or "",
        state=STATE_TO_PB[model.state],
        state_message=model.state_message,
        labels=model.labels,
        etag=model.etag,
        config_folder=model.config_folder,
    )
    _fill_timestamp(msg.create_time, model.created_at)
    _fill_timestamp(msg.update_time, model.updated_at)
    _fill_source(msg.source, model.source)
    if model.metadata is not None:
        _fill_metadata(msg.metadata, model.metadata)
    return msg


def model_draft_from_pb(msg: pb.Model) -> ModelDraft:
    """The client-settable part of a Model message (output-only fields are ignored)."""
    if not msg.HasField("source"):
        raise InvalidArgument.for_field("model.source", "the model's source is required")
    return ModelDraft(
        source=source_from_pb(msg.source),
        display_name=msg.display_name,
        paths=tuple(msg.paths),
        size_bytes=msg.size_bytes,
        sha256=msg.sha256 or None,
        state=STATE_FROM_PB.get(msg.state) if msg.state else None,
        state_message=msg.state_message,
        labels=dict(msg.labels),
        config_folder=msg.config_folder,
    )


def model_patch_from_pb(msg: pb.UpdateModelRequest) -> ModelPatch:
    fields = frozenset(msg.update_mask.paths)
    if "*" in fields:
        raise InvalidArgument.for_field("update_mask", "`*` is not accepted; name the fields")
    model = msg.model
    source = (
        source_from_pb(model.source)
        if "source" in fields
        else ModelSource(kind=SourceKind.LOCAL, path="/")  # placeholder, not applied
    )
    if "state" in fields and model.state == pb.MODEL_STATE_UNSPECIFIED:
        raise InvalidArgument.for_field("model.state", "state cannot be unset")
    draft = ModelDraft(
        source=source,
        display_name=model.display_name,
        paths=tuple(model.paths),
        size_bytes=model.size_bytes,
        sha256=model.sha256 or None,
        state=STATE_FROM_PB.get(model.state),
        state_message=model.state_message,
        labels=dict(model.labels),
        config_folder=model.config_folder,
    )
    return ModelPatch(fields=fields, values=draft, etag=model.etag or None)


# ---- worker types and installs --------------------------------------------------------------


def worker_type_to_pb(wt: WorkerType, *, supported_on_host: bool) -> pb.WorkerType:
    msg = pb.WorkerType(
        name=wt.name,
        display_name=wt.display_name,
        description=wt.description,
        backend=BACKEND_TO_PB[wt.backend],
        device_kind=DEVICE_KIND_TO_PB[wt.device_kind],
        platforms=list(wt.platforms),
        cpu_architectures=list(wt.cpu_architectures),
        formats=[FORMAT_TO_PB[f] for f in wt.formats],
        model_types=[MODEL_TYPE_TO_PB[t] for t in wt.model_types],
        addon_model_types=[MODEL_TYPE_TO_PB[t] for t in wt.addon_model_types],
        families=list(wt.families),
        llm_architectures=list(wt.llm_architectures),
        llm_architectures_source=wt.llm_architectures_source,
        quantizations=list(wt.quantizations),
        streaming=wt.streaming,
        batching=wt.batching,
        supported_on_host=supported_on_host,
    )
    if wt.max_context_length is not None:
        msg.max_context_length = wt.max_context_length
    return msg


def install_to_pb(install: Install) -> pb.Install:
    return pb.Install(
        name=install.name,
        worker_type=f"worker-types/{install.worker_type}",
        version=install.version,
        path=install.path,
        backend_version=install.backend_version,
        python_version=install.python_version,
        platform=install.platform,
        cpu_architecture=install.cpu_architecture,
        labels=dict(install.labels),
        create_time=timestamp_to_pb(install.created_at),
        update_time=timestamp_to_pb(install.updated_at),
    )


def install_from_pb(msg: pb.CreateInstallRequest) -> Install:
    from services.catalog.ids import parse_resource_name

    worker_type = msg.install.worker_type
    if not worker_type:
        raise InvalidArgument.for_field("install.worker_type", "the worker type is required")
    type_id = (
        parse_resource_name(worker_type, "worker-types", field="install.worker_type")
        if "/" in worker_type
        else worker_type
    )
    install_id = msg.install_id or f"{type_id}-{_slug(msg.install.version) or 'system'}"
    now = datetime.now(UTC)
    return Install(
        id=install_id,
        worker_type=type_id,
        version=msg.install.version,
        path=msg.install.path,
        backend_version=msg.install.backend_version,
        python_version=msg.install.python_version,
        platform=msg.install.platform,
        cpu_architecture=msg.install.cpu_architecture,
        labels=dict(msg.install.labels),
        created_at=now,
        updated_at=now,
    )


def install_from_msg(msg: pb.Install) -> Install:
    """An Install as the catalog returned it (the reverse of install_to_pb)."""
    return Install(
        id=msg.name.removeprefix("installs/"),
        worker_type=msg.worker_type.removeprefix("worker-types/"),
        version=msg.version,
        path=msg.path,
        backend_version=msg.backend_version,
        python_version=msg.python_version,
        platform=msg.platform,
        cpu_architecture=msg.cpu_architecture,
        labels=dict(msg.labels),
        created_at=timestamp_from_pb(msg.create_time),
        updated_at=timestamp_from_pb(msg.update_time),
    )


def _slug(text: str) -> str:
    from services.catalog.ids import slugify

    return slugify(text)[:40].strip("-")


# ---- compatibility --------------------------------------------------------------------------


def device_from_pb(msg: device_pb2.Device) -> Device:
    def opt(field: str) -> int | None:
        return int(getattr(msg, field)) if msg.HasField(field) else None  # type: ignore[arg-type]

    return Device(
        kind=enum_from_pb(DEVICE_KIND_FROM_PB, msg.kind, "device.kind"),
        name=msg.display_name or msg.name,
        total_ram_bytes=opt("total_ram_bytes"),
        free_ram_bytes=opt("free_ram_bytes"),
        total_vram_bytes=opt("total_vram_bytes"),
        free_vram_bytes=opt("free_vram_bytes"),
        unified_memory=msg.unified_memory,
    )


def memory_to_pb(mem: MemoryEstimate) -> pb.MemoryEstimate:
    msg = pb.MemoryEstimate(
        context_length=mem.context_length,
        kv_cache_type=KV_TYPE_TO_PB[mem.kv_cache_type],
        weights_bytes=mem.weights_bytes,
        kv_cache_bytes=mem.kv_cache_bytes,
        compute_bytes=mem.compute_bytes,
        ram_bytes=mem.ram_bytes,
        vram_bytes=mem.vram_bytes,
        gpu_layers=mem.gpu_layers,
        total_layers=mem.total_layers,
    )
    if mem.available_ram_bytes is not None:
        msg.available_ram_bytes = mem.available_ram_bytes
    if mem.available_vram_bytes is not None:
        msg.available_vram_bytes = mem.available_vram_bytes
    return msg


def compat_result_to_pb(result: CompatibilityResult) -> pb.CompatibilityResult:
    msg = pb.CompatibilityResult(
        worker_type=f"worker-types/{result.worker_type}",
        verdict=VERDICT_TO_PB[result.verdict],
        reasons=list(result.reasons),
        runnable=result.runnable,
    )
    if result.memory is not None:
        msg.memory.CopyFrom(memory_to_pb(result.memory))
    return msg


def compatibility_request_from_pb(msg: pb.EvaluateCompatibilityRequest) -> CompatibilityRequest:
    gpu_layers = msg.gpu_layers if msg.HasField("gpu_layers") else -1
    if gpu_layers < -1:
        raise InvalidArgument.for_field("gpu_layers", "must be -1 (auto), 0 or a layer count")
    return CompatibilityRequest(
        model_name=msg.model,
        worker_types=tuple(msg.worker_types),
        device=device_from_pb(msg.device) if msg.HasField("device") else None,
        context_length=msg.context_length or None,
        kv_cache_type=enum_from_pb(
            KV_TYPE_FROM_PB, msg.kv_cache_type, "kv_cache_type", default=KvCacheType.F16
        ),
        gpu_layers=None if gpu_layers == -1 else gpu_layers,
    )


# ---- the reverse direction, for clients (the SDK returns domain types) ------------------------

VERDICT_FROM_PB = inverse(VERDICT_TO_PB)
BACKEND_FROM_PB = inverse(BACKEND_TO_PB)


def model_from_pb(msg: pb.Model) -> Model:
    from services.catalog.ids import parse_resource_name

    return Model(
        id=parse_resource_name(msg.name, "models"),
        display_name=msg.display_name,
        source=source_from_pb(msg.source),
        paths=list(msg.paths),
        size_bytes=msg.size_bytes,
        sha256=msg.sha256 or None,
        state=enum_from_pb(STATE_FROM_PB, msg.state, "model.state"),
        state_message=msg.state_message,
        metadata=metadata_from_pb(msg.metadata) if msg.HasField("metadata") else None,
        labels=dict(msg.labels),
        created_at=timestamp_from_pb(msg.create_time),
        updated_at=timestamp_from_pb(msg.update_time),
        etag=msg.etag,
        config_folder=msg.config_folder,
    )


def model_draft_to_pb(draft: ModelDraft) -> pb.Model:
    msg = pb.Model(
        display_name=draft.display_name,
        source=source_to_pb(draft.source),
        paths=list(draft.paths),
        size_bytes=draft.size_bytes,
        sha256=draft.sha256 or "",
        state_message=draft.state_message,
        labels=dict(draft.labels),
        config_folder=draft.config_folder,
    )
    if draft.state is not None:
        msg.state = STATE_TO_PB[draft.state]
    return msg


def worker_type_from_pb(msg: pb.WorkerType) -> WorkerType:
    from services.catalog.ids import parse_resource_name

    return WorkerType(
        id=parse_resource_name(msg.name, "worker-types"),
        display_name=msg.display_name,
        description=msg.description,
        backend=enum_from_pb(BACKEND_FROM_PB, msg.backend, "backend"),
        device_kind=enum_from_pb(DEVICE_KIND_FROM_PB, msg.device_kind, "device_kind"),
        platforms=list(msg.platforms),
        cpu_architectures=list(msg.cpu_architectures),
        formats=[enum_from_pb(FORMAT_FROM_PB, f, "formats") for f in msg.formats],
        model_types=[enum_from_pb(MODEL_TYPE_FROM_PB, t, "model_types") for t in msg.model_types],
        addon_model_types=[
            enum_from_pb(MODEL_TYPE_FROM_PB, t, "addon_model_types") for t in msg.addon_model_types
        ],
        families=list(msg.families),
        llm_architectures=list(msg.llm_architectures),
        llm_architectures_source=msg.llm_architectures_source,
        quantizations=list(msg.quantizations),
        max_context_length=msg.max_context_length if msg.HasField("max_context_length") else None,
        streaming=msg.streaming,
        batching=msg.batching,
    )


def device_to_pb(device: Device) -> device_pb2.Device:
    msg = device_pb2.Device(
        kind=DEVICE_KIND_TO_PB[device.kind],
        display_name=device.name,
        unified_memory=device.unified_memory,
    )
    for field in ("total_ram_bytes", "free_ram_bytes", "total_vram_bytes", "free_vram_bytes"):
        value = getattr(device, field)
        if value is not None:
            setattr(msg, field, value)
    return msg


def memory_from_pb(msg: pb.MemoryEstimate) -> MemoryEstimate:
    return MemoryEstimate(
        context_length=msg.context_length,
        kv_cache_type=enum_from_pb(
            KV_TYPE_FROM_PB, msg.kv_cache_type, "kv_cache_type", default=KvCacheType.F16
        ),
        weights_bytes=msg.weights_bytes,
        kv_cache_bytes=msg.kv_cache_bytes,
        compute_bytes=msg.compute_bytes,
        ram_bytes=msg.ram_bytes,
        vram_bytes=msg.vram_bytes,
        gpu_layers=msg.gpu_layers,
        total_layers=msg.total_layers,
        available_ram_bytes=msg.available_ram_bytes
        if msg.HasField("available_ram_bytes")
        else None,
        available_vram_bytes=msg.available_vram_bytes
        if msg.HasField("available_vram_bytes")
        else None,
    )


def compat_result_from_pb(msg: pb.CompatibilityResult) -> CompatibilityResult:
    return CompatibilityResult(
        worker_type=msg.worker_type.removeprefix("worker-types/"),
        verdict=enum_from_pb(VERDICT_FROM_PB, msg.verdict, "verdict"),
        reasons=list(msg.reasons),
        memory=memory_from_pb(msg.memory) if msg.HasField("memory") else None,
    )
