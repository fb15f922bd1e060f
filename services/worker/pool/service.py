"""The worker pool: spawn worker processes per device, supervise them, stop them.

SpawnWorker runs its stages in order: VALIDATING (the model must be READY in the catalog; the
catalog's compatibility rules and memory fit pick the worker type and device: a GPU that fits
fully, else partial offload, else the CPU, as GPUStack does; the pool's own claims on a
device are subtracted from its measured free memory), INSTALLING (this version runs workers in
the environment the pool runs in: the backend must import there), STARTING (`rbee-worker` on a
free loopback port, bound to the device, gated on grpc.health.v1 with a deadline that grows with
the model's size), LOADING (the worker's LoadModel progress), then the READY worker.

Supervision: every worker process is watched; an unexpected exit marks it FAILED with the exit
code and the tail of its stderr, and the restart policy (never / on-failure with doubling
backoff up to a limit) decides what comes next. StopWorker signals only the pool's own child
(SIGTERM: the worker drains, then SIGKILL after the grace). Workers die with the pool: their
process has PR_SET_PDEATHSIG (services.worker.pool.process), so a restarted pool finds no
orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.catalog.domain import (
    ID_PATTERN,
    Backend,
    CompatibilityResult,
    DeviceKind,
    ModelState,
    Verdict,
)
from services.catalog.ids import slugify
from services.catalog.link import CatalogLink
from services.catalog.pagination import (
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    page_in_memory,
)
from services.common.channels import ChannelSecurity
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RbeeError,
    ResourceExhausted,
)
from services.common.list_filter import parse_equality_filter
from services.worker.pool.devices import CUDA_ORDER_ENVIRONMENT, HostDevice
from services.worker.pool.domain import (
    LiveStatus,
    PoolWorker,
    PoolWorkerState,
    RestartMode,
    RestartPolicy,
    SpawnEvent,
    SpawnStage,
    WorkerEventKind,
)
from services.worker.pool.metrics import PoolMetrics
from services.worker.pool.process import LaunchSpec, LineWatch, LogLine, WorkerProcess
from services.worker.pool.provisioner_link import InstallProgressNote, ProvisionerLink
from services.worker.pool.spares import SpareKey, SpareWorkers
from services.worker.pool.worker_link import WorkerLink, load_request
from services.worker.stdout_lines import SERVING as SERVING_LINE

logger = logging.getLogger(__name__)

# Worker types by kind of work: the engine that runs them and the backend it reports.
ENGINES = {"llm": ("llama_cpp", Backend.LLAMA_CPP), "sd": ("diffusers", Backend.DIFFUSERS)}
# The module a backend needs, to tell whether it is installed in this environment.
BACKEND_MODULES = {"llama_cpp": "llama_cpp", "diffusers": "diffusers"}
# Best first: the order in which an "auto" spawn takes what the catalog says.
VERDICT_PREFERENCE = (
    Verdict.FITS_GPU,
    Verdict.PARTIAL_OFFLOAD,
    Verdict.CPU_ONLY,
    Verdict.COMPATIBLE,
)
WATCH_QUEUE = 256
# The end of a STARTING event's message when the worker process is a warm spare.
WARM_START_NOTE = "(from a warm spare)"


@dataclass(frozen=True)
class PoolConfig:
    """What the pool needs from its settings."""

    worker_command: list[str]  # how to run rbee-worker
    catalog_address: str
    home: Path
    logs_dir: Path
    provisioner_address: str = ""  # "" = no provisioner: spawns with preload are refused
    default_grace: float = 10.0
    default_queue: int = 8
    start_timeout_base: float = 60.0  # seconds, plus the model's size over the rate below
    start_read_rate: float = 100e6  # bytes per second assumed for the load deadline
    # May hold the mesh token (RBEE_WORKER_AUTH_TOKEN): kept out of the repr.
    worker_env: dict[str, str] = field(default_factory=dict, repr=False)
    # How the pool calls its workers: its own token and TLS (settings.client_security()).
    worker_security: ChannelSecurity | None = None
    # Warm spares (services.worker.pool.spares): on which kinds of device, and how many at most.
    spare_device_kinds: frozenset[DeviceKind] = frozenset()
    spare_limit: int = 2


@dataclass(frozen=True)
class SpawnRequest:
    model: str
    worker_id: str = ""
    worker_type: str = ""  # "" or "auto"
    device: str = ""  # "" or "auto"
    options_kind: str = ""  # "llm" | "image" | ""
    load_options: bytes = b""  # serialised (worker_link.serialize_load_options)
    context_length: int = 0
    force: bool = False
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    preload: bool = False
    validate_only: bool = False
    reuse: bool = False
    skip_install: bool = False
    queue_capacity: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class _Managed:
    record: PoolWorker
    process: WorkerProcess | None = None
    link: WorkerLink | None = None
    monitor: asyncio.Task[None] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False


def _utcnow() -> datetime:
    return datetime.now(UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_installed(engine: str) -> bool:
    """The engine's backend imports in this environment (the "system" install)."""
    module = BACKEND_MODULES.get(engine)
    return module is None or importlib.util.find_spec(module) is not None


def spawn_event(record: PoolWorker, stage: SpawnStage, message: str, **extra: Any) -> SpawnEvent:
    """A progress event of `record`'s spawn (worker, type and device filled in)."""
    return SpawnEvent(
        worker=record.name,
        stage=stage,
        message=message,
        worker_type=record.worker_type,
        device=record.device,
        **extra,
    )


def _extra(engine: str) -> str:
    return "llm" if engine == "llama_cpp" else "sd"


def _options_kind(engine: str) -> str:
    return "llm" if engine == "llama_cpp" else "image"


def parse_worker_name(name: str, field_name: str = "name") -> str:
    worker_id = name.removeprefix("workers/") if name.startswith("workers/") else ""
    if not worker_id or not ID_PATTERN.fullmatch(worker_id):
        raise InvalidArgument.for_field(
            field_name, f"expected workers/{{worker}}, got {name[:100]!r}", reason="INVALID_NAME"
        )
    return worker_id


class PoolService:
    """Every worker process of this pool."""

    def __init__(
        self,
        *,
        catalog: CatalogLink,
        config: PoolConfig,
        devices: Callable[[], list[HostDevice]],
        metrics: PoolMetrics | None = None,
        provisioner: ProvisionerLink | None = None,
    ) -> None:
        self._metrics = metrics
        self._provisioner = provisioner
        self._catalog = catalog
        self._config = config
        self._detect = devices
        self._workers: dict[str, _Managed] = {}
        self._watchers: set[asyncio.Queue[tuple[WorkerEventKind, PoolWorker]]] = set()
        self._tokens = PageTokenCodec(new_secret())
        self._lock = asyncio.Lock()  # one VALIDATING at a time: claims are checked, then made
        self.spares = SpareWorkers(device_kinds=config.spare_device_kinds, limit=config.spare_limit)
        if metrics is not None:
            metrics.spares.set_function(lambda: self.spares.ready_count)

    # --- devices ------------------------------------------------------------------------------

    async def devices(self) -> list[tuple[HostDevice, int, int, list[str]]]:
        """(device, claimed RAM, claimed VRAM, worker names) for every device of the hive."""
        found = await asyncio.to_thread(self._detect)
        return [(d, *self._claims(d.name), self._names_on(d.name)) for d in found]

    async def device(self, name: str) -> tuple[HostDevice, int, int, list[str]]:
        for entry in await self.devices():
            if entry[0].name == name:
                return entry
        raise NotFound(
            f"{name} is not a device of this hive",
            resource_type="device",
            resource_name=name,
            reason="DEVICE_NOT_FOUND",
        )

    def _claims(self, device: str) -> tuple[int, int]:
        ram = vram = 0
        for m in self._workers.values():
            if m.record.device == device and m.record.state.running:
                ram += m.record.claimed_ram_bytes
                vram += m.record.claimed_vram_bytes
        return ram, vram

    def _names_on(self, device: str) -> list[str]:
        return sorted(
            m.record.name
            for m in self._workers.values()
            if m.record.device == device and m.record.state.running
        )

    # --- queries ------------------------------------------------------------------------------

    def _managed(self, name: str) -> _Managed:
        worker_id = parse_worker_name(name)
        managed = self._workers.get(worker_id)
        if managed is None:
            raise NotFound(
                f"{name} does not exist",
                resource_type="worker",
                resource_name=name,
                reason="WORKER_NOT_FOUND",
            )
        return managed

    async def get(self, name: str) -> PoolWorker:
        managed = self._managed(name)
        await self._refresh(managed)
        return managed.record

    async def _refresh(self, managed: _Managed) -> None:
        """Ask a running worker for its live state (queue, counters, memory, BUSY/READY)."""
        record = managed.record
        if managed.link is None or record.state not in (
            PoolWorkerState.READY,
            PoolWorkerState.BUSY,
            PoolWorkerState.IDLE,
        ):
            return
        with contextlib.suppress(RbeeError):
            live = await managed.link.status()
            record.live = live
            if live.state in (PoolWorkerState.READY, PoolWorkerState.BUSY, PoolWorkerState.IDLE):
                record.state = live.state

    async def list_workers(
        self, *, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[PoolWorker], str, int]:
        terms = _parse_filter(filter_text)
        for managed in list(self._workers.values()):
            await self._refresh(managed)
        matching = sorted(
            (m.record for m in self._workers.values() if _matches(m.record, terms)),
            key=lambda r: r.id,
        )
        page, token = page_in_memory(
            matching,
            key=lambda r: r.id,
            codec=self._tokens,
            fingerprint=filter_fingerprint("workers", json.dumps(sorted(terms.items())), "name"),
            page_size=page_size,
            page_token=page_token,
        )
        return page, token, len(matching)

    # --- spawning -----------------------------------------------------------------------------

    async def spawn(self, request: SpawnRequest) -> AsyncIterator[SpawnEvent | PoolWorker]:
        """Validate now (errors before the stream), then stream the stages."""
        if request.preload and self._provisioner is None:
            raise FailedPrecondition(
                "preload needs the provisioner: set RBEE_POOL_PROVISIONER_ADDRESS",
                reason="DEPENDENCY_UNAVAILABLE",
            )
        if request.worker_id and not ID_PATTERN.fullmatch(request.worker_id):
            raise InvalidArgument.for_field(
                "worker_id", "must be a slug: lower-case letters, digits and hyphens"
            )
        if request.worker_id and request.worker_id in self._workers:
            raise AlreadyExists(
                f"workers/{request.worker_id} already exists",
                resource_type="worker",
                resource_name=f"workers/{request.worker_id}",
                reason="WORKER_ALREADY_EXISTS",
            )
        return self._spawn(request)

    async def _spawn(self, request: SpawnRequest) -> AsyncIterator[SpawnEvent | PoolWorker]:
        async with self._lock:
            record, result, device = await self._validate(request)
            existing = self._reusable(record) if request.reuse else None
            if existing is not None:
                yield spawn_event(
                    existing,
                    SpawnStage.READY,
                    f"reusing {existing.name}",
                )
                yield existing
                return
            yield spawn_event(
                record,
                SpawnStage.VALIDATING,
                f"{record.worker_type} on {record.device}: {result.verdict.value}",
                compatibility=result,
            )
            if request.validate_only:
                yield record
                return
            installed = await self._find_install(record)
            if installed is None and (request.skip_install or self._provisioner is None):
                raise FailedPrecondition(
                    f"no {record.worker_type} backend is installed: `rbee install "
                    f"{record.worker_type.removeprefix('worker-types/')}` builds one, or install "
                    f"the project's `{_extra(record.engine)}` extra where the pool runs",
                    reason="WORKER_TYPE_NOT_INSTALLED",
                )
            managed = _Managed(record=record)
            self._workers[record.id] = managed  # claims count from here on
        self._publish(WorkerEventKind.CREATED, record)
        began = time.monotonic()
        preload: asyncio.Task[tuple[int, int]] | None = None
        try:
            if installed is None:
                async for event in self._install(record):
                    yield event
            else:
                yield spawn_event(record, SpawnStage.INSTALLING, installed)
            if request.preload:
                # Alongside STARTING, not before it: the worker process's start (interpreter,
                # imports) takes about as long as reading a model of a few hundred MB.
                yield spawn_event(
                    record, SpawnStage.PRELOADING, f"preloading {record.model} while it starts"
                )
                preload = asyncio.create_task(self._preload(record), name=f"preload:{record.id}")
            async for event in self._start_and_load(managed, device, preload):
                yield event
        except BaseException as exc:
            if preload is not None:
                preload.cancel()
            message = exc.message if isinstance(exc, RbeeError) else "the spawn was cancelled"
            await self._discard_process(managed, f"spawn failed: {message}")
            if self._metrics is not None:
                self._metrics.spawn_duration.labels("failed").observe(time.monotonic() - began)
            raise
        if self._metrics is not None:
            self._metrics.spawn_duration.labels("succeeded").observe(time.monotonic() - began)
        yield managed.record

    async def _validate(
        self, request: SpawnRequest
    ) -> tuple[PoolWorker, CompatibilityResult, HostDevice]:
        model_name = (
            request.model if request.model.startswith("models/") else f"models/{request.model}"
        )
        model = await self._catalog.get_model(model_name)
        if model is None:
            raise NotFound(
                f"{model_name} is not in the catalog",
                resource_type="model",
                resource_name=model_name,
                reason="MODEL_NOT_FOUND",
            )
        if model.state is not ModelState.READY or model.metadata is None:
            detail = f": {model.state_message}" if model.state_message else ""
            raise FailedPrecondition(
                f"{model_name} is {model.state.value}{detail}; only READY models can be served",
                reason="MODEL_NOT_READY",
            )
        wanted_type = request.worker_type.removeprefix("worker-types/")
        if wanted_type == "auto":
            wanted_type = ""
        all_devices = await asyncio.to_thread(self._detect)
        if request.device and request.device != "auto":
            candidates = [d for d in all_devices if d.name == request.device]
            if not candidates:
                raise NotFound(
                    f"{request.device} is not a device of this hive (devices: "
                    f"{', '.join(d.name for d in all_devices)})",
                    resource_type="device",
                    resource_name=request.device,
                    reason="DEVICE_NOT_FOUND",
                )
        else:
            candidates = sorted(all_devices, key=lambda d: (d.kind is DeviceKind.CPU, d.index))
        options: list[tuple[int, HostDevice, CompatibilityResult]] = []
        refusals: list[str] = []
        too_large: list[tuple[HostDevice, CompatibilityResult]] = []
        # Host RAM is one pool for every device (a partial offload keeps layers there): RAM
        # claims count across devices, VRAM claims per device.
        ram = sum(
            m.record.claimed_ram_bytes for m in self._workers.values() if m.record.state.running
        )
        for device in candidates:
            _, vram = self._claims(device.name)
            results = await self._catalog.evaluate(
                model.metadata,
                device.for_compatibility(claimed_ram=ram, claimed_vram=vram),
                request.context_length,
            )
            for result in results:
                type_id = result.worker_type.removeprefix("worker-types/")
                if not type_id.startswith(f"{device.kind.value}-"):
                    continue
                if wanted_type and type_id != wanted_type:
                    continue
                if result.verdict in VERDICT_PREFERENCE:
                    options.append((VERDICT_PREFERENCE.index(result.verdict), device, result))
                elif result.verdict is Verdict.TOO_LARGE:
                    too_large.append((device, result))
                else:
                    refusals.append(f"{type_id} on {device.name}: {'; '.join(result.reasons)}")
        if options:
            _, device, result = min(options, key=lambda o: (o[0], o[1].kind is DeviceKind.CPU))
        elif too_large and request.force:
            device, result = too_large[0]
        elif too_large:
            device, result = too_large[0]
            raise ResourceExhausted(
                f"{model_name} does not fit {device.name}: "
                + "; ".join(result.reasons)
                + " (spawn with force to try anyway)",
                reason="INSUFFICIENT_MEMORY",
            )
        else:
            wanted = f"worker type {wanted_type}" if wanted_type else "any worker type"
            raise FailedPrecondition(
                f"{model_name} cannot run on {wanted} here: "
                + (" | ".join(refusals) if refusals else "no matching worker type or device"),
                reason="INCOMPATIBLE_MODEL",
            )
        type_id = result.worker_type.removeprefix("worker-types/")
        engine, backend = ENGINES[type_id.rsplit("-", 1)[1]]
        if request.options_kind and request.options_kind != (
            "llm" if engine == "llama_cpp" else "image"
        ):
            raise InvalidArgument.for_field(
                request.options_kind,
                f"{type_id} workers take {_options_kind(engine)} load options",
                reason="WRONG_ENGINE",
            )
        worker_id = request.worker_id or self._new_id(model_name, device)
        now = _utcnow()
        memory = result.memory
        record = PoolWorker(
            id=worker_id,
            device=device.name,
            device_kind=device.kind,
            device_index=device.index,
            worker_type=f"worker-types/{type_id}",
            backend=backend,
            engine=engine,
            model=model_name,
            model_paths=list(model.paths),
            model_size_bytes=model.size_bytes,
            restart_policy=request.restart_policy,
            claimed_ram_bytes=memory.ram_bytes if memory else 0,
            claimed_vram_bytes=memory.vram_bytes if memory else 0,
            queue_capacity=request.queue_capacity or self._config.default_queue,
            labels=dict(request.labels),
            load_options=request.load_options,
            created_at=now,
            updated_at=now,
        )
        return record, result, device

    def _new_id(self, model_name: str, device: HostDevice) -> str:
        base = slugify(
            f"{model_name.removeprefix('models/')[:40]}-{device.name.removeprefix('devices/')}"
        )
        base = base.strip("-")[:55] or "worker"
        n = 1
        while f"{base}-{n}" in self._workers:
            n += 1
        return f"{base}-{n}"

    def _reusable(self, record: PoolWorker) -> PoolWorker | None:
        for managed in self._workers.values():
            other = managed.record
            if (
                other.model == record.model
                and other.device == record.device
                and other.state in (PoolWorkerState.READY, PoolWorkerState.BUSY)
            ):
                return other
        return None

    async def _start_and_load(
        self,
        managed: _Managed,
        device: HostDevice,
        preload: asyncio.Task[tuple[int, int]] | None = None,
    ) -> AsyncIterator[SpawnEvent]:
        record = managed.record
        port = free_port()
        record.endpoint = f"127.0.0.1:{port}"
        command = (
            [record.install_python, "-m", "services.worker"]
            if record.install_python
            else self._config.worker_command
        )
        argv = [
            *command,
            "--engine",
            record.engine,
            "--device",
            device.worker_device,
            "--listen",
            record.endpoint,
            # Each worker serves its own /metrics on an ephemeral loopback port; its
            # InfoService (`rbee status`) says where.
            "--metrics-listen",
            f"{record.endpoint.rpartition(':')[0]}:0",
            "--name",
            record.name,
            "--queue-size",
            str(record.queue_capacity),
            "--catalog",
            self._config.catalog_address,
        ]
        env = {
            **os.environ,
            **self._config.worker_env,
            "RBEE_HOME": str(self._config.home),
            "RBEE_LOG_FORMAT": os.environ.get("RBEE_LOG_FORMAT", "text"),
            # CUDA numbers GPUs fastest first by default, nvidia-smi by PCI bus: the same order
            # everywhere, so devices/cuda-N is the GPU the worker binds.
            **CUDA_ORDER_ENVIRONMENT,
        }
        key = SpareKey.of(command, record.engine, device.worker_device, env)
        try:
            async for event in self._start_process(managed, device, key, argv, env):
                yield event
            async for event in self._load(managed, preload):
                yield event
        finally:
            # The next spawn like this one finds a warm spare (after this one is over).
            self.spares.refill(key, device.kind, env)

    async def _start_process(
        self,
        managed: _Managed,
        device: HostDevice,
        key: SpareKey,
        argv: list[str],
        env: dict[str, str],
    ) -> AsyncIterator[SpawnEvent]:
        """STARTING: the worker process, from a warm spare when there is one, to SERVING."""
        record = managed.record
        self._set_state(record, PoolWorkerState.STARTING, f"starting on {record.endpoint}")
        log_path = self._config.logs_dir / f"{record.id}.log"
        managed.exited = asyncio.Event()
        process = await self.spares.claim(key)
        serving: LineWatch | None = None
        if process is not None:
            serving = process.watch_line(SERVING_LINE)  # before the launch: no line missed
            try:
                await process.send_launch(argv[len(key.command) :], log_path=log_path)
            except OSError as exc:
                logger.info("the warm spare %d is gone (%s): starting afresh", process.pid, exc)
                with contextlib.suppress(Exception):
                    await process.stop(grace=0, force=True)
                serving.cancel()
                process = serving = None
        start = "warm" if process is not None else "cold"
        yield spawn_event(
            record,
            SpawnStage.STARTING,
            f"rbee-worker --engine {record.engine} --device {device.worker_device} "
            f"on {record.endpoint}" + (f" {WARM_START_NOTE}" if process is not None else ""),
        )
        if process is None:
            process = await WorkerProcess.start(LaunchSpec(argv=argv, env=env, log_path=log_path))
        if serving is None:
            serving = process.watch_line(SERVING_LINE)  # no await since the start: none missed
        if self._metrics is not None:
            self._metrics.starts.labels(start).inc()
        managed.process = process
        record.pid = managed.process.pid
        record.started_at = managed.process.started_at
        record.exit_code = None
        managed.monitor = asyncio.get_running_loop().create_task(
            self._watch_exit(managed), name=f"watch:{record.id}"
        )
        managed.link = WorkerLink(record.endpoint, security=self._config.worker_security)
        timeout = self._load_timeout(record)
        try:
            await managed.link.wait_serving(timeout, exited=managed.exited, serving=serving.seen)
        except RbeeError as exc:
            tail = managed.process.stderr_tail_text(lines=10)
            if tail:
                exc.message = f"{exc.message}; stderr tail:\n{tail}"
            raise
        finally:
            serving.cancel()

    async def _load(
        self, managed: _Managed, preload: asyncio.Task[tuple[int, int]] | None
    ) -> AsyncIterator[SpawnEvent]:
        """PRELOADING's end, LOADING, READY: the serving worker loads its model.

        A preload that is still running when the worker serves does not hold the load back:
        both read the same file (the page cache serves whichever comes second), so waiting
        would only put the preload's whole read before the load's (a warm spare serves within
        ~0.1 s, long before a large model is read). Its end is reported before READY."""
        record = managed.record
        assert managed.link is not None
        timeout = self._load_timeout(record)
        if preload is not None and preload.done():
            yield self._preloaded_event(record, preload.result())
            preload = None
        self._set_state(record, PoolWorkerState.LOADING, f"loading {record.model}")
        yield spawn_event(
            record,
            SpawnStage.LOADING,
            f"loading {record.model}",
        )
        # By name only: the worker asks the catalog for the files and for what else the model
        # needs (a single-file checkpoint's recorded config folder), as any client's load does.
        request = load_request(record.model, [], record.load_options)
        async for item in managed.link.load(request, limit_s=timeout):
            if isinstance(item, LiveStatus):
                record.live = item
                continue
            stage, fraction, message = item
            yield spawn_event(
                record,
                SpawnStage.LOADING,
                message,
                load_stage=stage,
                load_fraction=fraction,
            )
        if preload is not None:
            yield self._preloaded_event(record, await preload)
        self._set_state(record, PoolWorkerState.READY, f"serving {record.model}")
        yield spawn_event(
            record,
            SpawnStage.READY,
            f"{record.name} is ready on {record.endpoint}",
        )

    @staticmethod
    def _preloaded_event(record: PoolWorker, progress: tuple[int, int]) -> SpawnEvent:
        done, total = progress
        return spawn_event(
            record,
            SpawnStage.PRELOADING,
            f"{done / 2**20:.0f} of {total / 2**20:.0f} MiB in the page cache",
            preload_done=done,
            preload_total=total,
        )

    def _load_timeout(self, record: PoolWorker) -> float:
        """Health and load deadline: grows with the model's size."""
        return (
            self._config.start_timeout_base + record.model_size_bytes / self._config.start_read_rate
        )

    async def _find_install(self, record: PoolWorker) -> str | None:
        """Where the worker will run from, as a note for the INSTALLING stage (None: nothing is
        installed). A backend built from a recipe (the newest registered install whose
        environment exists) wins; else the pool's own environment when the backend imports
        there (the "system" install)."""
        type_id = record.worker_type.removeprefix("worker-types/")
        installs = await self._catalog.list_installs(type_id)
        for install in sorted(installs, key=lambda i: i.created_at, reverse=True):
            python = Path(install.path) / "venv" / "bin" / "python"
            present: bool = bool(install.path) and await asyncio.to_thread(python.exists)
            if present:
                record.install = install.name
                record.install_python = str(python)
                return f"runs from {install.name} ({install.backend_version or install.version})"
        if backend_installed(record.engine):
            record.install = ""
            record.install_python = ""
            return f"the {record.engine} backend runs in the pool's environment (system install)"
        return None

    async def _install(self, record: PoolWorker) -> AsyncIterator[SpawnEvent]:
        """INSTALLING: the provisioner builds the worker type's backend from its recipe."""
        assert self._provisioner is not None
        type_id = record.worker_type.removeprefix("worker-types/")
        yield spawn_event(record, SpawnStage.INSTALLING, f"installing {type_id} from its recipe")
        async for item in self._provisioner.install(type_id, limit_s=3 * 3600):
            if isinstance(item, InstallProgressNote):
                yield spawn_event(record, SpawnStage.INSTALLING, f"{item.state}: {item.message}")
                continue
            python = Path(item.path) / "venv" / "bin" / "python"
            record.install = item.name
            record.install_python = str(python) if item.path else ""
            yield spawn_event(record, SpawnStage.INSTALLING, f"installed {item.name}")

    async def _preload(self, record: PoolWorker) -> tuple[int, int]:
        """The provisioner warms the model's files into the page cache: (bytes, total)."""
        assert self._provisioner is not None
        limit = self._config.start_timeout_base + record.model_size_bytes / 50e6
        last = (0, 0)
        async for progress in self._provisioner.preload(record.model, limit_s=limit):
            last = progress
        return last

    async def _discard_process(self, managed: _Managed, message: str) -> None:
        managed.stopping = True
        if managed.process is not None and managed.process.returncode is None:
            with contextlib.suppress(Exception):
                await managed.process.stop(grace=0, force=True)
        record = managed.record
        record.state_message = message
        self._set_state(record, PoolWorkerState.FAILED, message)

    # --- supervision --------------------------------------------------------------------------

    async def _watch_exit(self, managed: _Managed) -> None:
        process = managed.process
        assert process is not None
        code = await process.wait()
        managed.exited.set()
        record = managed.record
        record.exit_code = code
        record.pid = 0
        if managed.link is not None:
            await managed.link.close()
            managed.link = None
        if self._metrics is not None:
            self._metrics.exits.labels("expected" if managed.stopping else "unexpected").inc()
        if managed.stopping:
            if record.state is not PoolWorkerState.FAILED:
                self._set_state(record, PoolWorkerState.STOPPED, f"stopped (exit code {code})")
            return
        tail = process.stderr_tail_text(lines=20)
        self._set_state(
            record,
            PoolWorkerState.FAILED,
            f"exited unexpectedly with code {code}" + (f"; stderr tail:\n{tail}" if tail else ""),
        )
        logger.warning("%s exited unexpectedly with code %s", record.name, code)
        policy = record.restart_policy
        if policy.mode is RestartMode.ON_FAILURE and record.restart_count < policy.max_restarts:
            asyncio.get_running_loop().create_task(
                self._restart(managed), name=f"restart:{record.id}"
            )

    async def _restart(self, managed: _Managed) -> None:
        record = managed.record
        record.restart_count += 1
        if self._metrics is not None:
            self._metrics.restarts.inc()
        delay = record.restart_policy.delay(record.restart_count)
        logger.info("%s: restart %d in %.1f s", record.name, record.restart_count, delay)
        await asyncio.sleep(delay)
        if managed.stopping or record.id not in self._workers:
            return
        devices = await asyncio.to_thread(self._detect)
        device = next((d for d in devices if d.name == record.device), None)
        if device is None:
            self._set_state(
                record, PoolWorkerState.FAILED, f"{record.device} is gone; not restarted"
            )
            return
        try:
            async for _event in self._start_and_load(managed, device):
                pass
        except RbeeError as exc:
            await self._discard_process(
                managed, f"restart {record.restart_count} failed: {exc.message}"
            )

    # --- stopping -----------------------------------------------------------------------------

    async def stop(self, name: str, *, grace: float | None, force: bool) -> PoolWorker:
        managed = self._managed(name)
        record = managed.record
        if not record.state.running:
            return record
        managed.stopping = True
        self._set_state(record, PoolWorkerState.STOPPING, "stopping: draining its queue")
        if managed.process is not None and managed.process.returncode is None:
            code = await managed.process.stop(
                grace=self._config.default_grace if grace is None else grace, force=force
            )
            record.exit_code = code
        if managed.monitor is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(managed.monitor), 5)
        if record.state is not PoolWorkerState.STOPPED:
            self._set_state(
                record, PoolWorkerState.STOPPED, f"stopped (exit code {record.exit_code})"
            )
        return record

    async def delete(self, name: str, *, force: bool, allow_missing: bool) -> None:
        try:
            managed = self._managed(name)
        except NotFound:
            if allow_missing:
                return
            raise
        if managed.record.state.running:
            if not force:
                raise FailedPrecondition(
                    f"{name} is running; stop it first or delete with force", reason="JOB_RUNNING"
                )
            await self.stop(name, grace=None, force=False)
        self._workers.pop(managed.record.id, None)
        self._publish(WorkerEventKind.DELETED, managed.record)
        self._count_states()

    async def close(self) -> None:
        """Stop every worker and spare (the pool is going away; they would die with it
        anyway)."""
        running = [m for m in self._workers.values() if m.record.state.running]
        await asyncio.gather(
            self.spares.close(),
            *(self.stop(m.record.name, grace=2.0, force=False) for m in running),
            return_exceptions=True,
        )

    # --- events and logs ----------------------------------------------------------------------

    def _set_state(self, record: PoolWorker, state: PoolWorkerState, message: str) -> None:
        record.state = state
        record.state_message = message
        record.updated_at = _utcnow()
        self._publish(WorkerEventKind.UPDATED, record)
        self._count_states()

    def _count_states(self) -> None:
        if self._metrics is not None:
            self._metrics.count_states([m.record.state for m in self._workers.values()])

    def _publish(self, kind: WorkerEventKind, record: PoolWorker) -> None:
        snapshot = record.model_copy(deep=True)
        for queue in list(self._watchers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait((kind, snapshot))

    async def watch(
        self, *, filter_text: str, send_existing: bool
    ) -> AsyncIterator[tuple[WorkerEventKind, PoolWorker]]:
        terms = _parse_filter(filter_text)
        queue: asyncio.Queue[tuple[WorkerEventKind, PoolWorker]] = asyncio.Queue(WATCH_QUEUE)
        self._watchers.add(queue)
        existing = (
            [m.record.model_copy(deep=True) for m in self._workers.values()]
            if send_existing
            else []
        )
        return self._watch_stream(queue, terms, existing)

    async def _watch_stream(
        self,
        queue: asyncio.Queue[tuple[WorkerEventKind, PoolWorker]],
        terms: dict[str, str],
        existing: Sequence[PoolWorker],
    ) -> AsyncIterator[tuple[WorkerEventKind, PoolWorker]]:
        try:
            for record in sorted(existing, key=lambda r: r.id):
                if _matches(record, terms):
                    yield WorkerEventKind.EXISTING, record
            while True:
                kind, record = await queue.get()
                if _matches(record, terms):
                    yield kind, record
        finally:
            self._watchers.discard(queue)

    async def logs(
        self,
        name: str,
        *,
        follow: bool,
        tail_lines: int,
        stream: str | None,
        since: datetime | None,
    ) -> AsyncIterator[list[LogLine]]:
        managed = self._managed(name)
        process = managed.process
        if process is None:
            raise FailedPrecondition(
                f"{name} has no process output yet", reason="FAILED_PRECONDITION"
            )
        return self._log_stream(process, follow, tail_lines, stream, since)

    async def _log_stream(
        self,
        process: WorkerProcess,
        follow: bool,
        tail_lines: int,
        stream: str | None,
        since: datetime | None,
    ) -> AsyncIterator[list[LogLine]]:
        kept = process.tail(tail_lines, stream=stream, since=since)
        # follow() starts collecting when called: right after tail(), so no line is lost or
        # repeated between the kept ones and the new ones.
        new_lines = process.follow(stream=stream) if follow else None
        for start in range(0, len(kept), 200):
            yield kept[start : start + 200]
        if new_lines is None:
            return
        batch: list[LogLine] = []
        last = time.monotonic()
        async for line in new_lines:
            batch.append(line)
            if len(batch) >= 200 or time.monotonic() - last > 0.1:
                yield batch
                batch, last = [], time.monotonic()
        if batch:
            yield batch


# --- ListWorkers / WatchWorkers filter ---------------------------------------------------------

_FIELDS = ("state", "model", "worker_type", "device", "backend")


def _parse_filter(text: str) -> dict[str, str]:
    """`field=value` terms joined by AND: state, model, worker_type, device, backend, labels.KEY."""
    return parse_equality_filter(
        text,
        fields=_FIELDS,
        enums={"state": ({s.value for s in PoolWorkerState}, "worker_state_")},
        labels=True,
        example="state=ready AND device=devices/cpu",
    )


def _matches(record: PoolWorker, terms: dict[str, str]) -> bool:
    for name, value in terms.items():
        if name == "state" and record.state.value != value:
            return False
        if name == "model" and record.model not in (value, f"models/{value}"):
            return False
        if name == "worker_type" and record.worker_type not in (value, f"worker-types/{value}"):
            return False
        if name == "device" and record.device not in (value, f"devices/{value}"):
            return False
        if name == "backend" and (record.backend.value if record.backend else "") != value.lower():
            return False
        if name.startswith("labels.") and record.labels.get(name.removeprefix("labels.")) != value:
            return False
    return True


def jsonable(record: PoolWorker) -> dict[str, Any]:
    return record.model_dump(mode="json", exclude={"load_options"})
