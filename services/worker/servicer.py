"""rbee.worker.v1.WorkerService over gRPC: convert, call the domain service, convert.

Errors are raised as domain exceptions; the server's one interceptor turns them into statuses.
A caller that cancels (or whose deadline passes) makes grpc.aio cancel the handler task: the
CancelledError unwinds through the service's stream, whose `finally` stops the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import image_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from services.worker import convert
from services.worker.service import WorkerService

Context = Any  # grpc.aio.ServicerContext; the domain never sees it

SERVICE_NAME = "rbee.worker.v1.WorkerService"


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin adapter from protobuf to WorkerService."""

    def __init__(self, service: WorkerService) -> None:
        self._service = service

    async def GetWorker(
        self, request: pb.WorkerServiceGetWorkerRequest, context: Context
    ) -> pb.Worker:
        await self._service.measure_device_memory()
        return convert.worker_to_pb(self._service.get_worker())

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: Context
    ) -> AsyncIterator[pb.LoadModelResponse]:
        events = self._service.load_model(convert.load_request_from_pb(request))
        async for event in events:
            yield convert.load_response_to_pb(event)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> pb.Worker:
        return convert.worker_to_pb(await self._service.unload_model(request.model))

    async def Generate(
        self, request: gen_pb.GenerateRequest, context: Context
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        to_pb = convert.stream_event_to_pb
        async for event in self._service.generate(convert.generate_request_from_pb(request)):
            yield to_pb(event)

    async def Chat(
        self, request: gen_pb.ChatRequest, context: Context
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        to_pb = convert.stream_event_to_pb
        async for event in self._service.chat(convert.chat_request_from_pb(request)):
            yield to_pb(event)

    async def Tokenize(
        self, request: gen_pb.TokenizeRequest, context: Context
    ) -> gen_pb.TokenizeResponse:
        token_ids = await self._service.tokenize(
            request.text,
            add_special=request.add_special if request.HasField("add_special") else True,
            parse_special=request.parse_special,
        )
        return gen_pb.TokenizeResponse(token_ids=token_ids)

    async def Detokenize(
        self, request: gen_pb.DetokenizeRequest, context: Context
    ) -> gen_pb.DetokenizeResponse:
        text = await self._service.detokenize(request.token_ids, skip_special=request.skip_special)
        return gen_pb.DetokenizeResponse(text=text)

    async def GenerateImage(
        self, request: image_pb2.GenerateImageRequest, context: Context
    ) -> AsyncIterator[image_pb2.GenerateImageResponse]:
        # UNIMPLEMENTED (WRONG_ENGINE) on an LLM worker, before the request is even read.
        self._service.check_image_worker()
        to_pb = convert.image_stream_event_to_pb
        events = self._service.generate_image(convert.image_request_from_pb(request))
        async for event in events:
            yield to_pb(event)
