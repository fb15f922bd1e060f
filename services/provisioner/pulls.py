"""Pull jobs: one download per source, shared by every caller, outliving them, resumable.

A pull (`pulls/{id}`) is keyed by its source (parsed and canonicalised, with the revision and
file options), so two callers pulling the same source at once attach to ONE job and see the same
progress. The job runs as an asyncio task; the blocking parts (resolution, transfer) run in
threads and stop on the job's `threading.Event`, checked per buffer, so a cancel stops the
transfer within a second. Its record is persisted at every state change: after a kill -9 the
next start finds it unfinished, marks it PAUSED and (when configured) resumes it from the
partial files.

Callers see a stream: a snapshot event at once, throttled progress events (a few per second,
plus every state change), then exactly one terminal item: the catalog Model, or the error the
pull failed with. A caller that leaves cancels the pull only when it was the last one watching.

A single-file image checkpoint (one .safetensors of a family in SINGLE_FILE_CONFIG_REPOS, from
any source) also gets its family's config repo's small files (model_index.json, component
configs, scheduler, tokenizers; never weights) fetched into the HF cache after its own download,
reported as DOWNLOADING messages: the worker loads such a file offline with those configs. The
snapshot folder they landed in (absolute) is recorded with the model in the catalog
(`Model.config_folder`), so a worker loading the model by name finds them even when its own HF
cache is another one than the provisioner's (RBEE_PROVISIONER_HF_CACHE). A model already READY
(or registered in place) without a usable recorded folder gets the configs fetched and recorded
too. A failure there does not fail the pull (the checkpoint is good); the last message says what
failed, and the worker's load will say what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.catalog.domain import (
    ID_PATTERN,
    Model,
    ModelState,
    ModelType,
    SourceKind,
)
from services.catalog.ids import slugify
from services.catalog.inspect import inspect_path
from services.catalog.link import CatalogLink
from services.catalog.pagination import (
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    page_in_memory,
)
from services.common.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RbeeError,
    ResourceExhausted,
    Unavailable,
    error_for_status,
)
from services.common.list_filter import parse_equality_filter
from services.provisioner.domain import (
    CivitaiSpec,
    Credentials,
    FileResult,
    HfSpec,
    LocalSpec,
    PlannedFile,
    PullError,
    PullEvent,
    PullFileRecord,
    PullFileState,
    PullOptions,
    PullRecord,
    PullState,
    Resolution,
    SourceSpec,
    UrlSpec,
)
from services.provisioner.http import redact_url
from services.provisioner.metrics import ProvisionerMetrics
from services.provisioner.pull_store import PullStore
from services.provisioner.sources import SourceContext, parse_source, resolve
from services.provisioner.sources.huggingface import resolve_config_files
from services.provisioner.transfer import TokenBucket, TransferSettings, download_file
from services.worker.engines.image_base import (
    SINGLE_FILE_CONFIG_PATTERNS,
    SINGLE_FILE_CONFIG_REPOS,
)

logger = logging.getLogger(__name__)

# Smallest ring buffer of a file that transfers beside others (its sha256 and writes stay in
# large calls).
MIN_PARALLEL_BUFFER = 1024 * 1024

PROGRESS_INTERVAL = 0.25  # seconds between progress events (state changes are sent at once)
PERSIST_INTERVAL = 2.0  # seconds between record writes while bytes flow
RATE_WINDOW = 3.0  # seconds of samples behind the reported rate
CANCEL_WAIT = 5.0  # how long CancelPull waits for the job to wind down
WATCH_QUEUE = 256

PullItem = PullEvent | Model
Resolver = Callable[[SourceSpec, PullOptions, SourceContext], Resolution]
Downloader = Callable[..., FileResult]


@dataclass
class _End:
    """The terminal item of a stream: the model, or the error."""

    model: Model | None = None
    error: RbeeError | None = None


@dataclass
class _Job:
    record: PullRecord
    spec: SourceSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    watchers: set[asyncio.Queue[PullItem | _End]] = field(default_factory=set)
    end: _End | None = None
    shutdown: bool = False  # stopped by the provisioner stopping: PAUSED, not CANCELLED
    cancel_reason: str = ""
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    last_emit: float = 0.0
    last_persist: float = 0.0
    file_index: int = 0  # 1-based index of the file being transferred
    message: str = ""
    started: float = 0.0

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


def pull_id_for(spec: SourceSpec, options: PullOptions) -> str:
    """The pull id of a source: readable, and the same for the same source and file options."""
    if isinstance(spec, HfSpec):
        key: list[Any] = [
            "hf",
            spec.repo,
            spec.file or "",
            options.revision or spec.revision or "main",
            sorted(options.files),
        ]
        readable = f"{spec.repo.replace('/', '-')}-{Path(spec.file).stem if spec.file else ''}"
    elif isinstance(spec, CivitaiSpec):
        key = ["civitai", spec.version_id, spec.filename or "", sorted(options.files)]
        readable = f"civitai-{spec.version_id}"
    elif isinstance(spec, UrlSpec):
        key = ["url", spec.url]
        readable = spec.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "url"
    else:
        key = ["local", str(spec.path), options.copy_files]
        readable = spec.path.name or "local"
    digest = hashlib.sha256(json.dumps(key).encode("utf-8")).hexdigest()[:8]
    slug = slugify(readable)[:50].strip("-") or "pull"
    return f"{slug}-{digest}"


def display_source(source: str) -> str:
    """The source string safe to show or log: URLs lose their userinfo and query."""
    if source.startswith(("http://", "https://")):
        return redact_url(source)
    return source


def parse_pull_name(name: str, field_name: str = "name") -> str:
    prefix = "pulls/"
    pull_id = name[len(prefix) :] if name.startswith(prefix) else ""
    if not pull_id or not ID_PATTERN.fullmatch(pull_id):
        raise InvalidArgument.for_field(
            field_name, f"expected pulls/{{pull}}, got {name[:100]!r}", reason="INVALID_NAME"
        )
    return pull_id


def error_record(exc: RbeeError) -> PullError:
    return PullError(
        code=exc.kind.name, reason=exc.reason, message=exc.message, metadata=dict(exc.metadata)
    )


def error_from_record(err: PullError) -> RbeeError:
    """Rebuild the error a finished pull ended with (for WatchPull after the fact)."""
    return error_for_status(
        err.code, err.message, reason=err.reason, metadata=err.metadata, resource_type="pull"
    )


class PullManager:
    """Every pull of this provisioner: start, attach, watch, cancel, resume, list, delete."""

    def __init__(
        self,
        *,
        store: PullStore,
        catalog: CatalogLink,
        context: SourceContext,
        credentials: Credentials,
        transfer_settings: Callable[[int], TransferSettings],
        max_concurrent: int = 2,
        parallel_files: int = 4,
        resume_on_start: bool = True,
        metrics: ProvisionerMetrics | None = None,
        resolver: Resolver = resolve,
        downloader: Downloader = download_file,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._ctx = context
        self._credentials = credentials
        self._transfer_settings = transfer_settings
        self._slots = asyncio.Semaphore(max_concurrent)
        self._parallel_files = max(1, parallel_files)
        self._resume_on_start = resume_on_start
        self._metrics = metrics
        self._resolve = resolver
        self._download = downloader
        self._jobs: dict[str, _Job] = {}
        self._tokens = PageTokenCodec(new_secret())
        self._closing = False
        # One thread writes the records, in order: a progress snapshot queued before a state
        # change can never land after it.
        self._store_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pull-store")

    async def _store_call(self, fn: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._store_io, fn, *args)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records; unfinished ones become PAUSED, and resume when configured."""
        records = await asyncio.to_thread(self._store.load_all)
        to_resume: list[_Job] = []
        for record in records:
            try:
                spec = parse_source(record.source)
            except RbeeError:
                logger.warning("pull %s has an unparsable source; skipped", record.id)
                continue
            job = _Job(record=record, spec=spec)
            self._jobs[record.id] = job
            if record.state.running:
                record.state = PullState.PAUSED
                record.state_message = "interrupted by a provisioner restart; resumable"
                self._touch(record)
                await self._store_call(self._store.save, record)
                if self._resume_on_start:
                    to_resume.append(job)
        for job in to_resume:
            logger.info("resuming %s (%s)", job.record.name, display_source(job.record.source))
            self._launch(job, job.record.options)

    async def close(self) -> None:
        """Stop every running pull; they are left PAUSED, to resume at the next start."""
        self._closing = True
        running = [job for job in self._jobs.values() if job.running]
        for job in running:
            job.shutdown = True
            job.cancel.set()
        for job in running:
            assert job.task is not None
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(job.task), CANCEL_WAIT)

    # --- queries ------------------------------------------------------------------------------

    def _job(self, name: str, field_name: str = "name") -> _Job:
        pull_id = parse_pull_name(name, field_name)
        job = self._jobs.get(pull_id)
        if job is None:
            raise NotFound(
                f"{name} does not exist",
                resource_type="pull",
                resource_name=name,
                reason="PULL_NOT_FOUND",
            )
        return job

    def get(self, name: str) -> PullRecord:
        return self._job(name).record

    def list_pulls(
        self, *, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[PullRecord], str, int]:
        """Pulls, newest first, filtered (`state=`, `source=`, `model=`, joined by AND)."""
        terms = _parse_pull_filter(filter_text)
        matching = sorted(
            (j.record for j in self._jobs.values() if _matches(j.record, terms)),
            key=_order_key,
        )
        page, token = page_in_memory(
            matching,
            key=_order_key,
            codec=self._tokens,
            fingerprint=filter_fingerprint("pulls", json.dumps(sorted(terms.items())), "new"),
            page_size=page_size,
            page_token=page_token,
        )
        return page, token, len(matching)

    # --- starting and attaching ---------------------------------------------------------------

    async def pull(
        self, source: str, options: PullOptions, pull_id: str = ""
    ) -> AsyncIterator[PullItem]:
        """PullModel: start (or attach to) the pull of `source` and stream it."""
        spec = parse_source(source)
        if options.model_id and not ID_PATTERN.fullmatch(options.model_id):
            raise InvalidArgument.for_field(
                "options.model_id", "must be a slug: lower-case letters, digits and hyphens"
            )
        if options.validate_only:
            return self._validate_only(spec, source, options)
        if pull_id and not ID_PATTERN.fullmatch(pull_id):
            raise InvalidArgument.for_field(
                "pull_id", "must be a slug: lower-case letters, digits and hyphens"
            )
        if self._closing:
            raise Unavailable("the provisioner is shutting down", reason="UNAVAILABLE")
        pull_id = pull_id or pull_id_for(spec, options)
        job = self._jobs.get(pull_id)
        if job is not None and job.running:
            if job.record.source != source and pull_id_for(spec, options) != pull_id:
                raise AlreadyExists(
                    f"pulls/{pull_id} is running for another source "
                    f"({display_source(job.record.source)})",
                    resource_type="pull",
                    resource_name=f"pulls/{pull_id}",
                    reason="PULL_ALREADY_EXISTS",
                )
            return self._attach(job)
        now = datetime.now(UTC)
        if job is None:
            record = PullRecord(
                id=pull_id, source=source, options=options, created_at=now, updated_at=now
            )
            job = _Job(record=record, spec=spec)
            self._jobs[pull_id] = job
        else:
            job.record.options = options
            job.record.source = source
            job.spec = spec
        queue = self._subscribe(job)
        self._launch(job, options)
        return self._stream(job, queue)

    async def watch(self, name: str) -> AsyncIterator[PullItem]:
        """WatchPull: the progress from now on, then the terminal model (or error)."""
        job = self._job(name)
        if job.running:
            return self._attach(job)
        return self._finished_stream(job)

    async def resume(self, name: str) -> AsyncIterator[PullItem]:
        """ResumePull: run a PAUSED, CANCELLED or FAILED pull again from its bytes on disk."""
        job = self._job(name)
        if job.running:
            return self._attach(job)
        if job.record.state is PullState.SUCCEEDED:
            return self._finished_stream(job)
        if self._closing:
            raise Unavailable("the provisioner is shutting down", reason="UNAVAILABLE")
        queue = self._subscribe(job)
        self._launch(job, job.record.options)
        return self._stream(job, queue)

    async def cancel(self, name: str, *, discard_partial: bool) -> PullRecord:
        """CancelPull: stop the transfer (within a second); keep the partial unless asked."""
        job = self._job(name)
        if job.record.state is PullState.SUCCEEDED:
            raise FailedPrecondition(
                f"{name} already succeeded; nothing to cancel", reason="JOB_FINISHED"
            )
        if job.running:
            job.cancel_reason = "cancelled by CancelPull"
            job.cancel.set()
            assert job.task is not None
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(job.task), CANCEL_WAIT)
        elif job.record.state is PullState.PAUSED:
            job.record.state = PullState.CANCELLED
            job.record.state_message = "cancelled by CancelPull"
            job.record.error = error_record(Cancelled(f"{name} was cancelled", reason="CANCELLED"))
            job.record.ended_at = datetime.now(UTC)
            await self._persist(job)
        if discard_partial:
            await asyncio.to_thread(_discard_partials, job.record)
            await self._persist(job)
        return job.record

    async def delete(self, name: str, *, etag: str, force: bool, allow_missing: bool) -> None:
        try:
            job = self._job(name)
        except NotFound:
            if allow_missing:
                return
            raise
        if etag and etag != job.record.etag:
            raise Aborted(
                f"{name} changed (etag {job.record.etag}, given {etag})", reason="ETAG_MISMATCH"
            )
        if job.running:
            if not force:
                raise FailedPrecondition(
                    f"{name} is running; cancel it first or delete with force",
                    reason="JOB_RUNNING",
                )
            await self.cancel(name, discard_partial=True)
        await asyncio.to_thread(_discard_partials, job.record)
        await self._store_call(self._store.delete, job.record.id)
        self._jobs.pop(job.record.id, None)

    # --- streams ------------------------------------------------------------------------------

    def _subscribe(self, job: _Job) -> asyncio.Queue[PullItem | _End]:
        queue: asyncio.Queue[PullItem | _End] = asyncio.Queue(maxsize=WATCH_QUEUE)
        job.watchers.add(queue)
        job.record.watcher_count = len(job.watchers)
        return queue

    def _attach(self, job: _Job) -> AsyncIterator[PullItem]:
        return self._stream(job, self._subscribe(job))

    async def _stream(
        self, job: _Job, queue: asyncio.Queue[PullItem | _End]
    ) -> AsyncIterator[PullItem]:
        try:
            yield self._event(job)  # the first event at once
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    if item.model is not None:
                        yield item.model
                        return
                    assert item.error is not None
                    raise item.error
                yield item
        finally:
            job.watchers.discard(queue)
            job.record.watcher_count = len(job.watchers)
            if not job.watchers and job.running and not job.cancel.is_set():
                logger.info("%s: the last caller left; cancelling", job.record.name)
                job.cancel_reason = "cancelled: the last caller left"
                job.cancel.set()

    async def _finished_stream(self, job: _Job) -> AsyncIterator[PullItem]:
        record = job.record
        yield self._event(job)
        if record.state is PullState.SUCCEEDED:
            model = await self._catalog.get_model(record.model) if record.model else None
            if model is None:
                raise NotFound(
                    f"{record.name} succeeded but its model {record.model} is gone from the "
                    "catalog; pull again",
                    resource_type="model",
                    resource_name=record.model,
                    reason="MODEL_NOT_FOUND",
                )
            yield model
            return
        if record.state is PullState.PAUSED:
            raise FailedPrecondition(
                f"{record.name} is paused (interrupted by a restart); ResumePull or pull the "
                "source again to continue",
                reason="JOB_FINISHED",
            )
        if record.error is not None:
            raise error_from_record(record.error)
        raise FailedPrecondition(f"{record.name} is {record.state.value}", reason="JOB_FINISHED")

    def _event(self, job: _Job, message: str = "") -> PullEvent:
        record = job.record
        files = record.files
        index = job.file_index
        current = files[index - 1] if 0 < index <= len(files) else None
        rate = self._rate(job)
        total = record.total_bytes
        done = record.done_bytes
        eta = (total - done) / rate if (total is not None and rate > 0) else None
        return PullEvent(
            pull=record.name,
            state=record.state,
            file=current.path if current else "",
            file_index=index if current else 0,
            file_count=len(files),
            file_done=current.done if current else 0,
            file_total=current.total if current else None,
            total_done=done,
            total_total=total,
            rate=rate,
            eta_seconds=eta,
            message=message or job.message,
            reused=sum(f.reused for f in files),
        )

    def _rate(self, job: _Job) -> float:
        samples = job.samples
        if len(samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def _publish(self, job: _Job, item: PullItem | _End) -> None:
        for queue in list(job.watchers):
            if queue.full() and not isinstance(item, _End):
                continue  # a slow reader skips progress; it still gets the next state and end
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(item)

    # --- running ------------------------------------------------------------------------------

    def _launch(self, job: _Job, options: PullOptions) -> None:
        record = job.record
        record.options = options
        record.state = PullState.QUEUED
        record.state_message = ""
        record.error = None
        record.ended_at = None
        job.end = None
        job.cancel = threading.Event()
        job.shutdown = False
        job.cancel_reason = ""
        job.samples.clear()
        job.file_index = 0
        job.message = ""
        job.started = time.monotonic()
        self._touch(record)
        if self._metrics is not None:
            self._metrics.active_pulls.inc()
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"pull:{record.id}")

    async def _set_state(self, job: _Job, state: PullState, message: str = "") -> None:
        job.record.state = state
        job.record.state_message = message
        job.message = message
        await self._persist(job)
        self._publish(job, self._event(job, message))
        job.last_emit = time.monotonic()

    async def _persist(self, job: _Job) -> None:
        self._touch(job.record)
        job.last_persist = time.monotonic()
        await self._store_call(self._store.save, job.record.model_copy(deep=True))

    @staticmethod
    def _touch(record: PullRecord) -> None:
        record.updated_at = datetime.now(UTC)
        record.etag = hashlib.sha256(
            f"{record.id}|{record.updated_at.isoformat()}|{record.state}".encode()
        ).hexdigest()[:16]

    async def _run(self, job: _Job) -> None:
        record = job.record
        kind = _kind_label(job.spec)
        model_was_ready = False
        outcome = PullState.FAILED
        try:
            await self._persist(job)
            self._publish(job, self._event(job))
            async with self._slots:
                self._check_cancel(job)
                await self._set_state(job, PullState.RESOLVING)
                resolution = await asyncio.to_thread(
                    self._resolve, job.spec, record.options, self._ctx
                )
                self._check_cancel(job)
                self._record_resolution(job, resolution)
                note = (
                    f"chose {resolution.chosen_file}: {resolution.choice_reason}"
                    if resolution.chosen_file
                    else ""
                )
                await self._set_state(job, PullState.RESOLVING, note)
                model, model_was_ready = await self._register_start(job, resolution)
                if model is not None:
                    model = await self._record_config_folder(job, resolution, model)
                    await self._finish(job, model)
                    outcome = PullState.SUCCEEDED
                    return
                results = await self._download_all(job, resolution)
                await self._set_state(
                    job,
                    PullState.VERIFYING,
                    f"{len(results)} file(s) complete and verified (sha256)",
                )
                config_folder = await self._fetch_single_file_configs(job, resolution)
                await self._set_state(job, PullState.REGISTERING)
                ready = await self._register_ready(job, resolution, results, config_folder)
                await self._finish(job, ready)
                outcome = PullState.SUCCEEDED
        except (RbeeError, asyncio.CancelledError) as exc:
            outcome = await self._fail(job, exc, model_was_ready)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:  # a bug: the caller gets INTERNAL, the log gets the traceback
            logger.exception("%s failed unexpectedly", record.name)
            internal = RbeeError(
                f"internal error in {record.name}; see the provisioner log", reason="INTERNAL"
            )
            del exc
            outcome = await self._fail(job, internal, model_was_ready)
        finally:
            if self._metrics is not None:
                self._metrics.active_pulls.dec()
                self._metrics.pull_duration.labels(kind, outcome.value).observe(
                    time.monotonic() - job.started
                )

    def _check_cancel(self, job: _Job) -> None:
        if job.cancel.is_set():
            raise Cancelled(f"{job.record.name} was cancelled", reason="CANCELLED")

    def _record_resolution(self, job: _Job, resolution: Resolution) -> None:
        record = job.record
        record.resolved_source = resolution.source
        record.chosen_file = resolution.chosen_file
        record.choice_reason = resolution.choice_reason
        previous = {f.path: f for f in record.files}
        files: list[PullFileRecord] = []
        for planned in resolution.planned:
            old = previous.get(planned.path)
            files.append(
                PullFileRecord(
                    path=planned.path,
                    state=PullFileState.CACHED if planned.cached else PullFileState.PENDING,
                    done=(planned.size or 0) if planned.cached else 0,
                    total=planned.size,
                    expected_sha256=planned.sha256 or "",
                    sha256=(old.sha256 if old else "") or (planned.sha256 or ""),
                    local_path=str(planned.link or planned.dest),
                    partial_path=str(planned.partial),
                )
            )
        record.files = files

    async def _register_start(self, job: _Job, resolution: Resolution) -> tuple[Model | None, bool]:
        """Create the catalog model DOWNLOADING (or find it). Returns (done model, was READY).

        A model already READY for this source, with its files present, ends the pull at once
        (unless `force`); a local source without copy is registered READY directly.
        """
        options = job.record.options
        display = options.display_name or resolution.display_name
        if not resolution.planned:  # local, in place: nothing to fetch
            await self._set_state(job, PullState.REGISTERING)
            try:
                model = await self._catalog.create_model(
                    model_id=resolution.model_id(options.model_id),
                    source=resolution.source,
                    paths=resolution.model_paths,
                    state=ModelState.READY,
                    display_name=display,
                    labels=options.labels,
                )
            except AlreadyExists as exc:
                existing = await self._catalog.get_model(exc.resource_name)
                if existing is None:
                    raise
                model = existing
            job.record.model = model.name
            return model, False
        try:
            model = await self._catalog.create_model(
                model_id=resolution.model_id(options.model_id),
                source=resolution.source,
                paths=resolution.model_paths,
                state=ModelState.DOWNLOADING,
                display_name=display,
                labels=options.labels,
                state_message=f"downloading ({job.record.name})",
            )
            job.record.model = model.name
            return None, False
        except AlreadyExists as exc:
            existing = await self._catalog.get_model(exc.resource_name)
            if existing is None:
                raise
        job.record.model = existing.name
        all_present = await asyncio.to_thread(lambda: all(Path(p).exists() for p in existing.paths))
        if (
            existing.state is ModelState.READY
            and all_present
            and not options.force
            and all(p.cached for p in resolution.planned)
        ):
            return existing, True
        was_ready = existing.state is ModelState.READY
        if not was_ready:
            await self._catalog.update_model(
                existing.name,
                state=ModelState.DOWNLOADING,
                state_message=f"downloading ({job.record.name})",
            )
        return None, was_ready

    async def _download_all(self, job: _Job, resolution: Resolution) -> list[FileResult]:
        """Every planned file, up to `parallel_files` at once (each its own connection, sha256
        and disk writes: a many-file model is not bound by one stream's hash or one
        connection's rate), under one bandwidth limit for the pull. The first file that fails
        stops the others (their partials are kept) and is the pull's error. Results come in
        the planned order."""
        record = job.record
        settings = self._transfer_settings(record.options.bandwidth_limit)
        bucket = TokenBucket.for_limit(settings.bandwidth_limit)
        await asyncio.to_thread(_check_free_space, resolution)
        at_once = max(1, min(self._parallel_files, len(resolution.planned)))
        gate = asyncio.Semaphore(at_once)
        # The files at once share one file's buffer memory: a pull's footprint stays flat.
        settings = replace(
            settings, buffer_bytes=max(MIN_PARALLEL_BUFFER, settings.buffer_bytes // at_once)
        )

        async def one(index: int, planned: PlannedFile) -> FileResult:
            async with gate:
                self._check_cancel(job)
                return await self._download_one(job, index, planned, settings, bucket)

        tasks = [
            asyncio.create_task(one(index, planned), name=f"{record.name} file {index}")
            for index, planned in enumerate(resolution.planned, start=1)
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            if not all(task.done() for task in tasks):
                # A file failed, or this pull is being cancelled: stop the rest, within the
                # transfer's cancel poll, and wait for their threads to let go of the files.
                job.cancel.set()
                await asyncio.wait(tasks)
            failed = [
                error
                for task in tasks
                if not task.cancelled() and (error := task.exception()) is not None
            ]
        job.file_index = 0
        if failed:
            # The root cause, not the Cancelled its siblings ended with.
            first = next((e for e in failed if not isinstance(e, Cancelled)), failed[0])
            raise first
        return [task.result() for task in tasks]

    async def _download_one(
        self,
        job: _Job,
        index: int,
        planned: PlannedFile,
        settings: TransferSettings,
        bucket: TokenBucket | None,
    ) -> FileResult:
        loop = asyncio.get_running_loop()
        entry = job.record.files[index - 1]
        job.file_index = index
        if not planned.cached:
            entry.state = PullFileState.DOWNLOADING
        await self._set_state(job, PullState.DOWNLOADING)
        result = await asyncio.to_thread(
            self._download,
            planned,
            credentials=self._credentials,
            settings=settings,
            cancel=job.cancel,
            on_progress=lambda done, total, reused: loop.call_soon_threadsafe(
                self._on_progress, job, index, done, total, reused
            ),
            on_message=lambda text: loop.call_soon_threadsafe(self._on_message, job, text),
            bucket=bucket,
        )
        entry.state = PullFileState.CACHED if planned.cached else PullFileState.DONE
        entry.done = result.size
        entry.total = result.size
        entry.sha256 = result.sha256
        # Its last bytes may have fallen in the progress throttle: say it is complete.
        job.file_index = index
        self._publish(job, self._event(job))
        if self._metrics is not None and result.transferred:
            self._metrics.bytes_downloaded.labels(_kind_label(job.spec)).inc(result.transferred)
        await self._persist(job)
        return result

    async def _record_config_folder(self, job: _Job, resolution: Resolution, model: Model) -> Model:
        """For a model that needed no download (already READY, or registered in place): fetch
        its single-file configs and record their folder when it has no usable one yet."""
        recorded = model.config_folder
        usable: bool = bool(recorded) and await asyncio.to_thread(_has_model_index, recorded)
        if usable:
            return model
        folder = await self._fetch_single_file_configs(job, resolution)
        if folder is None or folder == recorded:
            return model
        try:
            return await self._catalog.update_model(
                model.name,
                state=model.state,
                state_message=model.state_message,
                config_folder=folder,
            )
        except RbeeError as exc:  # the model is good as it is: as a failed fetch, not fatal
            logger.warning(
                "%s: cannot record %s for %s: %s", job.record.name, folder, model.name, exc
            )
            self._on_message(job, f"could not record the config folder {folder} ({exc})")
            return model

    async def _fetch_single_file_configs(self, job: _Job, resolution: Resolution) -> str | None:
        """Fetch the configs a single-file image checkpoint loads with (module docstring).
        Returns the absolute snapshot folder they are in (what the catalog records as the
        model's config_folder); None when the model needs none or the fetch failed."""
        if len(resolution.model_paths) != 1:
            return None
        path = Path(resolution.model_paths[0])
        if path.suffix.lower() != ".safetensors":
            return None
        try:
            metadata = await asyncio.to_thread(inspect_path, path)
        except RbeeError:
            return None  # the catalog's inspection at registration reports it
        family = metadata.family
        if metadata.model_type is not ModelType.IMAGE or family not in SINGLE_FILE_CONFIG_REPOS:
            return None
        repo = SINGLE_FILE_CONFIG_REPOS[family]
        await self._set_state(
            job, PullState.DOWNLOADING, f"fetching the {family} configs from {repo} (no weights)"
        )
        settings = self._transfer_settings(job.record.options.bandwidth_limit)
        try:
            planned = await asyncio.to_thread(
                resolve_config_files, repo, SINGLE_FILE_CONFIG_PATTERNS, self._ctx
            )
            for index, file in enumerate(planned, start=1):
                self._check_cancel(job)
                await asyncio.to_thread(
                    self._download,
                    file,
                    credentials=self._credentials,
                    settings=settings,
                    cancel=job.cancel,
                    on_progress=lambda _done, _total, _reused: None,  # a few KB each
                    on_message=lambda _text: None,
                )
                self._on_message(
                    job, f"{family} configs from {repo}: {index}/{len(planned)} ({file.path})"
                )
        except Cancelled:
            raise
        except RbeeError as exc:
            logger.warning(
                "%s: cannot fetch the %s configs from %s: %s", job.record.name, family, repo, exc
            )
            self._on_message(
                job,
                f"could not fetch the {family} configs from {repo} ({exc}); workers need them "
                "to load this single file",
            )
            return None
        # The snapshot folder (HF layout: snapshots/COMMIT/model_index.json, the other files
        # beside it), resolved to an absolute path: the worker reads it as is, whatever its own
        # HF cache is.
        index_link = next((f.link for f in planned if f.path == "model_index.json"), None)
        if index_link is None:
            return None
        folder = str(index_link.parent.absolute())
        return folder if await asyncio.to_thread(_has_model_index, folder) else None

    def _on_progress(
        self, job: _Job, index: int, done: int, total: int | None, reused: int
    ) -> None:
        entry = job.record.files[index - 1]
        job.file_index = index  # with files in parallel: the one that moved last
        entry.done = done
        if total is not None:
            entry.total = total
        entry.reused = reused
        now = time.monotonic()
        job.samples.append((now, job.record.done_bytes))
        while job.samples and now - job.samples[0][0] > RATE_WINDOW and len(job.samples) > 2:
            job.samples.popleft()
        if now - job.last_emit >= PROGRESS_INTERVAL:
            job.last_emit = now
            self._publish(job, self._event(job))
        if now - job.last_persist >= PERSIST_INTERVAL:
            job.last_persist = now
            snapshot = job.record.model_copy(deep=True)
            asyncio.get_running_loop().run_in_executor(self._store_io, self._store.save, snapshot)

    def _on_message(self, job: _Job, text: str) -> None:
        job.message = text
        self._publish(job, self._event(job, text))

    async def _register_ready(
        self,
        job: _Job,
        resolution: Resolution,
        results: list[FileResult],
        config_folder: str | None,
    ) -> Model:
        size = sum(r.size for r in results)
        sha256 = results[0].sha256 if len(results) == 1 else ""
        return await self._catalog.update_model(
            job.record.model,
            state=ModelState.READY,
            state_message="",
            paths=resolution.model_paths,
            size_bytes=size,
            sha256=sha256,
            source=resolution.source,
            config_folder=config_folder,
        )

    async def _finish(self, job: _Job, model: Model) -> None:
        record = job.record
        record.model = model.name
        record.ended_at = datetime.now(UTC)
        await self._set_state(job, PullState.SUCCEEDED, f"{model.name} is ready")
        job.end = _End(model=model)
        self._publish(job, job.end)
        logger.info("%s succeeded: %s", record.name, model.name)

    async def _fail(self, job: _Job, exc: BaseException, model_was_ready: bool) -> PullState:
        record = job.record
        if job.shutdown or (isinstance(exc, asyncio.CancelledError) and self._closing):
            state = PullState.PAUSED
            error: RbeeError = Unavailable(
                f"{record.name} was interrupted: the provisioner is stopping; it resumes from "
                "the bytes on disk when the provisioner starts again",
                reason="UNAVAILABLE",
            )
            message = "interrupted by the provisioner stopping; resumable"
        elif isinstance(exc, Cancelled | asyncio.CancelledError) or (
            job.cancel.is_set() and isinstance(exc, RbeeError) and exc.reason == "CANCELLED"
        ):
            state = PullState.CANCELLED
            message = job.cancel_reason or "cancelled"
            error = Cancelled(
                f"{record.name}: {message}; pull again to resume from the bytes on disk",
                reason="CANCELLED",
            )
        else:
            assert isinstance(exc, RbeeError)
            state = PullState.FAILED
            error = exc
            message = exc.message
            if self._metrics is not None:
                self._metrics.pull_failures.labels(exc.reason).inc()
        for entry in record.files:
            if entry.state is PullFileState.DOWNLOADING:
                entry.state = (
                    PullFileState.PENDING if state is not PullState.FAILED else PullFileState.FAILED
                )
        record.error = error_record(error)
        record.ended_at = datetime.now(UTC) if state is not PullState.PAUSED else None
        if record.model and not model_was_ready and state is not PullState.PAUSED:
            with contextlib.suppress(RbeeError):
                await self._catalog.update_model(
                    record.model,
                    state=ModelState.FAILED,
                    state_message=f"{record.name}: {message}",
                )
        job.file_index = 0
        await self._set_state(job, state, message)
        job.end = _End(error=error)
        self._publish(job, job.end)
        logger.info("%s ended %s: %s", record.name, state.value, message)
        return state

    # --- validate_only ------------------------------------------------------------------------

    async def _validate_only(
        self, spec: SourceSpec, source: str, options: PullOptions
    ) -> AsyncIterator[PullItem]:
        pull_name = f"pulls/{pull_id_for(spec, options)}"
        yield PullEvent(pull=pull_name, state=PullState.RESOLVING, message="validate only")
        resolution = await asyncio.to_thread(self._resolve, spec, options, self._ctx)
        await asyncio.to_thread(_check_free_space, resolution)
        total = resolution.total_bytes
        yield PullEvent(
            pull=pull_name,
            state=PullState.RESOLVING,
            file_count=len(resolution.planned),
            total_total=total,
            message=(
                f"chose {resolution.chosen_file}: {resolution.choice_reason}"
                if resolution.chosen_file
                else f"{len(resolution.planned)} file(s), {total} bytes"
            ),
        )
        model = await self._catalog.create_model(
            model_id=resolution.model_id(options.model_id),
            source=resolution.source,
            paths=resolution.model_paths,
            state=ModelState.READY if not resolution.planned else ModelState.DOWNLOADING,
            display_name=options.display_name or resolution.display_name,
            labels=options.labels,
            validate_only=True,
        )
        yield model


def _has_model_index(folder: str) -> bool:
    """Whether `folder` holds a model_index.json (a config folder worth recording)."""
    return (Path(folder) / "model_index.json").is_file()


def _check_free_space(resolution: Resolution) -> None:
    """Room for every byte the pull has still to write (files at once: their sum)."""
    needed = sum(
        max(0, (p.size or 0) - p.partial_bytes()) for p in resolution.planned if not p.cached
    )
    if needed <= 0:
        return
    directory = resolution.planned[0].dest.parent
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ResourceExhausted(
            f"not enough free space in {probe}: the pull needs {needed} bytes, {free} are free",
            reason="DISK_FULL",
        )


def _discard_partials(record: PullRecord) -> None:
    for entry in record.files:
        if entry.partial_path:
            with contextlib.suppress(OSError):
                Path(entry.partial_path).unlink()
        if entry.state is not PullFileState.DONE and entry.state is not PullFileState.CACHED:
            entry.done = 0
            entry.reused = 0


def _kind_label(spec: SourceSpec) -> str:
    if isinstance(spec, HfSpec):
        return SourceKind.HUGGINGFACE.value
    if isinstance(spec, CivitaiSpec):
        return SourceKind.CIVITAI.value
    if isinstance(spec, UrlSpec):
        return SourceKind.URL.value
    assert isinstance(spec, LocalSpec)
    return SourceKind.LOCAL.value


# --- ListPulls filter and order --------------------------------------------------------------

_FILTER_FIELDS = ("state", "source", "model")


def _parse_pull_filter(text: str) -> dict[str, str]:
    """`field=value` terms joined by AND; fields state, source, model."""
    return parse_equality_filter(
        text,
        fields=_FILTER_FIELDS,
        enums={
            "state": ({s.value for s in PullState}, "pull_state_"),
            "source": ({k.value for k in SourceKind}, "source_kind_"),
        },
        example="state=downloading AND source=huggingface",
    )


def _matches(record: PullRecord, terms: dict[str, str]) -> bool:
    if "state" in terms and record.state.value != terms["state"]:
        return False
    if "source" in terms:
        try:
            kind = _kind_label(parse_source(record.source))
        except RbeeError:
            return False
        if kind != terms["source"]:
            return False
    if "model" in terms:
        want = terms["model"]
        if record.model not in (want, f"models/{want}"):
            return False
    return True


def _order_key(record: PullRecord) -> tuple[float, str]:
    # Newest first: negate the creation time; the id breaks ties.
    return (-record.created_at.timestamp(), record.id)
