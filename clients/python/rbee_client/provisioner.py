"""A synchronous client for rbee.provisioner.v1.ProvisionerService.

    from rbee_client.provisioner import ProvisionerClient

    with ProvisionerClient("127.0.0.1:50081") as prov:
        for event in prov.pull("hf:org/repo:model.Q4_K_M.gguf"):
            if isinstance(event, PullUpdate):
                print(event.state, event.done_bytes, event.total_bytes)
            else:
                print("ready:", event.name)      # the catalog Model

Unary calls carry a deadline (`timeout`, default 30 s). Pull streams have none by default (a
pull may take hours); pass `timeout=` to bound one. Errors are typed (rbee_client.errors); only
UNAVAILABLE is retried, and a stream never once it has yielded an event (rbee_client.calls).
rbee_client.aio.ProvisionerClient has the same methods, awaited.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from rbee.common.v1 import device_pb2
from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, RetryPolicy, ServiceClient
from services.catalog import convert as catalog_convert
from services.catalog.domain import Install, Model
from services.common.channels import ChannelSecurity

STATE_NAMES = {
    value: name.removeprefix("PULL_STATE_").lower()
    for name, value in pb.PullState.items()
    if value != 0
}


@dataclass(frozen=True)
class PullUpdate:
    """One progress event of a pull."""

    pull: str
    state: str  # queued, resolving, downloading, verifying, registering
    file: str
    file_index: int
    file_count: int
    file_done: int
    file_total: int | None
    done_bytes: int
    total_bytes: int | None
    bytes_per_second: float
    eta_seconds: float | None
    reused_bytes: int
    message: str
    raw: pb.PullProgress


def pull_update_from_pb(p: pb.PullProgress) -> PullUpdate:
    """The PullUpdate of a PullProgress message."""
    return PullUpdate(
        pull=p.pull,
        state=STATE_NAMES.get(p.state, "unknown"),
        file=p.file,
        file_index=p.file_index,
        file_count=p.file_count,
        file_done=p.file_bytes.completed_bytes,
        file_total=p.file_bytes.total_bytes or None,
        done_bytes=p.total_bytes.completed_bytes,
        total_bytes=p.total_bytes.total_bytes or None,
        bytes_per_second=p.total_bytes.bytes_per_second,
        eta_seconds=p.total_bytes.eta.ToTimedelta().total_seconds()
        if p.total_bytes.HasField("eta")
        else None,
        reused_bytes=p.total_bytes.reused_bytes,
        message=p.message,
        raw=p,
    )


@dataclass(frozen=True)
class PreloadUpdate:
    """One progress event of a preload."""

    model: str
    file: str
    file_index: int
    file_count: int
    done_bytes: int
    total_bytes: int
    bytes_per_second: float
    eta_seconds: float | None
    resident_before_bytes: int  # already in the page cache when the preload started
    raw: pb.PreloadProgress


def preload_update_from_pb(p: pb.PreloadProgress) -> PreloadUpdate:
    """The PreloadUpdate of a PreloadProgress message."""
    return PreloadUpdate(
        model=p.model,
        file=p.file,
        file_index=p.file_index,
        file_count=p.file_count,
        done_bytes=p.bytes.completed_bytes,
        total_bytes=p.bytes.total_bytes,
        bytes_per_second=p.bytes.bytes_per_second,
        eta_seconds=p.bytes.eta.ToTimedelta().total_seconds() if p.bytes.HasField("eta") else None,
        resident_before_bytes=p.bytes.reused_bytes,
        raw=p,
    )


def pull_event_from_pb(msg: pb.PullModelResponse) -> PullUpdate | Model:
    """The event a PullModel, WatchPull or ResumePull response carries."""
    if msg.HasField("model"):
        return catalog_convert.model_from_pb(msg.model)
    return pull_update_from_pb(msg.progress)


def preload_event_from_pb(msg: pb.PreloadResponse) -> PreloadUpdate | pb.Preload:
    """The event a Preload response carries."""
    return msg.preload if msg.HasField("preload") else preload_update_from_pb(msg.progress)


def install_event_from_pb(msg: pb.InstallWorkerResponse) -> pb.InstallProgress | Install:
    """The event an InstallWorker or WatchInstallJob response carries."""
    if msg.HasField("install"):
        return catalog_convert.install_from_msg(msg.install)
    return msg.progress


def inspect_remote_request(
    source: str,
    *,
    options: pb.PullOptions | None,
    context_length: int,
    devices: Sequence[device_pb2.Device],
) -> pb.InspectRemoteRequest:
    """An InspectRemoteRequest."""
    return pb.InspectRemoteRequest(
        source=source, options=options, context_length=context_length, devices=list(devices)
    )


def merge_preload_pages(merged: pb.ListPreloadsResponse, page: pb.ListPreloadsResponse) -> None:
    """Add one page of ListPreloads to `merged` (the totals are the latest page's)."""
    merged.preloads.extend(page.preloads)
    merged.total_size = page.total_size
    merged.budget_bytes = page.budget_bytes
    merged.resident_bytes = page.resident_bytes
    merged.evictions = page.evictions


class ProvisionerClient(ServiceClient):
    """Typed, synchronous access to the provisioner (one channel; close it when done)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        security: ChannelSecurity | None = None,
        channel: grpc.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(address, security=security, timeout=timeout, channel=channel, retry=retry)
        self._stub = provisioner_pb2_grpc.ProvisionerServiceStub(self._channel)

    @property
    def stub(self) -> provisioner_pb2_grpc.ProvisionerServiceStub:
        """The raw stub, for calls this client does not wrap."""
        return self._stub

    # --- pulls ---------------------------------------------------------------------------------

    def _pull_stream(
        self, method: Callable[..., Any], request: object, timeout: float | None
    ) -> Iterator[PullUpdate | Model]:
        for msg in self._stream(method, request, timeout):
            yield pull_event_from_pb(msg)

    def pull(
        self,
        source: str,
        *,
        options: pb.PullOptions | None = None,
        pull_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[PullUpdate | Model]:
        """Pull a model: progress updates, then the catalog Model (READY). Leaving the iterator
        early detaches this caller (the pull goes on unless cancelled)."""
        request = pb.PullModelRequest(source=source, options=options, pull_id=pull_id)
        return self._pull_stream(self._stub.PullModel, request, timeout)

    def watch(self, name: str, *, timeout: float | None = None) -> Iterator[PullUpdate | Model]:
        """Follow a running pull (`pulls/ID`): its progress, then the Model."""
        return self._pull_stream(self._stub.WatchPull, pb.WatchPullRequest(name=name), timeout)

    def resume(self, name: str, *, timeout: float | None = None) -> Iterator[PullUpdate | Model]:
        """Resume a paused or failed pull from the bytes on disk."""
        return self._pull_stream(self._stub.ResumePull, pb.ResumePullRequest(name=name), timeout)

    def get_pull(self, name: str) -> pb.Pull:
        """One pull (`pulls/ID`)."""
        pull: pb.Pull = self._unary(self._stub.GetPull, pb.GetPullRequest(name=name))
        return pull

    def list_pulls(self, *, filter: str = "", page_size: int = 0) -> list[pb.Pull]:
        """Every pull (all pages)."""
        pulls: list[pb.Pull] = []
        token = ""
        while True:
            response: pb.ListPullsResponse = self._unary(
                self._stub.ListPulls,
                pb.ListPullsRequest(filter=filter, page_size=page_size, page_token=token),
            )
            pulls.extend(response.pulls)
            token = response.next_page_token
            if not token:
                return pulls

    def cancel_pull(self, name: str, *, discard_partial: bool = False) -> pb.Pull:
        """Stop a pull (the bytes stay for a resume unless `discard_partial`)."""
        pull: pb.Pull = self._unary(
            self._stub.CancelPull, pb.CancelPullRequest(name=name, discard_partial=discard_partial)
        )
        return pull

    def delete_pull(self, name: str, *, force: bool = False) -> None:
        """Forget a finished pull (`force`: cancel a running one first)."""
        self._unary(self._stub.DeletePull, pb.DeletePullRequest(name=name, force=force))

    def resolve(
        self, source: str, *, options: pb.PullOptions | None = None
    ) -> pb.ResolveSourceResponse:
        """What a pull of `source` would fetch (files, sizes), without fetching it."""
        response: pb.ResolveSourceResponse = self._unary(
            self._stub.ResolveSource, pb.ResolveSourceRequest(source=source, options=options)
        )
        return response

    def inspect_remote(
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
        response: pb.InspectRemoteResponse = self._unary(self._stub.InspectRemote, request)
        return response

    def search(self, request: pb.SearchModelsRequest) -> pb.SearchModelsResponse:
        """Search the model hubs."""
        response: pb.SearchModelsResponse = self._unary(self._stub.SearchModels, request)
        return response

    # --- installs and recipes ------------------------------------------------------------------

    def install_worker(
        self,
        worker_type: str,
        *,
        options: pb.InstallOptions | None = None,
        timeout: float | None = None,
    ) -> Iterator[pb.InstallProgress | Install]:
        """Build and install a worker type's backend: InstallProgress (with log lines), then
        the catalog Install."""
        request = pb.InstallWorkerRequest(worker_type=worker_type, options=options)
        for msg in self._stream(self._stub.InstallWorker, request, timeout):
            yield install_event_from_pb(msg)

    def get_install_job(self, name: str) -> pb.InstallJob:
        """One install job (`installJobs/ID`)."""
        job: pb.InstallJob = self._unary(
            self._stub.GetInstallJob, pb.GetInstallJobRequest(name=name)
        )
        return job

    def list_install_jobs(self, *, filter: str = "") -> list[pb.InstallJob]:
        """Every install job (all pages)."""
        jobs: list[pb.InstallJob] = []
        token = ""
        while True:
            response: pb.ListInstallJobsResponse = self._unary(
                self._stub.ListInstallJobs,
                pb.ListInstallJobsRequest(filter=filter, page_token=token),
            )
            jobs.extend(response.install_jobs)
            token = response.next_page_token
            if not token:
                return jobs

    def watch_install_job(
        self, name: str, *, timeout: float | None = None
    ) -> Iterator[pb.InstallProgress | Install]:
        """Follow a running install job: its progress, then the Install."""
        request = pb.WatchInstallJobRequest(name=name)
        for msg in self._stream(self._stub.WatchInstallJob, request, timeout):
            yield install_event_from_pb(msg)

    def cancel_install_job(self, name: str) -> pb.InstallJob:
        """Stop a running install job."""
        job: pb.InstallJob = self._unary(
            self._stub.CancelInstallJob, pb.CancelInstallJobRequest(name=name)
        )
        return job

    def get_recipe(self, name: str) -> pb.Recipe:
        """One recipe (`recipes/ID`)."""
        recipe: pb.Recipe = self._unary(self._stub.GetRecipe, pb.GetRecipeRequest(name=name))
        return recipe

    def list_recipes(self, *, filter: str = "") -> list[pb.Recipe]:
        """Every recipe the provisioner can run (all pages)."""
        recipes: list[pb.Recipe] = []
        token = ""
        while True:
            response: pb.ListRecipesResponse = self._unary(
                self._stub.ListRecipes, pb.ListRecipesRequest(filter=filter, page_token=token)
            )
            recipes.extend(response.recipes)
            token = response.next_page_token
            if not token:
                return recipes

    # --- preloads ------------------------------------------------------------------------------

    def preload(
        self, model: str, *, pin: bool = False, timeout: float | None = None
    ) -> Generator[PreloadUpdate | pb.Preload, None, None]:
        """Warm `models/{id}` into the page cache: progress updates, then the pb.Preload with
        the residency measured at the end. Leaving the iterator early stops the read."""
        request = pb.PreloadRequest(model=model, pin=pin)
        for msg in self._stream(self._stub.Preload, request, timeout):
            yield preload_event_from_pb(msg)

    def get_preload(self, name: str) -> pb.Preload:
        """A preload (`preloads/{id}`) with its residency measured now."""
        preload: pb.Preload = self._unary(self._stub.GetPreload, pb.GetPreloadRequest(name=name))
        return preload

    def list_preloads(self, *, page_size: int = 0) -> pb.ListPreloadsResponse:
        """Every preload, most recently used first (all pages), with the budget and totals."""
        merged = pb.ListPreloadsResponse()
        token = ""
        while True:
            response: pb.ListPreloadsResponse = self._unary(
                self._stub.ListPreloads,
                pb.ListPreloadsRequest(page_size=page_size, page_token=token),
            )
            merge_preload_pages(merged, response)
            token = response.next_page_token
            if not token:
                return merged

    def delete_preload(self, name: str, *, allow_missing: bool = False) -> None:
        """Evict a preload from the page cache (DONTNEED) and stop tracking it."""
        self._unary(
            self._stub.DeletePreload,
            pb.DeletePreloadRequest(name=name, allow_missing=allow_missing),
        )
