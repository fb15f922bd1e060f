"""Install jobs: build a worker backend from its recipe, one job per worker type, watchable.

An install job (`install-jobs/{id}`) runs one build (services.provisioner.recipes.build) as an
asyncio task. Like a pull (services.provisioner.pulls) it outlives its caller: a second caller
installing the same worker type while a job runs attaches to it and sees the same events; a
caller that leaves cancels the job only when it was the last one watching; `cancel` stops the
build's whole process group within a second.

Callers see a stream: a snapshot event at once, events at every phase change and for build
output (log lines batched, a few events per second), then exactly one terminal item: the
Install, or the error the job failed with (raised).

Before any job exists, `install` checks the worker type, the options, the recipe (read by bash,
RECIPE_INVALID / RECIPE_NOT_FOUND) and the platform (UNSUPPORTED_PLATFORM): those failures are
raised by the `install` call itself, and nothing runs.

Records: every job's record is persisted as JSON under RBEE_HOME/provisioner/install-jobs/ at
each state change (atomic writes, as the pull records). Builds are not resumable: a job found
running at start-up (the provisioner was killed) becomes FAILED ("interrupted"), and leftover
staging and work directories are removed.

Registration: the manager calls `register(install)` (the lead passes the catalog's
CreateInstall) after the install directory is in place; when that fails the directory is
removed again and the job fails. Each install directory also holds `rbee-install.json`, so
`installed()` can list installs from disk (e.g. to register them again at start-up).

`system_installs()` reports the environment the services run in as one install per worker type
whose backend imports there (`system-<worker type>`; path empty).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import platform as platform_module
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from services.catalog.domain import ID_PATTERN, DeviceKind, Install
from services.catalog.ids import slugify
from services.catalog.pagination import (
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    page_in_memory,
)
from services.catalog.worker_types import (
    build_worker_types,
    detect_device_kinds,
    host_platform,
    host_supports,
)
from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RbeeError,
    Unavailable,
)
from services.common.list_filter import parse_equality_filter
from services.provisioner.domain import PullError
from services.provisioner.pulls import error_from_record, error_record
from services.provisioner.recipes.build import (
    LOG_TAIL,
    MANIFEST_FILE,
    STAGING_DIR,
    BuildCallbacks,
    BuildRequest,
    CancelToken,
    InstallPhase,
    LogLine,
    LogStream,
    RecipeBuilder,
    validate_build_env,
)
from services.provisioner.recipes.pkgbuild import Recipe, RecipeBook, validate_recipe_name

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.2  # seconds between log-line events (phase changes are sent at once)
CANCEL_WAIT = 5.0
WATCH_QUEUE = 512
SYSTEM_INSTALL_PREFIX = "system-"


class InstallJobState(StrEnum):
    QUEUED = "queued"
    FETCHING = "fetching"
    PREPARING = "preparing"
    BUILDING = "building"
    CHECKING = "checking"
    PACKAGING = "packaging"
    REGISTERING = "registering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (
            InstallJobState.SUCCEEDED,
            InstallJobState.FAILED,
            InstallJobState.CANCELLED,
        )


class InstallOptions(BaseModel):
    """How an install runs (every field optional; mirrors rbee.provisioner.v1.InstallOptions)."""

    force: bool = False
    validate_only: bool = False
    recipe: str = ""  # recipes/{id} or an id; empty = the worker type's recipe
    install_id: str = ""
    skip_check: bool = False
    build_env: dict[str, str] = Field(default_factory=dict)


class InstallJobRecord(BaseModel):
    """An install job (`install-jobs/{id}`), persisted as JSON under RBEE_HOME."""

    id: str
    worker_type: str  # worker type id
    recipe: str  # recipes/{id}
    options: InstallOptions = Field(default_factory=InstallOptions)
    state: InstallJobState = InstallJobState.QUEUED
    state_message: str = ""
    log_tail: list[LogLine] = Field(default_factory=list)
    error: PullError | None = None  # the status the stream ended with (same shape as pulls')
    install: str = ""  # installs/{id} when it succeeded
    watcher_count: int = 0
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None

    @property
    def name(self) -> str:
        return f"install-jobs/{self.id}"


@dataclass(frozen=True)
class InstallEvent:
    """One progress event of an install job."""

    install_job: str  # install-jobs/{id}
    state: InstallJobState
    log_lines: tuple[LogLine, ...] = ()
    fetch_done: int = 0
    fetch_total: int | None = None
    message: str = ""


InstallItem = InstallEvent | Install
Register = Callable[[Install], Awaitable[Install]]

_PHASE_STATE = {
    InstallPhase.FETCHING: InstallJobState.FETCHING,
    InstallPhase.PREPARING: InstallJobState.PREPARING,
    InstallPhase.BUILDING: InstallJobState.BUILDING,
    InstallPhase.CHECKING: InstallJobState.CHECKING,
    InstallPhase.PACKAGING: InstallJobState.PACKAGING,
    InstallPhase.REGISTERING: InstallJobState.REGISTERING,
}


def parse_worker_type(name: str, field_name: str = "worker_type") -> str:
    """`worker-types/{id}` or a bare id -> the id; INVALID_ARGUMENT otherwise."""
    worker_type = name.removeprefix("worker-types/")
    if not worker_type or not ID_PATTERN.fullmatch(worker_type):
        raise InvalidArgument.for_field(
            field_name, f"expected worker-types/{{worker_type}}, got {name[:100]!r}"
        )
    return worker_type


def parse_install_job_name(name: str, field_name: str = "name") -> str:
    job_id = name.removeprefix("install-jobs/") if name.startswith("install-jobs/") else ""
    if not job_id or not ID_PATTERN.fullmatch(job_id):
        raise InvalidArgument.for_field(
            field_name, f"expected install-jobs/{{install_job}}, got {name[:100]!r}",
            reason="INVALID_NAME",
        )  # fmt: skip
    return job_id


def default_install_id(worker_type: str, recipe: Recipe) -> str:
    """`<worker type>-<pkgver>-<pkgrel>` as a slug (e.g. cpu-llm-0-3-36-1)."""
    return slugify(f"{worker_type}-{recipe.pkgbuild.pkgver}-{recipe.pkgbuild.pkgrel}")[:63].strip(
        "-"
    )


class InstallJobStore:
    """One JSON file per job; each write atomic (temp file, fsync, rename)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def load_all(self) -> list[InstallJobRecord]:
        if not self._dir.is_dir():
            return []
        records: list[InstallJobRecord] = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                records.append(InstallJobRecord.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError, ValueError) as exc:
                logger.warning("skipping unreadable install job record %s: %s", path.name, exc)
        return records

    def save(self, record: InstallJobRecord) -> None:
        if not ID_PATTERN.fullmatch(record.id):
            raise ValueError(f"not a job id: {record.id!r}")
        self._dir.mkdir(parents=True, exist_ok=True)
        data = record.model_dump_json(indent=1).encode("utf-8")
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=f".{record.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._dir / f"{record.id}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@dataclass
class _End:
    install: Install | None = None
    error: RbeeError | None = None


@dataclass
class _Job:
    record: InstallJobRecord
    recipe: Recipe | None = None  # None for finished jobs loaded from disk (never rebuilt)
    install_id: str = ""
    cancel: CancelToken = field(default_factory=CancelToken)
    task: asyncio.Task[None] | None = None
    watchers: set[asyncio.Queue[InstallItem | _End]] = field(default_factory=set)
    pending: list[LogLine] = field(default_factory=list)
    tail: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LOG_TAIL))
    last_emit: float = 0.0
    fetch_done: int = 0
    fetch_total: int | None = None
    end: _End | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class InstallManager:
    """Every install job of this provisioner: start, attach, watch, cancel, list."""

    def __init__(
        self,
        *,
        recipes: RecipeBook,
        home: Path,
        builder: RecipeBuilder | None = None,
        register: Register | None = None,
        max_concurrent: int = 1,
    ) -> None:
        self._recipes = recipes
        self._home = home
        self._installs_dir = home / "installs"
        self._builds_dir = home / "provisioner" / "builds"
        self._store = InstallJobStore(home / "provisioner" / "install-jobs")
        self._builder = builder or RecipeBuilder()
        self._register = register
        self._slots = asyncio.Semaphore(max_concurrent)
        self._jobs: dict[str, _Job] = {}
        self._running_by_type: dict[str, _Job] = {}
        self._tokens = PageTokenCodec(new_secret())
        self._closing = False

    @property
    def installs_dir(self) -> Path:
        return self._installs_dir

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records (unfinished ones become FAILED) and remove crash leftovers."""
        records = await asyncio.to_thread(self._store.load_all)
        for record in records:
            if not record.state.terminal:
                record.state = InstallJobState.FAILED
                record.state_message = "interrupted by a provisioner restart; install again"
                record.error = error_record(
                    Unavailable(
                        f"{record.name} was interrupted by a provisioner restart",
                        reason="UNAVAILABLE",
                    )
                )
                record.ended_at = record.updated_at = datetime.now(UTC)
                await asyncio.to_thread(self._store.save, record)
            self._jobs[record.id] = _Job(record=record)
        await asyncio.to_thread(shutil.rmtree, self._installs_dir / STAGING_DIR, True)
        await asyncio.to_thread(shutil.rmtree, self._builds_dir, True)

    async def close(self) -> None:
        """Cancel every running job and wait for them (their builds are killed)."""
        self._closing = True
        running = [job for job in self._jobs.values() if job.running]
        for job in running:
            job.cancel.set("cancelled: the provisioner is stopping")
        for job in running:
            assert job.task is not None
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(job.task), CANCEL_WAIT)

    # --- queries ------------------------------------------------------------------------------

    def _job(self, name: str) -> _Job:
        job_id = parse_install_job_name(name)
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(
                f"{name} does not exist",
                resource_type="install-job",
                resource_name=name,
                reason="INSTALL_JOB_NOT_FOUND",
            )
        return job

    def get(self, name: str) -> InstallJobRecord:
        """GetInstallJob."""
        return self._job(name).record

    def list(
        self, *, filter_text: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[builtins.list[InstallJobRecord], str, int]:
        """ListInstallJobs: newest first; filter `state=`, `worker_type=` joined by AND."""
        terms = parse_equality_filter(
            filter_text,
            fields=("state", "worker_type"),
            enums={"state": ({s.value for s in InstallJobState}, "install_job_state_")},
            example="state=building AND worker_type=cpu-llm",
        )
        if "worker_type" in terms:
            terms["worker_type"] = terms["worker_type"].removeprefix("worker-types/")
        matching = sorted(
            (
                j.record
                for j in self._jobs.values()
                if all(
                    (j.record.state.value if k == "state" else j.record.worker_type) == v
                    for k, v in terms.items()
                )
            ),
            key=_order_key,
        )
        page, token = page_in_memory(
            matching,
            key=_order_key,
            codec=self._tokens,
            fingerprint=filter_fingerprint(
                "install-jobs", json.dumps(sorted(terms.items())), "new"
            ),
            page_size=page_size,
            page_token=page_token,
        )
        return page, token, len(matching)

    def installed(self) -> builtins.list[Install]:
        """The installs on disk (their rbee-install.json manifests), by id. Blocking."""
        found: builtins.list[Install] = []
        with contextlib.suppress(OSError):
            for entry in sorted(self._installs_dir.iterdir()):
                if not ID_PATTERN.fullmatch(entry.name):
                    continue
                try:
                    install = Install.model_validate_json((entry / MANIFEST_FILE).read_bytes())
                except (OSError, ValidationError, ValueError):
                    continue
                found.append(install.model_copy(update={"path": str(entry)}))
        return found

    # --- starting and attaching ---------------------------------------------------------------

    async def install(
        self, worker_type: str, options: InstallOptions
    ) -> AsyncIterator[InstallItem]:
        """InstallWorker: start (or attach to) the install of `worker_type` and stream it.

        Raises at once (no job, nothing run) for a bad request, a missing or invalid recipe and
        a recipe that does not build on this host (UNSUPPORTED_PLATFORM).
        """
        type_id = parse_worker_type(worker_type)
        validate_build_env(options.build_env)
        if options.install_id and not ID_PATTERN.fullmatch(options.install_id):
            raise InvalidArgument.for_field(
                "options.install_id", "must be a slug: lower-case letters, digits and hyphens"
            )
        recipe_name = options.recipe or type_id
        validate_recipe_name(recipe_name, "options.recipe")
        if self._closing:
            raise Unavailable("the provisioner is shutting down", reason="UNAVAILABLE")
        running = self._running_by_type.get(type_id)
        if running is not None and running.running and not options.validate_only:
            return self._attach(running)
        recipe = await asyncio.to_thread(self._recipes.get, recipe_name)
        if recipe.worker_type != type_id:
            raise InvalidArgument.for_field(
                "options.recipe", f"{recipe.name} builds worker type {recipe.worker_type}, "
                f"not {type_id}",
            )  # fmt: skip
        if not recipe.supported_on_host:
            raise FailedPrecondition(
                f"{recipe.name} does not build on this host: {recipe.unsupported_reason}",
                reason="UNSUPPORTED_PLATFORM",
            )
        install_id = options.install_id or default_install_id(type_id, recipe)
        if options.validate_only:
            return self._validate_only(recipe, install_id)
        # Checked again: another caller may have started one while the recipe was read.
        running = self._running_by_type.get(type_id)
        if running is not None and running.running:
            return self._attach(running)
        now = datetime.now(UTC)
        job_id = f"{type_id}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        record = InstallJobRecord(
            id=job_id,
            worker_type=type_id,
            recipe=recipe.name,
            options=options,
            created_at=now,
            updated_at=now,
        )
        job = _Job(record=record, recipe=recipe, install_id=install_id)
        self._jobs[job_id] = job
        self._running_by_type[type_id] = job
        queue = self._subscribe(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"install:{job_id}")
        return self._stream(job, queue)

    async def watch(self, name: str) -> AsyncIterator[InstallItem]:
        """WatchInstallJob: the events from now on, then the Install (or the job's error)."""
        job = self._job(name)
        if job.running:
            return self._attach(job)
        return self._finished_stream(job)

    async def cancel(self, name: str) -> InstallJobRecord:
        """CancelInstallJob: kill the build's process group, remove staging; CANCELLED."""
        job = self._job(name)
        if not job.running:
            raise FailedPrecondition(
                f"{name} is {job.record.state.value}; nothing to cancel", reason="JOB_FINISHED"
            )
        job.cancel.set("cancelled by CancelInstallJob")
        assert job.task is not None
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(job.task), CANCEL_WAIT)
        return job.record

    # --- streams ------------------------------------------------------------------------------

    def _subscribe(self, job: _Job) -> asyncio.Queue[InstallItem | _End]:
        queue: asyncio.Queue[InstallItem | _End] = asyncio.Queue(maxsize=WATCH_QUEUE)
        job.watchers.add(queue)
        job.record.watcher_count = len(job.watchers)
        return queue

    def _attach(self, job: _Job) -> AsyncIterator[InstallItem]:
        return self._stream(job, self._subscribe(job))

    async def _stream(
        self, job: _Job, queue: asyncio.Queue[InstallItem | _End]
    ) -> AsyncIterator[InstallItem]:
        try:
            yield self._event(job)
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    if item.install is not None:
                        yield item.install
                        return
                    assert item.error is not None
                    raise item.error
                yield item
        finally:
            job.watchers.discard(queue)
            job.record.watcher_count = len(job.watchers)
            if not job.watchers and job.running and not job.cancel.is_set():
                logger.info("%s: the last caller left; cancelling", job.record.name)
                job.cancel.set("cancelled: the last caller left")

    async def _finished_stream(self, job: _Job) -> AsyncIterator[InstallItem]:
        record = job.record
        yield self._event(job)
        if record.state is InstallJobState.SUCCEEDED:
            install = job.end.install if job.end is not None else None
            if install is None:
                install = next((i for i in self.installed() if i.name == record.install), None)
            if install is None:
                raise NotFound(
                    f"{record.name} succeeded but {record.install} is gone; install again",
                    resource_type="install",
                    resource_name=record.install,
                    reason="INSTALL_NOT_FOUND",
                )
            yield install
            return
        if record.error is not None:
            raise error_from_record(record.error)
        raise FailedPrecondition(f"{record.name} is {record.state.value}", reason="JOB_FINISHED")

    def _event(self, job: _Job, message: str = "", lines: tuple[LogLine, ...] = ()) -> InstallEvent:
        return InstallEvent(
            install_job=job.record.name,
            state=job.record.state,
            log_lines=lines,
            fetch_done=job.fetch_done,
            fetch_total=job.fetch_total,
            message=message or job.record.state_message,
        )

    def _publish(self, job: _Job, item: InstallItem | _End) -> None:
        for queue in list(job.watchers):
            if queue.full() and not isinstance(item, _End):
                continue  # a slow reader loses log events; it still gets states and the end
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(item)

    def _flush(self, job: _Job) -> None:
        if job.pending:
            lines, job.pending = tuple(job.pending), []
            job.last_emit = time.monotonic()
            self._publish(job, self._event(job, lines=lines))

    # --- running ------------------------------------------------------------------------------

    async def _set_state(self, job: _Job, state: InstallJobState, message: str = "") -> None:
        self._flush(job)
        record = job.record
        record.state = state
        record.state_message = message
        record.log_tail = list(job.tail)
        record.updated_at = datetime.now(UTC)
        await asyncio.to_thread(self._store.save, record.model_copy(deep=True))
        job.last_emit = time.monotonic()
        self._publish(job, self._event(job, message))

    def _on_log(self, job: _Job, line: LogLine) -> None:
        job.tail.append(line)
        job.pending.append(line)
        if time.monotonic() - job.last_emit >= PROGRESS_INTERVAL:
            self._flush(job)

    def _on_fetch(self, job: _Job, done: int, total: int | None) -> None:
        job.fetch_done, job.fetch_total = done, total
        if time.monotonic() - job.last_emit >= PROGRESS_INTERVAL:
            job.last_emit = time.monotonic()
            self._publish(job, self._event(job))

    async def _flusher(self, job: _Job) -> None:
        # Output that trickles in slowly still reaches callers within PROGRESS_INTERVAL.
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            self._flush(job)

    async def _run(self, job: _Job) -> None:
        record = job.record
        flusher = asyncio.get_running_loop().create_task(self._flusher(job))
        try:
            await self._set_state(job, InstallJobState.QUEUED, "waiting for a build slot")
            async with self._slots:
                if job.cancel.is_set():
                    raise Cancelled(job.cancel.reason, reason="CANCELLED")
                install = await self._existing(job)
                if install is None:
                    install = await self._build(job)
            record.install = install.name
            record.ended_at = datetime.now(UTC)
            await self._set_state(job, InstallJobState.SUCCEEDED, f"{install.name} is installed")
            job.end = _End(install=install)
            self._publish(job, job.end)
            logger.info("%s succeeded: %s", record.name, install.name)
        except (RbeeError, asyncio.CancelledError) as exc:
            await self._fail(job, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:  # a bug: the caller gets INTERNAL, the log gets the traceback
            logger.exception("%s failed unexpectedly", record.name)
            await self._fail(
                job, RbeeError(f"internal error in {record.name}; see the provisioner log")
            )
        finally:
            flusher.cancel()
            if self._running_by_type.get(record.worker_type) is job:
                del self._running_by_type[record.worker_type]

    async def _existing(self, job: _Job) -> Install | None:
        """The install already in place under this id (unless force), ending the job at once."""
        if job.record.options.force:
            return None
        manifest = self._installs_dir / job.install_id / MANIFEST_FILE
        try:
            data = await asyncio.to_thread(manifest.read_bytes)
            install = Install.model_validate_json(data)
        except (OSError, ValidationError, ValueError):
            return None
        await self._set_state(
            job, InstallJobState.REGISTERING, f"installs/{job.install_id} is already installed"
        )
        install = install.model_copy(update={"path": str(manifest.parent)})
        return await self._register(install) if self._register is not None else install

    async def _build(self, job: _Job) -> Install:
        options = job.record.options
        assert job.recipe is not None

        async def on_phase(phase: InstallPhase, message: str) -> None:
            await self._set_state(job, _PHASE_STATE[phase], message)

        request = BuildRequest(
            recipe=job.recipe,
            install_id=job.install_id,
            installs_dir=self._installs_dir,
            work_dir=self._builds_dir / job.record.id,
            build_env=options.build_env,
            skip_check=options.skip_check,
            replace_existing=options.force,
        )
        callbacks = BuildCallbacks(
            on_phase=on_phase,
            on_log=lambda line: self._on_log(job, line),
            on_fetch=lambda done, total: self._on_fetch(job, done, total),
        )
        install = await self._builder.build(request, callbacks, job.cancel)
        if self._register is None:
            return install
        try:
            return await self._register(install)
        except BaseException:
            # Not registered: not installed either (the catalog and the disk agree).
            await asyncio.to_thread(shutil.rmtree, Path(install.path), True)
            raise

    async def _fail(self, job: _Job, exc: BaseException) -> None:
        record = job.record
        if isinstance(exc, Cancelled | asyncio.CancelledError) or job.cancel.is_set():
            state = InstallJobState.CANCELLED
            message = job.cancel.reason or "cancelled"
            error: RbeeError = Cancelled(f"{record.name}: {message}", reason="CANCELLED")
        else:
            assert isinstance(exc, RbeeError)
            state = InstallJobState.FAILED
            error = exc
            message = exc.message.split("\n", 1)[0]
        record.error = error_record(error)
        record.ended_at = datetime.now(UTC)
        await self._set_state(job, state, message)
        job.end = _End(error=error)
        self._publish(job, job.end)
        logger.info("%s ended %s: %s", record.name, state.value, message)

    # --- validate_only ------------------------------------------------------------------------

    async def _validate_only(self, recipe: Recipe, install_id: str) -> AsyncIterator[InstallItem]:
        """Fetch and check every source in a scratch directory, build nothing; yield the Install
        that an install would create (not registered, not on disk)."""
        job_name = f"install-jobs/validate-{recipe.id}"[:76]
        yield InstallEvent(job_name, InstallJobState.FETCHING, message="validate only")
        cancel = CancelToken()
        lines: list[LogLine] = []

        async def on_phase(phase: InstallPhase, message: str) -> None:
            return None

        scratch = self._builds_dir / f"validate-{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread((scratch / "home").mkdir, parents=True)
            (scratch / "src").mkdir()
            await self._builder.fetch(
                recipe,
                scratch / "src",
                home=scratch / "home",
                on_line=lambda kind, text: lines.append(
                    LogLine(time=datetime.now(UTC), stream=kind, text=self._builder.redact(text))
                ),
                callbacks=BuildCallbacks(on_phase=on_phase),
                cancel=cancel,
            )
        finally:
            cancel.set()
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        yield InstallEvent(
            job_name, InstallJobState.FETCHING, tuple(lines), message="sources verified"
        )
        platform, machine = host_platform()
        now = datetime.now(UTC)
        yield Install(
            id=install_id,
            worker_type=recipe.worker_type,
            version=recipe.pkgbuild.version,
            path=str(self._installs_dir / install_id),
            platform=platform,
            cpu_architecture=machine,
            labels={"recipe": recipe.id, "pkgname": recipe.pkgbuild.pkgname},
            created_at=now,
            updated_at=now,
        )


def _order_key(record: InstallJobRecord) -> tuple[float, str]:
    return (-record.created_at.timestamp(), record.id)


# --- the services' own environment as "system" installs --------------------------------------


@dataclass(frozen=True)
class BackendProbe:
    """What imports in an environment: backend versions and the devices they can use."""

    python_version: str = ""
    llama_cpp_version: str = ""  # empty: llama_cpp does not import
    llama_gpu_offload: bool = False
    torch_version: str = ""  # empty: torch + diffusers do not both import
    diffusers_version: str = ""
    torch_cuda: bool = False
    torch_mps: bool = False


# Run in a separate interpreter: importing torch costs hundreds of MB and seconds, which the
# provisioner should not carry for its whole life just to learn a version.
_PROBE_SCRIPT = r"""
import json, platform
out = {"python_version": platform.python_version()}
try:
    import llama_cpp
    out["llama_cpp_version"] = str(llama_cpp.__version__)
    out["llama_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
except Exception:
    pass
try:
    import torch, diffusers
    out["torch_version"] = str(torch.__version__)
    out["diffusers_version"] = str(diffusers.__version__)
    out["torch_cuda"] = bool(torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    out["torch_mps"] = bool(mps is not None and mps.is_available())
except Exception:
    pass
print(json.dumps(out))
"""


def probe_backends(
    python: str = sys.executable, *, environ: Mapping[str, str] | None = None, timeout: float = 120
) -> BackendProbe:
    """Ask `python` which backends import (a subprocess). Blocking. Failures give an empty probe.

    The environment is the services' own minus anything secret-looking.
    """
    source = os.environ if environ is None else environ
    env = {
        k: v
        for k, v in source.items()
        if not any(h in k.upper() for h in ("TOKEN", "SECRET", "PASSWORD", "API_KEY"))
    }
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE_SCRIPT],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        data = json.loads(proc.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        logger.warning("could not probe the backends of %s", python)
        return BackendProbe()
    fields = BackendProbe.__dataclass_fields__
    return BackendProbe(**{k: v for k, v in data.items() if k in fields})


def system_installs(
    probe: BackendProbe | None = None,
    *,
    host: tuple[str, str] | None = None,
    device_kinds: frozenset[DeviceKind] | None = None,
) -> list[Install]:
    """One install (`system-<worker type>`) per worker type whose backend imports in the
    services' environment and whose device kind this host has. Blocking (probes by default)."""
    probe = probe if probe is not None else probe_backends()
    platform, machine = host if host is not None else host_platform()
    kinds = device_kinds if device_kinds is not None else detect_device_kinds(platform, machine)
    now = datetime.now(UTC)
    installs: list[Install] = []
    for wt in build_worker_types():
        if not host_supports(wt, platform, machine) or wt.device_kind not in kinds:
            continue
        if wt.id.endswith("-llm"):
            if not probe.llama_cpp_version:
                continue
            if wt.device_kind is not DeviceKind.CPU and not probe.llama_gpu_offload:
                continue
            backend = f"llama-cpp-python {probe.llama_cpp_version}"
        else:
            if not probe.torch_version or not probe.diffusers_version:
                continue
            if wt.device_kind is DeviceKind.CUDA and not probe.torch_cuda:
                continue
            if wt.device_kind is DeviceKind.METAL and not probe.torch_mps:
                continue
            backend = f"diffusers {probe.diffusers_version}, torch {probe.torch_version}"
        installs.append(
            Install(
                id=f"{SYSTEM_INSTALL_PREFIX}{wt.id}",
                worker_type=wt.id,
                version="system",
                path="",
                backend_version=backend,
                python_version=probe.python_version or platform_module.python_version(),
                platform=platform,
                cpu_architecture=machine,
                labels={"system": "true"},
                created_at=now,
                updated_at=now,
            )
        )
    return installs


__all__ = [
    "BackendProbe",
    "InstallEvent",
    "InstallItem",
    "InstallJobRecord",
    "InstallJobState",
    "InstallJobStore",
    "InstallManager",
    "InstallOptions",
    "LogStream",
    "default_install_id",
    "parse_install_job_name",
    "parse_worker_type",
    "probe_backends",
    "system_installs",
]
