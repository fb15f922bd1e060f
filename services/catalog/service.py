"""The catalog's data plane: transport-neutral, async, no grpc.

The catalog process is the single writer of its SQLite database: every store call runs on ONE
dedicated thread, in order. File inspection (disk reads that may be slow on a cold cache) runs
on a separate small pool so it never holds up the database thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from services.catalog import compat
from services.catalog.domain import (
    CompatibilityResult,
    Device,
    DeviceKind,
    Install,
    KvCacheType,
    Model,
    ModelMetadata,
    ModelSource,
    ModelState,
    SourceKind,
    WorkerType,
)
from services.catalog.filtering import parse_model_filter
from services.catalog.ids import model_id_for_source, parse_resource_name, validate_id
from services.catalog.inspect import InspectError, inspect_path
from services.catalog.store import CatalogStore, ModelRecord
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Fields of a model a client may set on create or change on update.
UPDATABLE_MODEL_FIELDS = frozenset(
    {
        "display_name",
        "labels",
        "state",
        "state_message",
        "paths",
        "size_bytes",
        "sha256",
        "source",
        "config_folder",
    }
)
MAX_PATHS = 64
MAX_PATH_CHARS = 4096
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_DISPLAY_NAME_CHARS = 256


@dataclass(frozen=True)
class ModelDraft:
    """What a client supplies to create a model (everything else is the catalog's)."""

    source: ModelSource
    display_name: str = ""
    paths: tuple[str, ...] = ()
    size_bytes: int = 0
    sha256: str | None = None
    state: ModelState | None = None  # None: READY when paths are given
    state_message: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    config_folder: str = ""  # a single-file checkpoint's config folder (Model.config_folder)


@dataclass(frozen=True)
class ModelPatch:
    """An update: `fields` names what to change (the update mask), `values` carries it."""

    fields: frozenset[str]
    values: ModelDraft
    etag: str | None = None


@dataclass(frozen=True)
class CompatibilityRequest:
    model_name: str = ""
    metadata: ModelMetadata | None = None  # inline metadata instead of a registered model
    worker_types: tuple[str, ...] = ()
    device: Device | None = None
    context_length: int | None = None
    kv_cache_type: KvCacheType = KvCacheType.F16
    gpu_layers: int | None = None  # None: the best that fits


@dataclass(frozen=True)
class MatrixRow:
    model_name: str
    results: list[CompatibilityResult]
    reason: str = ""  # why a row has no results (not READY, no metadata)


@dataclass(frozen=True)
class HostInfo:
    """The machine the catalog runs on, as worker types see it."""

    platform: str
    machine: str
    device_kinds: frozenset[DeviceKind] = frozenset({DeviceKind.CPU})


# Checks whether models are in use by a running worker; the worker pool plugs in here.
InUseChecker = Callable[[str], Sequence[str]]


# Models encoded per db-thread turn by backfill_encodings.
ENCODING_BACKFILL_BATCH = 200


def _no_workers(_model_name: str) -> Sequence[str]:
    return ()


class CatalogService:
    """Models, worker types, installs and compatibility: the catalog's domain API."""

    def __init__(
        self,
        store: CatalogStore,
        registry: WorkerTypeRegistry,
        *,
        host: HostInfo,
        inspector: Callable[[Path], ModelMetadata] = inspect_path,
        in_use: InUseChecker = _no_workers,
    ) -> None:
        self._store = store
        self._registry = registry
        self._host = host
        self._inspect = inspector
        self._in_use = in_use
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog-db")
        self._counts = _CountCache()  # touched only on the db thread
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="catalog-inspect")

    async def close(self) -> None:
        """Finish queued writes, then close the database."""
        await self._run_db(lambda: None)
        self._db.shutdown(wait=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        self._store.close()

    async def _run_db(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn)

    async def _write_db(self, fn: Callable[[], T]) -> T:
        """A model write on the db thread; cached list counts are stale after it."""

        def run() -> T:
            try:
                return fn()
            finally:
                self._counts.invalidate()

        return await self._run_db(run)

    async def _run_io(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    async def backfill_encodings(self) -> int:
        """Give every model the store's current encoding (a database written before, or by
        another build), one batch at a time on the db thread, so writes queued meanwhile wait
        for one batch at most (about 0.2 ms per model); returns how many it encoded. Reads do
        not wait: models without one are converted as they are served."""
        total, after = 0, ""
        while True:
            done, after = await self._run_db(
                functools.partial(self._store.backfill_encodings, ENCODING_BACKFILL_BATCH, after)
            )
            total += done
            if not after:
                return total

    # ---- models -------------------------------------------------------------------------

    async def get_model(self, name: str) -> Model:
        return (await self.get_model_record(name)).model()

    async def get_model_record(self, name: str) -> ModelRecord:
        """`get_model` as the stored version (id, etag, JSON), unparsed: for callers that keep
        what they derive from a version under (id, etag) (the servicer's protobuf cache)."""
        return self.read_model_record(name)

    def read_model_record(self, name: str) -> ModelRecord:
        """`get_model_record` from any thread, at once: a primary-key read (~50 us) on the
        store's read-only connection, which never waits for a write, so it needs no trip to
        the db thread (that hop was a third of GetModel's time)."""
        model_id = parse_resource_name(name, "models")
        return self._store.get_model_record(model_id)

    async def list_models(
        self, *, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[Model], str, int]:
        records, token, total = await self.list_model_records(
            filter_text=filter_text, page_size=page_size, page_token=page_token
        )
        return [record.model() for record in records], token, total

    async def list_model_records(
        self, *, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[ModelRecord], str, int]:
        """`list_models` as stored versions (id, etag, JSON), unparsed: the same filter, page
        and token rules, the same total."""
        return await self._run_db(self._page_of_records(filter_text, page_size, page_token))

    def read_model_records(
        self, *, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[ModelRecord], str, int]:
        """`list_model_records` from a thread that may block (a threaded server's handler
        thread; never the event loop or the db thread itself): it waits for the db thread,
        where the page is read and the total counted (the count cache lives there)."""
        read = self._page_of_records(filter_text, page_size, page_token)
        return self._db.submit(read).result()

    def _page_of_records(
        self, filter_text: str, page_size: int, page_token: str
    ) -> Callable[[], tuple[list[ModelRecord], str, int]]:
        """The db-thread work of one List page (the filter is parsed here, in the caller)."""
        flt = parse_model_filter(filter_text)

        def run() -> tuple[list[ModelRecord], str, int]:
            records, token = self._store.list_model_records(
                flt, page_size=page_size, page_token=page_token
            )
            key = flt.normalized()
            total = self._counts.get(key)
            if total is None:
                total = self._counts.put(key, self._store.count_models(flt))
            return records, token, total

        return run

    async def create_model(
        self, draft: ModelDraft, *, model_id: str = "", validate_only: bool = False
    ) -> Model:
        draft = _validated_draft(draft)
        if model_id:
            model_id = validate_id(model_id, field="model_id")
        else:
            model_id = model_id_for_source(draft.source, _hint_for(draft))
        state = draft.state or (ModelState.READY if draft.paths else ModelState.DOWNLOADING)
        if state is ModelState.READY and not draft.paths:
            raise InvalidArgument.for_field(
                "model.paths", "a READY model needs the path of its file or folder"
            )
        await self._run_db(lambda: self._check_unique(model_id, draft))

        now = datetime.now(UTC)
        model = Model(
            id=model_id,
            display_name=draft.display_name or _default_display_name(draft),
            source=draft.source,
            paths=list(draft.paths),
            size_bytes=draft.size_bytes,
            sha256=draft.sha256,
            state=state,
            state_message=draft.state_message,
            labels=dict(draft.labels),
            created_at=now,
            updated_at=now,
            config_folder=draft.config_folder,
        )
        if state is ModelState.READY:
            model = await self._with_inspection(model, raise_on_failure=True)
        if validate_only:
            return model

        def check_and_create() -> Model:
            # Checked again with the insert, on the single writer thread: a create of the same
            # source that raced past the early check above cannot slip in twice.
            self._check_unique(model_id, draft)
            return self._store.create_model(model)

        created = await self._write_db(check_and_create)
        logger.info("created %s (%s, %s)", created.name, created.state.value, created.source.kind)
        return created

    def _check_unique(self, model_id: str, draft: ModelDraft) -> None:
        existing = self._store.find_model_by_source(draft.source.canonical())
        if existing is not None:
            raise AlreadyExists(
                f"this source is already registered as {existing.name}",
                resource_type="model",
                resource_name=existing.name,
                reason="MODEL_ALREADY_EXISTS",
            )
        for path in draft.paths:
            for other in self._store.find_models_by_path(path):
                if other.id != model_id:
                    raise AlreadyExists(
                        f"{path} is already registered as {other.name}",
                        resource_type="model",
                        resource_name=other.name,
                        reason="MODEL_ALREADY_EXISTS",
                    )

    async def update_model(self, name: str, patch: ModelPatch) -> Model:
        model_id = parse_resource_name(name, "models")
        unknown = patch.fields - UPDATABLE_MODEL_FIELDS
        if unknown:
            raise InvalidArgument.for_field(
                "update_mask",
                f"cannot update {', '.join(sorted(unknown))}; updatable fields: "
                + ", ".join(sorted(UPDATABLE_MODEL_FIELDS)),
            )
        if not patch.fields:
            raise InvalidArgument.for_field("update_mask", "name at least one field to update")
        values = _validated_draft(patch.values)
        current = await self._run_db(lambda: self._store.get_model(model_id))
        if patch.etag and patch.etag != current.etag:
            # Checked again atomically by the store; this gives the early, clear answer.
            raise Aborted(
                f"{current.name} changed since it was read (etag {patch.etag} is stale)",
                reason="ETAG_MISMATCH",
            )
        changes: dict[str, Any] = {}
        for name_ in patch.fields:
            value = getattr(values, name_)
            changes[name_] = list(value) if name_ == "paths" else value
        if "state" in changes and changes["state"] is None:
            raise InvalidArgument.for_field("model.state", "state cannot be unset")
        updated = current.model_copy(update=changes)
        needs_inspection = updated.state is ModelState.READY and (
            current.state is not ModelState.READY
            or "paths" in patch.fields
            or updated.metadata is None
        )
        if updated.state is ModelState.READY and not updated.paths:
            raise InvalidArgument.for_field(
                "model.paths", "a READY model needs the path of its file or folder"
            )
        if needs_inspection:
            updated = await self._with_inspection(updated)
        if patch.fields & {"paths", "source"}:
            await self._run_db(lambda: self._check_unique_update(updated))
        expected = patch.etag or current.etag
        stored = await self._write_db(
            lambda: self._store.update_model(updated, expected_etag=expected)
        )
        _raise_if_inspection_failed(stored, needs_inspection)
        return stored

    def _check_unique_update(self, model: Model) -> None:
        other = self._store.find_model_by_source(model.source.canonical())
        if other is not None and other.id != model.id:
            raise AlreadyExists(
                f"this source is already registered as {other.name}",
                resource_type="model",
                resource_name=other.name,
                reason="MODEL_ALREADY_EXISTS",
            )
        for path in model.paths:
            for found in self._store.find_models_by_path(path):
                if found.id != model.id:
                    raise AlreadyExists(
                        f"{path} is already registered as {found.name}",
                        resource_type="model",
                        resource_name=found.name,
                        reason="MODEL_ALREADY_EXISTS",
                    )

    async def delete_model(
        self, name: str, *, etag: str = "", force: bool = False, allow_missing: bool = False
    ) -> Model | None:
        """Remove the record. Files are never deleted here: they may be the user's own or
        shared with other tools through the HF cache; the provisioner owns what it downloaded."""
        model_id = parse_resource_name(name, "models")
        workers = list(self._in_use(f"models/{model_id}"))
        if workers and not force:
            raise FailedPrecondition(
                f"models/{model_id} is in use by {', '.join(workers)}; stop them or use force",
                reason="MODEL_IN_USE",
                violations=[
                    PreconditionViolation("IN_USE", w, "a worker has this model loaded")
                    for w in workers
                ],
            )

        def run() -> Model | None:
            try:
                current = self._store.get_model(model_id)
            except NotFound:
                if allow_missing:
                    return None
                raise
            if etag and etag != current.etag:
                raise Aborted(
                    f"{current.name} changed since it was read (etag {etag} is stale)",
                    reason="ETAG_MISMATCH",
                )
            return self._store.delete_model(model_id)

        deleted = await self._write_db(run)
        if deleted is not None:
            logger.info("deleted %s", deleted.name)
        return deleted

    async def inspect_model(self, name: str) -> Model:
        """Read the model's files again and store fresh metadata (READY, or FAILED with why)."""
        model_id = parse_resource_name(name, "models")
        current = await self._run_db(lambda: self._store.get_model(model_id))
        if current.state is ModelState.DOWNLOADING:
            raise FailedPrecondition(
                f"{current.name} is still downloading", reason="MODEL_NOT_READY"
            )
        refreshed = await self._with_inspection(
            current.model_copy(update={"state": ModelState.READY})
        )
        stored = await self._write_db(
            lambda: self._store.update_model(refreshed, expected_etag=current.etag)
        )
        _raise_if_inspection_failed(stored, True)
        return stored

    async def inspect_path(self, path: str) -> ModelMetadata:
        checked = _validated_path(path, "path")
        return await self._run_io(lambda: self._inspect(Path(checked)))

    async def _with_inspection(self, model: Model, *, raise_on_failure: bool = False) -> Model:
        """Inspect the model's files: READY with metadata, or FAILED with the reason."""
        try:
            metadata = await self._run_io(lambda: self._inspect(Path(model.paths[0])))
        except (InspectError, NotFound) as exc:
            logger.info("inspection of %s failed: %s", model.name, exc.message)
            if raise_on_failure:
                raise
            return model.model_copy(
                update={"state": ModelState.FAILED, "state_message": exc.message, "metadata": None}
            )
        return model.model_copy(
            update={
                "metadata": metadata,
                "size_bytes": metadata.size_bytes or model.size_bytes,
                "state": ModelState.READY,
                "state_message": "",
            }
        )

    # ---- worker types and installs ---------------------------------------------------------

    def supported_on_host(self, worker_type: WorkerType) -> bool:
        """Platform, CPU architecture and device kind all present on the catalog host."""
        return (
            self._registry.host_supports(worker_type, self._host.platform, self._host.machine)
            and worker_type.device_kind in self._host.device_kinds
        )

    async def get_worker_type(self, name: str) -> WorkerType:
        return self._registry.get(parse_resource_name(name, "worker-types"))

    async def list_worker_types(self, filter_text: str) -> list[WorkerType]:
        """All worker types matching the filter, ordered by id (six at most: one page)."""
        terms = _parse_simple_filter(
            filter_text, {"backend", "device_kind", "platform", "supported_on_host"}
        )
        if terms.get("supported_on_host", "true") not in {"true", "false"}:
            raise InvalidArgument.for_field(
                "filter", "supported_on_host must be true or false", reason="INVALID_FILTER"
            )
        result = []
        for wt in sorted(self._registry.list(), key=lambda w: w.id):
            if "supported_on_host" in terms and (
                self.supported_on_host(wt) != (terms["supported_on_host"] == "true")
            ):
                continue
            if "backend" in terms and wt.backend.value != terms["backend"]:
                continue
            if "device_kind" in terms and wt.device_kind.value != terms["device_kind"]:
                continue
            if "platform" in terms and terms["platform"] not in wt.platforms:
                continue
            result.append(wt)
        return result

    async def get_install(self, name: str) -> Install:
        install_id = parse_resource_name(name, "installs")
        return await self._run_db(lambda: self._store.get_install(install_id))

    async def list_installs(self, filter_text: str) -> list[Install]:
        """Every install matching the filter, ordered by id (a hive has a handful)."""
        terms = _parse_simple_filter(
            filter_text, {"worker_type", "platform", "cpu_architecture"}, labels=True
        )
        worker_type = terms.pop("worker_type", None)
        if worker_type and "/" in worker_type:
            worker_type = parse_resource_name(worker_type, "worker-types", field="filter")

        def run() -> list[Install]:
            found: list[Install] = []
            token = ""
            while True:
                page, token = self._store.list_installs(
                    worker_type=worker_type, page_size=1000, page_token=token
                )
                found.extend(page)
                if not token:
                    return found

        installs = await self._run_db(run)
        return [i for i in installs if _install_matches(i, terms)]

    async def create_install(self, install: Install) -> Install:
        validate_id(install.id, field="install_id")
        self._registry.get(install.worker_type)  # NOT_FOUND for an unknown worker type
        return await self._run_db(lambda: self._store.create_install(install))

    async def delete_install(self, name: str, *, allow_missing: bool = False) -> Install | None:
        install_id = parse_resource_name(name, "installs")

        def run() -> Install | None:
            try:
                return self._store.delete_install(install_id)
            except NotFound:
                if allow_missing:
                    return None
                raise

        return await self._run_db(run)

    # ---- compatibility ------------------------------------------------------------------

    def _worker_types_for(self, names: Sequence[str]) -> list[WorkerType]:
        if not names:
            return sorted(self._registry.list(), key=lambda w: w.id)
        return [
            self._registry.get(parse_resource_name(n, "worker-types", field="worker_types"))
            for n in names
        ]

    def worker_type_names(self, names: Sequence[str]) -> list[str]:
        """The matrix columns for a request: the named types, or all of them, as names."""
        return [wt.name for wt in self._worker_types_for(names)]

    async def evaluate_compatibility(
        self, request: CompatibilityRequest
    ) -> tuple[list[CompatibilityResult], int]:
        """Per worker type: a verdict, reasons and the memory numbers. Returns the results and
        the context length they were computed for (0 for image models)."""
        worker_types = self._worker_types_for(request.worker_types)
        _check_compat_options(request)
        if request.metadata is not None:
            metadata = request.metadata
        elif request.model_name:
            metadata = _runnable_metadata(await self.get_model(request.model_name))
        else:
            raise InvalidArgument.for_field("model", "name a model or give its metadata")
        results = compat.evaluate_all(
            metadata,
            worker_types,
            device=request.device,
            context_length=request.context_length,
            kv_cache_type=request.kv_cache_type,
            gpu_layers=request.gpu_layers,
        )
        ctx = next((r.memory.context_length for r in results if r.memory), 0)
        return results, ctx

    async def compatibility_matrix(
        self,
        *,
        filter_text: str,
        worker_type_names: Sequence[str],
        device: Device | None,
        context_length: int | None,
        kv_cache_type: KvCacheType = KvCacheType.F16,
        page_size: int,
        page_token: str,
    ) -> tuple[list[MatrixRow], str, int]:
        worker_types = self._worker_types_for(worker_type_names)
        models, token, total = await self.list_models(
            filter_text=filter_text, page_size=page_size, page_token=page_token
        )
        rows = []
        for model in models:
            try:
                metadata = _runnable_metadata(model)
            except FailedPrecondition as exc:
                rows.append(MatrixRow(model.name, [], exc.message))
                continue
            rows.append(
                MatrixRow(
                    model.name,
                    compat.evaluate_all(
                        metadata,
                        worker_types,
                        device=device,
                        context_length=context_length,
                        kv_cache_type=kv_cache_type,
                    ),
                )
            )
        return rows, token, total


class _CountCache:
    """`total_size` per normalised filter. Counting 50,000 matches costs ~10 ms, more than the
    page itself; the catalog is the single writer, so any model write simply clears this.
    Used only on the db thread."""

    MAX_ENTRIES = 256

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        return self._counts.get(key)

    def put(self, key: str, count: int) -> int:
        if len(self._counts) >= self.MAX_ENTRIES:
            self._counts.clear()
        self._counts[key] = count
        return count

    def invalidate(self) -> None:
        self._counts.clear()


def _raise_if_inspection_failed(model: Model, inspected: bool) -> None:
    """After storing a FAILED inspection, report it to the caller as the error it is."""
    if inspected and model.state is ModelState.FAILED:
        raise InspectError(
            f"{model.name}: {model.state_message}",
            metadata={"model": model.name},
        )


def _runnable_metadata(model: Model) -> ModelMetadata:
    if model.state is not ModelState.READY or model.metadata is None:
        detail = f": {model.state_message}" if model.state_message else ""
        raise FailedPrecondition(
            f"{model.name} is {model.state.value}{detail}; compatibility needs a READY, "
            "inspected model",
            reason="MODEL_NOT_READY",
            violations=[PreconditionViolation("STATE", model.name, f"state is {model.state}")],
        )
    return model.metadata


def _check_compat_options(request: CompatibilityRequest) -> None:
    if request.context_length is not None and not 0 < request.context_length <= 16_777_216:
        raise InvalidArgument.for_field("context_length", "must be between 1 and 16777216")
    if request.gpu_layers is not None and not 0 <= request.gpu_layers <= 100_000:
        raise InvalidArgument.for_field("gpu_layers", "must be -1 (auto) or between 0 and 100000")


def _validated_path(path: str, field_name: str) -> str:
    if not path:
        raise InvalidArgument.for_field(field_name, "a path is required")
    if "\x00" in path or len(path) > MAX_PATH_CHARS:
        raise InvalidArgument.for_field(
            field_name, f"must be at most {MAX_PATH_CHARS} characters with no NUL bytes"
        )
    if not os.path.isabs(path):
        raise InvalidArgument.for_field(field_name, f"must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def _validated_draft(draft: ModelDraft) -> ModelDraft:
    if len(draft.paths) > MAX_PATHS:
        raise InvalidArgument.for_field("model.paths", f"at most {MAX_PATHS} paths")
    paths = tuple(_validated_path(p, f"model.paths[{i}]") for i, p in enumerate(draft.paths))
    if len(draft.display_name) > MAX_DISPLAY_NAME_CHARS or "\x00" in draft.display_name:
        raise InvalidArgument.for_field(
            "model.display_name", f"at most {MAX_DISPLAY_NAME_CHARS} characters, no NUL bytes"
        )
    if len(draft.labels) > MAX_LABELS:
        raise InvalidArgument.for_field("model.labels", f"at most {MAX_LABELS} labels")
    for key, value in draft.labels.items():
        if not key or len(key) > 63 or not all(c.isalnum() or c in "-_." for c in key):
            raise InvalidArgument.for_field(
                "model.labels", f"label key {key[:70]!r}: 1-63 letters, digits, '-', '_' or '.'"
            )
        if len(value) > MAX_LABEL_CHARS or "\x00" in value:
            raise InvalidArgument.for_field(
                f"model.labels[{key}]", f"at most {MAX_LABEL_CHARS} characters, no NUL bytes"
            )
    if draft.size_bytes < 0:
        raise InvalidArgument.for_field("model.size_bytes", "must not be negative")
    if draft.sha256 is not None and (
        len(draft.sha256) != 64 or any(c not in "0123456789abcdef" for c in draft.sha256.lower())
    ):
        raise InvalidArgument.for_field("model.sha256", "must be 64 hexadecimal characters")
    source = draft.source
    if source.kind is SourceKind.LOCAL and not source.path and paths:
        source = source.model_copy(update={"path": paths[0]})
    if source.kind is SourceKind.LOCAL and not source.path:
        raise InvalidArgument.for_field("model.source.path", "a local source needs its path")
    if source.kind is SourceKind.HUGGINGFACE and not source.repo:
        raise InvalidArgument.for_field("model.source.repo", "a huggingface source needs a repo")
    if source.kind is SourceKind.CIVITAI and not source.civitai_version_id:
        raise InvalidArgument.for_field(
            "model.source.civitai_version_id", "a civitai source needs a model version id"
        )
    if source.kind is SourceKind.URL and not (source.url or "").startswith(("http://", "https://")):
        raise InvalidArgument.for_field("model.source.url", "a url source needs an http(s) url")
    if source.path:
        source = source.model_copy(
            update={"path": _validated_path(source.path, "model.source.path")}
        )
    sha = draft.sha256.lower() if draft.sha256 else None
    config_folder = (
        _validated_path(draft.config_folder, "model.config_folder") if draft.config_folder else ""
    )
    return ModelDraft(
        source=source,
        display_name=draft.display_name,
        paths=paths,
        size_bytes=draft.size_bytes,
        sha256=sha,
        state=draft.state,
        state_message=draft.state_message[:4096],
        labels=dict(draft.labels),
        config_folder=config_folder,
    )


def _hint_for(draft: ModelDraft) -> str | None:
    source = draft.source
    if source.files:
        return source.files[0].rsplit("/", 1)[-1]
    if source.repo:
        return source.repo.rsplit("/", 1)[-1]
    if draft.paths:
        return Path(draft.paths[0]).name
    if source.url:
        return source.url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    if source.civitai_version_id:
        return f"civitai-{source.civitai_version_id}"
    return None


def _default_display_name(draft: ModelDraft) -> str:
    return _hint_for(draft) or "model"


def _install_matches(install: Install, terms: dict[str, str]) -> bool:
    for key, value in terms.items():
        if key.startswith("labels."):
            if install.labels.get(key.removeprefix("labels.")) != value:
                return False
        elif getattr(install, key) != value:
            return False
    return True


def _parse_simple_filter(text: str, allowed: set[str], *, labels: bool = False) -> dict[str, str]:
    """`a=b AND c=d` with bare or quoted values: enough for the small collections (worker
    types, installs); models use the full parser in services.catalog.filtering."""
    terms: dict[str, str] = {}
    if not text.strip():
        return terms
    if len(text) > 1024:
        raise InvalidArgument.for_field(
            "filter", "at most 1024 characters", reason="INVALID_FILTER"
        )
    for raw in text.split(" AND "):
        key, sep, value = raw.strip().partition("=")
        key, value = key.strip(), value.strip().strip('"')
        known = key in allowed or (labels and key.startswith("labels.") and len(key) > 7)
        if not sep or not known or not value:
            raise InvalidArgument.for_field(
                "filter",
                f"cannot parse {raw.strip()!r}: use field=value terms joined by AND; "
                f"fields: {', '.join(sorted(allowed))}",
                reason="INVALID_FILTER",
            )
        terms[key] = value
    return terms


__all__ = [
    "CatalogService",
    "CompatibilityRequest",
    "HostInfo",
    "MatrixRow",
    "ModelDraft",
    "ModelPatch",
]
