"""services.catalog.convert: every enum value maps both ways, and resources round-trip."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from rbee.catalog.v1 import catalog_pb2 as pb
from services.catalog import convert
from services.catalog.domain import (
    Backend,
    CompatibilityResult,
    Device,
    DeviceKind,
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
)
from services.catalog.message_cache import ModelMessageCache
from services.catalog.store import ModelRecord
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.errors import InvalidArgument

pytestmark = pytest.mark.unit

TABLES: list[tuple[type[enum.Enum], Mapping[Any, int]]] = [
    (ModelFormat, convert.FORMAT_TO_PB),
    (ModelType, convert.MODEL_TYPE_TO_PB),
    (SourceKind, convert.SOURCE_KIND_TO_PB),
    (ModelState, convert.STATE_TO_PB),
    (Verdict, convert.VERDICT_TO_PB),
    (DeviceKind, convert.DEVICE_KIND_TO_PB),
    (Backend, convert.BACKEND_TO_PB),
    (KvCacheType, convert.KV_TYPE_TO_PB),
]


@pytest.mark.parametrize(("domain_enum", "table"), TABLES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_domain_value_maps_to_a_distinct_nonzero_wire_value(
    domain_enum: type[enum.Enum], table: Mapping[Any, int]
) -> None:
    assert set(table) == set(domain_enum)
    values = list(table.values())
    assert 0 not in values and len(set(values)) == len(values)


def _full_metadata() -> ModelMetadata:
    return ModelMetadata(
        format=ModelFormat.GGUF,
        model_type=ModelType.LLM,
        name="Llama",
        architecture="llama",
        quantization="Q4_K_M",
        file_type=15,
        parameter_count=8_030_261_248,
        context_length=8192,
        block_count=32,
        embedding_length=4096,
        head_count=32,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        vocab_size=128256,
        tokenizer_model="gpt2",
        has_chat_template=False,  # False must survive (absent differs from false)
        kv_cache_bytes_per_token=131072,
        dtypes={"Q4_K": 193, "F32": 65},
        tensor_count=291,
        split=SplitInfo(index=1, count=2, files_found=2, tensors_total=291),
        weights=WeightsBreakdown(total_bytes=10, input_bytes=1, output_bytes=2, layer_bytes=[3, 4]),
        size_bytes=4_920_000_000,
        hints={"general.size_label": "8B"},
        warnings=["a warning"],
        needs_components=[],
    )


def test_model_round_trip() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    model = Model(
        id="llama-3-8b-1a2b3c4d",
        display_name="Llama 3 8B",
        source=ModelSource(
            kind=SourceKind.HUGGINGFACE, repo="org/repo", revision="main", files=["a.gguf"]
        ),
        paths=["/m/a.gguf"],
        size_bytes=4_920_000_000,
        sha256="a" * 64,
        state=ModelState.READY,
        metadata=_full_metadata(),
        labels={"team": "ml"},
        created_at=now,
        updated_at=now,
        etag="e1",
    )
    assert convert.model_from_pb(convert.model_to_pb(model)) == model
    wire = convert.model_to_pb(model)
    assert wire.metadata.HasField("has_chat_template") and not wire.metadata.has_chat_template
    assert not wire.metadata.HasField("family")  # None stays absent on the wire


def test_civitai_source_ids_round_trip() -> None:
    source = ModelSource(kind=SourceKind.CIVITAI, civitai_model_id=1, civitai_version_id=2)
    assert convert.source_from_pb(convert.source_to_pb(source)) == source


def test_worker_types_round_trip() -> None:
    for wt in WorkerTypeRegistry().list():
        assert (
            convert.worker_type_from_pb(convert.worker_type_to_pb(wt, supported_on_host=True)) == wt
        )


def test_compat_result_and_device_round_trip() -> None:
    result = CompatibilityResult(
        worker_type="cuda-llm",
        verdict=Verdict.PARTIAL_OFFLOAD,
        reasons=["28/33 layers on GPU"],
        memory=MemoryEstimate(
            context_length=8192,
            kv_cache_type=KvCacheType.Q8_0,
            weights_bytes=1,
            kv_cache_bytes=2,
            compute_bytes=3,
            ram_bytes=4,
            vram_bytes=5,
            gpu_layers=28,
            total_layers=33,
            available_ram_bytes=None,
            available_vram_bytes=6,
        ),
    )
    wire = convert.compat_result_to_pb(result)
    assert wire.worker_type == "worker-types/cuda-llm" and wire.runnable
    assert convert.compat_result_from_pb(wire) == result
    device = Device(kind=DeviceKind.CUDA, name="RTX 4090", free_vram_bytes=24, total_ram_bytes=None)
    assert convert.device_from_pb(convert.device_to_pb(device)) == device


def test_unknown_wire_enum_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as info:
        convert.source_from_pb(pb.ModelSource(kind=99))  # type: ignore[arg-type]
    assert info.value.field_violations[0].field == "model.source.kind"
    with pytest.raises(InvalidArgument):
        convert.model_draft_from_pb(pb.Model(paths=["/x"]))  # no source


def test_update_mask_star_and_unset_state_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        convert.model_patch_from_pb(
            pb.UpdateModelRequest(
                model=pb.Model(name="models/a"), update_mask=FieldMask(paths=["*"])
            )
        )
    with pytest.raises(InvalidArgument):
        convert.model_patch_from_pb(
            pb.UpdateModelRequest(
                model=pb.Model(name="models/a"), update_mask=FieldMask(paths=["state"])
            )
        )
    patch = convert.model_patch_from_pb(
        pb.UpdateModelRequest(
            model=pb.Model(name="models/a", display_name="x", etag="e"),
            update_mask=FieldMask(paths=["display_name"]),
        )
    )
    assert (
        patch.fields == {"display_name"} and patch.values.display_name == "x" and patch.etag == "e"
    )


def _record(model: Model) -> ModelRecord:
    return ModelRecord(model.id, model.etag, model.model_dump_json())


def _versions(count: int) -> list[Model]:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    return [
        Model(
            id=f"m{index}",
            display_name=f"Model {index}",
            source=ModelSource(kind=SourceKind.HUGGINGFACE, repo=f"org/m{index}", files=["a.gguf"]),
            paths=[f"/m/{index}.gguf"],
            state=ModelState.READY if index % 2 else ModelState.FAILED,
            metadata=_full_metadata() if index % 2 else None,
            labels={"n": str(index)},
            created_at=now,
            updated_at=now,
            etag=f"etag-{index}",
        )
        for index in range(count)
    ]


def test_message_cache_serves_exactly_what_model_to_pb_builds() -> None:
    cache = ModelMessageCache(max_entries=16)
    models = _versions(5)
    for _ in range(2):  # the first round fills the cache, the second is served from it
        response = cache.list_response(
            [_record(m) for m in models], next_page_token="t", total_size=5
        )
        assert response == pb.ListModelsResponse(
            models=[convert.model_to_pb(m) for m in models], next_page_token="t", total_size=5
        )
        for model in models:
            assert cache.to_pb(_record(model)) == convert.model_to_pb(model)
    assert cache.versions.hits >= len(models) and len(cache.versions) == len(models)

    # A message handed out is the caller's own: changing it does not change the cache.
    mine = cache.to_pb(_record(models[1]))
    mine.display_name = "changed by a caller"
    assert cache.to_pb(_record(models[1])).display_name == "Model 1"


def test_message_cache_follows_the_etag_and_stays_bounded() -> None:
    cache = ModelMessageCache(max_entries=3)
    old = _versions(1)[0]
    assert cache.to_pb(_record(old)).display_name == "Model 0"
    new = old.model_copy(update={"display_name": "renamed", "etag": "etag-new"})
    assert cache.to_pb(_record(new)).display_name == "renamed"
    assert len(cache.versions) == 1  # one entry per model: the new version replaced the old

    models = _versions(10)
    for model in models:
        assert cache.to_pb(_record(model)) == convert.model_to_pb(model)
        assert len(cache.versions) <= 3
    cache.discard(models[-1].id)
    assert len(cache.versions) == 2


def test_list_response_frames_messages_of_every_size() -> None:
    # Length prefixes of one, two and three bytes (< 128, < 16384, larger) in one page.
    small = _versions(1)[0].model_copy(update={"metadata": None, "id": "s", "etag": "e-s"})
    big = _versions(2)[1].model_copy(
        update={"id": "b", "etag": "e-b", "paths": [f"/m/{'x' * 300}/{i}" for i in range(64)]}
    )
    sizes = [len(convert.model_to_pb(m).SerializeToString()) for m in (small, _versions(2)[1], big)]
    assert sizes[0] < 128 <= sizes[1] < 16384 <= sizes[2]
    models = [small, _versions(2)[1], big]
    cache = ModelMessageCache()
    for _ in range(2):
        response = cache.list_response(
            [_record(m) for m in models], next_page_token="", total_size=3
        )
        assert list(response.models) == [convert.model_to_pb(m) for m in models]
        assert response.total_size == 3 and response.next_page_token == ""
    assert cache.list_response([], next_page_token="", total_size=0) == pb.ListModelsResponse()
