"""A typed, synchronous client for rbee.catalog.v1.CatalogService.

Every call has a deadline; failures raise the typed exceptions of rbee_client.errors (built
from the server's ErrorInfo, never from message strings); only UNAVAILABLE is retried, with
backoff, honouring RetryInfo. Results are the catalog's domain types (pydantic models).

    with CatalogClient("127.0.0.1:50061") as catalog:
        model = catalog.register_local("/models/llama.gguf")
        results, ctx = catalog.evaluate_compatibility(model.name)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee_client.errors import RbeeClientError, ServiceUnavailableError, error_from_rpc
from services.catalog import convert
from services.catalog.domain import (
    CompatibilityResult,
    Device,
    KvCacheType,
    Model,
    ModelMetadata,
    ModelSource,
    SourceKind,
    WorkerType,
)
from services.catalog.service import ModelDraft

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
MAX_ATTEMPTS = 4


def _model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


def _worker_type_name(worker_type: str) -> str:
    return worker_type if worker_type.startswith("worker-types/") else f"worker-types/{worker_type}"


class CatalogClient:
    """Talks to one catalog; usable as a context manager (closes the channel)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._own_channel = channel is None
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, fn: Callable[..., T], request: object) -> T:
        """One RPC with a deadline; UNAVAILABLE retried with backoff (RetryInfo first)."""
        delay = 0.2
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return fn(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
                if not isinstance(err, ServiceUnavailableError) or attempt == MAX_ATTEMPTS:
                    raise err from None
                time.sleep(err.retry_after_seconds or delay)
                delay *= 2
        raise AssertionError("unreachable")

    # ---- models -----------------------------------------------------------------------------

    def get_model(self, model: str) -> Model:
        msg = self._call(self._stub.GetModel, pb.GetModelRequest(name=_model_name(model)))
        return convert.model_from_pb(msg)

    def list_models(
        self, *, filter: str = "", page_size: int = 0, page_token: str = "", all_pages: bool = False
    ) -> tuple[list[Model], int]:
        """One page (or every page with `all_pages`) and the total number of matches."""
        models: list[Model] = []
        token = page_token
        while True:
            resp = self._call(
                self._stub.ListModels,
                pb.ListModelsRequest(filter=filter, page_size=page_size, page_token=token),
            )
            models.extend(convert.model_from_pb(m) for m in resp.models)
            token = resp.next_page_token
            if not all_pages or not token:
                return models, resp.total_size

    def create_model(
        self, draft: ModelDraft, *, model_id: str = "", validate_only: bool = False
    ) -> Model:
        msg = self._call(
            self._stub.CreateModel,
            pb.CreateModelRequest(
                model_id=model_id,
                model=convert.model_draft_to_pb(draft),
                validate_only=validate_only,
            ),
        )
        return convert.model_from_pb(msg)

    def register_local(self, path: str, *, model_id: str = "", display_name: str = "") -> Model:
        """Register a file or folder on the catalog host in place (no copy)."""
        draft = ModelDraft(
            source=ModelSource(kind=SourceKind.LOCAL, path=path),
            display_name=display_name,
            paths=(path,),
        )
        return self.create_model(draft, model_id=model_id)

    def delete_model(self, model: str, *, force: bool = False, etag: str = "") -> Model:
        """Delete the record; returns what it was."""
        current = self.get_model(model)
        self._call(
            self._stub.DeleteModel,
            pb.DeleteModelRequest(name=_model_name(model), force=force, etag=etag or current.etag),
        )
        return current

    def inspect_model(self, model: str) -> Model:
        msg = self._call(self._stub.InspectModel, pb.InspectModelRequest(name=_model_name(model)))
        return convert.model_from_pb(msg)

    def inspect_path(self, path: str) -> ModelMetadata:
        msg = self._call(self._stub.InspectPath, pb.InspectPathRequest(path=path))
        return convert.metadata_from_pb(msg)

    # ---- worker types and compatibility ---------------------------------------------------------

    def list_worker_types(self, *, filter: str = "") -> list[tuple[WorkerType, bool]]:
        """Every worker type with whether the catalog host supports it."""
        resp = self._call(self._stub.ListWorkerTypes, pb.ListWorkerTypesRequest(filter=filter))
        return [(convert.worker_type_from_pb(w), w.supported_on_host) for w in resp.worker_types]

    def evaluate_compatibility(
        self,
        model: str,
        *,
        worker_types: Sequence[str] = (),
        device: Device | None = None,
        context_length: int | None = None,
        kv_cache_type: str | KvCacheType = KvCacheType.F16,
        gpu_layers: int | None = None,
    ) -> tuple[list[CompatibilityResult], int]:
        """Per worker type: verdict, reasons, memory numbers; and the context length used."""
        try:
            kv = KvCacheType(kv_cache_type)
        except ValueError:
            raise RbeeClientError(
                message=f"unknown KV cache type {kv_cache_type!r}; use one of "
                + ", ".join(k.value for k in KvCacheType),
                code="INVALID_ARGUMENT",
                reason="INVALID_ARGUMENT",
            ) from None
        request = pb.EvaluateCompatibilityRequest(
            model=_model_name(model),
            worker_types=[_worker_type_name(w) for w in worker_types],
            context_length=context_length or 0,
            kv_cache_type=convert.KV_TYPE_TO_PB[kv],
        )
        if device is not None:
            request.device.CopyFrom(convert.device_to_pb(device))
        if gpu_layers is not None:
            request.gpu_layers = gpu_layers
        resp = self._call(self._stub.EvaluateCompatibility, request)
        return [convert.compat_result_from_pb(r) for r in resp.results], resp.context_length_used

    def compatibility_matrix(
        self, *, filter: str = "", device: Device | None = None, context_length: int | None = None
    ) -> list[tuple[str, list[CompatibilityResult], str]]:
        """Every model x every worker type: (model name, results, reason when empty)."""
        rows: list[tuple[str, list[CompatibilityResult], str]] = []
        token = ""
        while True:
            request = pb.ComputeCompatibilityMatrixRequest(
                filter=filter, context_length=context_length or 0, page_size=200, page_token=token
            )
            if device is not None:
                request.device.CopyFrom(convert.device_to_pb(device))
            resp = self._call(self._stub.ComputeCompatibilityMatrix, request)
            for row in resp.rows:
                results = [convert.compat_result_from_pb(r) for r in row.results]
                rows.append((row.model, results, "" if results else "not READY or not inspected"))
            token = resp.next_page_token
            if not token:
                return rows
