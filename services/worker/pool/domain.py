"""The pool's domain types: plain pydantic models, no grpc, no protobuf."""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, Field

from services.catalog.domain import Backend, CompatibilityResult, DeviceKind


class PoolWorkerState(enum.StrEnum):
    """rbee.worker.v1.WorkerState, as the pool tracks it."""

    STARTING = "starting"
    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def running(self) -> bool:
        return self not in (PoolWorkerState.STOPPED, PoolWorkerState.FAILED)


class RestartMode(enum.StrEnum):
    NEVER = "never"
    ON_FAILURE = "on_failure"


class RestartPolicy(BaseModel):
    mode: RestartMode = RestartMode.NEVER
    max_restarts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds before restart number `attempt` (1-based): doubling, capped."""
        return float(min(self.max_backoff, self.initial_backoff * (2 ** max(0, attempt - 1))))


class SpawnStage(enum.StrEnum):
    VALIDATING = "validating"
    INSTALLING = "installing"
    PRELOADING = "preloading"
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"


class LiveStatus(BaseModel):
    """What the worker process reports about itself (its own GetWorker)."""

    state: PoolWorkerState
    model: str = ""
    ram_bytes: int = 0
    vram_bytes: int = 0
    queue_depth: int = 0
    queue_capacity: int = 0
    requests_succeeded: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    version: str = ""
    backend_version: str = ""


class PoolWorker(BaseModel):
    """A worker process this pool spawned: `workers/{id}`."""

    id: str
    endpoint: str = ""
    device: str  # devices/{device}
    device_kind: DeviceKind
    device_index: int = 0
    worker_type: str  # worker-types/{type}
    backend: Backend | None = None
    engine: str  # the rbee-worker --engine value
    model: str  # models/{id}
    model_paths: list[str] = Field(default_factory=list)
    model_size_bytes: int = 0
    install: str = ""  # installs/{id} it runs from; "" = the pool's own environment
    install_python: str = ""  # that install's interpreter
    state: PoolWorkerState = PoolWorkerState.STARTING
    state_message: str = ""
    pid: int = 0
    exit_code: int | None = None
    restart_count: int = 0
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy)
    claimed_ram_bytes: int = 0
    claimed_vram_bytes: int = 0
    queue_capacity: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    load_options: bytes = b""  # the serialised LoadModel options, replayed on restart
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    live: LiveStatus | None = None

    @property
    def name(self) -> str:
        return f"workers/{self.id}"


class SpawnEvent(BaseModel):
    """One progress event of SpawnWorker."""

    worker: str
    stage: SpawnStage
    message: str = ""
    worker_type: str = ""
    device: str = ""
    compatibility: CompatibilityResult | None = None
    load_stage: str = ""  # LOADING: the worker's own load stage
    load_fraction: float | None = None
    preload_done: int = 0  # PRELOADING: bytes in the page cache
    preload_total: int = 0


class WorkerEventKind(enum.StrEnum):
    EXISTING = "existing"
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
