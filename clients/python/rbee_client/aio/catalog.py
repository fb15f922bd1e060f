"""An asyncio client for rbee.catalog.v1.CatalogService: the methods of
rbee_client.CatalogClient, awaited.

    from rbee_client.aio import CatalogClient

    async with CatalogClient("127.0.0.1:50061") as catalog:
        models, total = await catalog.list_models(all_pages=True)
        results, ctx = await catalog.evaluate_compatibility(models[0].name)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, AsyncServiceClient, RetryPolicy
from rbee_client.catalog import (
    compatibility_request,
    create_install_request,
    install_name,
    local_draft,
    matrix_request,
    matrix_rows_from_pb,
    model_name,
    update_model_request,
    worker_type_name,
)
from services.catalog import convert
from services.catalog.domain import (
    CompatibilityResult,
    Device,
    Install,
    KvCacheType,
    Model,
    ModelMetadata,
    ModelSource,
    ModelState,
    WorkerType,
)
from services.catalog.service import ModelDraft
from services.common.channels import ChannelSecurity


class CatalogClient(AsyncServiceClient):
    """Talks to one catalog over a grpc.aio channel; `async with` closes the channel it opened."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(target, security=security, timeout=timeout, channel=channel, retry=retry)
        self._stub = catalog_pb2_grpc.CatalogServiceStub(self._channel)

    # ---- models -----------------------------------------------------------------------------

    async def get_model(self, model: str) -> Model:
        """One model (`models/ID` or `ID`)."""
        msg = await self._unary(self._stub.GetModel, pb.GetModelRequest(name=model_name(model)))
        return convert.model_from_pb(msg)

    async def list_models(
        self, *, filter: str = "", page_size: int = 0, page_token: str = "", all_pages: bool = False
    ) -> tuple[list[Model], int]:
        """One page (or every page with `all_pages`) and the total number of matches."""
        models: list[Model] = []
        token = page_token
        while True:
            resp = await self._unary(
                self._stub.ListModels,
                pb.ListModelsRequest(filter=filter, page_size=page_size, page_token=token),
            )
            models.extend(convert.model_from_pb(m) for m in resp.models)
            token = resp.next_page_token
            if not all_pages or not token:
                return models, int(resp.total_size)

    async def create_model(
        self, draft: ModelDraft, *, model_id: str = "", validate_only: bool = False
    ) -> Model:
        """Register a model from a draft (source, paths, labels, ...)."""
        msg = await self._unary(
            self._stub.CreateModel,
            pb.CreateModelRequest(
                model_id=model_id,
                model=convert.model_draft_to_pb(draft),
                validate_only=validate_only,
            ),
        )
        return convert.model_from_pb(msg)

    async def register_local(
        self, path: str, *, model_id: str = "", display_name: str = ""
    ) -> Model:
        """Register a file or folder on the catalog host in place (no copy)."""
        return await self.create_model(
            local_draft(path, display_name=display_name), model_id=model_id
        )

    async def update_model(
        self,
        model: str,
        *,
        display_name: str | None = None,
        labels: Mapping[str, str] | None = None,
        state: ModelState | None = None,
        state_message: str | None = None,
        paths: Sequence[str] | None = None,
        size_bytes: int | None = None,
        sha256: str | None = None,
        source: ModelSource | None = None,
        etag: str = "",
    ) -> Model:
        """Change the fields given (the others stay); `etag` makes it conditional (ABORTED when
        the model changed since)."""
        request = update_model_request(
            model,
            display_name=display_name,
            labels=labels,
            state=state,
            state_message=state_message,
            paths=paths,
            size_bytes=size_bytes,
            sha256=sha256,
            source=source,
            etag=etag,
        )
        return convert.model_from_pb(await self._unary(self._stub.UpdateModel, request))

    async def delete_model(self, model: str, *, force: bool = False, etag: str = "") -> Model:
        """Delete the record; returns what it was."""
        current = await self.get_model(model)
        await self._unary(
            self._stub.DeleteModel,
            pb.DeleteModelRequest(name=model_name(model), force=force, etag=etag or current.etag),
        )
        return current

    async def inspect_model(self, model: str) -> Model:
        """Read the model's headers again and store the metadata; returns the model."""
        msg = await self._unary(
            self._stub.InspectModel, pb.InspectModelRequest(name=model_name(model))
        )
        return convert.model_from_pb(msg)

    async def inspect_path(self, path: str) -> ModelMetadata:
        """The metadata of a file or folder on the catalog host, without registering it."""
        msg = await self._unary(self._stub.InspectPath, pb.InspectPathRequest(path=path))
        return convert.metadata_from_pb(msg)

    # ---- worker types and installs --------------------------------------------------------------

    async def get_worker_type(self, worker_type: str) -> tuple[WorkerType, bool]:
        """One worker type (`worker-types/ID` or `ID`) and whether the catalog host supports it."""
        msg = await self._unary(
            self._stub.GetWorkerType, pb.GetWorkerTypeRequest(name=worker_type_name(worker_type))
        )
        return convert.worker_type_from_pb(msg), bool(msg.supported_on_host)

    async def list_worker_types(self, *, filter: str = "") -> list[tuple[WorkerType, bool]]:
        """Every worker type with whether the catalog host supports it (all pages)."""
        found: list[tuple[WorkerType, bool]] = []
        token = ""
        while True:
            resp = await self._unary(
                self._stub.ListWorkerTypes,
                pb.ListWorkerTypesRequest(filter=filter, page_token=token),
            )
            found.extend(
                (convert.worker_type_from_pb(w), bool(w.supported_on_host))
                for w in resp.worker_types
            )
            token = resp.next_page_token
            if not token:
                return found

    async def get_install(self, install: str) -> Install:
        """One installed backend (`installs/ID` or `ID`)."""
        msg = await self._unary(
            self._stub.GetInstall, pb.GetInstallRequest(name=install_name(install))
        )
        return convert.install_from_msg(msg)

    async def list_installs(self, *, filter: str = "") -> list[Install]:
        """Every installed backend (all pages)."""
        installs: list[Install] = []
        token = ""
        while True:
            resp = await self._unary(
                self._stub.ListInstalls, pb.ListInstallsRequest(filter=filter, page_token=token)
            )
            installs.extend(convert.install_from_msg(i) for i in resp.installs)
            token = resp.next_page_token
            if not token:
                return installs

    async def create_install(
        self,
        worker_type: str,
        *,
        install_id: str = "",
        version: str = "",
        path: str = "",
        backend_version: str = "",
        python_version: str = "",
        platform: str = "",
        cpu_architecture: str = "",
        labels: Mapping[str, str] | None = None,
        validate_only: bool = False,
    ) -> Install:
        """Record an installed backend of `worker_type` (the provisioner does this after a
        build; `rbee install` is the way for people)."""
        request = create_install_request(
            worker_type,
            install_id=install_id,
            version=version,
            path=path,
            backend_version=backend_version,
            python_version=python_version,
            platform=platform,
            cpu_architecture=cpu_architecture,
            labels=labels,
            validate_only=validate_only,
        )
        return convert.install_from_msg(await self._unary(self._stub.CreateInstall, request))

    async def delete_install(self, install: str, *, allow_missing: bool = False) -> None:
        """Forget an installed backend (its files stay)."""
        await self._unary(
            self._stub.DeleteInstall,
            pb.DeleteInstallRequest(name=install_name(install), allow_missing=allow_missing),
        )

    # ---- compatibility ------------------------------------------------------------------------

    async def evaluate_compatibility(
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
        request = compatibility_request(
            model,
            worker_types=worker_types,
            device=device,
            context_length=context_length,
            kv_cache_type=kv_cache_type,
            gpu_layers=gpu_layers,
        )
        resp = await self._unary(self._stub.EvaluateCompatibility, request)
        results = [convert.compat_result_from_pb(r) for r in resp.results]
        return results, int(resp.context_length_used)

    async def compatibility_matrix(
        self, *, filter: str = "", device: Device | None = None, context_length: int | None = None
    ) -> list[tuple[str, list[CompatibilityResult], str]]:
        """Every model x every worker type: (model name, results, reason when empty)."""
        rows: list[tuple[str, list[CompatibilityResult], str]] = []
        token = ""
        while True:
            request = matrix_request(
                filter=filter, device=device, context_length=context_length, page_token=token
            )
            resp = await self._unary(self._stub.ComputeCompatibilityMatrix, request)
            rows.extend(matrix_rows_from_pb(resp))
            token = resp.next_page_token
            if not token:
                return rows
