"""TARGET resolution for `rbee chat`, `rbee generate` and `rbee imagine`.

A TARGET names either a worker or a model:

- a worker: `workers/ID`, a worker id the pool knows, or the endpoint of a worker
  (`HOST:PORT`, `[IPV6]:PORT`, `unix:/path`), which is called directly, without the pool;
- a model: `models/ID`, a catalog model id, or a catalog model's name (display name or the
  name in its metadata). A READY (or BUSY) worker of the pool serving that model with the
  right kind of engine is reused; one still LOADING is waited for; otherwise the pool spawns
  one (its stages go to stderr).

A bare word is looked up as a pool worker first, then as a catalog model. Failures are
CliErrors with a hint: an unknown target (exit 1, `rbee models ls` / `rbee workers ls`), a model
of the wrong kind (an image model to chat), a service that cannot be reached (exit 3).
"""

from __future__ import annotations

import argparse
import enum
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from rbee.common.v1 import runtime_pb2
from rbee.worker.v1 import load_pb2, pool_pb2, worker_pb2
from rbee_client.cli.main import EXIT_FAILED, EXIT_UNREACHABLE, CliError, client_security
from rbee_client.errors import (
    InvalidArgumentError,
    NotFoundError,
    RbeeClientError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from rbee_client.pool import PoolClient
    from services.catalog.domain import Model

DEFAULT_POOL = "127.0.0.1:50091"
# How often a LOADING worker is polled while waiting for it to become READY.
WAIT_POLL_SECONDS = 0.25

_ENDPOINT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class Task(enum.StrEnum):
    """What the caller wants from the worker: text (LLM workers) or images (SD workers)."""

    TEXT = "llm"
    IMAGE = "sd"

    @property
    def command(self) -> str:
        return "rbee chat / rbee generate" if self is Task.TEXT else "rbee imagine"


class TargetKind(enum.StrEnum):
    WORKER = "worker"  # workers/ID
    ENDPOINT = "endpoint"  # host:port or unix:/path, called directly
    MODEL = "model"  # models/ID
    BARE = "bare"  # a worker id, a model id or a model name: looked up


@dataclass(frozen=True)
class TargetSpec:
    """A TARGET as written, classified without asking any service."""

    kind: TargetKind
    value: str  # the normalised text: "workers/ID", "models/ID", the endpoint, or the word


@dataclass(frozen=True)
class ResolvedWorker:
    """The worker a command talks to."""

    endpoint: str
    name: str = ""  # workers/ID; "" for an endpoint given directly
    model: str = ""  # models/ID the worker serves, when known
    worker_type: str = ""  # worker-types/ID, when known
    device: str = ""  # devices/ID, when known
    spawned: bool = False  # spawned for this command
    waited: bool = False  # was LOADING, waited for

    def describe(self) -> str:
        """One line for stderr: which worker, serving what, where."""
        who = self.name or "the worker"
        parts = [p for p in (self.model, self.worker_type.removeprefix("worker-types/")) if p]
        where = f" on {self.device}" if self.device else ""
        how = "spawned" if self.spawned else "using"
        detail = f" ({', '.join(parts)}{where})" if parts or where else ""
        return f"{how} {who}{detail} at {self.endpoint}"

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "endpoint": self.endpoint,
            "model": self.model,
            "worker_type": self.worker_type,
            "device": self.device,
            "spawned": self.spawned,
        }


def classify_target(text: str) -> TargetSpec:
    """Classify a TARGET by its shape alone (no service is asked)."""
    value = text.strip()
    if not value:
        raise CliError("the target is empty", hint="name a worker or a model", code=2)
    if value.startswith("workers/"):
        return TargetSpec(TargetKind.WORKER, value)
    if value.startswith("models/"):
        return TargetSpec(TargetKind.MODEL, value)
    if value.startswith("unix:"):
        return TargetSpec(TargetKind.ENDPOINT, value)
    match = _ENDPOINT.match(value)
    if match and 0 < int(match.group(1)) < 65536:
        return TargetSpec(TargetKind.ENDPOINT, value)
    return TargetSpec(TargetKind.BARE, value)


def restrict_target(spec: TargetSpec, only: TargetKind | None) -> TargetSpec:
    """Read `spec` as a worker only (`--worker`) or a model only (`--model`)."""
    if only is None:
        return spec
    if only is TargetKind.WORKER:
        if spec.kind is TargetKind.BARE:
            return TargetSpec(TargetKind.WORKER, normalize_worker(spec.value))
        if spec.kind is TargetKind.MODEL:
            raise CliError(f"{spec.value} is a model, not a worker", hint="use --model", code=2)
        return spec
    if spec.kind in (TargetKind.WORKER, TargetKind.ENDPOINT):
        raise CliError(f"{spec.value} is a worker, not a model", hint="use --worker", code=2)
    return spec


def worker_task(worker: worker_pb2.Worker) -> Task | None:
    """The kind of work a worker does, from its backend (or its type's suffix); None if unknown."""
    if worker.backend == runtime_pb2.BACKEND_LLAMA_CPP:
        return Task.TEXT
    if worker.backend == runtime_pb2.BACKEND_DIFFUSERS:
        return Task.IMAGE
    type_id = worker.worker_type.removeprefix("worker-types/")
    if type_id.endswith("-llm"):
        return Task.TEXT
    if type_id.endswith("-sd"):
        return Task.IMAGE
    return None


_SERVING = (worker_pb2.WORKER_STATE_READY, worker_pb2.WORKER_STATE_BUSY)
_COMING = (
    worker_pb2.WORKER_STATE_STARTING,
    worker_pb2.WORKER_STATE_IDLE,
    worker_pb2.WORKER_STATE_LOADING,
)


def state_name(state: int) -> str:
    """WORKER_STATE_READY -> "ready"."""
    try:
        return worker_pb2.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unknown"


def choose_reusable(
    workers: Iterable[worker_pb2.Worker],
    *,
    model: str,
    task: Task,
    device: str = "",
    worker_type: str = "",
) -> worker_pb2.Worker | None:
    """The best pool worker to reuse for `model`: READY first, then BUSY (its queue takes the
    request), then one still starting or loading (the caller waits for it); None when none fits.

    A worker counts only when it serves `model`, does `task`, and matches the `device` and
    `worker_type` asked for (when asked).
    """
    rank = {worker_pb2.WORKER_STATE_READY: 0, worker_pb2.WORKER_STATE_BUSY: 1}
    wanted_type = normalize_worker_type(worker_type)
    candidates = [
        w
        for w in workers
        if w.model == model
        and (w.state in _SERVING or w.state in _COMING)
        and worker_task(w) in (task, None)
        and (not device or w.device.name == device)
        and (not wanted_type or w.worker_type == wanted_type)
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (rank.get(w.state, 2), w.name))


def normalize_model(text: str) -> str:
    return text if text.startswith("models/") else f"models/{text}"


def normalize_worker(text: str) -> str:
    return text if text.startswith("workers/") else f"workers/{text}"


def normalize_device(text: str) -> str:
    if not text or text == "auto" or text.startswith("devices/"):
        return text
    # "cuda:0" is how torch and llama.cpp users write it; the pool names it devices/cuda-0.
    return f"devices/{text.replace(':', '-')}"


def normalize_worker_type(text: str) -> str:
    if not text or text == "auto":
        return ""
    return text if text.startswith("worker-types/") else f"worker-types/{text}"


def match_models_by_name(models: Sequence[Model], text: str) -> list[Model]:
    """Catalog models whose display name or metadata name is `text` (case-insensitive)."""
    wanted = text.casefold()
    found = []
    for model in models:
        names = {model.display_name.casefold()}
        if model.metadata is not None and model.metadata.name:
            names.add(model.metadata.name.casefold())
        if wanted in names:
            found.append(model)
    return found


def check_model_kind(model: Model, task: Task) -> None:
    """Refuse a model that is not READY, or not of the kind `task` needs."""
    from services.catalog.domain import ModelState, ModelType

    if model.state is not ModelState.READY:
        detail = f": {model.state_message}" if model.state_message else ""
        raise CliError(
            f"{model.name} is {model.state.value}{detail}",
            hint=f"only READY models can be served; see `rbee models show {model.id}`",
            reason="MODEL_NOT_READY",
        )
    model_type = model.metadata.model_type if model.metadata else ModelType.UNKNOWN
    wanted = ModelType.LLM if task is Task.TEXT else ModelType.IMAGE
    if model_type is wanted:
        return
    if model_type is ModelType.IMAGE:
        hint = f"it makes images: `rbee imagine PROMPT --model {model.id} -o out.png`"
    elif model_type is ModelType.LLM:
        hint = f"it makes text: `rbee chat {model.id}`"
    else:
        hint = "workers serve LLMs and image models; `rbee models ls` lists them with their type"
    needs = "an LLM" if task is Task.TEXT else "an image model"
    kinds = {ModelType.LLM: "an LLM", ModelType.IMAGE: "an image model"}
    kind = kinds.get(model_type, f"a {model_type.value.replace('_', ' ')} model")
    raise CliError(
        f"{model.name} is {kind}; {task.command} needs {needs}",
        hint=hint,
        reason="INCOMPATIBLE_MODEL",
    )


def check_worker_kind(worker: worker_pb2.Worker, task: Task, label: str) -> None:
    kind = worker_task(worker)
    if kind is None or kind is task:
        return
    if kind is Task.IMAGE:
        hint = f"it makes images: `rbee imagine PROMPT --worker {label} -o out.png`"
    else:
        hint = f"it makes text: `rbee chat {label}`"
    needs = "an LLM worker" if task is Task.TEXT else "an image (sd) worker"
    has = "an image (sd) worker" if kind is Task.IMAGE else "an LLM worker"
    raise CliError(
        f"{label} is {has}; {task.command} needs {needs}",
        hint=hint,
        reason="WRONG_ENGINE",
    )


def unknown_target(text: str) -> CliError:
    return CliError(
        f"unknown target {text!r}: no such worker or model",
        hint="`rbee models ls` lists models, `rbee workers ls` the pool's workers",
        reason="NOT_FOUND",
    )


# ---- arguments -------------------------------------------------------------------------------


def add_target_arguments(parser: argparse.ArgumentParser, *, llm: bool) -> None:
    """The flags every command that needs a worker takes."""
    parser.add_argument(
        "--pool",
        default=os.environ.get("RBEE_POOL_ADDR", DEFAULT_POOL),
        help="pool address host:port (env RBEE_POOL_ADDR)",
    )
    parser.add_argument(
        "--device", default="", help="when spawning: devices/cpu, cuda-0, ... (default: best fit)"
    )
    parser.add_argument(
        "--worker-type", default="", help="when spawning: e.g. cpu-llm (default: from the model)"
    )
    if llm:
        parser.add_argument("--ctx", type=int, default=0, help="when spawning: context length")
    parser.add_argument(
        "--spawn-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for a worker to spawn or finish loading",
    )


# ---- resolution ------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _unreachable(exc: ServiceUnavailableError, service: str, address: str) -> Exception:
    """The CliError for a service that did not answer (exit 3); the error itself when the
    service answered that something behind it is unavailable."""
    if exc.reason and exc.reason != "UNAVAILABLE":
        return exc
    return CliError(
        f"cannot reach the {service} at {address}: {exc.message}",
        hint=f"is the {service} running? start it with `rbee serve {service}` "
        f"(or `rbee up`), or pass --{service} HOST:PORT",
        code=EXIT_UNREACHABLE,
        reason=exc.reason or "UNAVAILABLE",
    )


def _worker_record(worker: worker_pb2.Worker, *, spawned: bool, waited: bool) -> ResolvedWorker:
    return ResolvedWorker(
        endpoint=worker.endpoint,
        name=worker.name,
        model=worker.model,
        worker_type=worker.worker_type,
        device=worker.device.name,
        spawned=spawned,
        waited=waited,
    )


class TargetResolver:
    """Resolves TARGETs against one pool and one catalog (both opened on first use)."""

    def __init__(
        self,
        args: argparse.Namespace,
        task: Task,
        *,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.args = args
        self.task = task
        self.say = say
        self.security = client_security()
        self._pool: PoolClient | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> TargetResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- services --

    def pool(self) -> PoolClient:
        if self._pool is None:
            from rbee_client.pool import PoolClient

            self._pool = PoolClient(
                self.args.pool, security=self.security, timeout=self.args.timeout
            )
        return self._pool

    def _pool_call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ServiceUnavailableError as exc:
            raise _unreachable(exc, "pool", self.args.pool) from None

    def _catalog_call(self, fn: Callable[[Any], Any]) -> Any:
        from rbee_client.catalog import CatalogClient

        try:
            with CatalogClient(
                self.args.catalog, security=self.security, timeout=self.args.timeout
            ) as catalog:
                return fn(catalog)
        except ServiceUnavailableError as exc:
            raise _unreachable(exc, "catalog", self.args.catalog) from None

    # -- the entry point --

    def resolve(self, text: str, *, only: TargetKind | None = None) -> ResolvedWorker:
        """The worker to use for TARGET `text` (spawned or waited for as needed).

        `only=TargetKind.WORKER` reads a bare word as a worker id (`--worker`),
        `only=TargetKind.MODEL` as a model id or name (`--model`)."""
        spec = restrict_target(classify_target(text), only)
        if spec.kind is TargetKind.ENDPOINT:
            return self._endpoint(spec.value)
        if spec.kind is TargetKind.WORKER:
            worker = self._get_worker(spec.value)
            if worker is None:
                raise unknown_target(text)
            return self._use_worker(worker)
        if spec.kind is TargetKind.BARE:
            worker = self._get_worker(normalize_worker(spec.value))
            if worker is not None:
                return self._use_worker(worker)
        model = self._find_model(spec)
        if model is None:
            raise unknown_target(text)
        check_model_kind(model, self.task)
        return self._worker_for_model(model.name)

    # -- workers --

    def _endpoint(self, endpoint: str) -> ResolvedWorker:
        from rbee_client.worker import WorkerClient

        try:
            with WorkerClient(endpoint, security=self.security, timeout=self.args.timeout) as w:
                worker = w.get_worker()
        except ServiceUnavailableError as exc:
            if exc.reason and exc.reason != "UNAVAILABLE":
                raise
            raise CliError(
                f"cannot reach a worker at {endpoint}: {exc.message}",
                hint="`rbee workers ls` lists the pool's workers and their endpoints",
                code=EXIT_UNREACHABLE,
                reason="UNAVAILABLE",
            ) from None
        check_worker_kind(worker, self.task, endpoint)
        if not worker.HasField("loaded_model"):
            raise CliError(
                f"the worker at {endpoint} has no model loaded",
                hint="spawn one through the pool: `rbee workers spawn MODEL`",
                reason="NO_MODEL_LOADED",
            )
        return ResolvedWorker(
            endpoint=endpoint,
            name=worker.name,
            model=worker.loaded_model.model or worker.model,
            worker_type=worker.worker_type,
            device=worker.device.name,
        )

    def _get_worker(self, name: str) -> worker_pb2.Worker | None:
        try:
            worker: worker_pb2.Worker = self._pool_call(lambda: self.pool().get_worker(name))
        except (NotFoundError, InvalidArgumentError):
            return None
        return worker

    def _use_worker(self, worker: worker_pb2.Worker) -> ResolvedWorker:
        check_worker_kind(worker, self.task, worker.name)
        waited = False
        if worker.state in _COMING:
            worker = self._wait_ready(worker)
            waited = True
        if worker.state not in _SERVING:
            detail = f": {worker.state_message}" if worker.state_message else ""
            raise CliError(
                f"{worker.name} is {state_name(worker.state)}{detail}",
                hint=f"`rbee workers logs {worker.name}` shows why; name the model instead "
                "to spawn a new worker",
                reason="WORKER_NOT_READY",
            )
        return _worker_record(worker, spawned=False, waited=waited)

    def _wait_ready(self, worker: worker_pb2.Worker) -> worker_pb2.Worker:
        self.say(f"waiting for {worker.name} ({state_name(worker.state)})")
        deadline = time.monotonic() + self.args.spawn_timeout
        while worker.state in _COMING:
            if time.monotonic() > deadline:
                raise CliError(
                    f"{worker.name} is still {state_name(worker.state)} after "
                    f"{self.args.spawn_timeout:g} s",
                    hint=f"raise --spawn-timeout, or see `rbee workers logs {worker.name}`",
                    reason="DEADLINE_EXCEEDED",
                )
            time.sleep(WAIT_POLL_SECONDS)
            worker = self._pool_call(partial(self.pool().get_worker, worker.name))
        return worker

    # -- models --

    def _find_model(self, spec: TargetSpec) -> Model | None:
        from services.catalog.domain import ID_PATTERN

        model_id = spec.value.removeprefix("models/")

        def lookup(catalog: Any) -> Model | None:
            if ID_PATTERN.fullmatch(model_id):
                try:
                    found: Model = catalog.get_model(model_id)
                    return found
                except NotFoundError:
                    pass
            if spec.kind is TargetKind.MODEL:
                return None
            models, _ = catalog.list_models(all_pages=True)
            named = match_models_by_name(models, spec.value)
            if len(named) > 1:
                raise CliError(
                    f"{spec.value!r} names {len(named)} models: " + ", ".join(m.id for m in named),
                    hint="name one by its id",
                    reason="AMBIGUOUS_TARGET",
                )
            return named[0] if named else None

        result: Model | None = self._catalog_call(lookup)
        return result

    def _worker_for_model(self, model: str) -> ResolvedWorker:
        device = normalize_device(self.args.device)
        worker_type = normalize_worker_type(self.args.worker_type)
        workers = self._pool_call(lambda: self.pool().list_workers())
        existing = choose_reusable(
            workers,
            model=model,
            task=self.task,
            device="" if device == "auto" else device,
            worker_type=worker_type,
        )
        if existing is not None:
            return self._use_worker(existing)
        return self._spawn(model, device=device, worker_type=worker_type)

    def spawn_request(
        self, model: str, *, device: str, worker_type: str
    ) -> pool_pb2.SpawnWorkerRequest:
        request = pool_pb2.SpawnWorkerRequest(
            model=model, worker_type=worker_type, device=device, reuse=True
        )
        if self.task is Task.TEXT and getattr(self.args, "ctx", None):
            request.llm.CopyFrom(load_pb2.LlmLoadOptions(context_length=self.args.ctx))
        return request

    def _spawn(self, model: str, *, device: str, worker_type: str) -> ResolvedWorker:
        request = self.spawn_request(model, device=device, worker_type=worker_type)
        self.say(f"no worker serves {model}: spawning one")
        stages = {
            int(v): n.removeprefix("SPAWN_STAGE_").lower() for n, v in pool_pb2.SpawnStage.items()
        }
        worker: worker_pb2.Worker | None = None
        started = False  # a spawn that found a worker to reuse goes straight to READY
        last_line = ""
        try:
            events = self.pool().spawn_worker(request, timeout=self.args.spawn_timeout)
            for event in events:
                if isinstance(event, worker_pb2.Worker):
                    worker = event
                else:
                    started = started or event.stage != pool_pb2.SPAWN_STAGE_READY
                    line = f"  {stages.get(int(event.stage), 'unknown')}: {event.message}"
                    if line != last_line:  # the load repeats its notes as its fraction grows
                        self.say(line)
                    last_line = line
        except ServiceUnavailableError as exc:
            raise _unreachable(exc, "pool", self.args.pool) from None
        except RbeeClientError as exc:
            raise CliError(
                f"spawning a worker for {model} failed: {exc.message}",
                hint=exc.hint
                or "`rbee compat` says which worker types run it and whether it "
                "fits; --device and --worker-type choose",
                reason=exc.reason,
                code=EXIT_FAILED,
            ) from None
        if worker is None:
            raise CliError(f"the pool ended the spawn of {model} without a worker")
        return _worker_record(worker, spawned=started, waited=False)

    def any_serving_worker(self) -> ResolvedWorker | None:
        """A READY (else BUSY) pool worker doing this task, for a command given no target."""
        workers = self._pool_call(lambda: self.pool().list_workers())
        serving = [w for w in workers if w.state in _SERVING and worker_task(w) is self.task]
        if not serving:
            return None
        best = min(serving, key=lambda w: (w.state != worker_pb2.WORKER_STATE_READY, w.name))
        return _worker_record(best, spawned=False, waited=False)


def resolve_worker(
    args: argparse.Namespace, task: Task, target: str, *, only: TargetKind | None = None
) -> ResolvedWorker:
    """Resolve `target` for `task` with the pool and catalog named in `args`, and say on stderr
    which worker is used."""
    with TargetResolver(args, task) as resolver:
        resolved = resolver.resolve(target, only=only)
    _say(resolved.describe())
    return resolved
