"""Run a real grpc.aio server on its own event-loop thread, so sync tests can call it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from rbee.worker.v1 import worker_pb2_grpc
from services.catalog.domain import DeviceKind
from services.common.server import RunningServer, ServiceBinding, start_server
from services.worker.devices import DeviceSpec
from services.worker.engines.base import LlmEngine
from services.worker.engines.image_base import ImageEngine
from services.worker.gpu_memory import GpuMemoryProbe
from services.worker.metrics import WorkerMetrics
from services.worker.service import WorkerService
from services.worker.servicer import SERVICE_NAME as WORKER_SERVICE_NAME
from services.worker.servicer import WorkerServicer

T = TypeVar("T")

START_TIMEOUT_S = 30.0


def error_reason(err: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (the server always attaches one)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "rich status details missing"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo in the status")


@contextmanager
def serve_in_thread(
    build: Callable[[], Awaitable[tuple[RunningServer, T]]], *, name: str
) -> Iterator[tuple[RunningServer, T]]:
    """`build` starts the server (bound, SERVING) on the thread's loop and returns it with
    anything the test needs; on exit the server is stopped and the thread joined, bounded."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    built: list[tuple[RunningServer, T]] = []
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            built.append(loop.run_until_complete(build()))
        except BaseException as exc:
            errors.append(exc)
        ready.set()
        if built:
            loop.run_forever()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not ready.wait(START_TIMEOUT_S):
        raise TimeoutError(f"{name} did not start within {START_TIMEOUT_S:.0f} s")
    if errors:
        raise RuntimeError(f"{name} failed to start") from errors[0]
    running, extra = built[0]
    try:
        yield running, extra
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@contextmanager
def serve_worker(
    engine: LlmEngine | ImageEngine,
    *,
    engine_name: str,
    queue_size: int = 8,
    metrics_listen: str | None = "127.0.0.1:0",
    registry: CollectorRegistry | None = None,
    device: DeviceSpec | None = None,
    gpu_memory: GpuMemoryProbe | None = None,
) -> Iterator[tuple[RunningServer, WorkerService]]:
    """A WorkerService around `engine` (default: on the CPU) on 127.0.0.1:0."""
    registry = registry if registry is not None else CollectorRegistry()

    async def build() -> tuple[RunningServer, WorkerService]:
        service = WorkerService(
            engine,
            device=device if device is not None else DeviceSpec(kind=DeviceKind.CPU),
            engine_name=engine_name,
            queue_size=queue_size,
            metrics=WorkerMetrics(registry),
            gpu_memory=gpu_memory,
        )
        running = await start_server(
            [
                ServiceBinding(
                    worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                    WorkerServicer(service),
                    WORKER_SERVICE_NAME,
                )
            ],
            listen="127.0.0.1:0",
            metrics_listen=metrics_listen,
            registry=registry,
        )
        running.on_stop(service.close)
        await running.set_serving()
        return running, service

    with serve_in_thread(build, name=f"{engine_name}-worker-test-server") as served:
        yield served
