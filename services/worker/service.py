"""One worker process, transport-neutral: an engine, a state machine, one generation at a time.

The engine's methods block, and it is not thread-safe, so every engine call runs on ONE
dedicated thread (a single-thread executor: llama.cpp and CUDA also prefer a stable thread),
and the service lets one operation in at a time through a turn with a bounded waiting line:

- Generate, Chat, Tokenize and Detokenize take a turn. When one is running, up to
  `queue_size` more wait (FIFO); beyond that a request fails at once with RESOURCE_EXHAUSTED
  (QUEUE_FULL).
- LoadModel and UnloadModel do NOT queue: while anything runs or waits they fail with
  FAILED_PRECONDITION (MODEL_IN_USE). Why: queued requests were accepted against the loaded
  model; swapping it under them would serve them with another model. The pool drains a worker
  before it reloads it.
- Generations arriving while a model loads fail with FAILED_PRECONDITION (MODEL_NOT_LOADED).

Streaming: the engine thread hands each event to the event loop with
`loop.call_soon_threadsafe(queue.put_nowait, event)` as soon as the engine yields it, and the
stream forwards it at once (no batching, no sleeps). A turn is released only when the engine
thread has finished, never earlier, so the next request always starts on an idle engine.

Cancellation: when the caller goes away (the RPC is cancelled or its deadline passes, which
cancels the handler task) the stream's `finally` sets the request's threading.Event; the engine
checks it once per token and stops. `begin_stop()` (SIGTERM) does the same for the running
generation, whose stream then ends with finish reason CANCELLED, and refuses new work with
UNAVAILABLE.

States (WorkerState): IDLE (no model) -> LOADING -> READY <-> BUSY; STOPPING after begin_stop.

Loading (LoadModel), checked before the engine sees anything:
- `paths` given: they are loaded, and `model` (if any) is the name the worker reports.
- only `model`: the catalog (a `ModelCatalog`, e.g. services.catalog.link) is asked for
  it: unknown -> NOT_FOUND (MODEL_NOT_FOUND); not READY -> FAILED_PRECONDITION
  (MODEL_NOT_READY, with its state and state message); catalog unreachable -> UNAVAILABLE
  (DEPENDENCY_UNAVAILABLE); otherwise its paths are loaded under its catalog name. A worker
  without a catalog refuses with FAILED_PRECONDITION naming the setting. The model's recorded
  config folder (a single-file image checkpoint's configs, which the provisioner fetched into
  ITS HF cache) goes to the engine as `recorded_config`, unless the request sets image.config.
- the file is inspected with the catalog's inspector (header only, in a thread) and evaluated
  with the catalog's compatibility rules for THIS worker's type (`{device}-llm|sd`): a verdict
  that the type cannot run it (format, architecture, model type, device, missing components)
  is FAILED_PRECONDITION (INCOMPATIBLE_MODEL) carrying the verdict's reasons; a file that is
  no model is INVALID_ARGUMENT (MODEL_FILE_INVALID / UNSUPPORTED_FILE_FORMAT). Memory fit is
  not checked here (the pool decides where a model fits; too large fails in the engine). The
  engines keep their own checks as a second line. The fake engine (protocol tests, which load
  placeholder files) skips inspection and compatibility: it runs no model file.
- single-file image checkpoints: `image.family` (when given) stands in for a family inspection
  cannot tell (in the compatibility check too), and inspection's family is handed to the
  engine, which loads the file with that family's configs (see engines.diffusers_engine).

Image workers (an ImageEngine) share all of it: GenerateImage takes the same turn, its progress
events travel the same bridge, and a cancelled stream sets the same event, which the engine
checks once per denoising step (it then raises Cancelled). Generate, Chat, Tokenize and
Detokenize on an image worker, and GenerateImage on an LLM worker, are UNIMPLEMENTED
(WRONG_ENGINE) with the worker types to use instead.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from services.catalog.compat import evaluate
from services.catalog.domain import (
    Backend,
    CompatibilityResult,
    DeviceKind,
    Model,
    ModelFormat,
    ModelMetadata,
    ModelState,
    ModelType,
    Verdict,
    WorkerType,
)
from services.catalog.inspect import inspect_path
from services.catalog.worker_types import IMAGE_INPUT_VARIANTS, WorkerTypeRegistry
from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from services.worker.devices import DeviceSpec
from services.worker.engines.base import (
    ChatMessage,
    FinishReason,
    GenerationEvent,
    GenerationResult,
    LlmEngine,
    LlmLoadOptions,
    LoadedModel,
    SamplingParams,
    StoppingCriteria,
    TokenDelta,
)
from services.worker.engines.image_base import (
    ImageEngine,
    ImageLoadOptions,
    ImageParams,
    ImageProgress,
    ImageResult,
)
from services.worker.gpu_memory import GpuMemoryProbe
from services.worker.metrics import FINISH_COMPLETED, FINISH_ERROR, FINISH_REJECTED, WorkerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

MODEL_PREFIX = "models/"
SD_WORKER_TYPES = "cpu-sd, cuda-sd or metal-sd"
LLM_WORKER_TYPES = "cpu-llm, cuda-llm or metal-llm"
# Load progress is forwarded when it moved by at least this much (llama.cpp reports per tensor).
LOAD_PROGRESS_STEP = 0.01
# Where a worker without a catalog is told to configure one (WorkerSettings.catalog_address).
CATALOG_SETTING = "RBEE_WORKER_CATALOG_ADDRESS (or rbee-worker --catalog)"

# Verdicts that say the worker type cannot run the model at all. The memory verdicts
# (fits_gpu, partial_offload, cpu_only, too_large) are not among them: the pool decides where a
# model fits, and a model too large for the memory left fails in the engine with its own error.
INCOMPATIBLE_VERDICTS = frozenset(
    {
        Verdict.UNSUPPORTED_FORMAT,
        Verdict.UNSUPPORTED_ARCH,
        Verdict.UNSUPPORTED_MODEL_TYPE,
        Verdict.UNSUPPORTED_DEVICE,
        Verdict.NEEDS_COMPONENTS,
    }
)


class ModelCatalog(Protocol):
    """What the worker asks of the catalog (services.catalog.link.CatalogLink has it)."""

    async def get_model(self, name: str) -> Model | None:
        """The model `models/{id}`, or None when the catalog has none by that name."""
        ...


def worker_type_id(device: DeviceKind, *, image: bool) -> str:
    """The worker type of a worker on `device`: "cpu-llm", "cuda-sd", "metal-llm", ..."""
    return f"{device.value}-{'sd' if image else 'llm'}"


def _left_to_the_engine(metadata: ModelMetadata, result: CompatibilityResult) -> bool:
    """A diffusers folder whose image family inspection could not name.

    The rules refuse it (no family, no pipeline to choose for a single file), but a folder
    names its own pipeline class in model_index.json, which is all the engine's
    `from_pretrained` needs: e.g. small or custom pipelines whose UNet matches no released
    family. The engine decides (and fails with its own error if it cannot load it). Image-input
    variants (inpaint, depth, ...) are still refused: they cannot run text-to-image.
    """
    return (
        result.verdict is Verdict.UNSUPPORTED_ARCH
        and metadata.format is ModelFormat.DIFFUSERS
        and metadata.model_type is ModelType.IMAGE
        and not metadata.family
        and metadata.variant not in IMAGE_INPUT_VARIANTS
    )


def _with_inspected_family(
    options: ImageLoadOptions, path: Path, metadata: ModelMetadata | None
) -> ImageLoadOptions:
    """`options` with inspection's family for a single file when the request set none: the
    engine picks the single file's configs by family (a folder carries its own)."""
    if options.family or metadata is None or not metadata.family or path.is_dir():
        return options
    return options.model_copy(update={"family": metadata.family})


def with_recorded_config(options: ImageLoadOptions, target: LoadTarget) -> ImageLoadOptions:
    """`options` with the catalog's config folder for the model (`recorded_config`) when the
    request set no image.config and no image.family other than inspection's: the recorded
    folder holds the configs of the family the provisioner's inspection named."""
    inspected_family = target.metadata.family if target.metadata is not None else None
    if not target.config_folder or options.config is not None:
        return options
    if options.family != inspected_family:
        return options
    return options.model_copy(update={"recorded_config": target.config_folder})


def require_compatible(
    metadata: ModelMetadata, worker_type: WorkerType, *, subject: str
) -> CompatibilityResult:
    """The catalog's verdict for `worker_type` running this model (no device: no memory fit).

    Raises FailedPrecondition (INCOMPATIBLE_MODEL) with the verdict's reasons when the worker
    type cannot run the model (INCOMPATIBLE_VERDICTS); `subject` names the model or file in the
    message. The error's metadata carries `verdict` and `worker_type` for clients.
    """
    result = evaluate(metadata, worker_type)
    if result.verdict not in INCOMPATIBLE_VERDICTS or _left_to_the_engine(metadata, result):
        return result
    reasons = " ".join(result.reasons) or result.verdict.value
    raise FailedPrecondition(
        f"{worker_type.id} cannot run {subject} ({result.verdict.value}): {reasons}",
        reason="INCOMPATIBLE_MODEL",
        violations=[
            PreconditionViolation(
                type=result.verdict.value.upper(),
                subject=f"worker-types/{worker_type.id}",
                description=reasons,
            )
        ],
        metadata={"verdict": result.verdict.value, "worker_type": worker_type.id},
    )


class WorkerState(enum.StrEnum):
    """What a worker process reports about itself (a subset of rbee.worker.v1.WorkerState)."""

    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"


class LoadStage(enum.StrEnum):
    CHECKING = "checking"
    UNLOADING = "unloading"
    READING = "reading"
    ALLOCATING = "allocating"
    WARMING_UP = "warming_up"


class OptionsKind(enum.StrEnum):
    """Which engine a LoadModel request's options were written for."""

    LLM = "llm"
    IMAGE = "image"


class LoadRequest(BaseModel):
    """A LoadModel request."""

    model_config = ConfigDict(frozen=True)

    model: str = ""  # `models/{model}` (a bare id is accepted), "" when loaded by path only
    paths: list[str] = Field(default_factory=list)  # empty: the catalog's paths for `model`
    options_kind: OptionsKind | None = None  # None: no options given (defaults)
    options: LlmLoadOptions = Field(default_factory=LlmLoadOptions)
    image_options: ImageLoadOptions = Field(default_factory=ImageLoadOptions)  # image workers
    default_seed: int | None = None  # for requests that set no seed
    chat_template: str = ""  # overrides the model's own for Chat requests that give none


class LoadProgressEvent(BaseModel):
    stage: LoadStage
    fraction: float | None = None
    message: str = ""
    elapsed_s: float = 0.0


class LoadTarget(BaseModel):
    """What a LoadModel request resolved to: the name to report and the files to load."""

    model_config = ConfigDict(frozen=True)

    model: str  # `models/{id}`, "" when loaded by path only
    paths: list[str]
    path: Path  # the one handed to the engine (a split GGUF: its first shard)
    metadata: ModelMetadata | None = None  # None: not inspected (the fake engine)
    config_folder: str = ""  # the catalog's Model.config_folder for a load by name


class LoadedModelInfo(BaseModel):
    """What is loaded, with the request that loaded it."""

    model: str
    paths: list[str]  # as loaded: the request's, or the catalog's for a load by name
    options: LlmLoadOptions
    image_options: ImageLoadOptions | None = None  # set on image workers
    default_seed: int | None = None
    chat_template: str = ""
    engine_model: LoadedModel
    load_time: datetime


class WorkerCounters(BaseModel):
    requests_succeeded: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class WorkerInfo(BaseModel):
    """A snapshot of the worker (GetWorker, and the end of LoadModel / UnloadModel)."""

    name: str
    device: DeviceSpec
    backend: Backend | None  # None: the fake engine
    engine: str
    worker_type: str
    state: WorkerState
    model: str
    loaded: LoadedModelInfo | None
    ram_bytes: int
    vram_bytes: int
    queue_depth: int
    queue_capacity: int
    counters: WorkerCounters
    version: str
    backend_version: str
    start_time: datetime
    update_time: datetime


class GenerationRequest(BaseModel):
    """A Generate request: a raw prompt."""

    model_config = ConfigDict(frozen=True)

    model: str = ""
    prompt: str
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stopping: StoppingCriteria = Field(default_factory=StoppingCriteria)
    add_special: bool = True
    parse_special: bool = False


class ChatGenerationRequest(BaseModel):
    """A Chat request: messages, formatted by the model's (or the given) chat template."""

    model_config = ConfigDict(frozen=True)

    model: str = ""
    messages: list[ChatMessage]
    chat_template: str = ""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stopping: StoppingCriteria = Field(default_factory=StoppingCriteria)


class CompletedGeneration(BaseModel):
    """The final event of a generation stream: the engine's result, plus what the worker adds."""

    result: GenerationResult
    model: str
    queue_seconds: float


StreamEvent = TokenDelta | CompletedGeneration


class ImageGenerationRequest(BaseModel):
    """A GenerateImage request."""

    model_config = ConfigDict(frozen=True)

    model: str = ""
    params: ImageParams


class CompletedImages(BaseModel):
    """The final event of a GenerateImage stream: the engine's result, plus the worker's part."""

    result: ImageResult
    model: str
    queue_seconds: float


ImageStreamEvent = ImageProgress | CompletedImages


def normalize_model_name(model: str) -> str:
    """`models/{id}` for a bare id or a full name; "" stays ""."""
    model = model.strip()
    if not model or model.startswith(MODEL_PREFIX):
        return model
    return MODEL_PREFIX + model


def process_rss_bytes() -> int:
    """The resident set of this process in bytes (best effort; 0 when unknown)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # No /proc (macOS): the peak instead, in bytes there (kilobytes on Linux).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


class _Turns:
    """One holder at a time, with a bounded FIFO waiting line."""

    def __init__(self, capacity: int, on_waiting_changed: Callable[[int], None]) -> None:
        self.capacity = capacity
        self._lock = asyncio.Lock()
        self._on_waiting_changed = on_waiting_changed
        self.waiting = 0

    @property
    def busy(self) -> bool:
        return self._lock.locked() or self.waiting > 0

    async def acquire(self) -> None:
        if self.busy and self.waiting >= self.capacity:
            raise ResourceExhausted(
                f"the worker's queue is full ({self.capacity} waiting behind the running "
                "request); retry later",
                reason="QUEUE_FULL",
            )
        self.waiting += 1
        self._on_waiting_changed(self.waiting)
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
            self._on_waiting_changed(self.waiting)

    def release(self) -> None:
        self._lock.release()


class _Finished:
    """Queued after the last item of an engine-thread job, with the job's error if any."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


Emit = Callable[[object], None]


def _merge_ready_deltas(
    delta: TokenDelta, items: asyncio.Queue[object]
) -> tuple[TokenDelta, object | None]:
    """`delta` joined with the deltas already queued behind it (text, ids and log
    probabilities); also returns the first queued item that is not a delta (to be handled
    next), or None."""
    deltas = [delta]
    held: object | None = None
    while not items.empty():
        queued = items.get_nowait()
        if not isinstance(queued, TokenDelta):
            held = queued
            break
        deltas.append(queued)
    return TokenDelta.joined(deltas), held


class WorkerService:
    """The worker: see the module docstring. Methods are called on the event loop."""

    def __init__(
        self,
        engine: LlmEngine | ImageEngine,
        *,
        device: DeviceSpec,
        engine_name: str,
        queue_size: int,
        metrics: WorkerMetrics,
        name: str = "",
        version: str = "",
        backend_version: str = "",
        catalog: ModelCatalog | None = None,
        worker_types: WorkerTypeRegistry | None = None,
        gpu_memory: GpuMemoryProbe | None = None,
    ) -> None:
        """`catalog`: where LoadModel by name looks models up (None: loads need paths).
        `worker_types`: where this worker's type comes from (default: this host's registry).
        `gpu_memory`: how a CUDA worker measures the device memory it holds (default: this
        process in nvidia-smi's compute apps); unused on the CPU."""
        self._engine = engine
        self._device = device
        self._engine_name = engine_name
        self._metrics = metrics
        self._name = name
        self._version = version
        self._backend_version = backend_version
        backends = {backend.value: backend for backend in Backend}
        self._backend = backends.get(engine.backend)  # None: the fake engine
        self._catalog = catalog
        self._worker_type_id = worker_type_id(device.kind, image=isinstance(engine, ImageEngine))
        # The compatibility rules this worker loads by; None for the fake engine, which runs no
        # model file (protocol tests load placeholder files through it).
        self._worker_type: WorkerType | None = None
        if self._backend is not None:
            registry = worker_types if worker_types is not None else WorkerTypeRegistry()
            self._worker_type = registry.get(self._worker_type_id)
        self._turns = _Turns(queue_size, metrics.queue_depth.set)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loaded: LoadedModelInfo | None = None
        self._loading = False
        self._running = False
        self._stopping = False
        self._closed = False
        self._current_cancel: threading.Event | None = None
        self._counters = WorkerCounters()
        self._gpu_memory: GpuMemoryProbe | None = None
        if device.kind is DeviceKind.CUDA:
            self._gpu_memory = gpu_memory if gpu_memory is not None else GpuMemoryProbe()
            # Measured at scrape time (in the metrics server's thread, cached briefly).
            metrics.track_device_memory(self._gpu_memory.gauge_value)
        self._start_time = datetime.now(UTC)
        self._update_time = self._start_time

    # ---- state -------------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        """The current state (derived, so it can never disagree with the flags)."""
        if self._stopping:
            return WorkerState.STOPPING
        if self._loading:
            return WorkerState.LOADING
        if self._running:
            return WorkerState.BUSY
        if self._loaded is not None:
            return WorkerState.READY
        return WorkerState.IDLE

    @property
    def loaded_model(self) -> LoadedModelInfo | None:
        return self._loaded

    @property
    def counters(self) -> WorkerCounters:
        return self._counters.model_copy()

    @property
    def queue_depth(self) -> int:
        return self._turns.waiting

    async def measure_device_memory(self) -> None:
        """Refresh the GPU memory reading (CUDA workers; nvidia-smi off the event loop, at most
        every couple of seconds), so the next get_worker() reports it."""
        if self._gpu_memory is not None:
            await asyncio.to_thread(self._gpu_memory.measure)

    def get_worker(self) -> WorkerInfo:
        """A snapshot of the worker."""
        loaded = self._loaded
        on_gpu = self._device.kind is not DeviceKind.CPU
        model_bytes = loaded.engine_model.memory_bytes if loaded else 0
        measured = self._gpu_memory.last if self._gpu_memory is not None else None
        return WorkerInfo(
            name=self._name,
            device=self._device,
            backend=self._backend,
            engine=self._engine_name,
            worker_type=self._worker_type_id,
            state=self.state,
            model=loaded.model if loaded else "",
            loaded=loaded,
            ram_bytes=process_rss_bytes(),
            # CUDA: what the driver says this process holds (context, weights, caches); where it
            # cannot be measured, and on Metal, the engine's number for the model.
            vram_bytes=measured if measured is not None else (model_bytes if on_gpu else 0),
            queue_depth=self._turns.waiting,
            queue_capacity=self._turns.capacity,
            counters=self.counters,
            version=self._version,
            backend_version=self._backend_version,
            start_time=self._start_time,
            update_time=self._update_time,
        )

    def _touch(self) -> None:
        self._update_time = datetime.now(UTC)

    @property
    def _is_image(self) -> bool:
        return isinstance(self._engine, ImageEngine)

    def _llm_engine(self, method: str) -> LlmEngine:
        """The LLM engine, or UNIMPLEMENTED (WRONG_ENGINE) on an image worker."""
        engine = self._engine
        if isinstance(engine, ImageEngine):
            raise Unimplemented(
                f"this is an image worker ({self._engine_name} on {self._device}); {method} "
                f"needs an LLM worker: spawn one of the llm worker types ({LLM_WORKER_TYPES})",
                reason="WRONG_ENGINE",
            )
        return engine

    def _refuse_when_stopping(self) -> None:
        if self._stopping:
            raise Unavailable("the worker is stopping", retry_after_seconds=1.0)

    def _refuse_when_busy(self) -> None:
        if self._turns.busy:
            raise FailedPrecondition(
                "the worker is busy (a load, or requests running or queued); retry when it is "
                "READY or IDLE",
                reason="MODEL_IN_USE",
            )

    def _require_model(self, expected: str) -> LoadedModelInfo:
        loaded = self._loaded
        if loaded is None:
            message = (
                "a model is loading; retry when the worker is READY"
                if self._loading
                else ("no model is loaded; call LoadModel first")
            )
            raise FailedPrecondition(message, reason="MODEL_NOT_LOADED")
        expected = normalize_model_name(expected)
        if expected and expected != loaded.model:
            raise FailedPrecondition(
                f"the request expects {expected} but this worker has "
                f"{loaded.model or 'a model loaded by path'} loaded",
                reason="MODEL_MISMATCH",
                metadata={"expected": expected, "loaded": loaded.model},
            )
        return loaded

    # ---- engine thread -----------------------------------------------------------------------

    def _start_job(
        self,
        work: Callable[[Emit], T],
        on_done: Callable[[asyncio.Future[T]], None],
    ) -> asyncio.Queue[object]:
        """Run `work(emit)` on the engine thread; returns the queue of what it emits.

        `on_done(future)` runs on the event loop when the thread has finished (whether or not
        anyone still reads the queue); then a `_Finished` is queued. The caller holds the turn
        and `on_done` releases it.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[object] = asyncio.Queue()
        put = items.put_nowait

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(put, item)

        def finished(future: asyncio.Future[T]) -> None:
            try:
                on_done(future)
            finally:
                error = None if future.cancelled() else future.exception()
                put(_Finished(error))

        # The emits are scheduled before the future's completion (which is also delivered with
        # call_soon_threadsafe, after `work` returned), so _Finished always comes last.
        future = loop.run_in_executor(self._executor, work, emit)
        future.add_done_callback(finished)
        return items

    # ---- load / unload -----------------------------------------------------------------------

    async def load_model(
        self, request: LoadRequest
    ) -> AsyncGenerator[LoadProgressEvent | WorkerInfo, None]:
        """Load a model (replacing the loaded one): progress events, then the worker, READY.

        Everything that can refuse the request (options, catalog lookup, files, compatibility:
        see the module docstring) runs before the first event, so a refusal is the stream's
        status, not an event.
        """
        self._refuse_when_stopping()
        target = await self._check_load_request(request)
        path = target.path
        # After the awaits above: the worker may have started stopping or become busy.
        self._refuse_when_stopping()
        self._refuse_when_busy()
        await self._turns.acquire()  # free (checked above): returns without suspending
        options = request.options
        engine = self._engine
        if self._device.kind is DeviceKind.CPU and options.gpu_layers is None:
            options = options.model_copy(update={"gpu_layers": 0})  # a CPU worker offloads none
        model = target.model
        image_options = with_recorded_config(
            _with_inspected_family(request.image_options, path, target.metadata), target
        )
        cancel = threading.Event()
        started = time.perf_counter()
        had_model = self._loaded is not None
        self._current_cancel = cancel  # begin_stop() aborts a load too
        self._loading = True
        self._loaded = None
        self._touch()

        def work(emit: Emit) -> LoadedModel:
            if had_model:
                emit(LoadProgressEvent(stage=LoadStage.UNLOADING, message="unloading"))
                self._engine.unload()
            last = -1.0

            def progress(fraction: float, message: str) -> None:
                nonlocal last
                if fraction - last >= LOAD_PROGRESS_STEP or fraction >= 1.0 > last:
                    last = fraction
                    stage = LoadStage.READING if fraction < 1.0 else LoadStage.ALLOCATING
                    emit(
                        LoadProgressEvent(
                            stage=stage,
                            fraction=fraction,
                            message=message,
                            elapsed_s=time.perf_counter() - started,
                        )
                    )

            if isinstance(engine, ImageEngine):
                return engine.load(path, image_options, progress=progress, cancel=cancel)
            return engine.load(path, options, progress=progress, cancel=cancel)

        def on_done(future: asyncio.Future[LoadedModel]) -> None:
            self._loading = False
            if self._current_cancel is cancel:
                self._current_cancel = None
            try:
                if not future.cancelled() and future.exception() is None:
                    engine_model = future.result()
                    self._loaded = LoadedModelInfo(
                        model=model,
                        paths=list(target.paths),
                        options=options,
                        image_options=image_options if self._is_image else None,
                        default_seed=request.default_seed,
                        chat_template=request.chat_template,
                        engine_model=engine_model,
                        load_time=datetime.now(UTC),
                    )
                    self._metrics.model_load.observe(time.perf_counter() - started)
                    self._metrics.model_memory.set(engine_model.memory_bytes)
                    logger.info("loaded %s (%s)", model or path, engine_model.name)
                else:
                    self._metrics.model_memory.set(0)
            finally:
                self._turns.release()
                self._touch()

        try:
            items = self._start_job(work, on_done)
        except BaseException:
            self._loading = False
            self._turns.release()
            self._touch()
            raise
        finished = False
        try:
            yield LoadProgressEvent(stage=LoadStage.CHECKING, message=f"loading {path.name}")
            while not isinstance(item := await items.get(), _Finished):
                assert isinstance(item, LoadProgressEvent)
                yield item
            finished = True
        finally:
            if not finished:
                cancel.set()  # the caller went away: the engine aborts the load
        if item.error is not None:
            raise item.error
        await self.measure_device_memory()
        yield self.get_worker()

    async def _check_load_request(self, request: LoadRequest) -> LoadTarget:
        """The request's options, its files (given, or the catalog's), and whether this worker
        type can run them; raises what the module docstring lists."""
        self._check_load_options(request)
        model, paths, where, config_folder = await self._resolve_paths(request)
        path = self._check_paths(paths, where)
        family = request.image_options.family if self._is_image else None
        metadata = await self._check_compatibility(path, model, family=family)
        return LoadTarget(
            model=model, paths=paths, path=path, metadata=metadata, config_folder=config_folder
        )

    def _check_load_options(self, request: LoadRequest) -> None:
        if self._is_image and request.options_kind is OptionsKind.LLM:
            raise InvalidArgument.for_field(
                "llm",
                f"this is an image worker ({self._engine_name}); LLM load options need an LLM "
                f"worker ({LLM_WORKER_TYPES}); send `image` options here",
                reason="WRONG_ENGINE",
            )
        if not self._is_image and request.options_kind is OptionsKind.IMAGE:
            raise InvalidArgument.for_field(
                "image",
                f"this is an LLM worker ({self._engine_name}); image load options need an image "
                f"worker ({SD_WORKER_TYPES}); send `llm` options here",
                reason="WRONG_ENGINE",
            )

    async def _resolve_paths(self, request: LoadRequest) -> tuple[str, list[str], str, str]:
        """(name to report, paths to load, where the paths came from for messages, the
        catalog's config folder for the model: "" when loaded by paths or none recorded)."""
        model = normalize_model_name(request.model)
        if request.paths:
            return model, list(request.paths), "paths", ""  # paths win; the model is the name
        if not model:
            raise InvalidArgument.for_field(
                "paths", "give the model file to load, or `model`, its catalog name"
            )
        if self._catalog is None:
            raise FailedPrecondition(
                f"paths are required to load {model}: this worker has no catalog to look it up "
                f"in (set {CATALOG_SETTING}), or pass the model's files in `paths`"
            )
        found = await self._catalog.get_model(model)
        if found is None:
            raise NotFound(
                f"{model} is not in the catalog",
                resource_type="model",
                resource_name=model,
                reason="MODEL_NOT_FOUND",
            )
        if found.state is not ModelState.READY:
            detail = f": {found.state_message}" if found.state_message else ""
            raise FailedPrecondition(
                f"{found.name} is {found.state.value}{detail}; only READY models load",
                reason="MODEL_NOT_READY",
                violations=[
                    PreconditionViolation("STATE", found.name, f"state is {found.state.value}")
                ],
                metadata={"model": found.name, "state": found.state.value},
            )
        if not found.paths:
            raise FailedPrecondition(
                f"{found.name} lists no files in the catalog", reason="MODEL_NOT_READY"
            )
        return found.name, list(found.paths), f"{found.name} paths", found.config_folder

    @staticmethod
    def _check_paths(paths: Sequence[str], where: str) -> Path:
        """Absolute and present on this host; returns the one the engine loads."""
        for index, text in enumerate(paths):
            candidate = Path(text)
            if not candidate.is_absolute():
                raise InvalidArgument.for_field(
                    f"{where}[{index}]", f"must be an absolute path on the worker host: {text!r}"
                )
            if not candidate.exists():
                raise NotFound(
                    f"no such file on the worker host: {text}",
                    resource_type="file",
                    resource_name=text,
                    reason="FILE_NOT_FOUND",
                )
        # A split GGUF loads from its first shard (llama.cpp finds the others).
        return Path(paths[0])

    async def _check_compatibility(
        self, path: Path, model: str, *, family: str | None = None
    ) -> ModelMetadata | None:
        """Inspect `path` and refuse what this worker type cannot run; None for the fake.
        `family` (image.family) stands in for an image family inspection cannot tell."""
        worker_type = self._worker_type
        if worker_type is None:
            return None
        # Header reads only (milliseconds), but on a cold disk: off the event loop.
        metadata = await asyncio.to_thread(inspect_path, path)
        if family and not metadata.family and metadata.model_type is ModelType.IMAGE:
            metadata = metadata.model_copy(update={"family": family, "warnings": []})
        subject = f"{model} ({path.name})" if model else path.name
        result = require_compatible(metadata, worker_type, subject=subject)
        if result.verdict in INCOMPATIBLE_VERDICTS:  # let through: see _left_to_the_engine
            logger.warning("%s: %s; the engine decides", subject, " ".join(result.reasons))
        return metadata

    async def unload_model(self, model: str = "") -> WorkerInfo:
        """Unload the model (idempotent); `model` set: only if it is the loaded one."""
        expected = normalize_model_name(model)
        loaded = self._loaded
        if expected and loaded is not None and loaded.model != expected:
            raise FailedPrecondition(
                f"{expected} is not loaded (the worker has {loaded.model or 'a model by path'})",
                reason="MODEL_MISMATCH",
            )
        self._refuse_when_stopping()
        self._refuse_when_busy()
        await self._turns.acquire()  # free (checked above): returns without suspending
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.unload)
            self._loaded = None
            self._metrics.model_memory.set(0)
        finally:
            self._turns.release()
            self._touch()
        return self.get_worker()

    # ---- generation --------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream deltas, then exactly one CompletedGeneration."""
        engine = self._llm_engine("Generate")
        if not request.prompt:
            raise InvalidArgument.for_field("prompt", "must not be empty")

        def start(loaded: LoadedModelInfo, cancel: threading.Event) -> Iterator[GenerationEvent]:
            return engine.generate(
                request.prompt,
                self._with_default_seed(request.sampling, loaded),
                request.stopping,
                cancel=cancel,
                add_special=request.add_special,
                parse_special=request.parse_special,
            )

        return self._generation(request.model, start)

    def chat(self, request: ChatGenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream deltas, then exactly one CompletedGeneration."""
        engine = self._llm_engine("Chat")
        if not request.messages:
            raise InvalidArgument.for_field("messages", "at least one message is required")

        def start(loaded: LoadedModelInfo, cancel: threading.Event) -> Iterator[GenerationEvent]:
            template = request.chat_template or loaded.chat_template or None
            return engine.chat(
                request.messages,
                self._with_default_seed(request.sampling, loaded),
                request.stopping,
                cancel=cancel,
                chat_template=template,
            )

        return self._generation(request.model, start)

    @staticmethod
    def _with_default_seed(sampling: SamplingParams, loaded: LoadedModelInfo) -> SamplingParams:
        if sampling.seed is None and loaded.default_seed is not None:
            return sampling.model_copy(update={"seed": loaded.default_seed})
        return sampling

    def _reject(self) -> None:
        self._counters.requests_failed += 1
        self._metrics.count_request(FINISH_REJECTED)

    async def _take_turn(self, expected_model: str) -> LoadedModelInfo:
        """Wait for the turn; checks before and after waiting. Counts rejections."""
        try:
            self._refuse_when_stopping()
            self._require_model(expected_model)
            await self._turns.acquire()
        except asyncio.CancelledError:
            self._counters.requests_cancelled += 1
            self._metrics.count_request(FinishReason.CANCELLED.value)
            raise
        except Exception:
            self._reject()
            raise
        try:
            # The world may have changed while it waited.
            self._refuse_when_stopping()
            return self._require_model(expected_model)
        except Exception:
            self._turns.release()
            self._reject()
            raise

    async def _begin_turn(
        self,
        expected_model: str,
        work: Callable[[LoadedModelInfo, threading.Event, Emit], None],
    ) -> tuple[LoadedModelInfo, float, threading.Event, asyncio.Queue[object]]:
        """Wait for this request's turn, then start `work(loaded, cancel, emit)` on the engine
        thread. Returns the loaded model, when the turn began, the request's cancel event and
        the queue of what the work emits; the turn ends when the work does."""
        loaded = await self._take_turn(expected_model)
        began = time.perf_counter()
        cancel = threading.Event()
        self._current_cancel = cancel
        self._running = True
        self._touch()

        def on_done(_future: asyncio.Future[None]) -> None:
            self._running = False
            if self._current_cancel is cancel:
                self._current_cancel = None
            self._turns.release()
            self._touch()

        try:
            items = self._start_job(lambda emit: work(loaded, cancel, emit), on_done)
        except BaseException:
            self._running = False
            self._turns.release()
            self._touch()
            self._reject()
            raise
        return loaded, began, cancel, items

    async def _generation(
        self,
        expected_model: str,
        start: Callable[[LoadedModelInfo, threading.Event], Iterator[GenerationEvent]],
    ) -> AsyncGenerator[StreamEvent, None]:
        enqueued = time.perf_counter()

        def work(loaded: LoadedModelInfo, cancel: threading.Event, emit: Emit) -> None:
            for event in start(loaded, cancel):
                emit(event)

        loaded, began, cancel, items = await self._begin_turn(expected_model, work)
        metrics = self._metrics
        outcome = FINISH_ERROR
        completion_seen = 0
        result: GenerationResult | None = None
        last = began
        first = True
        held: object | None = None
        try:
            while True:
                item = held if held is not None else await items.get()
                held = None
                if isinstance(item, _Finished):
                    break
                if isinstance(item, TokenDelta):
                    # Deltas that piled up while the previous message was being sent go out
                    # as one message: none waits for it (no timer, no batch size), and a
                    # reader slower than the engine costs fewer messages, not more latency.
                    if not items.empty():
                        item, held = _merge_ready_deltas(item, items)
                    now = time.perf_counter()
                    if first:
                        metrics.time_to_first_token.observe(now - began)
                        first = False
                    else:
                        metrics.inter_token.observe(now - last)
                    last = now
                    completion_seen += len(item.token_ids)
                    yield item
                elif isinstance(item, GenerationResult):
                    result = item
                    outcome = item.finish_reason.value
                    yield CompletedGeneration(
                        result=item, model=loaded.model, queue_seconds=began - enqueued
                    )
            if item.error is not None:
                raise item.error
            if result is None:
                raise RuntimeError("the engine ended a generation without a result")
        except (asyncio.CancelledError, GeneratorExit):
            if result is None:
                outcome = FinishReason.CANCELLED.value
            raise
        finally:
            if result is None:
                cancel.set()  # the caller went away: the engine stops within one token
            self._account(outcome, result, completion_seen)

    def _count_outcome(self, outcome: str) -> None:
        """One finished request, of either engine, in the counters and the metrics."""
        counters = self._counters
        if outcome == FinishReason.CANCELLED.value:
            counters.requests_cancelled += 1
        elif outcome == FINISH_ERROR:
            counters.requests_failed += 1
        else:
            counters.requests_succeeded += 1
        self._metrics.count_request(outcome)

    def _account(self, outcome: str, result: GenerationResult | None, seen: int) -> None:
        self._count_outcome(outcome)
        counters = self._counters
        completion = result.completion_tokens if result is not None else seen
        prompt = result.prompt_tokens if result is not None else 0
        counters.completion_tokens += completion
        counters.prompt_tokens += prompt
        self._metrics.tokens_generated.inc(completion)
        self._metrics.prompt_tokens.inc(prompt)

    # ---- tokenizer ---------------------------------------------------------------------------

    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of `text` with the loaded model's tokenizer."""
        engine = self._llm_engine("Tokenize")
        return await self._short_job(
            lambda: engine.tokenize(text, add_special=add_special, parse_special=parse_special)
        )

    async def detokenize(self, token_ids: Sequence[int], *, skip_special: bool) -> str:
        """The text of `token_ids` with the loaded model's tokenizer."""
        ids = list(token_ids)
        engine = self._llm_engine("Detokenize")
        return await self._short_job(lambda: engine.detokenize(ids, skip_special=skip_special))

    async def _short_job(self, call: Callable[[], T]) -> T:
        # Same turn as generations: the engine is not thread-safe. Not counted as requests.
        self._refuse_when_stopping()
        self._require_model("")
        await self._turns.acquire()
        try:
            self._require_model("")
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self._turns.release()

    # ---- images ------------------------------------------------------------------------------

    def check_image_worker(self) -> ImageEngine:
        """The image engine; UNIMPLEMENTED (WRONG_ENGINE) on an LLM worker."""
        engine = self._engine
        if not isinstance(engine, ImageEngine):
            raise Unimplemented(
                f"this is an LLM worker ({self._engine_name} on {self._device}); GenerateImage "
                f"needs an image worker: spawn one of the sd worker types ({SD_WORKER_TYPES})",
                reason="WRONG_ENGINE",
            )
        return engine

    def generate_image(
        self, request: ImageGenerationRequest | None = None
    ) -> AsyncGenerator[ImageStreamEvent, None]:
        """Stream step progress, then exactly one CompletedImages. UNIMPLEMENTED (WRONG_ENGINE)
        on an LLM worker, checked before anything else."""
        engine = self.check_image_worker()
        if request is None:
            raise InvalidArgument.for_field("params", "the image parameters are required")
        if not request.params.prompt:
            raise InvalidArgument.for_field("params.prompt", "must not be empty")
        try:
            engine.check_params(request.params)  # before the queue: a bad request costs no turn
        except InvalidArgument:
            self._reject()
            raise
        return self._image_generation(engine, request)

    async def _image_generation(
        self, engine: ImageEngine, request: ImageGenerationRequest
    ) -> AsyncGenerator[ImageStreamEvent, None]:
        enqueued = time.perf_counter()

        def work(_loaded: LoadedModelInfo, cancel: threading.Event, emit: Emit) -> None:
            emit(engine.generate(request.params, on_progress=emit, cancel=cancel))

        loaded, began, cancel, items = await self._begin_turn(request.model, work)
        outcome = FINISH_ERROR
        result: ImageResult | None = None
        steps_seen = 0
        try:
            while not isinstance(item := await items.get(), _Finished):
                if isinstance(item, ImageProgress):
                    steps_seen += 1
                    yield item
                elif isinstance(item, ImageResult):
                    result = item
                    outcome = FINISH_COMPLETED
                    yield CompletedImages(
                        result=item, model=loaded.model, queue_seconds=began - enqueued
                    )
            if item.error is not None:
                if isinstance(item.error, Cancelled):
                    outcome = FinishReason.CANCELLED.value
                raise item.error
            if result is None:
                raise RuntimeError("the engine ended an image generation without a result")
        except (asyncio.CancelledError, GeneratorExit):
            if result is None:
                outcome = FinishReason.CANCELLED.value
            raise
        finally:
            if result is None:
                cancel.set()  # the caller went away: the engine stops within one step
            self._account_images(outcome, result, steps_seen)

    def _account_images(self, outcome: str, result: ImageResult | None, steps: int) -> None:
        self._count_outcome(outcome)
        self._metrics.image_steps.inc(steps)
        if result is not None and result.steps_per_second > 0:
            self._metrics.image_steps_per_second.observe(result.steps_per_second)

    # ---- lifecycle ---------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """Refuse new work; cancel the running generation (it ends with CANCELLED) or load."""
        if self._stopping:
            return
        self._stopping = True
        if self._current_cancel is not None:
            self._current_cancel.set()
        self._touch()

    async def close(self) -> None:
        """Stop, wait for the engine thread, unload; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.begin_stop()
        loop = asyncio.get_running_loop()
        # Queued behind whatever runs, on the same thread: unload happens after it stopped.
        try:
            await loop.run_in_executor(self._executor, self._engine.unload)
        finally:
            self._loaded = None
            await asyncio.to_thread(self._executor.shutdown, wait=True)
