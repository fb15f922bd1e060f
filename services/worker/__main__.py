"""`rbee-worker`: one worker process bound to one device and one engine.

    rbee-worker --engine llama_cpp|diffusers|fake --device cpu|cuda:N|mps --listen HOST:PORT
                [--metrics-listen HOST:PORT] [--catalog HOST:PORT]
                [--model PATH [--model-name models/ID]]
                [--queue-size N] [--context-length N] [--gpu-layers N] [--threads N]
                [--dtype float16|bfloat16|float32] [--scheduler NAME] [--attention-slicing]

    rbee-worker --spare --engine E --device D    (a warm spare: services.worker.spare)

`--engine diffusers` is an image worker: --model is a diffusers pipeline folder and the image
flags (--dtype, --scheduler, --attention-slicing) are its load options.

`--catalog` is the catalog that LoadModel looks a model up in when a request names a model and
no paths (default 127.0.0.1:50061; empty: none, and such requests fail with
FAILED_PRECONDITION). Nothing connects at start-up: the catalog is asked at LoadModel time, so a
worker starts before its catalog, and a catalog that is down is UNAVAILABLE for that request.

Flags override the RBEE_WORKER_* variables (services.worker.settings), which override the
defaults. Lifecycle, in this order: settings, logging, device binding (CUDA_VISIBLE_DEVICES,
before the engine is imported), engine, service, server with health NOT_SERVING, the start-up
model when --model is given, then health SERVING.

Health SERVING means "ready to accept requests", including LoadModel: a worker started without
--model is SERVING with no model loaded (state IDLE in GetWorker), so the pool can gate on
health and then load. GetWorker reports what is loaded.

SIGTERM / SIGINT: health NOT_SERVING, the running generation is cancelled at once (its stream
ends with finish reason CANCELLED), queued and new requests get UNAVAILABLE, in-flight RPCs get
`grace_seconds` to finish, then the model is unloaded and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from rbee.worker.v1 import worker_pb2_grpc
from services.catalog.domain import DeviceKind
from services.catalog.link import GrpcCatalogLink
from services.common.logs import configure_logging, log_settings
from services.common.server import (
    ListenError,
    RunningServer,
    ServiceBinding,
    prepare_heap_for_serving,
    serve_until_signal,
    start_server,
)
from services.worker.devices import ACCEPTED, DeviceSpec, bind_device
from services.worker.engines.base import LlmEngine
from services.worker.engines.image_base import ImageEngine
from services.worker.metrics import WorkerMetrics
from services.worker.service import LoadProgressEvent, LoadRequest, OptionsKind, WorkerService
from services.worker.servicer import SERVICE_NAME, WorkerServicer
from services.worker.settings import EngineName, WorkerSettings
from services.worker.spare import SPARE_FLAG, prepare_engine_environment, run_spare
from services.worker.stdout_lines import SERVING as SERVING_LINE

logger = logging.getLogger("services.worker")

DISTRIBUTION = "rbee-mesh"
EXIT_USAGE = 2
# A catalog lookup is one indexed read; a catalog slower than this is as good as down.
CATALOG_LOOKUP_DEADLINE_S = 10.0


class StartupError(Exception):
    """The worker cannot start (bad model, address in use): one line for the user."""


def torch_device(device: DeviceSpec) -> str:
    """The torch device of a bound device: CUDA_VISIBLE_DEVICES leaves one GPU, "cuda"."""
    return {DeviceKind.CPU: "cpu", DeviceKind.CUDA: "cuda", DeviceKind.METAL: "mps"}[device.kind]


def create_engine(
    name: EngineName, device: DeviceSpec | None = None, *, threads: int | None = None
) -> LlmEngine | ImageEngine:
    """The engine, imported only now: after the device binding, and only the one asked for.
    `threads` is torch's thread count for diffusers (llama.cpp takes it as a load option)."""
    prepare_engine_environment(name)
    if name == "diffusers":
        from services.worker.engines.diffusers_engine import DiffusersEngine

        device = device or DeviceSpec(kind=DeviceKind.CPU)
        return DiffusersEngine(torch_device(device), threads=threads)
    if name == "fake":
        from services.worker.engines.fake import FakeEngine

        return FakeEngine()
    from services.worker.engines.llama_cpp import LlamaCppEngine

    return LlamaCppEngine()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def backend_version(name: EngineName) -> str:
    """e.g. "llama-cpp-python 0.3.36"; "fake" for the fake engine."""
    if name == "fake":
        return "fake"
    if name == "diffusers":
        version = _version("diffusers")
        return f"diffusers {version}" if version else "diffusers"
    version = _version("llama-cpp-python")
    return f"llama-cpp-python {version}" if version else "llama-cpp-python"


async def load_startup_model(service: WorkerService, settings: WorkerSettings) -> None:
    """Load --model before SERVING; progress goes to the log."""
    assert settings.model_path is not None
    paths = [str(settings.model_path.expanduser().resolve())]
    if settings.engine == "diffusers":
        request = LoadRequest(
            model=settings.model_name,
            paths=paths,
            options_kind=OptionsKind.IMAGE,
            image_options=settings.image_load_options(),
        )
    else:
        request = LoadRequest(
            model=settings.model_name,
            paths=paths,
            options_kind=OptionsKind.LLM,
            options=settings.load_options(),
        )
    async for event in service.load_model(request):
        if isinstance(event, LoadProgressEvent):
            logger.debug("load %s %s %s", event.stage.value, event.fraction, event.message)
    loaded = service.loaded_model
    assert loaded is not None
    if loaded.image_options is not None:
        logger.info(
            "model loaded: %s (%s, %.2f s)",
            loaded.model or loaded.paths[0],
            loaded.engine_model.name,
            loaded.engine_model.load_seconds,
        )
        return
    logger.info(
        "model loaded: %s (context %d, %.2f s)",
        loaded.model or loaded.paths[0],
        loaded.engine_model.context_length,
        loaded.engine_model.load_seconds,
    )


async def start_worker(
    settings: WorkerSettings,
    device: DeviceSpec,
    engine: LlmEngine | ImageEngine,
    registry: CollectorRegistry,
) -> tuple[RunningServer, WorkerService]:
    """Build the service and bind the server (NOT_SERVING); the caller loads the start-up model
    and sets SERVING. Stopping the server cancels the running generation first, then closes the
    service and the catalog link. Raises StartupError when the address cannot be bound."""
    # grpc.aio channels connect lazily: building one needs no catalog running yet.
    catalog = (
        GrpcCatalogLink(
            settings.catalog_address,
            deadline=CATALOG_LOOKUP_DEADLINE_S,
            security=settings.client_security(),
        )
        if settings.catalog_address
        else None
    )
    service = WorkerService(
        engine,
        device=device,
        engine_name=settings.engine,
        queue_size=settings.queue_size,
        metrics=WorkerMetrics(registry),
        name=settings.name,
        version=_version(DISTRIBUTION),
        backend_version=backend_version(settings.engine),
        catalog=catalog,
    )
    try:
        running = await start_server(
            [
                ServiceBinding(
                    worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                    WorkerServicer(service),
                    SERVICE_NAME,
                )
            ],
            listen=settings.listen,
            metrics_listen=settings.metrics_listen,
            registry=registry,
            security=settings.server_security(),
        )
    except ListenError as exc:
        await service.close()
        if catalog is not None:
            await catalog.close()
        raise StartupError(str(exc)) from exc
    if catalog is not None:
        running.on_stop(catalog.close)  # LIFO: closed after the service
    running.on_stop(service.close)

    async def cancel_work_when_stopping() -> None:
        # stop() runs server.stop(grace), which waits for in-flight RPCs: the running
        # generation must be told to stop first, or it would run on through the grace.
        await running.wait_until_stopping()
        service.begin_stop()

    stop_watch = asyncio.create_task(cancel_work_when_stopping())

    def end_stop_watch() -> None:
        stop_watch.cancel()  # it has done its work once stop() runs the callbacks

    running.on_stop(end_stop_watch)
    return running, service


async def run(
    settings: WorkerSettings, device: DeviceSpec, engine: LlmEngine | ImageEngine
) -> None:
    """Serve until SIGTERM/SIGINT: NOT_SERVING until ready (start-up model loaded), SERVING."""
    running, service = await start_worker(settings, device, engine, CollectorRegistry())
    if settings.model_path is not None:
        try:
            await load_startup_model(service, settings)
        except Exception as exc:
            await running.stop(0)
            raise StartupError(f"cannot load {settings.model_path}: {exc}") from exc
    prepare_heap_for_serving()
    await running.set_serving()
    print(SERVING_LINE, flush=True)  # for the pool that started this worker (stdout_lines.py)
    logger.info(
        "worker serving on port %d (metrics port %s, engine %s, device %s, queue %d, catalog %s)",
        running.port,
        running.metrics_port,
        settings.engine,
        device,
        settings.queue_size,
        settings.catalog_address or "none",
    )
    await serve_until_signal(running, grace=settings.grace_seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbee-worker",
        description="One rbee worker: one device, one engine, at most one loaded model.",
        epilog="Flags override RBEE_WORKER_* environment variables.",
    )
    parser.add_argument("--engine", choices=["llama_cpp", "diffusers", "fake"])
    parser.add_argument("--device", help=f"the device to bind: {ACCEPTED}")
    parser.add_argument("--listen", help="gRPC address host:port (port 0: ephemeral)")
    parser.add_argument(
        "--metrics-listen", help="Prometheus /metrics address host:port; empty: off"
    )
    parser.add_argument(
        "--catalog",
        dest="catalog_address",
        help="the catalog's gRPC address host:port, for LoadModel by model name; empty: none",
    )
    parser.add_argument("--model", dest="model_path", help="a model file to load before SERVING")
    parser.add_argument("--model-name", help="the model's catalog name, models/ID")
    parser.add_argument("--name", help="the worker's name, workers/ID (the pool sets it)")
    parser.add_argument("--queue-size", type=int, help="requests that may wait (default 8)")
    parser.add_argument("--context-length", type=int, help="context length for --model")
    parser.add_argument("--gpu-layers", type=int, help="GPU layers for --model (-1: all)")
    parser.add_argument("--threads", type=int, help="threads for --model")
    parser.add_argument("--dtype", help="torch dtype for --model (diffusers)")
    parser.add_argument("--scheduler", help="default scheduler for --model (diffusers)")
    parser.add_argument(
        "--attention-slicing",
        action="store_true",
        default=None,
        help="attention slicing for --model (diffusers)",
    )
    return parser


def settings_from_args(argv: Sequence[str]) -> WorkerSettings:
    """Settings from the environment, with the flags that were given on top."""
    args = build_parser().parse_args(list(argv))
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return WorkerSettings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit code. `--spare` first: a warm spare
    (services.worker.spare) that becomes this worker when the pool sends its argv."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [SPARE_FLAG]:
        return run_spare(args[1:], main)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        print(f"error: {problems}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    log_settings(logger, settings)
    device = settings.device_spec
    bind_device(device, os.environ)
    try:
        engine = create_engine(settings.engine, device, threads=settings.threads)
        asyncio.run(run(settings, device, engine))
    except StartupError as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
