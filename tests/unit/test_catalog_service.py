"""CatalogService (the domain API) over a real store in a temp dir: no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.catalog.domain import DeviceKind, Model, ModelSource, ModelState, SourceKind
from services.catalog.inspect import InspectError
from services.catalog.message_cache import ProtobufModelEncoder
from services.catalog.service import (
    ENCODING_BACKFILL_BATCH,
    CatalogService,
    CompatibilityRequest,
    HostInfo,
    ModelDraft,
    ModelPatch,
)
from services.catalog.store import CatalogStore
from services.catalog.version_cache import ModelVersionCache
from services.catalog.worker_types import WorkerTypeRegistry, detect_device_kinds
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.fixtures.gguf_models import write_tiny_llama_gguf, write_truncated_gguf

pytestmark = pytest.mark.unit

CPU_ONLY_LINUX = HostInfo("linux", "x86_64", frozenset({DeviceKind.CPU}))


def _local(path: Path, **kw: object) -> ModelDraft:
    return ModelDraft(source=ModelSource(kind=SourceKind.LOCAL), paths=(str(path),), **kw)  # type: ignore[arg-type]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[CatalogService]:
    in_use: dict[str, list[str]] = {}
    svc = CatalogService(
        CatalogStore.open(tmp_path / "db" / "catalog.db"),
        WorkerTypeRegistry(),
        host=CPU_ONLY_LINUX,
        in_use=lambda name: in_use.get(name, []),
    )
    svc.in_use_table = in_use  # type: ignore[attr-defined]
    yield svc
    await svc.close()


async def test_supported_on_host_needs_the_device_kind(service: CatalogService) -> None:
    supported = {wt.id: service.supported_on_host(wt) for wt in await service.list_worker_types("")}
    assert supported == {
        "cpu-llm": True,
        "cpu-sd": True,
        "cuda-llm": False,  # linux/x86_64 is a cuda platform, but this host has no NVIDIA driver
        "cuda-sd": False,
        "metal-llm": False,
        "metal-sd": False,
    }
    assert [wt.id for wt in await service.list_worker_types("supported_on_host=true")] == [
        "cpu-llm",
        "cpu-sd",
    ]
    with pytest.raises(InvalidArgument) as info:
        await service.list_worker_types("supported_on_host=maybe")
    assert info.value.reason == "INVALID_FILTER"


def test_detect_device_kinds_always_has_cpu_and_metal_only_on_apple_silicon() -> None:
    assert DeviceKind.CPU in detect_device_kinds("Linux", "x86_64")
    assert DeviceKind.METAL not in detect_device_kinds("Linux", "aarch64")
    assert DeviceKind.METAL in detect_device_kinds("Darwin", "arm64")


@pytest.mark.parametrize(
    ("draft", "field"),
    [
        (
            ModelDraft(source=ModelSource(kind=SourceKind.LOCAL), paths=("relative.gguf",)),
            "model.paths[0]",
        ),
        (
            ModelDraft(source=ModelSource(kind=SourceKind.LOCAL), paths=("/a\x00b",)),
            "model.paths[0]",
        ),
        (ModelDraft(source=ModelSource(kind=SourceKind.HUGGINGFACE)), "model.source.repo"),
        (
            ModelDraft(source=ModelSource(kind=SourceKind.CIVITAI)),
            "model.source.civitai_version_id",
        ),
        (ModelDraft(source=ModelSource(kind=SourceKind.URL, url="ftp://x")), "model.source.url"),
        (
            ModelDraft(source=ModelSource(kind=SourceKind.URL, url="https://x/m"), sha256="xyz"),
            "model.sha256",
        ),
        (
            ModelDraft(
                source=ModelSource(kind=SourceKind.URL, url="https://x/m"), labels={"bad key": "v"}
            ),
            "model.labels",
        ),
        (
            ModelDraft(
                source=ModelSource(kind=SourceKind.URL, url="https://x/m"), state=ModelState.READY
            ),
            "model.paths",
        ),
    ],
)
async def test_bad_drafts_name_the_field(
    service: CatalogService, draft: ModelDraft, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await service.create_model(draft)
    assert info.value.field_violations[0].field == field
    assert (await service.list_models(filter_text="", page_size=0, page_token=""))[2] == 0


async def test_bad_model_id_is_refused(service: CatalogService, tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf")
    for bad in ("Upper", "../x", "-lead", "a" * 64, "a/b"):
        with pytest.raises(InvalidArgument) as info:
            await service.create_model(_local(path), model_id=bad)
        assert info.value.reason == "INVALID_NAME"


async def test_validate_only_inspects_but_stores_nothing(
    service: CatalogService, tmp_path: Path
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf")
    model = await service.create_model(_local(path), validate_only=True)
    assert model.state is ModelState.READY and model.metadata is not None
    with pytest.raises(NotFound):
        await service.get_model(model.name)
    with pytest.raises(InspectError):
        await service.create_model(
            _local(write_truncated_gguf(tmp_path / "t.gguf")), validate_only=True
        )


async def test_downloading_model_without_paths_then_ready(
    service: CatalogService, tmp_path: Path
) -> None:
    draft = ModelDraft(
        source=ModelSource(kind=SourceKind.HUGGINGFACE, repo="org/repo", files=["m.gguf"])
    )
    model = await service.create_model(draft)
    assert model.state is ModelState.DOWNLOADING and model.metadata is None
    path = write_tiny_llama_gguf(tmp_path / "m.gguf")
    ready = await service.update_model(
        model.name,
        ModelPatch(
            fields=frozenset({"paths", "state"}),
            values=ModelDraft(source=draft.source, paths=(str(path),), state=ModelState.READY),
        ),
    )
    assert ready.state is ModelState.READY and ready.metadata is not None
    assert ready.size_bytes == path.stat().st_size


async def test_model_in_use_needs_force(service: CatalogService, tmp_path: Path) -> None:
    model = await service.create_model(_local(write_tiny_llama_gguf(tmp_path / "m.gguf")))
    service.in_use_table[model.name] = ["workers/cpu-0"]  # type: ignore[attr-defined]
    with pytest.raises(FailedPrecondition) as info:
        await service.delete_model(model.name)
    assert info.value.reason == "MODEL_IN_USE" and "workers/cpu-0" in info.value.message
    deleted = await service.delete_model(model.name, force=True)
    assert deleted is not None and deleted.id == model.id


async def test_inspect_model_refreshes_and_fails_on_a_damaged_file(
    service: CatalogService, tmp_path: Path
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf")
    model = await service.create_model(_local(path))
    refreshed = await service.inspect_model(model.name)
    assert refreshed.metadata == model.metadata and refreshed.etag != model.etag
    path.write_bytes(path.read_bytes()[:100])  # the file got damaged on disk
    with pytest.raises(InspectError):
        await service.inspect_model(model.name)
    failed = await service.get_model(model.name)
    assert failed.state is ModelState.FAILED and failed.metadata is None
    assert failed.state_message


async def test_total_size_follows_every_write(service: CatalogService, tmp_path: Path) -> None:
    async def total(flt: str = "") -> int:
        return (await service.list_models(filter_text=flt, page_size=1, page_token=""))[2]

    assert await total() == 0
    first = await service.create_model(_local(write_tiny_llama_gguf(tmp_path / "a.gguf")))
    assert await total() == 1 and await total("state=ready") == 1
    second = await service.create_model(_local(write_tiny_llama_gguf(tmp_path / "b.gguf")))
    assert await total() == 2 and await total("state=ready") == 2
    await service.update_model(
        second.name,
        ModelPatch(
            fields=frozenset({"state"}),
            values=ModelDraft(source=second.source, state=ModelState.DOWNLOADING),
        ),
    )
    assert await total("state=ready") == 1 and await total("state=downloading") == 1
    await service.delete_model(first.name)
    assert await total() == 1 and await total("state=ready") == 0


async def test_concurrent_creates_of_one_source_register_it_once(
    service: CatalogService, tmp_path: Path
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "same.gguf")
    results = await asyncio.gather(
        *(service.create_model(_local(path), model_id=f"copy-{i}") for i in range(4)),
        return_exceptions=True,
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(created) == 1 and len(refused) == 3
    assert (await service.list_models(filter_text="", page_size=0, page_token=""))[2] == 1


async def test_reads_do_not_wait_for_a_write_in_progress(
    service: CatalogService, tmp_path: Path
) -> None:
    model = await service.create_model(_local(write_tiny_llama_gguf(tmp_path / "r.gguf")))
    store = service._store  # the writer holds its lock as a long write transaction would
    with store._lock:
        assert (await service.get_model(model.name)).id == model.id


# ---- per-version caches ---------------------------------------------------------------------


def test_version_cache_is_keyed_by_etag_bounded_and_least_recently_used_first() -> None:
    cache: ModelVersionCache[str] = ModelVersionCache(max_entries=2)
    assert cache.get("a", "e1") is None
    cache.put("a", "e1", "a@e1")
    assert cache.get("a", "e1") == "a@e1"
    assert cache.get("a", "e2") is None  # another version of the model is a miss
    cache.put("a", "e2", "a@e2")  # replaces the old version: one entry per model
    assert len(cache) == 1 and cache.get("a", "e1") is None and cache.get("a", "e2") == "a@e2"

    cache.put("b", "e1", "b@e1")
    assert cache.get("a", "e2") == "a@e2"  # a is now the most recently used
    cache.put("c", "e1", "c@e1")  # over the bound: b, the least recently used, goes
    assert len(cache) == 2
    assert cache.get("b", "e1") is None
    assert cache.get("a", "e2") == "a@e2" and cache.get("c", "e1") == "c@e1"

    # A batch lookup: hits, a stale etag and an absent model, in order; hits refresh recency.
    assert cache.get_many([("c", "e1"), ("a", "old"), ("zz", "e1"), ("a", "e2")]) == [
        "c@e1",
        None,
        None,
        "a@e2",
    ]
    cache.put("f", "e1", "f@e1")  # c was used before a in the batch, so c goes now
    assert cache.get("c", "e1") is None and cache.get("a", "e2") == "a@e2"
    cache.discard("a")
    assert cache.get("a", "e2") is None and len(cache) == 1
    cache.put("d", "", "never stored")  # no etag: not a stored version
    assert cache.get("d", "") is None and len(cache) == 1
    calls: list[str] = []

    def compute() -> str:
        calls.append("e")
        return "e@x"

    for _ in range(3):
        assert cache.get_or_compute("e", "x", compute) == "e@x"
    assert calls == ["e"]
    assert cache.hits > 0 and cache.misses > 0
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        ModelVersionCache(max_entries=0)


async def _context_used(service: CatalogService, name: str) -> int:
    return (await service.evaluate_compatibility(CompatibilityRequest(model_name=name)))[1]


async def test_compatibility_follows_every_write_of_the_model(
    service: CatalogService, tmp_path: Path
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", n_ctx=256)
    model = await service.create_model(_local(path))
    assert await _context_used(service, model.name) == 256

    write_tiny_llama_gguf(path, n_ctx=512)  # the file changed; inspection stores new metadata
    await service.inspect_model(model.name)
    assert await _context_used(service, model.name) == 512

    await service.update_model(
        model.name,
        ModelPatch(
            fields=frozenset({"state"}),
            values=ModelDraft(source=model.source, state=ModelState.DOWNLOADING),
        ),
    )
    with pytest.raises(FailedPrecondition) as info:
        await _context_used(service, model.name)
    assert info.value.reason == "MODEL_NOT_READY"

    await service.delete_model(model.name)
    with pytest.raises(NotFound):
        await _context_used(service, model.name)


NOW = datetime(2026, 11, 23, tzinfo=UTC)


async def test_backfill_encodes_a_database_written_without_encodings(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    with CatalogStore.open(path) as plain:  # as rbee before stored encodings wrote it
        created = plain.create_models(
            [
                Model(
                    id=f"m{index:03d}",
                    source=ModelSource(kind=SourceKind.URL, url=f"https://example.invalid/{index}"),
                    state=ModelState.READY,
                    created_at=NOW,
                    updated_at=NOW,
                )
                for index in range(ENCODING_BACKFILL_BATCH + 7)
            ]
        )
    encoder = ProtobufModelEncoder()
    svc = CatalogService(
        CatalogStore.open(path, encoder=encoder), WorkerTypeRegistry(), host=CPU_ONLY_LINUX
    )
    try:
        before = await svc.get_model_record(f"models/{created[0].id}")
        assert before.encoded is None
        assert await svc.backfill_encodings() == len(created)
        assert await svc.backfill_encodings() == 0
        for model in (created[0], created[-1]):
            record = await svc.get_model_record(f"models/{model.id}")
            assert record.etag == model.etag  # encoding changes no model version
            assert record.encoded == encoder.encode(model)
    finally:
        await svc.close()
