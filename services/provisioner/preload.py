"""Page-cache preloading: warm a model's files into RAM, measure residency, keep a RAM budget.

`Preload(models/{id})` reads every file of a READY model sequentially with large reads into one
reusable buffer (after `posix_fadvise(SEQUENTIAL, WILLNEED)`), so the pages are resident when a
worker maps or reads the model, and a cold start costs RAM bandwidth instead of disk latency.
Reading, not only advising, is the point: WILLNEED is a hint the kernel may cut short, while a
read that returned has put the page in the cache.

Residency is measured, never assumed: each file is mapped (`mmap`, PROT_READ, MAP_SHARED, which
faults nothing in) and `mincore(2)` says, page by page, what is in the page cache now. That
works on Linux and macOS (both have mincore; the mapping is made through libc with ctypes,
because Python's read-only `mmap` objects expose no address). Where mincore cannot be used
(Windows, a libc without it, a file that cannot be mapped) the residency is an ESTIMATE: the
bytes the last preload read (`Residency.measured` is False). Eviction uses
`posix_fadvise(POSIX_FADV_DONTNEED)`; where that does not exist (macOS, Windows) an eviction only
stops tracking the model and the kernel reclaims the pages as it sees fit. Linux drops only clean
pages that nothing maps: a worker that has the model mapped keeps its pages, which is what we
want. tmpfs and some overlay mounts keep pages resident whatever is advised (the page cache IS
their storage).

The RAM budget counts the full size of each tracked model (not its measured residency, which the
kernel may shrink at any time): deterministic, and it is the RAM the model needs when it is
used. A preload that would overflow the budget first evicts the least-recently-used unpinned
models; a model larger than the budget (less the pinned models) is RESOURCE_EXHAUSTED, with the
numbers, before anything is read. Budget 0 means no budget.

Preloads run one at a time (they compete for the same disk; two sequential readers are faster
than two interleaved ones); a second caller waits for its turn, and leaving while waiting costs
nothing. A caller that leaves a running preload stops the read within one buffer; what was read
stays in the cache as ordinary cache, untracked (the preload did not finish, so it is not
recorded). The stream: a progress event at once, progress throttled to a few per second, a last
progress event with every byte, then exactly one terminal `PreloadRecord`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.catalog.domain import Model, ModelState
from services.catalog.ids import parse_resource_name
from services.catalog.link import CatalogLink
from services.catalog.pagination import (
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    page_in_memory,
)
from services.catalog.pagination import normalize_page_size as _normalize_page_size
from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted

logger = logging.getLogger(__name__)

DEFAULT_READ_SIZE = 8 * 1024 * 1024  # one buffer: large sequential reads, cancel within ~ms
PROGRESS_INTERVAL = 0.25  # seconds between progress events
RATE_WINDOW = 3.0  # seconds of samples behind the reported rate
_MINCORE_CHUNK = 1 << 30  # map and measure at most 1 GiB at a time (bounded vector and mapping)


# --- residency: mincore and fadvise ----------------------------------------------------------


@dataclass(frozen=True)
class Residency:
    """Bytes of some files in the page cache. `measured` is False for an estimate (no mincore)."""

    resident_bytes: int
    total_bytes: int
    measured: bool = True


class _Libc:
    """mmap, munmap and mincore from the C library, or None where they are not available."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") if sys.platform != "linux" else None
        lib = ctypes.CDLL(name, use_errno=True)
        self.mmap = lib.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
        ]
        self.munmap = lib.munmap
        self.munmap.restype = ctypes.c_int
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mincore = lib.mincore
        self.mincore.restype = ctypes.c_int
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _load_libc() -> _Libc | None:
    if sys.platform == "win32":
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value
PAGE_SIZE = mmap.PAGESIZE


def mincore_available() -> bool:
    """Whether residency can be measured here (mincore through libc)."""
    return _LIBC is not None


def file_resident_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache now (mincore), or None when it cannot be measured.

    A page counts for its bytes within the file (the last page only up to the file's end).
    Nothing is read and nothing is faulted in: the mapping is PROT_READ and never touched.
    """
    if _LIBC is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        resident = 0
        for offset in range(0, size, _MINCORE_CHUNK):
            length = min(_MINCORE_CHUNK, size - offset)
            counted = _resident_in_range(_LIBC, fd, offset, length)
            if counted is None:
                return None
            resident += counted
        return resident
    finally:
        os.close(fd)


def _resident_in_range(libc: _Libc, fd: int, offset: int, length: int) -> int | None:
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        return None
    try:
        pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, length, vec) != 0:
            return None
        # Bit 0 is "resident" on Linux and MINCORE_INCORE on macOS; the rest is platform noise.
        resident_pages = sum(1 for v in vec if v & 1)
        if resident_pages and vec[pages - 1] & 1:
            # The last page holds only the bytes up to the end of the range.
            return (resident_pages - 1) * PAGE_SIZE + (length - (pages - 1) * PAGE_SIZE)
        return resident_pages * PAGE_SIZE
    finally:
        libc.munmap(addr, length)


def measure_residency(files: Sequence[Path], *, estimate: int = 0) -> Residency:
    """Residency of `files` (mincore); where it cannot be measured, `estimate` (not measured)."""
    total = resident = 0
    measured = True
    for path in files:
        try:
            total += path.stat().st_size
        except OSError:
            continue  # a file deleted since: nothing of it can be resident for us
        counted = file_resident_bytes(path)
        if counted is None:
            measured = False
        else:
            resident += counted
    if not measured:
        return Residency(min(estimate, total), total, measured=False)
    return Residency(resident, total)


def drop_from_page_cache(files: Sequence[Path]) -> bool:
    """Ask the kernel to drop the files' clean, unmapped pages (POSIX_FADV_DONTNEED).

    Returns False where posix_fadvise does not exist (the pages are then left to the kernel).
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # a file system that takes no advice: nothing more to do for it
        finally:
            os.close(fd)
    return True


def _advise_read(fd: int) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    with contextlib.suppress(OSError):
        advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


# --- the model's files ---------------------------------------------------------------------


def model_files(paths: Sequence[str]) -> list[tuple[Path, int]]:
    """The regular files of a model (its paths: files or folders, walked in name order), with
    sizes. Symbolic links are followed to their targets (the HF cache links snapshots to
    blobs) and each target counted once. A missing path is NOT_FOUND (FILE_NOT_FOUND)."""
    seen: set[Path] = set()
    files: list[tuple[Path, int]] = []

    def add(path: Path) -> None:
        real = path.resolve()
        if real in seen or not real.is_file():
            return
        seen.add(real)
        files.append((real, real.stat().st_size))

    for text in paths:
        root = Path(text)
        if not root.exists():
            raise NotFound(
                f"the model's file {text} does not exist on this hive",
                resource_type="file",
                resource_name=text,
                reason="FILE_NOT_FOUND",
            )
        if root.is_dir():
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                for name in sorted(names):
                    add(Path(folder) / name)
        else:
            add(root)
    return files


# --- records and events --------------------------------------------------------------------


@dataclass
class PreloadRecord:
    """A model preloaded into the page cache: `preloads/{id}` (the model's id)."""

    model_id: str
    files: list[Path]
    total_bytes: int
    resident_bytes: int
    pinned: bool
    duration_seconds: float
    last_used_at: datetime
    measured_at: datetime
    residency_measured: bool = True  # False: resident_bytes is an estimate (no mincore here)
    evicted_models: list[str] = field(default_factory=list)  # `models/{id}`, by this preload
    read_bytes: int = 0  # bytes the preload read (the estimate where mincore is missing)

    @property
    def name(self) -> str:
        return f"preloads/{self.model_id}"

    @property
    def model(self) -> str:
        return f"models/{self.model_id}"


@dataclass(frozen=True)
class PreloadEvent:
    """One progress event of a preload."""

    model: str  # `models/{id}`
    file: str
    file_index: int  # 1-based
    file_count: int
    done_bytes: int  # warmed so far, over all files
    total_bytes: int
    bytes_per_second: float
    resident_before_bytes: int  # already in the page cache when the preload started

    @property
    def eta_seconds(self) -> float | None:
        if self.bytes_per_second <= 0:
            return None
        return max(0.0, (self.total_bytes - self.done_bytes) / self.bytes_per_second)


PreloadItem = PreloadEvent | PreloadRecord


@dataclass(frozen=True)
class PreloadPage:
    """A page of ListPreloads, with the budget and what the preloads hold now."""

    preloads: list[PreloadRecord]
    next_page_token: str
    total_size: int
    budget_bytes: int
    resident_bytes: int
    evictions: int


class PreloadMetrics:
    """rbee_provisioner_preload_* metrics (bounded labels: `cause` is budget or delete)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes_read = Counter(
            "rbee_provisioner_preloaded_bytes",
            "Bytes read into the page cache by preloads.",
            registry=registry,
        )
        self.resident_bytes = Gauge(
            "rbee_provisioner_preload_resident_bytes",
            "Bytes of preloaded models resident in the page cache when last measured.",
            registry=registry,
        )
        self.evictions = Counter(
            "rbee_provisioner_preload_evictions",
            "Preloaded models evicted from the page cache, by cause (budget, delete).",
            ["cause"],
            registry=registry,
        )


# --- the reader (a thread) -----------------------------------------------------------------


class PreloadCancelled(Exception):
    """The caller left: the read stopped."""


def read_into_page_cache(
    files: Sequence[tuple[Path, int]],
    *,
    buffer: bytearray,
    cancel: threading.Event,
    on_progress: Callable[[int, int, int], None],
) -> int:
    """Read every file sequentially into `buffer`; `on_progress(file_index0, done_in_file,
    done_total)` after each read. Stops (raises PreloadCancelled) within one buffer of `cancel`."""
    view = memoryview(buffer)
    done = 0
    for index, (path, _size) in enumerate(files):
        if cancel.is_set():
            raise PreloadCancelled
        fd = os.open(path, os.O_RDONLY)
        try:
            _advise_read(fd)
            in_file = 0
            while True:
                if cancel.is_set():
                    raise PreloadCancelled
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                in_file += n
                done += n
                on_progress(index, in_file, done)
        finally:
            os.close(fd)
    return done


# --- the manager ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    model: Model
    files: list[tuple[Path, int]]
    total: int
    pin: bool


class PreloadManager:
    """Every preload of this provisioner: run, get, list, evict; the LRU RAM budget."""

    def __init__(
        self,
        *,
        catalog: CatalogLink,
        budget_bytes: int,
        metrics: PreloadMetrics | None = None,
        read_size: int = DEFAULT_READ_SIZE,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must not be negative")
        self._catalog = catalog
        self._budget = budget_bytes
        self._metrics = metrics
        self._read_size = read_size
        self._interval = progress_interval
        # id -> record, least recently used first (dicts keep insertion order; re-insert on use)
        self._records: dict[str, PreloadRecord] = {}
        self._turn = asyncio.Lock()  # one preload reads at a time
        self._evictions = 0
        self._tokens = PageTokenCodec(new_secret())

    @property
    def budget_bytes(self) -> int:
        """The RAM budget in bytes; 0 = none."""
        return self._budget

    @property
    def evictions(self) -> int:
        """Models evicted since start (for the budget or by DeletePreload)."""
        return self._evictions

    def used_bytes(self) -> int:
        """Bytes the tracked preloads count against the budget (their full sizes)."""
        return sum(r.total_bytes for r in self._records.values())

    # --- Preload ------------------------------------------------------------------------------

    async def preload(self, model_name: str, *, pin: bool = False) -> AsyncIterator[PreloadItem]:
        """Preload: check the model (NOT_FOUND, FAILED_PRECONDITION when not READY,
        RESOURCE_EXHAUSTED when larger than the budget) and return its stream."""
        plan = await self._plan(model_name, pin)
        self._check_fits(plan)
        return self._run(plan)

    async def _plan(self, model_name: str, pin: bool) -> _Plan:
        model_id = parse_resource_name(model_name, "models", field="model")
        model = await self._catalog.get_model(f"models/{model_id}")
        if model is None:
            raise NotFound(
                f"models/{model_id} is not in the catalog",
                resource_type="model",
                resource_name=f"models/{model_id}",
                reason="MODEL_NOT_FOUND",
            )
        if model.state is not ModelState.READY:
            raise FailedPrecondition(
                f"{model.name} is {model.state.value}, not ready: only READY models can be "
                "preloaded",
                reason="MODEL_NOT_READY",
            )
        files = await asyncio.to_thread(model_files, model.paths)
        return _Plan(model, files, sum(size for _, size in files), pin)

    def _pinned_bytes(self, except_id: str) -> int:
        return sum(
            r.total_bytes for r in self._records.values() if r.pinned and r.model_id != except_id
        )

    def _check_fits(self, plan: _Plan) -> None:
        if not self._budget:
            return
        room = self._budget - self._pinned_bytes(plan.model.id)
        if plan.total > room:
            pinned = self._budget - room
            raise ResourceExhausted(
                f"{plan.model.name} needs {plan.total} bytes of page cache; the preload budget "
                f"is {self._budget} bytes"
                + (f", {pinned} of them held by pinned preloads" if pinned else ""),
                reason="INSUFFICIENT_MEMORY",
                metadata={
                    "required_bytes": str(plan.total),
                    "budget_bytes": str(self._budget),
                    "pinned_bytes": str(pinned),
                    "available_bytes": str(max(room, 0)),
                },
            )

    async def _make_room(self, plan: _Plan) -> tuple[list[PreloadRecord], PreloadRecord | None]:
        """Evict least-recently-used unpinned preloads until `plan` fits the budget. Returns the
        evicted records and the model's own previous record (taken out while it is re-read)."""
        # Re-preloading a tracked model replaces its record: its own size is not in the way.
        previous = self._records.pop(plan.model.id, None)
        victims: list[PreloadRecord] = []
        if self._budget:
            used = self.used_bytes()
            for record in list(self._records.values()):  # least recently used first
                if used + plan.total <= self._budget:
                    break
                if record.pinned:
                    continue
                del self._records[record.model_id]
                victims.append(record)
                used -= record.total_bytes
        if victims:
            await asyncio.to_thread(
                drop_from_page_cache, [p for record in victims for p in record.files]
            )
            self._evictions += len(victims)
            for record in victims:
                logger.info(
                    "evicted %s (%d bytes) from the page cache for %s",
                    record.model,
                    record.total_bytes,
                    plan.model.name,
                )
                if self._metrics is not None:
                    self._metrics.evictions.labels(cause="budget").inc()
        return victims, previous

    async def _run(self, plan: _Plan) -> AsyncIterator[PreloadItem]:
        model = plan.model
        count = len(plan.files)

        def event(index: int, done: int, rate: float, before: int) -> PreloadEvent:
            name = plan.files[index][0].name if plan.files else ""
            return PreloadEvent(
                model=model.name,
                file=name,
                file_index=index + 1 if count else 0,
                file_count=count,
                done_bytes=done,
                total_bytes=plan.total,
                bytes_per_second=rate,
                resident_before_bytes=before,
            )

        yield event(0, 0, 0.0, 0)  # at once, even while waiting for our turn
        async with self._turn:
            self._check_fits(plan)  # pins may have changed while we waited
            evicted, previous = await self._make_room(plan)
            finished = False
            try:
                # aclosing: a caller that leaves closes the reader at once (cancel within one
                # buffer), not whenever the inner generator is garbage collected.
                reading = self._read(plan, event, evicted, previous)
                async with contextlib.aclosing(reading):  # type: ignore[type-var]
                    async for item in reading:
                        yield item
                finished = True
            finally:
                if not finished and previous is not None:
                    # A re-preload that did not finish leaves the earlier one tracked.
                    self._records.setdefault(model.id, previous)

    async def _read(
        self,
        plan: _Plan,
        event: Callable[[int, int, float, int], PreloadEvent],
        evicted: list[PreloadRecord],
        previous: PreloadRecord | None,
    ) -> AsyncIterator[PreloadItem]:
        """Read the files in a thread, relaying its throttled progress; then the record."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[PreloadEvent] = asyncio.Queue()
        cancel = threading.Event()
        model = plan.model
        paths = [p for p, _ in plan.files]
        count = len(plan.files)
        before = await asyncio.to_thread(measure_residency, paths)
        samples: deque[tuple[float, int]] = deque(maxlen=64)
        started = last_emit = time.monotonic()
        samples.append((started, 0))

        def on_progress(index: int, _in_file: int, done: int) -> None:
            # In the reader thread: throttled here, so the loop sees a few calls a second.
            nonlocal last_emit
            now = time.monotonic()
            if now - last_emit < self._interval:
                return
            last_emit = now
            samples.append((now, done))
            while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW:
                samples.popleft()
            t0, d0 = samples[0]
            rate = (done - d0) / (now - t0) if now > t0 else 0.0
            loop.call_soon_threadsafe(
                queue.put_nowait, event(index, done, rate, before.resident_bytes)
            )

        buffer = bytearray(min(self._read_size, max(plan.total, 1)))
        reader = asyncio.ensure_future(
            asyncio.to_thread(
                read_into_page_cache,
                plan.files,
                buffer=buffer,
                cancel=cancel,
                on_progress=on_progress,
            )
        )
        getter: asyncio.Future[PreloadEvent] | None = None
        try:
            while not reader.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({reader, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            try:
                read = reader.result()
            except FileNotFoundError as exc:
                raise NotFound(
                    f"a file of {model.name} disappeared while it was read: {exc.filename}",
                    resource_type="file",
                    resource_name=str(exc.filename or ""),
                    reason="FILE_NOT_FOUND",
                ) from None
        finally:
            if getter is not None:
                getter.cancel()
            if not reader.done():
                # The caller left: the reader stops within one buffer. Wait for it, so that the
                # next preload's turn starts only when this one's reads have ended.
                cancel.set()
                with contextlib.suppress(PreloadCancelled, OSError):
                    await asyncio.shield(reader)
                logger.info("preload of %s stopped: its caller left", model.name)
        elapsed = time.monotonic() - started
        after = await asyncio.to_thread(measure_residency, paths, estimate=read)
        yield event(
            max(count - 1, 0),
            plan.total,
            read / elapsed if elapsed > 0 else 0.0,
            before.resident_bytes,
        )
        now = datetime.now(UTC)
        record = PreloadRecord(
            model_id=model.id,
            files=paths,
            total_bytes=plan.total,
            resident_bytes=after.resident_bytes,
            pinned=plan.pin or (previous is not None and previous.pinned),
            duration_seconds=elapsed,
            last_used_at=now,
            measured_at=now,
            residency_measured=after.measured,
            evicted_models=[v.model for v in evicted],
            read_bytes=read,
        )
        self._records[model.id] = record  # the most recently used: last
        if self._metrics is not None:
            self._metrics.bytes_read.inc(read)
            self._refresh_gauge()
        logger.info(
            "preloaded %s: %d of %d bytes resident (%s) in %.2fs%s",
            model.name,
            after.resident_bytes,
            plan.total,
            "mincore" if after.measured else "estimated",
            elapsed,
            f", evicted {', '.join(record.evicted_models)}" if evicted else "",
        )
        yield _snapshot(record)

    # --- Get, List, Delete --------------------------------------------------------------------

    def _record(self, name: str) -> PreloadRecord:
        model_id = parse_resource_name(name, "preloads")
        record = self._records.get(model_id)
        if record is None:
            raise NotFound(
                f"{name} is not preloaded",
                resource_type="preload",
                resource_name=name,
                reason="PRELOAD_NOT_FOUND",
            )
        return record

    async def _remeasure(self, records: Sequence[PreloadRecord]) -> None:
        def measure_all() -> list[Residency]:
            return [measure_residency(r.files, estimate=r.read_bytes) for r in records]

        results = await asyncio.to_thread(measure_all)
        now = datetime.now(UTC)
        for record, residency in zip(records, results, strict=True):
            record.resident_bytes = residency.resident_bytes
            record.residency_measured = residency.measured
            record.measured_at = now
        self._refresh_gauge()

    def _refresh_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.resident_bytes.set(sum(r.resident_bytes for r in self._records.values()))

    async def get(self, name: str) -> PreloadRecord:
        """GetPreload: the preload `preloads/{id}`, residency measured now."""
        record = self._record(name)
        await self._remeasure([record])
        return _snapshot(record)

    async def list_preloads(self, *, page_size: int = 0, page_token: str = "") -> PreloadPage:
        """ListPreloads: most recently used first, every residency measured now."""
        _normalize_page_size(page_size)  # INVALID_ARGUMENT for a negative size
        records = list(self._records.values())
        await self._remeasure(records)
        ordered = sorted(records, key=_order_key)
        page, token = page_in_memory(
            ordered,
            key=_order_key,
            codec=self._tokens,
            fingerprint=filter_fingerprint("preloads", "", "mru"),
            page_size=page_size,
            page_token=page_token,
        )
        return PreloadPage(
            preloads=[_snapshot(r) for r in page],
            next_page_token=token,
            total_size=len(ordered),
            budget_bytes=self._budget,
            resident_bytes=sum(r.resident_bytes for r in records),
            evictions=self._evictions,
        )

    async def delete(self, name: str, *, allow_missing: bool = False) -> None:
        """DeletePreload: drop the model's pages (DONTNEED) and stop tracking it."""
        try:
            record = self._record(name)
        except NotFound:
            if allow_missing:
                return
            raise
        self._records.pop(record.model_id, None)
        await asyncio.to_thread(drop_from_page_cache, record.files)
        self._evictions += 1
        if self._metrics is not None:
            self._metrics.evictions.labels(cause="delete").inc()
            self._refresh_gauge()
        logger.info("evicted %s from the page cache (DeletePreload)", record.model)


def _snapshot(record: PreloadRecord) -> PreloadRecord:
    return replace(record, files=list(record.files), evicted_models=list(record.evicted_models))


def _order_key(record: PreloadRecord) -> tuple[float, str]:
    # Most recently used first: negate the time; the id breaks ties.
    return (-record.last_used_at.timestamp(), record.model_id)
