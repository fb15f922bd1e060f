"""PreloadManager and the page-cache primitives, on real files: residency is measured with
mincore, eviction is real POSIX_FADV_DONTNEED, reads are real reads.

tmpfs (and some overlay mounts) keep file pages resident whatever is advised: where the test
directory is such a file system, the "cold after DONTNEED" assertions are skipped with a reason,
and everything else still runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.catalog.domain import (
    CompatibilityResult,
    Device,
    Install,
    Model,
    ModelMetadata,
    ModelSource,
    ModelState,
    SourceKind,
)
from services.catalog.link import CatalogLink
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.provisioner.preload import (
    PreloadCancelled,
    PreloadEvent,
    PreloadItem,
    PreloadManager,
    PreloadMetrics,
    PreloadRecord,
    drop_from_page_cache,
    file_resident_bytes,
    measure_residency,
    mincore_available,
    model_files,
    read_into_page_cache,
)
from services.provisioner.settings import ProvisionerSettings, parse_budget
from tests.fixtures.residency import assert_resident

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        not mincore_available() or not hasattr(os, "posix_fadvise"),
        reason="needs mincore and posix_fadvise (Linux)",
    ),
]

MB = 1024 * 1024


class MemoryCatalog(CatalogLink):
    """The catalog seam: models by name, nothing else (preloading only reads models)."""

    def __init__(self) -> None:
        self.models: dict[str, Model] = {}

    def add(
        self, model_id: str, paths: Sequence[Path], state: ModelState = ModelState.READY
    ) -> str:
        now = datetime.now(UTC)
        model = Model(
            id=model_id,
            source=ModelSource(kind=SourceKind.LOCAL, path=str(paths[0])),
            paths=[str(p) for p in paths],
            state=state,
            created_at=now,
            updated_at=now,
        )
        self.models[model.name] = model
        return model.name

    async def get_model(self, name: str) -> Model | None:
        return self.models.get(name)

    async def create_model(self, **kwargs: object) -> Model:  # type: ignore[override]
        raise AssertionError("preloading never creates models")

    async def update_model(self, name: str, **kwargs: object) -> Model:  # type: ignore[override]
        raise AssertionError("preloading never updates models")

    async def evaluate(
        self, metadata: ModelMetadata, device: Device | None, context_length: int
    ) -> list[CompatibilityResult]:
        raise AssertionError("preloading never evaluates")

    async def create_install(self, install: Install) -> Install:
        raise AssertionError("preloading never registers installs")

    async def list_installs(self, worker_type: str) -> list[Install]:
        raise AssertionError("preloading never lists installs")


def write_file(path: Path, size: int) -> Path:
    """Random bytes (no page sharing tricks), fsynced so DONTNEED can drop them (dirty pages
    cannot be dropped until written back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = min(remaining, 4 * MB)
            f.write(os.urandom(chunk))
            remaining -= chunk
        f.flush()
        os.fsync(f.fileno())
    return path


def page_cache_keeps_pages(path: Path) -> bool:
    """Whether this file system ignores DONTNEED (tmpfs, some overlays): drop, then measure."""
    drop_from_page_cache([path])
    resident = file_resident_bytes(path)
    assert resident is not None
    return resident > path.stat().st_size // 2


STICKY_REASON = (
    "the test directory's file system keeps pages resident after POSIX_FADV_DONTNEED "
    "(tmpfs or overlay): the cold-cache assertion cannot be made here"
)


async def collect(stream: object) -> tuple[list[PreloadEvent], PreloadRecord]:
    events: list[PreloadEvent] = []
    records: list[PreloadRecord] = []
    async for item in stream:  # type: ignore[attr-defined]
        if isinstance(item, PreloadRecord):
            records.append(item)
        else:
            assert not records, "no progress after the terminal record"
            events.append(item)
    assert len(records) == 1, "exactly one terminal record"
    return events, records[0]


def manager(
    catalog: MemoryCatalog, budget: int = 0, registry: CollectorRegistry | None = None, **kw: int
) -> PreloadManager:
    metrics = PreloadMetrics(registry) if registry is not None else None
    return PreloadManager(catalog=catalog, budget_bytes=budget, metrics=metrics, **kw)  # type: ignore[arg-type]


# --- the primitives ------------------------------------------------------------------------


def test_mincore_sees_dontneed_and_reads(tmp_path: Path) -> None:
    path = write_file(tmp_path / "weights.bin", 32 * MB + 123)  # a partial last page
    size = path.stat().st_size
    sticky = page_cache_keeps_pages(path)
    cold = file_resident_bytes(path)
    assert cold is not None
    if not sticky:
        assert cold < size // 10, f"{cold} of {size} bytes still resident after DONTNEED"
    with open(path, "rb") as f:
        while f.read(MB):
            pass
    assert_resident(file_resident_bytes(path), size)  # the partial last page by its bytes
    residency = measure_residency([path])
    assert (residency.total_bytes, residency.measured) == (size, True)
    assert_resident(residency.resident_bytes, size)
    if sticky:
        pytest.skip(STICKY_REASON)


def test_reader_stops_within_one_buffer(tmp_path: Path) -> None:
    path = write_file(tmp_path / "a.bin", 4 * MB)
    cancel = threading.Event()
    calls: list[int] = []

    def on_progress(index: int, in_file: int, done: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            cancel.set()

    with pytest.raises(PreloadCancelled):
        read_into_page_cache(
            [(path, 4 * MB)], buffer=bytearray(64 * 1024), cancel=cancel, on_progress=on_progress
        )
    assert calls == [64 * 1024, 128 * 1024, 192 * 1024]  # not one buffer more


def test_model_files_walks_folders_and_follows_links(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    write_file(folder / "unet" / "w.bin", 1000)
    write_file(folder / "b.json", 10)
    blob = write_file(tmp_path / "blobs" / "x", 300)
    (folder / "linked.bin").symlink_to(blob)
    (folder / "again.bin").symlink_to(blob)  # the same target twice: counted once
    files = model_files([str(folder)])
    assert [(p.name, s) for p, s in files] == [("x", 300), ("b.json", 10), ("w.bin", 1000)]
    with pytest.raises(NotFound) as caught:
        model_files([str(tmp_path / "absent")])
    assert caught.value.reason == "FILE_NOT_FOUND"


def test_budget_setting_forms() -> None:
    assert parse_budget("50%", total_ram=1000) == 500
    assert parse_budget("0", total_ram=1000) == 0
    assert parse_budget(" 4096 ", total_ram=1000) == 4096
    for bad in ("-1", "150%", "lots", "1.5"):
        with pytest.raises(ValueError, match="percentage of total"):
            parse_budget(bad, total_ram=1000)
    settings = ProvisionerSettings(preload_budget="25%")
    assert settings.preload_budget_bytes(total_ram=4000) == 1000
    assert ProvisionerSettings().preload_budget_bytes() > 0  # 50% of this machine's RAM


# --- the manager -----------------------------------------------------------------------------


async def test_preload_warms_a_cold_model_and_streams_progress(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    first = write_file(tmp_path / "m" / "part-1.bin", 24 * MB)
    second = write_file(tmp_path / "m" / "part-2.bin", 8 * MB + 5)
    name = catalog.add("warm-me", [tmp_path / "m"])
    total = 32 * MB + 5
    sticky = page_cache_keeps_pages(first)
    drop_from_page_cache([second])
    before = measure_residency([first, second])
    if not sticky:
        assert before.resident_bytes < total // 10
    registry = CollectorRegistry()
    preloads = manager(catalog, registry=registry, read_size=MB, progress_interval=0)

    events, record = await collect(await preloads.preload(name))

    assert record.total_bytes == total
    assert_resident(record.resident_bytes, total)  # measured with mincore after the reads
    assert_resident(measure_residency([first, second]).resident_bytes, total)
    assert record.name == "preloads/warm-me" and record.model == name
    assert record.evicted_models == [] and not record.pinned and record.duration_seconds > 0
    # The stream: an event at once, progress that only grows, a last event with every byte.
    assert events[0].done_bytes == 0
    assert len(events) >= 4
    done = [e.done_bytes for e in events]
    assert done == sorted(done)
    assert events[-1].done_bytes == total == events[-1].total_bytes
    assert {e.file for e in events[1:]} == {"part-1.bin", "part-2.bin"}
    assert all(e.file_count == 2 for e in events)
    assert events[-1].bytes_per_second > 0
    assert registry.get_sample_value("rbee_provisioner_preloaded_bytes_total") == total
    gauge = registry.get_sample_value("rbee_provisioner_preload_resident_bytes")
    assert gauge == record.resident_bytes
    if sticky:
        pytest.skip(STICKY_REASON)


async def test_progress_is_throttled(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    name = catalog.add("many-reads", [write_file(tmp_path / "w.bin", 16 * MB)])
    preloads = manager(catalog, read_size=64 * 1024)  # 256 reads, default interval (0.25 s)
    started = time.monotonic()
    events, _ = await collect(await preloads.preload(name))
    elapsed = time.monotonic() - started
    assert len(events) <= 2 + elapsed / 0.25 + 1  # first + last + a few per second


async def test_lru_eviction_beyond_the_budget(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    paths = {m: write_file(tmp_path / f"{m}.bin", 4 * MB) for m in ("a", "b", "c")}
    names = {m: catalog.add(m, [p]) for m, p in paths.items()}
    registry = CollectorRegistry()
    preloads = manager(catalog, budget=10 * MB, registry=registry)
    sticky = page_cache_keeps_pages(paths["a"])

    await collect(await preloads.preload(names["a"]))
    await collect(await preloads.preload(names["b"]))
    _, again = await collect(await preloads.preload(names["a"]))  # a is now the most recent
    assert again.evicted_models == []
    _, record = await collect(await preloads.preload(names["c"]))

    assert record.evicted_models == ["models/b"]  # the least recently used, not a
    page = await preloads.list_preloads()
    assert [r.model_id for r in page.preloads] == ["c", "a"]  # most recently used first
    assert page.budget_bytes == 10 * MB and page.evictions == 1 and page.total_size == 2
    assert_resident(page.resident_bytes, 8 * MB)
    assert preloads.used_bytes() == 8 * MB
    assert (
        registry.get_sample_value("rbee_provisioner_preload_evictions_total", {"cause": "budget"})
        == 1
    )
    with pytest.raises(NotFound):
        await preloads.get("preloads/b")
    if sticky:
        pytest.skip(STICKY_REASON)
    b_resident = file_resident_bytes(paths["b"])
    assert b_resident is not None and b_resident < MB  # DONTNEED really dropped it


async def test_pinned_models_are_not_evicted(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    names = {m: catalog.add(m, [write_file(tmp_path / f"{m}.bin", 4 * MB)]) for m in "abc"}
    preloads = manager(catalog, budget=10 * MB)
    _, pinned = await collect(await preloads.preload(names["a"], pin=True))
    assert pinned.pinned
    await collect(await preloads.preload(names["b"]))
    _, record = await collect(await preloads.preload(names["c"]))
    assert record.evicted_models == ["models/b"]
    assert (await preloads.get("preloads/a")).pinned


async def test_model_larger_than_the_budget_is_refused_before_reading(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    big = catalog.add("big", [write_file(tmp_path / "big.bin", 3 * MB)])
    small = catalog.add("small", [write_file(tmp_path / "small.bin", MB)])
    preloads = manager(catalog, budget=2 * MB)
    with pytest.raises(ResourceExhausted) as caught:
        await preloads.preload(big)
    error = caught.value
    assert error.reason == "INSUFFICIENT_MEMORY"
    assert error.metadata["required_bytes"] == str(3 * MB)
    assert error.metadata["budget_bytes"] == str(2 * MB)
    assert str(3 * MB) in error.message and str(2 * MB) in error.message
    # Pinned preloads shrink the room: 1 MiB pinned leaves 1 MiB, so 1.5 MiB does not fit.
    await collect(await preloads.preload(small, pin=True))
    mid = catalog.add("mid", [write_file(tmp_path / "mid.bin", 3 * MB // 2)])
    with pytest.raises(ResourceExhausted) as caught:
        await preloads.preload(mid)
    assert caught.value.metadata["pinned_bytes"] == str(MB)
    assert (await preloads.list_preloads()).total_size == 1


async def test_a_caller_that_leaves_stops_the_read(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    name = catalog.add("leave", [write_file(tmp_path / "w.bin", 48 * MB)])
    registry = CollectorRegistry()
    preloads = manager(catalog, registry=registry, read_size=4096, progress_interval=0)
    stream = await preloads.preload(name)
    seen: list[PreloadItem] = []
    started = time.monotonic()
    async for item in stream:  # type: ignore[attr-defined]
        seen.append(item)
        if len(seen) == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5
    assert all(isinstance(i, PreloadEvent) for i in seen)
    assert 0 < seen[-1].done_bytes < 48 * MB  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await preloads.get("preloads/leave")  # an unfinished preload is not recorded
    assert registry.get_sample_value("rbee_provisioner_preloaded_bytes_total") == 0
    # The turn was given back: the next preload runs at once.
    _, record = await asyncio.wait_for(collect(await preloads.preload(name)), 10)
    assert_resident(record.resident_bytes, 48 * MB)


async def test_task_cancellation_stops_the_read(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    name = catalog.add("cancel", [write_file(tmp_path / "w.bin", 48 * MB)])
    preloads = manager(catalog, read_size=4096, progress_interval=0)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for item in await preloads.preload(name):
            if isinstance(item, PreloadEvent) and item.done_bytes:
                got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(NotFound):
        await preloads.get("preloads/cancel")
    _, record = await asyncio.wait_for(collect(await preloads.preload(name)), 10)
    assert record.total_bytes == 48 * MB


async def test_unknown_and_unready_models_and_bad_names(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    pending = catalog.add(
        "pending", [write_file(tmp_path / "p.bin", 1000)], state=ModelState.DOWNLOADING
    )
    preloads = manager(catalog)
    with pytest.raises(NotFound) as missing:
        await preloads.preload("models/nope")
    assert missing.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(FailedPrecondition) as unready:
        await preloads.preload(pending)
    assert unready.value.reason == "MODEL_NOT_READY"
    for bad in ("nope", "models/../etc", "preloads/x", ""):
        with pytest.raises(InvalidArgument):
            await preloads.preload(bad)
    with pytest.raises(InvalidArgument):
        await preloads.get("models/x")


async def test_get_list_delete_measure_at_call_time(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    path = write_file(tmp_path / "w.bin", 8 * MB)
    name = catalog.add("kept", [path])
    registry = CollectorRegistry()
    preloads = manager(catalog, budget=64 * MB, registry=registry)
    sticky = page_cache_keeps_pages(path)
    await collect(await preloads.preload(name))
    first = await preloads.get("preloads/kept")
    assert_resident(first.resident_bytes, 8 * MB)

    # Something else drops the pages: Get and List see it, because they measure again.
    drop_from_page_cache([path])
    later = await preloads.get("preloads/kept")
    assert later.measured_at >= first.measured_at
    page = await preloads.list_preloads(page_size=1)
    assert page.total_size == 1 and page.next_page_token == ""
    if not sticky:
        assert later.resident_bytes < MB
        assert page.resident_bytes < MB

    await preloads.delete("preloads/kept")
    with pytest.raises(NotFound) as caught:
        await preloads.delete("preloads/kept")
    assert caught.value.reason == "PRELOAD_NOT_FOUND"
    await preloads.delete("preloads/kept", allow_missing=True)
    assert preloads.evictions == 1
    assert (
        registry.get_sample_value("rbee_provisioner_preload_evictions_total", {"cause": "delete"})
        == 1
    )
    assert (await preloads.list_preloads()).total_size == 0
    if sticky:
        pytest.skip(STICKY_REASON)


async def test_list_pages_most_recent_first(tmp_path: Path) -> None:
    catalog = MemoryCatalog()
    preloads = manager(catalog)
    for model_id in ("p1", "p2", "p3"):
        name = catalog.add(model_id, [write_file(tmp_path / f"{model_id}.bin", 1000)])
        await collect(await preloads.preload(name))
    seen: list[str] = []
    token = ""
    while True:
        page = await preloads.list_preloads(page_size=2, page_token=token)
        seen += [r.model_id for r in page.preloads]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["p3", "p2", "p1"]
    with pytest.raises(InvalidArgument):
        await preloads.list_preloads(page_token="forged.token")
