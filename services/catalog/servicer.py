"""rbee.catalog.v1.CatalogService over gRPC: convert, call the domain service, convert.

Errors are raised as domain exceptions; the server's one interceptor turns them into statuses.
GetModel, ListModels and EvaluateCompatibility (of a stored model) answer with cached
serialized messages (`EncodedResponse`, see message_cache), so the servicer must be mounted
through services.common.server.start_server, whose interceptor sends those bytes as they are.

The catalog serves on a threaded server by default (`handler_threads`, see
services.common.server): the cheap reads run in the handler thread with no event-loop hop
(GetModel reads the store right there; ListModels waits for the db thread; EvaluateCompatibility
answers a cached evaluation there), and everything else is a coroutine run on the event loop.
A plain-function handler here may return a coroutine to finish on the loop (the server's
wrapper runs it there): EvaluateCompatibility does on a cache miss. With `threaded=False` the
same servicer serves on a grpc.aio server (RBEE_CATALOG_HANDLER_THREADS=0). Measured with
bench/catalog.py and bench/rpc_cost.py, see BENCHMARKS.md ("The catalog on a threaded server").
"""

from __future__ import annotations

import base64
from collections.abc import Coroutine
from typing import Any

from google.protobuf.empty_pb2 import Empty

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from services.catalog import convert
from services.catalog.message_cache import CompatibilityResponseCache, ModelMessageCache
from services.catalog.pagination import normalize_page_size
from services.catalog.service import CatalogService
from services.catalog.store import ModelRecord
from services.common.errors import InvalidArgument, RbeeError
from services.common.interceptors import EncodedResponse
from services.common.server import ServiceBinding

Context = Any  # a grpc ServicerContext; the domain never sees it

SERVICE_NAME = "rbee.catalog.v1.CatalogService"


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """Thin adapter from protobuf to CatalogService."""

    def __init__(
        self,
        service: CatalogService,
        *,
        messages: ModelMessageCache | None = None,
        compat: CompatibilityResponseCache | None = None,
        threaded: bool = True,
    ) -> None:
        self._service = service
        # Served by a threaded server: ListModels may block its handler thread on the db thread.
        self._threaded = threaded
        # GetModel and ListModels serve stored versions (id, etag) through this cache: a model
        # is parsed and converted once per version, not once per read (see message_cache).
        self._messages = messages if messages is not None else ModelMessageCache()
        self._compat = compat if compat is not None else CompatibilityResponseCache()

    # The three cached reads return EncodedResponse, which the generated stubs' types do not
    # know of (hence the ignores): the server's interceptor sends its bytes as the message.
    # They are plain functions: on a threaded server they run in the handler thread.
    def GetModel(  # type: ignore[override]
        self, request: pb.GetModelRequest, context: Context
    ) -> EncodedResponse:
        record = self._service.read_model_record(request.name)
        return EncodedResponse(self._messages.serialized(record))

    def ListModels(  # type: ignore[override]
        self, request: pb.ListModelsRequest, context: Context
    ) -> EncodedResponse | Coroutine[Any, Any, EncodedResponse]:
        if not self._threaded:
            return self._list_on_the_loop(request)  # never block the event loop
        records, token, total = self._service.read_model_records(
            filter_text=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        return self._page(records, token, total)

    async def _list_on_the_loop(self, request: pb.ListModelsRequest) -> EncodedResponse:
        records, token, total = await self._service.list_model_records(
            filter_text=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        return self._page(records, token, total)

    def _page(self, records: list[ModelRecord], token: str, total: int) -> EncodedResponse:
        return EncodedResponse(
            self._messages.list_response_wire(records, next_page_token=token, total_size=total)
        )

    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.Model:
        if not request.HasField("model"):
            raise InvalidArgument.for_field("model", "the model to create is required")
        model = await self._service.create_model(
            convert.model_draft_from_pb(request.model),
            model_id=request.model_id,
            validate_only=request.validate_only,
        )
        return convert.model_to_pb(model)

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.Model:
        model = await self._service.update_model(
            request.model.name, convert.model_patch_from_pb(request)
        )
        self._messages.discard(model.id)
        self._compat.discard(model.id)
        return convert.model_to_pb(model)

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Context) -> Empty:
        deleted = await self._service.delete_model(
            request.name,
            etag=request.etag,
            force=request.force,
            allow_missing=request.allow_missing,
        )
        if deleted is not None:
            self._messages.discard(deleted.id)
            self._compat.discard(deleted.id)
        return Empty()

    async def InspectModel(self, request: pb.InspectModelRequest, context: Context) -> pb.Model:
        model = await self._service.inspect_model(request.name)
        self._messages.discard(model.id)
        self._compat.discard(model.id)
        return convert.model_to_pb(model)

    async def InspectPath(
        self, request: pb.InspectPathRequest, context: Context
    ) -> pb.ModelMetadata:
        return convert.metadata_to_pb(await self._service.inspect_path(request.path))

    async def GetWorkerType(
        self, request: pb.GetWorkerTypeRequest, context: Context
    ) -> pb.WorkerType:
        wt = await self._service.get_worker_type(request.name)
        return convert.worker_type_to_pb(wt, supported_on_host=self._service.supported_on_host(wt))

    async def ListWorkerTypes(
        self, request: pb.ListWorkerTypesRequest, context: Context
    ) -> pb.ListWorkerTypesResponse:
        everything = await self._service.list_worker_types(request.filter)
        page, token = _page_in_memory(
            [wt.id for wt in everything], request.page_size, request.page_token
        )
        by_id = {wt.id: wt for wt in everything}
        return pb.ListWorkerTypesResponse(
            worker_types=[
                convert.worker_type_to_pb(
                    by_id[i], supported_on_host=self._service.supported_on_host(by_id[i])
                )
                for i in page
            ],
            next_page_token=token,
            total_size=len(everything),
        )

    async def GetInstall(self, request: pb.GetInstallRequest, context: Context) -> pb.Install:
        return convert.install_to_pb(await self._service.get_install(request.name))

    async def ListInstalls(
        self, request: pb.ListInstallsRequest, context: Context
    ) -> pb.ListInstallsResponse:
        everything = await self._service.list_installs(request.filter)
        page, token = _page_in_memory(
            [i.id for i in everything], request.page_size, request.page_token
        )
        by_id = {i.id: i for i in everything}
        return pb.ListInstallsResponse(
            installs=[convert.install_to_pb(by_id[i]) for i in page],
            next_page_token=token,
            total_size=len(everything),
        )

    async def CreateInstall(self, request: pb.CreateInstallRequest, context: Context) -> pb.Install:
        install = convert.install_from_pb(request)
        if request.validate_only:
            return convert.install_to_pb(install)
        return convert.install_to_pb(await self._service.create_install(install))

    async def DeleteInstall(self, request: pb.DeleteInstallRequest, context: Context) -> Empty:
        await self._service.delete_install(request.name, allow_missing=request.allow_missing)
        return Empty()

    def EvaluateCompatibility(  # type: ignore[override]
        self, request: pb.EvaluateCompatibilityRequest, context: Context
    ) -> EncodedResponse | Coroutine[Any, Any, pb.EvaluateCompatibilityResponse]:
        if request.WhichOneof("subject") != "model":
            return self._evaluate(request)
        try:
            record = self._service.read_model_record(request.model)
        except RbeeError:
            # Not cacheable; the full path raises the error the service raises (it checks the
            # options before it reads the model, so which error comes first is its call).
            return self._evaluate(request)
        key = request.SerializeToString(deterministic=True)
        cached = self._compat.get(record, key)
        if cached is not None:
            return EncodedResponse(cached)
        return self._evaluate_and_keep(request, record, key)

    async def _evaluate_and_keep(
        self, request: pb.EvaluateCompatibilityRequest, record: ModelRecord, key: bytes
    ) -> pb.EvaluateCompatibilityResponse:
        response = await self._evaluate(request)
        # Kept only when the model did not change while it was evaluated: every write gives
        # a new etag, so the same etag after means the evaluation read exactly this version.
        try:
            unchanged = self._service.read_model_record(request.model).etag == record.etag
        except RbeeError:
            unchanged = False  # deleted meanwhile: answer, but keep nothing
        if unchanged:
            self._compat.put(record, key, response.SerializeToString())
        return response

    async def _evaluate(
        self, request: pb.EvaluateCompatibilityRequest
    ) -> pb.EvaluateCompatibilityResponse:
        compat_request = convert.compatibility_request_from_pb(request)
        if request.HasField("metadata"):
            compat_request = _with_metadata(
                compat_request, convert.metadata_from_pb(request.metadata)
            )
        results, ctx = await self._service.evaluate_compatibility(compat_request)
        return pb.EvaluateCompatibilityResponse(
            results=[convert.compat_result_to_pb(r) for r in results], context_length_used=ctx
        )

    async def ComputeCompatibilityMatrix(
        self, request: pb.ComputeCompatibilityMatrixRequest, context: Context
    ) -> pb.ComputeCompatibilityMatrixResponse:
        device = convert.device_from_pb(request.device) if request.HasField("device") else None
        kv = convert.compatibility_request_from_pb(
            pb.EvaluateCompatibilityRequest(kv_cache_type=request.kv_cache_type)
        ).kv_cache_type
        rows, token, total = await self._service.compatibility_matrix(
            filter_text=request.filter,
            worker_type_names=list(request.worker_types),
            device=device,
            context_length=request.context_length or None,
            kv_cache_type=kv,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        columns = self._service.worker_type_names(list(request.worker_types))
        return pb.ComputeCompatibilityMatrixResponse(
            rows=[
                pb.CompatibilityMatrixRow(
                    model=row.model_name,
                    results=[convert.compat_result_to_pb(r) for r in row.results],
                )
                for row in rows
            ],
            worker_types=columns,
            next_page_token=token,
            total_size=total,
        )


def catalog_binding(servicer: CatalogServicer) -> ServiceBinding:
    """The servicer as start_server mounts it."""
    return ServiceBinding(
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE_NAME
    )


def _with_metadata(request: Any, metadata: Any) -> Any:
    from dataclasses import replace

    return replace(request, metadata=metadata, model_name="")


def _page_in_memory(keys: list[str], page_size: int, page_token: str) -> tuple[list[str], str]:
    """Keyset pagination over a small sorted list; the token is the last key, encoded."""
    size = normalize_page_size(page_size)
    start = 0
    if page_token:
        try:
            last = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument.for_field(
                "page_token", "not a token this server issued", reason="INVALID_PAGE_TOKEN"
            ) from None
        if last not in keys:
            raise InvalidArgument.for_field(
                "page_token", "not a token for this filter", reason="INVALID_PAGE_TOKEN"
            )
        start = keys.index(last) + 1
    page = keys[start : start + size]
    more = start + size < len(keys)
    token = base64.urlsafe_b64encode(page[-1].encode()).decode() if more and page else ""
    return page, token
