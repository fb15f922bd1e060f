"""A typed, synchronous client for rbee.catalog.v1.CatalogService.

Every call has a deadline; failures raise the typed exceptions of rbee_client.errors (built
from the server's ErrorInfo, never from message strings); only UNAVAILABLE is retried, with
backoff, honouring RetryInfo (rbee_client.calls). Results are the catalog's domain types
(pydantic models).

    with CatalogClient("127.0.0.1:50061") as catalog:
        model = catalog.register_local("/models/llama.gguf")
        results, ctx = catalog.evaluate_compatibility(model.name)

rbee_client.aio.CatalogClient has the same methods, awaited.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import field_mask_pb2

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, RetryPolicy, ServiceClient
from rbee_client.errors import InvalidArgumentError
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
    SourceKind,
    WorkerType,
)
from services.catalog.service import ModelDraft
from services.common.channels import ChannelSecurity

__all__ = ["DEFAULT_TIMEOUT", "CatalogClient"]

MATRIX_PAGE_SIZE = 200
NOT_EVALUATED = "not READY or not inspected"


def model_name(model: str) -> str:
    """`models/ID` from `ID` or `models/ID`."""
    return model if model.startswith("models/") else f"models/{model}"


def worker_type_name(worker_type: str) -> str:
    """`worker-types/ID` from `ID` or `worker-types/ID`."""
    return worker_type if worker_type.startswith("worker-types/") else f"worker-types/{worker_type}"


def install_name(install: str) -> str:
    """`installs/ID` from `ID` or `installs/ID`."""
    return install if install.startswith("installs/") else f"installs/{install}"


# ---- requests and results shared with rbee_client.aio.catalog -----------------------------------


def local_draft(path: str, *, display_name: str = "") -> ModelDraft:
    """The draft that registers a file or folder on the catalog host in place."""
    return ModelDraft(
        source=ModelSource(kind=SourceKind.LOCAL, path=path),
        display_name=display_name,
        paths=(path,),
    )


def update_model_request(
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
) -> pb.UpdateModelRequest:
    """An UpdateModelRequest whose mask names exactly the fields given (not None)."""
    msg = pb.Model(name=model_name(model), etag=etag)
    mask: list[str] = []
    if display_name is not None:
        msg.display_name = display_name
        mask.append("display_name")
    if labels is not None:
        msg.labels.update(labels)
        mask.append("labels")
    if state is not None:
        msg.state = convert.STATE_TO_PB[ModelState(state)]
        mask.append("state")
    if state_message is not None:
        msg.state_message = state_message
        mask.append("state_message")
    if paths is not None:
        msg.paths.extend(paths)
        mask.append("paths")
    if size_bytes is not None:
        msg.size_bytes = size_bytes
        mask.append("size_bytes")
    if sha256 is not None:
        msg.sha256 = sha256
        mask.append("sha256")
    if source is not None:
        msg.source.CopyFrom(convert.source_to_pb(source))
        mask.append("source")
    return pb.UpdateModelRequest(model=msg, update_mask=field_mask_pb2.FieldMask(paths=mask))


def create_install_request(
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
) -> pb.CreateInstallRequest:
    """A CreateInstallRequest (what the provisioner records after building a backend)."""
    return pb.CreateInstallRequest(
        install_id=install_id,
        install=pb.Install(
            worker_type=worker_type_name(worker_type),
            version=version,
            path=path,
            backend_version=backend_version,
            python_version=python_version,
            platform=platform,
            cpu_architecture=cpu_architecture,
            labels=dict(labels or {}),
        ),
        validate_only=validate_only,
    )


def compatibility_request(
    model: str,
    *,
    worker_types: Sequence[str] = (),
    device: Device | None = None,
    context_length: int | None = None,
    kv_cache_type: str | KvCacheType = KvCacheType.F16,
    gpu_layers: int | None = None,
) -> pb.EvaluateCompatibilityRequest:
    """An EvaluateCompatibilityRequest; an unknown KV cache type fails here, before any call."""
    try:
        kv = KvCacheType(kv_cache_type)
    except ValueError:
        raise InvalidArgumentError(
            message=f"unknown KV cache type {kv_cache_type!r}; use one of "
            + ", ".join(k.value for k in KvCacheType),
            code="INVALID_ARGUMENT",
            reason="INVALID_ARGUMENT",
        ) from None
    request = pb.EvaluateCompatibilityRequest(
        model=model_name(model),
        worker_types=[worker_type_name(w) for w in worker_types],
        context_length=context_length or 0,
        kv_cache_type=convert.KV_TYPE_TO_PB[kv],
    )
    if device is not None:
        request.device.CopyFrom(convert.device_to_pb(device))
    if gpu_layers is not None:
        request.gpu_layers = gpu_layers
    return request


def matrix_request(
    *, filter: str, device: Device | None, context_length: int | None, page_token: str
) -> pb.ComputeCompatibilityMatrixRequest:
    """One page of ComputeCompatibilityMatrix."""
    request = pb.ComputeCompatibilityMatrixRequest(
        filter=filter,
        context_length=context_length or 0,
        page_size=MATRIX_PAGE_SIZE,
        page_token=page_token,
    )
    if device is not None:
        request.device.CopyFrom(convert.device_to_pb(device))
    return request


def matrix_rows_from_pb(
    resp: pb.ComputeCompatibilityMatrixResponse,
) -> list[tuple[str, list[CompatibilityResult], str]]:
    """(model name, results, reason when empty) for each row of a matrix page."""
    rows: list[tuple[str, list[CompatibilityResult], str]] = []
    for row in resp.rows:
        results = [convert.compat_result_from_pb(r) for r in row.results]
        rows.append((row.model, results, "" if results else NOT_EVALUATED))
    return rows


class CatalogClient(ServiceClient):
    """Talks to one catalog; usable as a context manager (closes the channel it opened)."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(target, security=security, timeout=timeout, channel=channel, retry=retry)
        self._stub = catalog_pb2_grpc.CatalogServiceStub(self._channel)

    # ---- models -----------------------------------------------------------------------------

    def get_model(self, model: str) -> Model:
        """One model (`models/ID` or `ID`)."""
        msg = self._unary(self._stub.GetModel, pb.GetModelRequest(name=model_name(model)))
        return convert.model_from_pb(msg)

    def list_models(
        self, *, filter: str = "", page_size: int = 0, page_token: str = "", all_pages: bool = False
    ) -> tuple[list[Model], int]:
        """One page (or every page with `all_pages`) and the total number of matches."""
        models: list[Model] = []
        token = page_token
        while True:
            resp = self._unary(
                self._stub.ListModels,
                pb.ListModelsRequest(filter=filter, page_size=page_size, page_token=token),
            )
            models.extend(convert.model_from_pb(m) for m in resp.models)
            token = resp.next_page_token
            if not all_pages or not token:
                return models, int(resp.total_size)

    def create_model(
        self, draft: ModelDraft, *, model_id: str = "", validate_only: bool = False
    ) -> Model:
        """Register a model from a draft (source, paths, labels, ...)."""
        msg = self._unary(
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
        return self.create_model(local_draft(path, display_name=display_name), model_id=model_id)

    def update_model(
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
        return convert.model_from_pb(self._unary(self._stub.UpdateModel, request))

    def delete_model(self, model: str, *, force: bool = False, etag: str = "") -> Model:
        """Delete the record; returns what it was."""
        current = self.get_model(model)
        self._unary(
            self._stub.DeleteModel,
            pb.DeleteModelRequest(name=model_name(model), force=force, etag=etag or current.etag),
        )
        return current

    def inspect_model(self, model: str) -> Model:
        """Read the model's headers again and store the metadata; returns the model."""
        msg = self._unary(self._stub.InspectModel, pb.InspectModelRequest(name=model_name(model)))
        return convert.model_from_pb(msg)

    def inspect_path(self, path: str) -> ModelMetadata:
        """The metadata of a file or folder on the catalog host, without registering it."""
        msg = self._unary(self._stub.InspectPath, pb.InspectPathRequest(path=path))
        return convert.metadata_from_pb(msg)

    # ---- worker types and installs --------------------------------------------------------------

    def get_worker_type(self, worker_type: str) -> tuple[WorkerType, bool]:
        """One worker type (`worker-types/ID` or `ID`) and whether the catalog host supports it."""
        msg = self._unary(
            self._stub.GetWorkerType, pb.GetWorkerTypeRequest(name=worker_type_name(worker_type))
        )
        return convert.worker_type_from_pb(msg), bool(msg.supported_on_host)

    def list_worker_types(self, *, filter: str = "") -> list[tuple[WorkerType, bool]]:
        """Every worker type with whether the catalog host supports it (all pages)."""
        found: list[tuple[WorkerType, bool]] = []
        token = ""
        while True:
            resp = self._unary(
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

    def get_install(self, install: str) -> Install:
        """One installed backend (`installs/ID` or `ID`)."""
        msg = self._unary(self._stub.GetInstall, pb.GetInstallRequest(name=install_name(install)))
        return convert.install_from_msg(msg)

    def list_installs(self, *, filter: str = "") -> list[Install]:
        """Every installed backend (all pages)."""
        installs: list[Install] = []
        token = ""
        while True:
            resp = self._unary(
                self._stub.ListInstalls, pb.ListInstallsRequest(filter=filter, page_token=token)
            )
            installs.extend(convert.install_from_msg(i) for i in resp.installs)
            token = resp.next_page_token
            if not token:
                return installs

    def create_install(
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
        return convert.install_from_msg(self._unary(self._stub.CreateInstall, request))

    def delete_install(self, install: str, *, allow_missing: bool = False) -> None:
        """Forget an installed backend (its files stay)."""
        self._unary(
            self._stub.DeleteInstall,
            pb.DeleteInstallRequest(name=install_name(install), allow_missing=allow_missing),
        )

    # ---- compatibility ------------------------------------------------------------------------

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
        request = compatibility_request(
            model,
            worker_types=worker_types,
            device=device,
            context_length=context_length,
            kv_cache_type=kv_cache_type,
            gpu_layers=gpu_layers,
        )
        resp = self._unary(self._stub.EvaluateCompatibility, request)
        results = [convert.compat_result_from_pb(r) for r in resp.results]
        return results, int(resp.context_length_used)

    def compatibility_matrix(
        self, *, filter: str = "", device: Device | None = None, context_length: int | None = None
    ) -> list[tuple[str, list[CompatibilityResult], str]]:
        """Every model x every worker type: (model name, results, reason when empty)."""
        rows: list[tuple[str, list[CompatibilityResult], str]] = []
        token = ""
        while True:
            request = matrix_request(
                filter=filter, device=device, context_length=context_length, page_token=token
            )
            resp = self._unary(self._stub.ComputeCompatibilityMatrix, request)
            rows.extend(matrix_rows_from_pb(resp))
            token = resp.next_page_token
            if not token:
                return rows
