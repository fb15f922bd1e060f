"""A real catalog server on 127.0.0.1:0, in its own event-loop thread, for sync tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2_grpc
from services.catalog.domain import DeviceKind
from services.catalog.service import CatalogService, HostInfo
from services.catalog.servicer import CatalogServicer
from services.catalog.store import CatalogStore
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.server import RunningServer, ServiceBinding, start_server

SERVICE_NAME = "rbee.catalog.v1.CatalogService"


@dataclass
class CatalogServer:
    address: str
    port: int
    metrics_port: int | None
    database: Path


@contextmanager
def running_catalog(home: Path, *, host: HostInfo | None = None) -> Iterator[CatalogServer]:
    """Start the catalog (store under `home`) and stop it on exit, bounded in time."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def start() -> None:
        store = CatalogStore.open(home / "catalog" / "catalog.db")
        service = CatalogService(
            store,
            WorkerTypeRegistry(),
            host=host or HostInfo("linux", "x86_64", frozenset({DeviceKind.CPU, DeviceKind.CUDA})),
        )
        running = await start_server(
            [
                ServiceBinding(
                    catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
                    CatalogServicer(service),
                    SERVICE_NAME,
                )
            ],
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            registry=CollectorRegistry(),
        )
        running.on_stop(service.close)
        await running.set_serving()
        holder["running"] = running

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:
            holder["error"] = exc
        ready.set()
        if "running" in holder:
            loop.run_forever()

    thread = threading.Thread(target=run, name="catalog-test-server", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise TimeoutError("catalog server did not start within 30 s")
    error = holder.get("error")
    if isinstance(error, BaseException):
        raise RuntimeError("catalog server failed to start") from error
    running = holder["running"]
    assert isinstance(running, RunningServer)
    try:
        yield CatalogServer(
            address=f"127.0.0.1:{running.port}",
            port=running.port,
            metrics_port=running.metrics_port,
            database=home / "catalog" / "catalog.db",
        )
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
