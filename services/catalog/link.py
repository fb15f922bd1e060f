"""The catalog as other services see it: its RPCs, never its database.

Used by the provisioner and the worker (moved here from services.provisioner so both share one
client). The catalog is the single writer of its database; a pull registers its model
DOWNLOADING at start and asks for READY (the catalog inspects the files) or FAILED at the end;
a worker asked to load `models/{id}` without paths looks the model up to find its files.
Errors coming back from the catalog are re-raised as our own errors with the same status and
reason (so a pull that fails at registration ends its stream with the catalog's explanation);
a catalog that cannot be reached, or fails, is UNAVAILABLE (DEPENDENCY_UNAVAILABLE).
`get_model` returns None for a model the catalog does not have.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import grpc
from google.protobuf import field_mask_pb2

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee_client.errors import RbeeClientError, error_from_rpc
from services.catalog import convert
from services.catalog.domain import (
    CompatibilityResult,
    Device,
    Install,
    Model,
    ModelMetadata,
    ModelSource,
    ModelState,
)
from services.common.channels import ChannelSecurity, open_aio_channel
from services.common.errors import RbeeError, StatusKind, Unavailable, error_for_status

CATALOG_DEADLINE = 120.0  # registration inspects the files (headers only, but a cold disk)


class CatalogLink(abc.ABC):
    """What the provisioner and the worker ask of the catalog."""

    @abc.abstractmethod
    async def get_model(self, name: str) -> Model | None:
        """The model `models/{id}`, or None when the catalog has none by that name."""

    @abc.abstractmethod
    async def create_model(
        self,
        *,
        model_id: str,
        source: ModelSource,
        paths: Sequence[str],
        state: ModelState,
        display_name: str = "",
        labels: dict[str, str] | None = None,
        state_message: str = "",
        validate_only: bool = False,
    ) -> Model:
        """Create the model; AlreadyExists carries the existing model's name."""

    @abc.abstractmethod
    async def update_model(
        self,
        name: str,
        *,
        state: ModelState,
        state_message: str = "",
        paths: Sequence[str] | None = None,
        size_bytes: int | None = None,
        sha256: str | None = None,
        source: ModelSource | None = None,
        config_folder: str | None = None,
    ) -> Model:
        """Set the state (and the other given fields; None: unchanged). `config_folder`: a
        single-file image checkpoint's config folder (Model.config_folder)."""

    @abc.abstractmethod
    async def create_install(self, install: Install) -> Install:
        """Register an installed worker backend; AlreadyExists when its id is taken."""

    @abc.abstractmethod
    async def list_installs(self, worker_type: str) -> list[Install]:
        """The installs of a worker type (its id, e.g. "cpu-llm")."""

    @abc.abstractmethod
    async def evaluate(
        self, metadata: ModelMetadata, device: Device | None, context_length: int
    ) -> list[CompatibilityResult]: ...

    async def close(self) -> None:
        return None


# Statuses that say the catalog itself is in trouble, not the request: the caller sees the
# dependency as unavailable.
_CATALOG_DOWN = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "UNIMPLEMENTED"}
)


def _as_rbee_error(err: RbeeClientError, what: str) -> RbeeError:
    """A catalog status, re-raised as ours (same code, reason and resource)."""
    known = err.code in StatusKind.__members__ or err.code == "OUT_OF_RANGE"
    if err.code in _CATALOG_DOWN or not known:
        return Unavailable(
            f"the catalog cannot be reached or failed ({err.code}): {err.message}",
            reason="DEPENDENCY_UNAVAILABLE",
        )
    return error_for_status(
        "INVALID_ARGUMENT" if err.code == "OUT_OF_RANGE" else err.code,
        f"catalog: {err.message}" if what else err.message,
        reason=err.reason or None,
        resource_type=err.resource_type or "model",
        resource_name=err.resource_name,
    )


class GrpcCatalogLink(CatalogLink):
    """The catalog over gRPC (one aio channel for the life of the service that holds it)."""

    def __init__(
        self,
        address: str,
        *,
        deadline: float = CATALOG_DEADLINE,
        security: ChannelSecurity | None = None,
    ) -> None:
        """`security`: the calling service's token and TLS (settings.client_security());
        None: plaintext, no token."""
        self._channel = open_aio_channel(address, security)
        self._stub = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self._deadline = deadline

    async def close(self) -> None:
        await self._channel.close()

    async def get_model(self, name: str) -> Model | None:
        try:
            msg = await self._stub.GetModel(pb.GetModelRequest(name=name), timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _as_rbee_error(error_from_rpc(exc), "get") from None
        return convert.model_from_pb(msg)

    async def create_model(
        self,
        *,
        model_id: str,
        source: ModelSource,
        paths: Sequence[str],
        state: ModelState,
        display_name: str = "",
        labels: dict[str, str] | None = None,
        state_message: str = "",
        validate_only: bool = False,
    ) -> Model:
        model = pb.Model(
            display_name=display_name,
            source=convert.source_to_pb(source),
            paths=list(paths),
            state=_STATE_TO_PB[state],
            state_message=state_message,
            labels=labels or {},
        )
        try:
            msg = await self._stub.CreateModel(
                pb.CreateModelRequest(model_id=model_id, model=model, validate_only=validate_only),
                timeout=self._deadline,
            )
        except grpc.aio.AioRpcError as exc:
            raise _as_rbee_error(error_from_rpc(exc), "create") from None
        return convert.model_from_pb(msg)

    async def update_model(
        self,
        name: str,
        *,
        state: ModelState,
        state_message: str = "",
        paths: Sequence[str] | None = None,
        size_bytes: int | None = None,
        sha256: str | None = None,
        source: ModelSource | None = None,
        config_folder: str | None = None,
    ) -> Model:
        model = pb.Model(name=name, state=_STATE_TO_PB[state], state_message=state_message)
        mask = ["state", "state_message"]
        if paths is not None:
            model.paths.extend(paths)
            mask.append("paths")
        if size_bytes is not None:
            model.size_bytes = size_bytes
            mask.append("size_bytes")
        if sha256 is not None:
            model.sha256 = sha256
            mask.append("sha256")
        if source is not None:
            model.source.CopyFrom(convert.source_to_pb(source))
            mask.append("source")
        if config_folder is not None:
            model.config_folder = config_folder
            mask.append("config_folder")
        request = pb.UpdateModelRequest(
            model=model, update_mask=field_mask_pb2.FieldMask(paths=mask)
        )
        try:
            msg = await self._stub.UpdateModel(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise _as_rbee_error(error_from_rpc(exc), "update") from None
        return convert.model_from_pb(msg)

    async def create_install(self, install: Install) -> Install:
        request = pb.CreateInstallRequest(
            install_id=install.id, install=convert.install_to_pb(install)
        )
        try:
            msg = await self._stub.CreateInstall(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise _as_rbee_error(error_from_rpc(exc), "create install") from None
        return convert.install_from_msg(msg)

    async def list_installs(self, worker_type: str) -> list[Install]:
        found: list[Install] = []
        token = ""
        try:
            while True:
                msg = await self._stub.ListInstalls(
                    pb.ListInstallsRequest(
                        filter=f"worker_type={worker_type}", page_size=1000, page_token=token
                    ),
                    timeout=self._deadline,
                )
                found.extend(convert.install_from_msg(i) for i in msg.installs)
                token = msg.next_page_token
                if not token:
                    return found
        except grpc.aio.AioRpcError as exc:
            raise _as_rbee_error(error_from_rpc(exc), "list installs") from None

    async def evaluate(
        self, metadata: ModelMetadata, device: Device | None, context_length: int
    ) -> list[CompatibilityResult]:
        request = pb.EvaluateCompatibilityRequest(
            metadata=convert.metadata_to_pb(metadata), context_length=context_length
        )
        if device is not None:
            request.device.CopyFrom(convert.device_to_pb(device))
        try:
            msg = await self._stub.EvaluateCompatibility(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise _as_rbee_error(error_from_rpc(exc), "evaluate") from None
        return [convert.compat_result_from_pb(r) for r in msg.results]


_STATE_TO_PB = {
    ModelState.DOWNLOADING: pb.MODEL_STATE_DOWNLOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
