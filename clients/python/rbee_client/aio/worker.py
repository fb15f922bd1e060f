"""An asyncio client for rbee.worker.v1.WorkerService: the methods of rbee_client.WorkerClient,
awaited, with streams as async iterators.

    from rbee_client.aio import WorkerClient
    from rbee.worker.v1 import generation_pb2 as gen

    async with WorkerClient("127.0.0.1:50100") as worker:
        async for event in worker.generate("Once upon a time"):
            if isinstance(event, gen.TokenDelta):
                print(event.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from rbee.worker.v1 import generation_pb2 as gen
from rbee.worker.v1 import image_pb2 as img
from rbee.worker.v1 import load_pb2, worker_pb2, worker_pb2_grpc
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, AsyncServiceClient, RetryPolicy
from rbee_client.worker import (
    GenerationEvent,
    ImageEvent,
    LoadEvent,
    chat_message,
    generation_event_from_pb,
    image_event_from_pb,
    load_event_from_pb,
)
from services.common.channels import ChannelSecurity


class WorkerClient(AsyncServiceClient):
    """Talks to one worker over a grpc.aio channel; `async with` closes the channel it opened."""

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
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)

    async def get_worker(self) -> worker_pb2.Worker:
        """This worker's state: device, backend, loaded model, memory, queue, counters."""
        worker: worker_pb2.Worker = await self._unary(
            self._stub.GetWorker, worker_pb2.WorkerServiceGetWorkerRequest()
        )
        return worker

    async def load_model(
        self,
        model: str = "",
        *,
        paths: Sequence[str] = (),
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
        llm: load_pb2.LlmLoadOptions | None = None,
        image: load_pb2.ImageLoadOptions | None = None,
    ) -> AsyncIterator[LoadEvent]:
        """Load `models/{id}` (or the files in `paths`): LoadProgress events, then the Worker
        with the loaded model."""
        request = worker_pb2.LoadModelRequest(model=model, paths=list(paths), llm=llm, image=image)
        async for msg in self._stream(self._stub.LoadModel, request, timeout):
            yield load_event_from_pb(msg)

    async def unload_model(self, model: str = "") -> worker_pb2.Worker:
        """Unload the model (idempotent); returns the worker."""
        worker: worker_pb2.Worker = await self._unary(
            self._stub.UnloadModel, worker_pb2.UnloadModelRequest(model=model)
        )
        return worker

    async def generate(
        self,
        prompt: str,
        *,
        sampling: gen.SamplingParams | None = None,
        stopping: gen.StoppingCriteria | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
        model: str = "",
        logprobs: gen.LogprobOptions | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Complete a raw prompt: TokenDelta events, then one GenerationResult."""
        request = gen.GenerateRequest(
            model=model, prompt=prompt, sampling=sampling, stopping=stopping, logprobs=logprobs
        )
        async for msg in self._stream(self._stub.Generate, request, timeout):
            yield generation_event_from_pb(msg)

    async def chat(
        self,
        messages: Sequence[gen.ChatMessage | tuple[str, str]],
        *,
        sampling: gen.SamplingParams | None = None,
        stopping: gen.StoppingCriteria | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
        model: str = "",
        chat_template: str = "",
        logprobs: gen.LogprobOptions | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """A chat reply to `messages` (ChatMessage or (role, content)): TokenDelta events, then
        one GenerationResult."""
        request = gen.ChatRequest(
            model=model,
            messages=[chat_message(m) for m in messages],
            chat_template=chat_template,
            sampling=sampling,
            stopping=stopping,
            logprobs=logprobs,
        )
        async for msg in self._stream(self._stub.Chat, request, timeout):
            yield generation_event_from_pb(msg)

    async def tokenize(
        self, text: str, *, add_special: bool | None = None, parse_special: bool = False
    ) -> list[int]:
        """Token ids of `text` with the loaded model's tokenizer."""
        request = gen.TokenizeRequest(text=text, parse_special=parse_special)
        if add_special is not None:
            request.add_special = add_special
        response: gen.TokenizeResponse = await self._unary(self._stub.Tokenize, request)
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special: bool = False) -> str:
        """The text of `token_ids` with the loaded model's tokenizer."""
        response: gen.DetokenizeResponse = await self._unary(
            self._stub.Detokenize,
            gen.DetokenizeRequest(token_ids=list(token_ids), skip_special=skip_special),
        )
        return response.text

    async def generate_image(
        self,
        params: img.ImageParams,
        *,
        model: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[ImageEvent]:
        """Generate images: ImageProgress per step, then one ImageResult with the images."""
        request = img.GenerateImageRequest(model=model, params=params)
        async for msg in self._stream(self._stub.GenerateImage, request, timeout):
            yield image_event_from_pb(msg)
