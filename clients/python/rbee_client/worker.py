"""A typed, synchronous client for rbee.worker.v1.WorkerService (one worker process).

    from rbee_client import WorkerClient
    from rbee.worker.v1 import generation_pb2 as gen

    with WorkerClient("127.0.0.1:50100") as worker:
        stopping = gen.StoppingCriteria(max_tokens=32)
        for event in worker.chat([("user", "Say hi")], stopping=stopping):
            if isinstance(event, gen.TokenDelta):
                print(event.text, end="", flush=True)
            else:
                print("\\n", gen.FinishReason.Name(event.finish_reason), event.usage.total_tokens)

Events are the generated protobuf messages. Unary calls carry a deadline (`timeout`, default
30 s); streams have none unless given one (a generation or a load may take long). Failures raise
the typed exceptions of rbee_client.errors; only UNAVAILABLE is retried, and a stream never once
it has yielded an event.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from rbee.worker.v1 import generation_pb2 as gen
from rbee.worker.v1 import image_pb2 as img
from rbee.worker.v1 import load_pb2, worker_pb2, worker_pb2_grpc
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, RetryPolicy, ServiceClient
from rbee_client.errors import InvalidArgumentError
from services.common.channels import ChannelSecurity

CHAT_ROLES: dict[str, gen.ChatRole.ValueType] = {
    "system": gen.CHAT_ROLE_SYSTEM,
    "user": gen.CHAT_ROLE_USER,
    "assistant": gen.CHAT_ROLE_ASSISTANT,
    "tool": gen.CHAT_ROLE_TOOL,
}

LoadEvent = worker_pb2.LoadProgress | worker_pb2.Worker
GenerationEvent = gen.TokenDelta | gen.GenerationResult
ImageEvent = img.ImageProgress | img.ImageResult


def chat_message(message: gen.ChatMessage | tuple[str, str]) -> gen.ChatMessage:
    """A ChatMessage from a message or a (role, content) pair; role is system, user, assistant
    or tool."""
    if isinstance(message, gen.ChatMessage):
        return message
    role, content = message
    try:
        return gen.ChatMessage(role=CHAT_ROLES[role.lower()], content=content)
    except KeyError:
        raise InvalidArgumentError(
            message=f"unknown chat role {role!r}; use one of " + ", ".join(CHAT_ROLES),
            code="INVALID_ARGUMENT",
            reason="INVALID_ARGUMENT",
            field_violations=[("messages.role", f"unknown role {role!r}")],
        ) from None


def load_event_from_pb(msg: worker_pb2.LoadModelResponse) -> LoadEvent:
    """The event a LoadModel response carries."""
    return msg.worker if msg.HasField("worker") else msg.progress


def generation_event_from_pb(msg: gen.GenerateResponse) -> GenerationEvent:
    """The event a Generate or Chat response carries."""
    return msg.result if msg.HasField("result") else msg.delta


def image_event_from_pb(msg: img.GenerateImageResponse) -> ImageEvent:
    """The event a GenerateImage response carries."""
    return msg.result if msg.HasField("result") else msg.progress


class WorkerClient(ServiceClient):
    """Talks to one worker; usable as a context manager (closes the channel it opened)."""

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
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)

    def get_worker(self) -> worker_pb2.Worker:
        """This worker's state: device, backend, loaded model, memory, queue, counters."""
        worker: worker_pb2.Worker = self._unary(
            self._stub.GetWorker, worker_pb2.WorkerServiceGetWorkerRequest()
        )
        return worker

    def load_model(
        self,
        model: str = "",
        *,
        paths: Sequence[str] = (),
        timeout: float | None = None,
        llm: load_pb2.LlmLoadOptions | None = None,
        image: load_pb2.ImageLoadOptions | None = None,
    ) -> Iterator[LoadEvent]:
        """Load `models/{id}` (or the files in `paths`): LoadProgress events, then the Worker
        with the loaded model."""
        request = worker_pb2.LoadModelRequest(model=model, paths=list(paths), llm=llm, image=image)
        for msg in self._stream(self._stub.LoadModel, request, timeout):
            yield load_event_from_pb(msg)

    def unload_model(self, model: str = "") -> worker_pb2.Worker:
        """Unload the model (idempotent); returns the worker."""
        worker: worker_pb2.Worker = self._unary(
            self._stub.UnloadModel, worker_pb2.UnloadModelRequest(model=model)
        )
        return worker

    def generate(
        self,
        prompt: str,
        *,
        sampling: gen.SamplingParams | None = None,
        stopping: gen.StoppingCriteria | None = None,
        timeout: float | None = None,
        model: str = "",
        logprobs: gen.LogprobOptions | None = None,
    ) -> Iterator[GenerationEvent]:
        """Complete a raw prompt: TokenDelta events, then one GenerationResult."""
        request = gen.GenerateRequest(
            model=model, prompt=prompt, sampling=sampling, stopping=stopping, logprobs=logprobs
        )
        for msg in self._stream(self._stub.Generate, request, timeout):
            yield generation_event_from_pb(msg)

    def chat(
        self,
        messages: Sequence[gen.ChatMessage | tuple[str, str]],
        *,
        sampling: gen.SamplingParams | None = None,
        stopping: gen.StoppingCriteria | None = None,
        timeout: float | None = None,
        model: str = "",
        chat_template: str = "",
        logprobs: gen.LogprobOptions | None = None,
    ) -> Iterator[GenerationEvent]:
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
        for msg in self._stream(self._stub.Chat, request, timeout):
            yield generation_event_from_pb(msg)

    def tokenize(
        self, text: str, *, add_special: bool | None = None, parse_special: bool = False
    ) -> list[int]:
        """Token ids of `text` with the loaded model's tokenizer."""
        request = gen.TokenizeRequest(text=text, parse_special=parse_special)
        if add_special is not None:
            request.add_special = add_special
        response: gen.TokenizeResponse = self._unary(self._stub.Tokenize, request)
        return list(response.token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special: bool = False) -> str:
        """The text of `token_ids` with the loaded model's tokenizer."""
        response: gen.DetokenizeResponse = self._unary(
            self._stub.Detokenize,
            gen.DetokenizeRequest(token_ids=list(token_ids), skip_special=skip_special),
        )
        return response.text

    def generate_image(
        self, params: img.ImageParams, *, model: str = "", timeout: float | None = None
    ) -> Iterator[ImageEvent]:
        """Generate images: ImageProgress per step, then one ImageResult with the images."""
        request = img.GenerateImageRequest(model=model, params=params)
        for msg in self._stream(self._stub.GenerateImage, request, timeout):
            yield image_event_from_pb(msg)
