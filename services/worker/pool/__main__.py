"""`rbee-pool`: spawns and supervises worker processes on this hive."""

from __future__ import annotations

import asyncio
import logging
import platform
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from rbee.worker.v1 import pool_pb2_grpc
from services.catalog.link import GrpcCatalogLink
from services.common.logs import configure_logging, log_settings
from services.common.server import (
    RunningServer,
    ServiceBinding,
    prepare_heap_for_serving,
    serve_until_signal,
    start_server,
)
from services.common.settings import SettingsError, load_settings
from services.worker.pool.devices import detect_devices
from services.worker.pool.metrics import PoolMetrics
from services.worker.pool.provisioner_link import ProvisionerLink
from services.worker.pool.service import PoolService
from services.worker.pool.servicer import SERVICE_NAME, PoolServicer
from services.worker.pool.settings import PoolSettings

logger = logging.getLogger("services.worker.pool")

EXIT_USAGE = 2


async def start_pool(
    settings: PoolSettings, registry: CollectorRegistry
) -> tuple[RunningServer, PoolService]:
    """Bind the server (NOT_SERVING) and return; the caller sets SERVING. Stopping the server
    stops every worker first (they would die with the pool anyway)."""
    security = settings.client_security()
    catalog = GrpcCatalogLink(settings.catalog_address, security=security)
    provisioner = (
        ProvisionerLink(settings.provisioner_address, security=security)
        if settings.provisioner_address
        else None
    )
    service = PoolService(
        catalog=catalog,
        config=settings.pool_config(),
        devices=detect_devices,
        metrics=PoolMetrics(registry),
        provisioner=provisioner,
    )
    running = await start_server(
        [
            ServiceBinding(
                pool_pb2_grpc.add_PoolServiceServicer_to_server, PoolServicer(service), SERVICE_NAME
            )
        ],
        listen=settings.listen,
        metrics_listen=settings.metrics_listen,
        registry=registry,
        security=settings.server_security(),
    )

    async def stop_workers_when_stopping() -> None:
        await running.wait_until_stopping()
        await service.close()

    watch = asyncio.create_task(stop_workers_when_stopping(), name="stop-workers-on-stop")

    async def close() -> None:
        watch.cancel()
        await service.close()
        await catalog.close()
        if provisioner is not None:
            await provisioner.close()

    running.on_stop(close)
    return running, service


async def run(settings: PoolSettings) -> None:
    running, _service = await start_pool(settings, CollectorRegistry())
    prepare_heap_for_serving()
    await running.set_serving()
    logger.info(
        "pool serving on port %d (metrics port %s, catalog %s, worker command %s, python %s)",
        running.port,
        running.metrics_port,
        settings.catalog_address,
        " ".join(settings.worker_command),
        platform.python_version(),
    )
    await serve_until_signal(running, grace=settings.grace_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(PoolSettings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    log_settings(logger, settings)
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
