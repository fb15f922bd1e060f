"""rbee.worker.v1.PoolService over gRPC: convert, call the pool, convert."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.empty_pb2 import Empty

from rbee.common.v1 import device_pb2
from rbee.worker.v1 import pool_pb2 as pb
from rbee.worker.v1 import pool_pb2_grpc
from rbee.worker.v1 import worker_pb2 as wpb
from services.catalog import convert as catalog_convert
from services.common.errors import InvalidArgument
from services.worker.pool import convert
from services.worker.pool.domain import PoolWorker
from services.worker.pool.service import PoolService

Context = Any

SERVICE_NAME = "rbee.worker.v1.PoolService"


class PoolServicer(pool_pb2_grpc.PoolServiceServicer):
    def __init__(self, service: PoolService) -> None:
        self._service = service

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        kind = request.filter.strip().removeprefix("kind=").strip().strip('"').lower()
        if request.filter.strip() and (not request.filter.strip().startswith("kind=") or not kind):
            raise InvalidArgument.for_field(
                "filter", "the only filter is kind=cpu|cuda|metal", reason="INVALID_FILTER"
            )
        devices = [
            convert.device_to_pb(d, claimed_ram=ram, claimed_vram=vram, workers=names)
            for d, ram, vram, names in await self._service.devices()
            if not kind or d.kind.value == kind
        ]
        return pb.ListDevicesResponse(devices=devices, total_size=len(devices))

    async def GetDevice(self, request: pb.GetDeviceRequest, context: Context) -> device_pb2.Device:
        device, ram, vram, names = await self._service.device(request.name)
        return convert.device_to_pb(device, claimed_ram=ram, claimed_vram=vram, workers=names)

    async def SpawnWorker(
        self, request: pb.SpawnWorkerRequest, context: Context
    ) -> AsyncIterator[pb.SpawnWorkerResponse]:
        stream = await self._service.spawn(convert.spawn_request_from_pb(request))
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for item in stream:
                if isinstance(item, PoolWorker):
                    yield pb.SpawnWorkerResponse(worker=convert.worker_to_pb(item))
                else:
                    yield convert.spawn_event_to_pb(item)

    async def GetWorker(self, request: pb.GetWorkerRequest, context: Context) -> wpb.Worker:
        return convert.worker_to_pb(await self._service.get(request.name))

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Context
    ) -> pb.ListWorkersResponse:
        workers, token, total = await self._service.list_workers(
            filter_text=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListWorkersResponse(
            workers=[convert.worker_to_pb(w) for w in workers],
            next_page_token=token,
            total_size=total,
        )

    async def StopWorker(self, request: pb.StopWorkerRequest, context: Context) -> wpb.Worker:
        grace = (
            convert.duration_seconds_from_pb(request.grace, "grace")
            if request.HasField("grace")
            else None
        )
        if grace is not None and grace < 0:
            raise InvalidArgument.for_field("grace", "must not be negative")
        record = await self._service.stop(request.name, grace=grace, force=request.force)
        return convert.worker_to_pb(record)

    async def DeleteWorker(self, request: pb.DeleteWorkerRequest, context: Context) -> Empty:
        await self._service.delete(
            request.name, force=request.force, allow_missing=request.allow_missing
        )
        return Empty()

    async def WatchWorkers(
        self, request: pb.WatchWorkersRequest, context: Context
    ) -> AsyncIterator[pb.WatchWorkersResponse]:
        stream = await self._service.watch(
            filter_text=request.filter, send_existing=request.send_existing
        )
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for kind, record in stream:
                yield pb.WatchWorkersResponse(
                    type=convert.EVENT_TO_PB[kind], worker=convert.worker_to_pb(record)
                )

    async def GetWorkerLogs(
        self, request: pb.GetWorkerLogsRequest, context: Context
    ) -> AsyncIterator[pb.GetWorkerLogsResponse]:
        since = (
            catalog_convert.timestamp_from_pb(request.since, field_name="since")
            if request.HasField("since")
            else None
        )
        stream = await self._service.logs(
            request.name,
            follow=request.follow,
            tail_lines=request.tail_lines,
            stream=convert.LOG_STREAM_FROM_PB.get(request.stream),
            since=since,
        )
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for lines in stream:
                if lines:
                    yield convert.log_lines_to_pb(lines)
