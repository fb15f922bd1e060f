"""A synchronous client for rbee.provisioner.v1.ProvisionerService.

    from rbee_client.provisioner import ProvisionerClient

    with ProvisionerClient("127.0.0.1:50081") as prov:
        for event in prov.pull("hf:org/repo:model.Q4_K_M.gguf"):
            if isinstance(event, PullUpdate):
                print(event.state, event.done_bytes, event.total_bytes)
            else:
                print("ready:", event.name)      # the catalog Model

Unary calls carry a deadline (`timeout`, default 30 s). Pull streams have none by default (a
pull may take hours); pass `timeout=` to bound one. Errors are typed (rbee_client.errors).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc

from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from rbee_client.errors import error_from_rpc
from services.catalog import convert as catalog_convert
from services.catalog.domain import Model

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


def _update_from_pb(p: pb.PullProgress) -> PullUpdate:
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


def _preload_update_from_pb(p: pb.PreloadProgress) -> PreloadUpdate:
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


class ProvisionerClient:
    """Typed, synchronous access to the provisioner (one channel; close it when done)."""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = provisioner_pb2_grpc.ProvisionerServiceStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    @property
    def stub(self) -> provisioner_pb2_grpc.ProvisionerServiceStub:
        """The raw stub, for calls this client does not wrap yet."""
        return self._stub

    def __enter__(self) -> ProvisionerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _stream(self, call: Iterator[pb.PullModelResponse]) -> Iterator[PullUpdate | Model]:
        try:
            for msg in call:
                if msg.HasField("model"):
                    yield catalog_convert.model_from_pb(msg.model)
                else:
                    yield _update_from_pb(msg.progress)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()  # leaving early (Ctrl-C, break) tells the server this caller left

    def pull(
        self,
        source: str,
        *,
        options: pb.PullOptions | None = None,
        pull_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[PullUpdate | Model]:
        """Pull a model: progress updates, then the catalog Model (READY)."""
        request = pb.PullModelRequest(source=source, options=options, pull_id=pull_id)
        return self._stream(self._stub.PullModel(request, timeout=timeout))

    def watch(self, name: str, *, timeout: float | None = None) -> Iterator[PullUpdate | Model]:
        return self._stream(self._stub.WatchPull(pb.WatchPullRequest(name=name), timeout=timeout))

    def resume(self, name: str, *, timeout: float | None = None) -> Iterator[PullUpdate | Model]:
        return self._stream(self._stub.ResumePull(pb.ResumePullRequest(name=name), timeout=timeout))

    def get_pull(self, name: str) -> pb.Pull:
        try:
            pull: pb.Pull = self._stub.GetPull(pb.GetPullRequest(name=name), timeout=self._timeout)
            return pull
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_pulls(self, *, filter: str = "", page_size: int = 0) -> list[pb.Pull]:
        pulls: list[pb.Pull] = []
        token = ""
        try:
            while True:
                response = self._stub.ListPulls(
                    pb.ListPullsRequest(filter=filter, page_size=page_size, page_token=token),
                    timeout=self._timeout,
                )
                pulls.extend(response.pulls)
                token = response.next_page_token
                if not token:
                    return pulls
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def cancel_pull(self, name: str, *, discard_partial: bool = False) -> pb.Pull:
        try:
            pull: pb.Pull = self._stub.CancelPull(
                pb.CancelPullRequest(name=name, discard_partial=discard_partial),
                timeout=self._timeout,
            )
            return pull
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def delete_pull(self, name: str, *, force: bool = False) -> None:
        try:
            self._stub.DeletePull(
                pb.DeletePullRequest(name=name, force=force), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def resolve(
        self, source: str, *, options: pb.PullOptions | None = None
    ) -> pb.ResolveSourceResponse:
        try:
            response: pb.ResolveSourceResponse = self._stub.ResolveSource(
                pb.ResolveSourceRequest(source=source, options=options), timeout=self._timeout
            )
            return response
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def inspect_remote(
        self,
        source: str,
        *,
        options: pb.PullOptions | None = None,
        context_length: int = 0,
        devices: Sequence[object] = (),
    ) -> pb.InspectRemoteResponse:
        try:
            response: pb.InspectRemoteResponse = self._stub.InspectRemote(
                pb.InspectRemoteRequest(
                    source=source,
                    options=options,
                    context_length=context_length,
                    devices=list(devices),  # type: ignore[arg-type]
                ),
                timeout=self._timeout,
            )
            return response
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def search(self, request: pb.SearchModelsRequest) -> pb.SearchModelsResponse:
        try:
            response: pb.SearchModelsResponse = self._stub.SearchModels(
                request, timeout=self._timeout
            )
            return response
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    # --- preloads ------------------------------------------------------------------------------

    def preload(
        self, model: str, *, pin: bool = False, timeout: float | None = None
    ) -> Generator[PreloadUpdate | pb.Preload, None, None]:
        """Warm `models/{id}` into the page cache: progress updates, then the pb.Preload with
        the residency measured at the end. Leaving the iterator early stops the read."""
        call = self._stub.Preload(pb.PreloadRequest(model=model, pin=pin), timeout=timeout)
        try:
            for msg in call:
                if msg.HasField("preload"):
                    yield msg.preload
                else:
                    yield _preload_update_from_pb(msg.progress)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # leaving early (Ctrl-C, break) stops the server's read

    def get_preload(self, name: str) -> pb.Preload:
        """A preload (`preloads/{id}`) with its residency measured now."""
        try:
            preload: pb.Preload = self._stub.GetPreload(
                pb.GetPreloadRequest(name=name), timeout=self._timeout
            )
            return preload
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_preloads(self, *, page_size: int = 0) -> pb.ListPreloadsResponse:
        """Every preload, most recently used first (all pages), with the budget and totals."""
        merged = pb.ListPreloadsResponse()
        token = ""
        try:
            while True:
                response = self._stub.ListPreloads(
                    pb.ListPreloadsRequest(page_size=page_size, page_token=token),
                    timeout=self._timeout,
                )
                merged.preloads.extend(response.preloads)
                merged.total_size = response.total_size
                merged.budget_bytes = response.budget_bytes
                merged.resident_bytes = response.resident_bytes
                merged.evictions = response.evictions
                token = response.next_page_token
                if not token:
                    return merged
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def delete_preload(self, name: str, *, allow_missing: bool = False) -> None:
        """Evict a preload from the page cache (DONTNEED) and stop tracking it."""
        try:
            self._stub.DeletePreload(
                pb.DeletePreloadRequest(name=name, allow_missing=allow_missing),
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
