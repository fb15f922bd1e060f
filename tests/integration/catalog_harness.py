"""A real catalog server on 127.0.0.1:0, in its own event-loop thread, for sync tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.catalog.domain import DeviceKind
from services.catalog.message_cache import ProtobufModelEncoder
from services.catalog.service import CatalogService, HostInfo
from services.catalog.servicer import CatalogServicer, catalog_binding
from services.catalog.settings import DEFAULT_HANDLER_THREADS
from services.catalog.store import CatalogStore
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.server import RunningServer, start_server
from tests.integration.server_harness import serve_in_thread

SERVICE_NAME = "rbee.catalog.v1.CatalogService"


@dataclass
class CatalogServer:
    address: str
    port: int
    metrics_port: int | None
    database: Path


@contextmanager
def running_catalog(
    home: Path, *, host: HostInfo | None = None, handler_threads: int = DEFAULT_HANDLER_THREADS
) -> Iterator[CatalogServer]:
    """Start the catalog (store under `home`) and stop it on exit, bounded in time.
    `handler_threads=0` serves it on the event loop (RBEE_CATALOG_HANDLER_THREADS=0)."""
    hive = host or HostInfo("linux", "x86_64", frozenset({DeviceKind.CPU, DeviceKind.CUDA}))

    async def build() -> tuple[RunningServer, None]:
        # As the catalog opens it (services.catalog.__main__): models keep their encodings.
        store = CatalogStore.open(home / "catalog" / "catalog.db", encoder=ProtobufModelEncoder())
        service = CatalogService(store, WorkerTypeRegistry(), host=hive)
        threads = handler_threads or None
        running = await start_server(
            [catalog_binding(CatalogServicer(service, threaded=threads is not None))],
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            registry=CollectorRegistry(),
            handler_threads=threads,
        )
        running.on_stop(service.close)
        await running.set_serving()
        return running, None

    with serve_in_thread(build, name="catalog-test-server") as (running, _):
        yield CatalogServer(
            address=f"127.0.0.1:{running.port}",
            port=running.port,
            metrics_port=running.metrics_port,
            database=home / "catalog" / "catalog.db",
        )
