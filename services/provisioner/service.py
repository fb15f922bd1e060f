"""The provisioner's data plane, transport-neutral: pulls, resolution, search, remote inspection,
page-cache preloads.

The servicer converts and calls this; nothing here imports grpc or *_pb2.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from services.catalog.domain import (
    CompatibilityResult,
    Device,
    DeviceKind,
    Model,
    ModelMetadata,
    ModelState,
)
from services.catalog.link import CatalogLink
from services.catalog.pagination import (
    PageTokenCodec,
    filter_fingerprint,
    new_secret,
    page_in_memory,
)
from services.common.errors import AlreadyExists
from services.common.list_filter import parse_equality_filter
from services.provisioner.domain import PullOptions, PullRecord, Resolution, SearchPage, SearchQuery
from services.provisioner.preload import PreloadManager
from services.provisioner.pulls import PullItem, PullManager
from services.provisioner.recipes.installs import InstallManager
from services.provisioner.recipes.pkgbuild import Recipe, RecipeBook
from services.provisioner.remote_inspect import inspect_remote
from services.provisioner.search import search
from services.provisioner.sources import SourceContext, parse_source, resolve


@dataclass(frozen=True)
class ResolvedSource:
    resolution: Resolution
    model_id: str  # the id a pull would create
    existing_model: str  # `models/{id}` already registered for this source, or ""


@dataclass(frozen=True)
class DeviceVerdicts:
    device: Device
    results: list[CompatibilityResult]


@dataclass(frozen=True)
class RemoteReport:
    resolved: ResolvedSource
    metadata: ModelMetadata
    compatibility: list[DeviceVerdicts]
    bytes_read: int


def host_devices() -> list[Device]:
    """This hive's devices for a compatibility answer: the CPU with its RAM (Linux /proc)."""
    total = free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        total, free = fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = pages * size if pages > 0 and size > 0 else None
    return [Device(kind=DeviceKind.CPU, name="cpu", total_ram_bytes=total, free_ram_bytes=free)]


class ProvisionerService:
    def __init__(
        self,
        *,
        pulls: PullManager,
        catalog: CatalogLink,
        context: SourceContext,
        preloads: PreloadManager,
        installs: InstallManager,
        recipes: RecipeBook,
    ) -> None:
        self.pulls = pulls
        self.preloads = preloads
        self.installs = installs
        self.recipes = recipes
        self._catalog = catalog
        self._ctx = context
        self._tokens = PageTokenCodec(new_secret())

    async def pull(
        self, source: str, options: PullOptions, pull_id: str
    ) -> AsyncIterator[PullItem]:
        return await self.pulls.pull(source, options, pull_id)

    async def resolve_source(self, source: str, options: PullOptions) -> ResolvedSource:
        spec = parse_source(source)
        resolution = await asyncio.to_thread(resolve, spec, options, self._ctx)
        return await self._describe(resolution, options)

    async def _describe(self, resolution: Resolution, options: PullOptions) -> ResolvedSource:
        model_id = resolution.model_id(options.model_id)
        existing = ""
        try:
            await self._catalog.create_model(
                model_id=model_id,
                source=resolution.source,
                paths=resolution.model_paths,
                state=ModelState.DOWNLOADING,
                validate_only=True,
            )
        except AlreadyExists as exc:
            existing = exc.resource_name
        return ResolvedSource(resolution, model_id, existing)

    async def inspect_remote(
        self,
        source: str,
        options: PullOptions,
        devices: Sequence[Device],
        context_length: int,
    ) -> RemoteReport:
        spec = parse_source(source)
        inspection = await asyncio.to_thread(inspect_remote, spec, options, self._ctx)
        resolved = await self._describe(inspection.resolution, options)
        verdicts = []
        for device in devices or host_devices():
            results = await self._catalog.evaluate(inspection.metadata, device, context_length)
            verdicts.append(DeviceVerdicts(device, results))
        return RemoteReport(resolved, inspection.metadata, verdicts, inspection.bytes_read)

    async def list_recipes(
        self, *, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[Recipe], str, int]:
        """ListRecipes: by name; filter `worker_type=`, `supported_on_host=true|false`. A recipe
        that cannot be read is left out of the list (GetRecipe reports why)."""
        terms = parse_equality_filter(
            filter_text,
            fields=("worker_type", "supported_on_host"),
            enums={"supported_on_host": ({"true", "false"}, "")},
            example="worker_type=cpu-llm AND supported_on_host=true",
        )
        found = await asyncio.to_thread(lambda: list(self.recipes.list()))
        recipes = sorted((r for r in found if isinstance(r, Recipe)), key=lambda r: r.id)
        if "worker_type" in terms:
            wanted = terms["worker_type"].removeprefix("worker-types/")
            recipes = [r for r in recipes if r.worker_type == wanted]
        if "supported_on_host" in terms:
            flag = terms["supported_on_host"] == "true"
            recipes = [r for r in recipes if r.supported_on_host is flag]
        page, token = page_in_memory(
            recipes,
            key=lambda r: r.id,
            codec=self._tokens,
            fingerprint=filter_fingerprint("recipes", json.dumps(sorted(terms.items())), "name"),
            page_size=page_size,
            page_token=page_token,
        )
        return page, token, len(recipes)

    async def get_recipe(self, name: str) -> Recipe:
        recipe_id = name.removeprefix("recipes/")
        return await asyncio.to_thread(self.recipes.get, recipe_id)

    async def search(self, query: SearchQuery) -> SearchPage:
        return await asyncio.to_thread(search, query, self._ctx)

    def get_pull(self, name: str) -> PullRecord:
        return self.pulls.get(name)

    async def get_model(self, name: str) -> Model | None:
        return await self._catalog.get_model(name)
