"""rbee.provisioner.v1.ProvisionerService over gRPC: convert, call the domain service, convert.

Errors are raised as domain exceptions; the server's one interceptor turns them into statuses.
Streams are closed explicitly (`aclosing`): when a caller goes away, gRPC cancels this handler,
and closing the pull stream is what tells the pull that a watcher left.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.empty_pb2 import Empty

from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from services.catalog import convert as catalog_convert
from services.catalog.domain import Install, Model
from services.common.errors import InvalidArgument
from services.provisioner import convert
from services.provisioner.preload import PreloadRecord
from services.provisioner.pulls import PullItem
from services.provisioner.recipes.installs import InstallEvent
from services.provisioner.service import ProvisionerService

Context = Any  # grpc.aio.ServicerContext; the domain never sees it


async def _relay_install(
    stream: AsyncIterator[InstallEvent | Install],
) -> AsyncIterator[pb.InstallWorkerResponse]:
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            if isinstance(item, InstallEvent):
                yield convert.install_event_to_pb(item)
            else:
                yield convert.install_result_to_pb(item)


async def _relay(stream: AsyncIterator[PullItem]) -> AsyncIterator[pb.PullModelResponse]:
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            if isinstance(item, Model):
                yield convert.pull_model_to_pb(item)
            else:
                yield convert.pull_event_to_pb(item)


def _required_source(source: str) -> str:
    if not source.strip():
        raise InvalidArgument.for_field(
            "source",
            "a source is required: hf:ORG/REPO[:FILE][@REVISION], civitai:VERSION_ID, "
            "https://..., or file:PATH",
            reason="INVALID_SOURCE",
        )
    return source


class ProvisionerServicer(provisioner_pb2_grpc.ProvisionerServiceServicer):
    """Thin adapter from protobuf to ProvisionerService."""

    def __init__(self, service: ProvisionerService) -> None:
        self._service = service

    async def PullModel(
        self, request: pb.PullModelRequest, context: Context
    ) -> AsyncIterator[pb.PullModelResponse]:
        stream = await self._service.pull(
            _required_source(request.source),
            convert.pull_options_from_pb(request.options),
            request.pull_id,
        )
        async for msg in _relay(stream):
            yield msg

    async def GetPull(self, request: pb.GetPullRequest, context: Context) -> pb.Pull:
        return convert.pull_to_pb(self._service.pulls.get(request.name))

    async def ListPulls(
        self, request: pb.ListPullsRequest, context: Context
    ) -> pb.ListPullsResponse:
        records, token, total = self._service.pulls.list_pulls(
            filter_text=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListPullsResponse(
            pulls=[convert.pull_to_pb(r) for r in records], next_page_token=token, total_size=total
        )

    async def WatchPull(
        self, request: pb.WatchPullRequest, context: Context
    ) -> AsyncIterator[pb.PullModelResponse]:
        async for msg in _relay(await self._service.pulls.watch(request.name)):
            yield msg

    async def CancelPull(self, request: pb.CancelPullRequest, context: Context) -> pb.Pull:
        record = await self._service.pulls.cancel(
            request.name, discard_partial=request.discard_partial
        )
        return convert.pull_to_pb(record)

    async def ResumePull(
        self, request: pb.ResumePullRequest, context: Context
    ) -> AsyncIterator[pb.PullModelResponse]:
        async for msg in _relay(await self._service.pulls.resume(request.name)):
            yield msg

    async def DeletePull(self, request: pb.DeletePullRequest, context: Context) -> Empty:
        await self._service.pulls.delete(
            request.name,
            etag=request.etag,
            force=request.force,
            allow_missing=request.allow_missing,
        )
        return Empty()

    async def ResolveSource(
        self, request: pb.ResolveSourceRequest, context: Context
    ) -> pb.ResolveSourceResponse:
        resolved = await self._service.resolve_source(
            _required_source(request.source), convert.pull_options_from_pb(request.options)
        )
        return convert.resolution_to_pb(
            resolved.resolution,
            model_id=resolved.model_id,
            existing_model=resolved.existing_model,
        )

    async def InspectRemote(
        self, request: pb.InspectRemoteRequest, context: Context
    ) -> pb.InspectRemoteResponse:
        devices = [catalog_convert.device_from_pb(d) for d in request.devices]
        report = await self._service.inspect_remote(
            _required_source(request.source),
            convert.pull_options_from_pb(request.options),
            devices,
            request.context_length,
        )
        response = pb.InspectRemoteResponse(
            resolution=convert.resolution_to_pb(
                report.resolved.resolution,
                model_id=report.resolved.model_id,
                existing_model=report.resolved.existing_model,
            ),
            metadata=catalog_convert.metadata_to_pb(report.metadata),
            bytes_read=report.bytes_read,
        )
        for verdicts in report.compatibility:
            response.compatibility.append(
                pb.DeviceCompatibility(
                    device=catalog_convert.device_to_pb(verdicts.device),
                    results=[catalog_convert.compat_result_to_pb(r) for r in verdicts.results],
                )
            )
        return response

    async def SearchModels(
        self, request: pb.SearchModelsRequest, context: Context
    ) -> pb.SearchModelsResponse:
        page = await self._service.search(convert.search_query_from_pb(request))
        return convert.search_page_to_pb(page)

    # --- worker backends from recipes -----------------------------------------------------------

    async def InstallWorker(
        self, request: pb.InstallWorkerRequest, context: Context
    ) -> AsyncIterator[pb.InstallWorkerResponse]:
        stream = await self._service.installs.install(
            request.worker_type, convert.install_options_from_pb(request.options)
        )
        async for msg in _relay_install(stream):
            yield msg

    async def GetInstallJob(
        self, request: pb.GetInstallJobRequest, context: Context
    ) -> pb.InstallJob:
        return convert.install_job_to_pb(self._service.installs.get(request.name))

    async def ListInstallJobs(
        self, request: pb.ListInstallJobsRequest, context: Context
    ) -> pb.ListInstallJobsResponse:
        records, token, total = self._service.installs.list(
            filter_text=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListInstallJobsResponse(
            install_jobs=[convert.install_job_to_pb(r) for r in records],
            next_page_token=token,
            total_size=total,
        )

    async def WatchInstallJob(
        self, request: pb.WatchInstallJobRequest, context: Context
    ) -> AsyncIterator[pb.InstallWorkerResponse]:
        async for msg in _relay_install(await self._service.installs.watch(request.name)):
            yield msg

    async def CancelInstallJob(
        self, request: pb.CancelInstallJobRequest, context: Context
    ) -> pb.InstallJob:
        return convert.install_job_to_pb(await self._service.installs.cancel(request.name))

    async def GetRecipe(self, request: pb.GetRecipeRequest, context: Context) -> pb.Recipe:
        return convert.recipe_to_pb(await self._service.get_recipe(request.name))

    async def ListRecipes(
        self, request: pb.ListRecipesRequest, context: Context
    ) -> pb.ListRecipesResponse:
        recipes, token, total = await self._service.list_recipes(
            filter_text=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListRecipesResponse(
            recipes=[convert.recipe_to_pb(r) for r in recipes],
            next_page_token=token,
            total_size=total,
        )

    async def Preload(
        self, request: pb.PreloadRequest, context: Context
    ) -> AsyncIterator[pb.PreloadResponse]:
        stream = await self._service.preloads.preload(request.model, pin=request.pin)
        # aclosing: a caller that leaves stops the read within one buffer.
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for item in stream:
                if isinstance(item, PreloadRecord):
                    yield convert.preload_result_to_pb(item)
                else:
                    yield convert.preload_event_to_pb(item)

    async def GetPreload(self, request: pb.GetPreloadRequest, context: Context) -> pb.Preload:
        return convert.preload_to_pb(await self._service.preloads.get(request.name))

    async def ListPreloads(
        self, request: pb.ListPreloadsRequest, context: Context
    ) -> pb.ListPreloadsResponse:
        page = await self._service.preloads.list_preloads(
            page_size=request.page_size, page_token=request.page_token
        )
        return convert.preload_page_to_pb(page)

    async def DeletePreload(self, request: pb.DeletePreloadRequest, context: Context) -> Empty:
        await self._service.preloads.delete(request.name, allow_missing=request.allow_missing)
        return Empty()
