"""`rbee-catalog`: settings, logging, store, service, servicer, server; in that order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import sys
import threading
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.catalog.inspect import warm_imports
from services.catalog.message_cache import ProtobufModelEncoder
from services.catalog.service import CatalogService, HostInfo
from services.catalog.servicer import CatalogServicer, catalog_binding
from services.catalog.settings import CatalogSettings
from services.catalog.store import CatalogStore
from services.catalog.worker_types import (
    WorkerTypeRegistry,
    detect_device_kinds,
    host_platform,
)
from services.common.logs import configure_logging, log_settings
from services.common.server import (
    RunningServer,
    prepare_heap_for_serving,
    serve_until_signal,
    start_server,
)
from services.common.settings import SettingsError, load_settings

logger = logging.getLogger("services.catalog")

EXIT_USAGE = 2


async def start_catalog(
    settings: CatalogSettings, registry: CollectorRegistry | None = None
) -> RunningServer:
    """Open the store and bind the server (NOT_SERVING); the caller sets SERVING. Stopping the
    server closes the store."""
    store = CatalogStore.open(settings.database_path, encoder=ProtobufModelEncoder())
    plat, machine = host_platform()
    service = CatalogService(
        store,
        WorkerTypeRegistry(),
        host=HostInfo(plat, machine, detect_device_kinds(plat, machine)),
    )
    threads = settings.handler_threads or None  # 0: the event-loop server
    running = await start_server(
        [catalog_binding(CatalogServicer(service, threaded=threads is not None))],
        listen=settings.listen,
        metrics_listen=settings.metrics_listen,
        registry=registry,
        security=settings.server_security(),
        handler_threads=threads,
    )
    running.on_stop(service.close)
    backfill = asyncio.ensure_future(_backfill_encodings(service))
    running.on_stop(lambda: _cancel(backfill))  # LIFO: before the service closes
    # The first inspect should not pay for importing the readers: do it now, off the loop.
    threading.Thread(target=warm_imports, name="warm-inspect-imports", daemon=True).start()
    return running


async def _backfill_encodings(service: CatalogService) -> None:
    """Encode the models stored without a current encoding (see CatalogStore); a failure only
    leaves them to be converted as they are served."""
    try:
        encoded = await service.backfill_encodings()
    except Exception:
        logger.warning("could not encode the stored models for serving", exc_info=True)
        return
    if encoded:
        logger.info("encoded %d stored models for serving", encoded)


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run(settings: CatalogSettings) -> None:
    """Serve until SIGTERM/SIGINT: NOT_SERVING while opening the store, SERVING after."""
    running = await start_catalog(settings)
    prepare_heap_for_serving()
    await running.set_serving()
    logger.info(
        "catalog serving on port %d (%s, metrics port %s, database %s, python %s)",
        running.port,
        f"{settings.handler_threads} handler threads"
        if settings.handler_threads
        else "on the event loop",
        running.metrics_port,
        settings.database_path,
        platform.python_version(),
    )
    await serve_until_signal(running, grace=settings.grace_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(CatalogSettings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    log_settings(logger, settings)
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
