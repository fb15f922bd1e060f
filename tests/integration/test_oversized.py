"""Oversized requests and prompts beyond the context: a clear status, never a crash.

Issue 7, "Bad input":
- a request above the server's receive limit (services.common.server DEFAULT_MAX_MESSAGE_BYTES,
  64 MiB, set as grpc.max_receive_message_length on every server) is RESOURCE_EXHAUSTED, and the
  service keeps serving;
- a request just under the limit whose fields are absurdly long is INVALID_ARGUMENT;
- a prompt longer than the loaded context on a real tiny llama.cpp worker is INVALID_ARGUMENT or
  RESOURCE_EXHAUSTED with an ErrorInfo reason, and the worker then generates normally.

Run issue 7's tests alone with `-k security`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.catalog.v1 import catalog_pb2 as cpb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from services.common.server import DEFAULT_MAX_MESSAGE_BYTES
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.catalog_harness import CatalogServer, running_catalog
from tests.integration.server_harness import error_reason, serve_worker

pytestmark = [pytest.mark.integration, pytest.mark.security]

RPC_TIMEOUT = 60
CONTEXT = 128


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[CatalogServer]:
    with running_catalog(tmp_path / "home") as server:
        yield server


def assert_serving(channel: grpc.Channel) -> None:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_security_request_above_the_receive_limit_is_resource_exhausted(
    catalog: CatalogServer,
) -> None:
    huge = "x" * (DEFAULT_MAX_MESSAGE_BYTES + 1024)
    with grpc.insecure_channel(catalog.address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModel(cpb.GetModelRequest(name=huge), timeout=RPC_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_serving(channel)
        # The next ordinary call is answered as usual.
        with pytest.raises(grpc.RpcError) as miss:
            stub.GetModel(cpb.GetModelRequest(name="models/absent"), timeout=RPC_TIMEOUT)
        assert miss.value.code() == grpc.StatusCode.NOT_FOUND


def test_security_long_fields_under_the_limit_are_invalid_argument(catalog: CatalogServer) -> None:
    long = "a" * (4 * 1024 * 1024)
    with grpc.insecure_channel(catalog.address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        calls: list[Callable[[], object]] = [
            lambda: stub.GetModel(cpb.GetModelRequest(name=f"models/{long}"), timeout=RPC_TIMEOUT),
            lambda: stub.CreateModel(
                cpb.CreateModelRequest(
                    model_id=long,
                    model=cpb.Model(source=cpb.ModelSource(kind=cpb.SOURCE_KIND_LOCAL, path="/x")),
                ),
                timeout=RPC_TIMEOUT,
            ),
            lambda: stub.ListModels(cpb.ListModelsRequest(filter=long), timeout=RPC_TIMEOUT),
            lambda: stub.ListModels(cpb.ListModelsRequest(page_token=long), timeout=RPC_TIMEOUT),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(info.value.details() or "") < 4096, "the error echoes the whole field"
        assert_serving(channel)


@pytest.mark.llm
def test_security_prompt_beyond_the_context_is_refused_and_the_worker_keeps_serving(
    tmp_path: Path,
) -> None:
    llama_cpp = pytest.importorskip("services.worker.engines.llama_cpp")
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", n_ctx=256, chat_template=template)
    with (
        serve_worker(llama_cpp.LlamaCppEngine(), engine_name="llama_cpp") as (running, _),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        load = pb.LoadModelRequest(
            model="models/tiny",
            paths=[str(path)],
            llm=load_pb2.LlmLoadOptions(context_length=CONTEXT),
        )
        list(stub.LoadModel(load, timeout=RPC_TIMEOUT))
        prompt = " ".join(["hello world"] * (CONTEXT * 4))
        n_tokens = len(stub.Tokenize(gen_pb.TokenizeRequest(text=prompt), timeout=30).token_ids)
        assert n_tokens > CONTEXT
        stopping = gen_pb.StoppingCriteria(max_tokens=4, ignore_eos=True)
        for request, method in (
            (gen_pb.GenerateRequest(prompt=prompt, stopping=stopping), stub.Generate),
            (
                gen_pb.ChatRequest(
                    messages=[gen_pb.ChatMessage(role=gen_pb.CHAT_ROLE_USER, content=prompt)],
                    stopping=stopping,
                ),
                stub.Chat,
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                list(method(request, timeout=RPC_TIMEOUT))
            assert info.value.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            }, info.value.details()
            assert error_reason(info.value) == "CONTEXT_TOO_LONG"
            assert str(CONTEXT) in (info.value.details() or "")  # says what the limit is
            assert_serving(channel)
        # Still serving: a prompt that fits is answered.
        reply = list(stub.Generate(gen_pb.GenerateRequest(prompt="hello", stopping=stopping),
                                   timeout=RPC_TIMEOUT))  # fmt: skip
        assert reply[-1].result.usage.completion_tokens == 4
