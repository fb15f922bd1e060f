"""`rbee-provisioner`: settings, logging, pull records, catalog link, service, server."""

from __future__ import annotations

import asyncio
import logging
import platform
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from rbee.provisioner.v1 import provisioner_pb2_grpc
from services.catalog.link import CatalogLink, GrpcCatalogLink
from services.common.errors import AlreadyExists, RbeeError
from services.common.logs import configure_logging, log_settings
from services.common.server import (
    RunningServer,
    ServiceBinding,
    prepare_heap_for_serving,
    serve_until_signal,
    start_server,
)
from services.common.settings import SettingsError, load_settings
from services.provisioner.metrics import ProvisionerMetrics
from services.provisioner.preload import PreloadManager, PreloadMetrics
from services.provisioner.pull_store import PullStore
from services.provisioner.pulls import PullManager
from services.provisioner.recipes.build import RecipeBuilder
from services.provisioner.recipes.installs import InstallManager, system_installs
from services.provisioner.recipes.pkgbuild import RecipeBook
from services.provisioner.service import ProvisionerService
from services.provisioner.servicer import ProvisionerServicer
from services.provisioner.settings import ProvisionerSettings

logger = logging.getLogger("services.provisioner")

EXIT_USAGE = 2

SERVICE_NAME = "rbee.provisioner.v1.ProvisionerService"


def build_service(
    settings: ProvisionerSettings, registry: CollectorRegistry
) -> tuple[ProvisionerService, GrpcCatalogLink]:
    """The service with its pull and preload managers and catalog link (not started:
    `pulls.start()`)."""
    catalog = GrpcCatalogLink(settings.catalog_address, security=settings.client_security())
    context = settings.source_context()
    preloads = PreloadManager(
        catalog=catalog,
        budget_bytes=settings.preload_budget_bytes(),
        metrics=PreloadMetrics(registry),
    )
    pulls = PullManager(
        store=PullStore(settings.pulls_dir),
        catalog=catalog,
        context=context,
        credentials=settings.credentials(),
        transfer_settings=settings.transfer_settings,
        max_concurrent=settings.max_concurrent_pulls,
        parallel_files=settings.parallel_files,
        resume_on_start=settings.resume_on_start,
        metrics=ProvisionerMetrics(registry),
    )
    recipes = RecipeBook(settings.recipe_directories())
    secrets = [t.get_secret_value() for t in (settings.hf_token, settings.civitai_token) if t]
    installs = InstallManager(
        recipes=recipes,
        home=settings.home,
        builder=RecipeBuilder(secrets_to_redact=secrets),
        register=catalog.create_install,
    )
    service = ProvisionerService(
        pulls=pulls,
        catalog=catalog,
        context=context,
        preloads=preloads,
        installs=installs,
        recipes=recipes,
    )
    return service, catalog


async def register_system_installs(catalog: CatalogLink) -> None:
    """The environment the provisioner runs in counts as an install of every worker type whose
    backend imports here (a user who pip-installed the extras needs no build). Probed in a child
    process (it imports torch), after SERVING, and registered in the catalog once."""
    try:
        found = await asyncio.to_thread(system_installs)
    except Exception:  # a probe that fails must not take the provisioner down
        logger.exception("probing the system installs failed")
        return
    for install in found:
        try:
            await catalog.create_install(install)
            logger.info("registered %s (%s)", install.name, install.backend_version)
        except AlreadyExists:
            pass
        except RbeeError as exc:
            logger.warning("could not register %s: %s", install.name, exc.message)


async def start_provisioner(
    settings: ProvisionerSettings, registry: CollectorRegistry
) -> tuple[RunningServer, ProvisionerService]:
    """Bind the server (NOT_SERVING), load the pull records (resuming unfinished pulls when
    configured) and return; the caller sets SERVING. Stopping the server pauses the pulls first:
    server.stop(grace) waits for in-flight streams, then cancels them, and a cancelled last
    watcher would otherwise cancel its pull."""
    service, catalog = build_service(settings, registry)
    running = await start_server(
        [
            ServiceBinding(
                provisioner_pb2_grpc.add_ProvisionerServiceServicer_to_server,
                ProvisionerServicer(service),
                SERVICE_NAME,
            )
        ],
        listen=settings.listen,
        metrics_listen=settings.metrics_listen,
        registry=registry,
        security=settings.server_security(),
    )

    async def pause_pulls_when_stopping() -> None:
        await running.wait_until_stopping()
        await service.pulls.close()

    stop_watch = asyncio.create_task(pause_pulls_when_stopping(), name="pause-pulls-on-stop")

    async def close() -> None:
        stop_watch.cancel()
        await service.pulls.close()
        await service.installs.close()
        if probe is not None:
            probe.cancel()
        await catalog.close()

    running.on_stop(close)
    await service.pulls.start()
    await service.installs.start()
    probe = (
        asyncio.create_task(register_system_installs(catalog), name="system-installs")
        if settings.register_system_installs
        else None
    )
    return running, service


async def run(settings: ProvisionerSettings) -> None:
    """Serve until SIGTERM/SIGINT. Stopping pauses running pulls (they resume at next start)."""
    running, _service = await start_provisioner(settings, CollectorRegistry())
    prepare_heap_for_serving()
    await running.set_serving()
    logger.info(
        "provisioner serving on port %d (metrics port %s, catalog %s, HF cache %s, python %s)",
        running.port,
        running.metrics_port,
        settings.catalog_address,
        settings.hf_cache,
        platform.python_version(),
    )
    await serve_until_signal(running, grace=settings.grace_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(ProvisionerSettings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    # huggingface_hub's HTTP client logs every request at INFO; ours are logged by the pulls.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    log_settings(logger, settings)
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
