"""A real provisioner (and the catalog it registers in) on 127.0.0.1:0, for sync tests.

Built by the same `build_service` as `rbee-provisioner`, pointed at fake upstreams.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2_grpc
from rbee.provisioner.v1 import provisioner_pb2_grpc
from services.common.server import RunningServer
from services.provisioner.__main__ import start_provisioner
from services.provisioner.service import ProvisionerService
from services.provisioner.settings import ProvisionerSettings
from tests.integration.catalog_harness import running_catalog
from tests.integration.server_harness import serve_in_thread


@dataclass
class Mesh:
    """A catalog and a provisioner, with stubs for both."""

    home: Path
    hf_cache: Path
    catalog_address: str
    address: str
    metrics_port: int | None
    service: ProvisionerService
    provisioner: provisioner_pb2_grpc.ProvisionerServiceStub
    catalog: catalog_pb2_grpc.CatalogServiceStub
    settings: ProvisionerSettings


def provisioner_settings(home: Path, catalog_address: str, **overrides: Any) -> ProvisionerSettings:
    values: dict[str, Any] = {
        "home": home,
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "catalog_address": catalog_address,
        "hf_endpoint": "http://127.0.0.1:9",  # nothing listens: tests pass a fake's endpoint
        "civitai_endpoint": "http://127.0.0.1:9",
        "hf_cache": home / "hf-cache",
        "hf_token": None,
        "civitai_token": None,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "stall_timeout": 2.0,
        "upstream_timeout": 5.0,
        "resume_on_start": False,
        # The probe imports torch in a child (seconds of CPU); tests that want it say so.
        "register_system_installs": False,
    }
    values.update(overrides)
    return ProvisionerSettings(**values)


@contextmanager
def running_provisioner(
    settings: ProvisionerSettings,
) -> Iterator[tuple[str, ProvisionerService, int | None]]:
    """The provisioner alone (its catalog must be running at settings.catalog_address)."""

    async def build() -> tuple[RunningServer, ProvisionerService]:
        running, service = await start_provisioner(settings, CollectorRegistry())
        await running.set_serving()
        return running, service

    with serve_in_thread(build, name="provisioner-test-server") as (running, service):
        yield f"127.0.0.1:{running.port}", service, running.metrics_port


@contextmanager
def running_mesh(home: Path, **overrides: Any) -> Iterator[Mesh]:
    """A catalog plus a provisioner under `home`; `overrides` are ProvisionerSettings fields."""
    with running_catalog(home) as catalog:
        settings = provisioner_settings(home, catalog.address, **overrides)
        with (
            running_provisioner(settings) as (address, service, metrics_port),
            grpc.insecure_channel(address) as prov_channel,
            grpc.insecure_channel(catalog.address) as cat_channel,
        ):
            yield Mesh(
                home=home,
                hf_cache=settings.hf_cache,
                catalog_address=catalog.address,
                address=address,
                metrics_port=metrics_port,
                service=service,
                provisioner=provisioner_pb2_grpc.ProvisionerServiceStub(prov_channel),
                catalog=catalog_pb2_grpc.CatalogServiceStub(cat_channel),
                settings=settings,
            )
