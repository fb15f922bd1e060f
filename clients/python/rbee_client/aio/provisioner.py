"""An asyncio client for rbee.provisioner.v1.ProvisionerService: the methods of
rbee_client.ProvisionerClient, awaited, with streams as async iterators.

    from rbee_client.aio import ProvisionerClient
    from rbee_client.provisioner import PullUpdate

    async with ProvisionerClient("127.0.0.1:50081") as prov:
        async for event in prov.pull("hf:org/repo:model.Q4_K_M.gguf"):
            if isinstance(event, PullUpdate):
                print(event.state, event.done_bytes, event.total_bytes)
            else:
                print("ready:", event.name)      # the catalog Model
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from rbee.common.v1 import device_pb2
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, AsyncServiceClient, RetryPolicy
from rbee_client.provisioner import (
    PreloadUpdate,
    PullUpdate,
    inspect_remote_request,
    install_event_from_pb,
    merge_preload_pages,
    preload_event_from_pb,
    pull_event_from_pb,
)
from services.catalog.domain import Install, Model
from services.common.channels import ChannelSecurity


class ProvisionerClient(AsyncServiceClient):
    """Talks to the provisioner over a grpc.aio channel; `async with` closes the channel it
    opened."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        security: ChannelSecurity | None = None,
        channel: grpc.aio.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(address, security=security, timeout=timeout, channel=channel, retry=retry)
        self._stub = provisioner_pb2_grpc.ProvisionerServiceStub(self._channel)

    @property
    def stub(self) -> provisioner_pb2_grpc.ProvisionerServiceStub:
        """The raw (grpc.aio) stub, for calls this client does not wrap."""
        return self._stub

    # --- pulls ---------------------------------------------------------------------------------

    async def _pull_stream(
        self,
        method: Callable[..., Any],
        request: object,
        timeout: float | None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[PullUpdate | Model]:
        async for msg in self._stream(method, request, timeout):
            yield pull_event_from_pb(msg)

    def pull(
        self,
        source: str,
        *,
        options: pb.PullOptions | None = None,
        pull_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[PullUpdate | Model]:
        """Pull a model: progress updates, then the catalog Model (READY). Leaving the iterator
        early detaches this caller (the pull goes on unless cancelled)."""
        request = pb.PullModelRequest(source=source, options=options, pull_id=pull_id)
        return self._pull_stream(self._stub.PullModel, request, timeout)

    def watch(
        self, name: str, *, timeout: float | None = None
    ) -> AsyncIterator[PullUpdate | Model]:
        """Follow a running pull (`pulls/ID`): its progress, then the Model."""
        return self._pull_stream(self._stub.WatchPull, pb.WatchPullRequest(name=name), timeout)

    def resume(
        self, name: str, *, timeout: float | None = None
    ) -> AsyncIterator[PullUpdate | Model]:
        """Resume a paused or failed pull from the bytes on disk."""
        return self._pull_stream(self._stub.ResumePull, pb.ResumePullRequest(name=name), timeout)

    async def get_pull(self, name: str) -> pb.Pull:
        """One pull (`pulls/ID`)."""
        pull: pb.Pull = await self._unary(self._stub.GetPull, pb.GetPullRequest(name=name))
        return pull

    async def list_pulls(self, *, filter: str = "", page_size: int = 0) -> list[pb.Pull]:
        """Every pull (all pages)."""
        pulls: list[pb.Pull] = []
        token = ""
        while True:
            response: pb.ListPullsResponse = await self._unary(
                self._stub.ListPulls,
                pb.ListPullsRequest(filter=filter, page_size=page_size, page_token=token),
            )
            pulls.extend(response.pulls)
            token = response.next_page_token
            if not token:
                return pulls

    async def cancel_pull(self, name: str, *, discard_partial: bool = False) -> pb.Pull:
        """Stop a pull (the bytes stay for a resume unless `discard_partial`)."""
        pull: pb.Pull = await self._unary(
            self._stub.CancelPull, pb.CancelPullRequest(name=name, discard_partial=discard_partial)
        )
        return pull

    async def delete_pull(self, name: str, *, force: bool = False) -> None:
        """Forget a finished pull (`force`: cancel a running one first)."""
        await self._unary(self._stub.DeletePull, pb.DeletePullRequest(name=name, force=force))

    async def resolve(
        self, source: str, *, options: pb.PullOptions | None = None
    ) -> pb.ResolveSourceResponse:
        """What a pull of `source` would fetch (files, sizes), without fetching it."""
        response: pb.ResolveSourceResponse = await self._unary(
            self._stub.ResolveSource, pb.ResolveSourceRequest(source=source, options=options)
        )
        return response

    async def inspect_remote(
        self,
        source: str,
        *,
        options: pb.PullOptions | None = None,
        context_length: int = 0,
        devices: Sequence[device_pb2.Device] = (),
    ) -> pb.InspectRemoteResponse:
        """A remote model's metadata and compatibility, read from its header before download."""
        request = inspect_remote_request(
            source, options=options, context_length=context_length, devices=devices
        )
        response: pb.InspectRemoteResponse = await self._unary(self._stub.InspectRemote, request)
        return response

    async def search(self, request: pb.SearchModelsRequest) -> pb.SearchModelsResponse:
        """Search the model hubs."""
        response: pb.SearchModelsResponse = await self._unary(self._stub.SearchModels, request)
        return response

    # --- installs and recipes ------------------------------------------------------------------

    async def install_worker(
        self,
        worker_type: str,
        *,
        options: pb.InstallOptions | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[pb.InstallProgress | Install]:
        """Build and install a worker type's backend: InstallProgress (with log lines), then
        the catalog Install."""
        request = pb.InstallWorkerRequest(worker_type=worker_type, options=options)
        async for msg in self._stream(self._stub.InstallWorker, request, timeout):
            yield install_event_from_pb(msg)

    async def get_install_job(self, name: str) -> pb.InstallJob:
        """One install job (`install-jobs/ID`)."""
        request = pb.GetInstallJobRequest(name=name)
        job: pb.InstallJob = await self._unary(self._stub.GetInstallJob, request)
        return job

    async def list_install_jobs(self, *, filter: str = "") -> list[pb.InstallJob]:
        """Every install job (all pages)."""
        jobs: list[pb.InstallJob] = []
        token = ""
        while True:
            response: pb.ListInstallJobsResponse = await self._unary(
                self._stub.ListInstallJobs,
                pb.ListInstallJobsRequest(filter=filter, page_token=token),
            )
            jobs.extend(response.install_jobs)
            token = response.next_page_token
            if not token:
                return jobs

    async def watch_install_job(
        self,
        name: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[pb.InstallProgress | Install]:
        """Follow a running install job: its progress, then the Install."""
        request = pb.WatchInstallJobRequest(name=name)
        async for msg in self._stream(self._stub.WatchInstallJob, request, timeout):
            yield install_event_from_pb(msg)

    async def cancel_install_job(self, name: str) -> pb.InstallJob:
        """Stop a running install job."""
        job: pb.InstallJob = await self._unary(
            self._stub.CancelInstallJob, pb.CancelInstallJobRequest(name=name)
        )
        return job

    async def get_recipe(self, name: str) -> pb.Recipe:
        """One recipe (`recipes/ID`)."""
        recipe: pb.Recipe = await self._unary(self._stub.GetRecipe, pb.GetRecipeRequest(name=name))
        return recipe

    async def list_recipes(self, *, filter: str = "") -> list[pb.Recipe]:
        """Every recipe the provisioner can run (all pages)."""
        recipes: list[pb.Recipe] = []
        token = ""
        while True:
            response: pb.ListRecipesResponse = await self._unary(
                self._stub.ListRecipes, pb.ListRecipesRequest(filter=filter, page_token=token)
            )
            recipes.extend(response.recipes)
            token = response.next_page_token
            if not token:
                return recipes

    # --- preloads ------------------------------------------------------------------------------

    async def preload(
        self,
        model: str,
        *,
        pin: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[PreloadUpdate | pb.Preload]:
        """Warm `models/{id}` into the page cache: progress updates, then the pb.Preload with
        the residency measured at the end. Leaving the iterator early stops the read."""
        request = pb.PreloadRequest(model=model, pin=pin)
        async for msg in self._stream(self._stub.Preload, request, timeout):
            yield preload_event_from_pb(msg)

    async def get_preload(self, name: str) -> pb.Preload:
        """A preload (`preloads/{id}`) with its residency measured now."""
        preload: pb.Preload = await self._unary(
            self._stub.GetPreload, pb.GetPreloadRequest(name=name)
        )
        return preload

    async def list_preloads(self, *, page_size: int = 0) -> pb.ListPreloadsResponse:
        """Every preload, most recently used first (all pages), with the budget and totals."""
        merged = pb.ListPreloadsResponse()
        token = ""
        while True:
            response: pb.ListPreloadsResponse = await self._unary(
                self._stub.ListPreloads,
                pb.ListPreloadsRequest(page_size=page_size, page_token=token),
            )
            merge_preload_pages(merged, response)
            token = response.next_page_token
            if not token:
                return merged

    async def delete_preload(self, name: str, *, allow_missing: bool = False) -> None:
        """Evict a preload from the page cache (DONTNEED) and stop tracking it."""
        await self._unary(
            self._stub.DeletePreload,
            pb.DeletePreloadRequest(name=name, allow_missing=allow_missing),
        )
