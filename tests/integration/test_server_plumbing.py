"""The shared server plumbing against a real grpc.aio server on 127.0.0.1:0.

The service under test is built from generic handlers with bytes in and out, so these tests need
no generated code: a unary method, server streams in both styles (async generator and
context.write), a client stream and a bidirectional stream, each able to raise domain and
unexpected errors on request.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.common import errors
from services.common.logs import configure_logging
from services.common.request_context import current_request_id
from services.common.server import (
    ListenError,
    RunningServer,
    generic_binding,
    start_server,
)

pytestmark = pytest.mark.integration

SERVICE = "rbee.test.v1.PlumbingService"
ECHO = f"/{SERVICE}/Echo"
COUNT = f"/{SERVICE}/Count"
COUNT_WRITE = f"/{SERVICE}/CountWrite"
SUM = f"/{SERVICE}/Sum"
CHAT = f"/{SERVICE}/Chat"
REPO_ROOT = Path(__file__).resolve().parents[2]

LEAKY_TEXT = "secret-ish text /tmp/x at 0x7f3a2b1c0d"


def raise_for(request: bytes) -> None:
    """Raise the error a test asked for with the request payload, if any."""
    if request == b"not-found":
        raise errors.NotFound(
            "model models/tiny not found",
            resource_type="rbee.catalog.v1.Model",
            resource_name="models/tiny",
            reason="MODEL_NOT_FOUND",
        )
    if request == b"bad":
        raise errors.InvalidArgument(
            "page_size: must be >= 0",
            field_violations=[errors.FieldViolation("page_size", "must be >= 0")],
        )
    if request == b"busy":
        raise errors.Unavailable("worker busy", retry_after_seconds=1.5)
    if request == b"not-ready":
        raise errors.FailedPrecondition(
            "model is downloading",
            reason="MODEL_NOT_READY",
            violations=[errors.PreconditionViolation("STATE", "models/tiny", "DOWNLOADING")],
        )
    if request == b"boom":
        raise ValueError(LEAKY_TEXT)


class PlumbingServicer:
    """Handlers of every kind; what the request says decides how they fail."""

    def __init__(self) -> None:
        self.stream_cleanups = 0

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"whoami":
            return (current_request_id() or "").encode()
        if request == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted itself")
        if request == b"stray-cancel":
            # What awaiting a client call on a channel that closed meanwhile does.
            inner = asyncio.get_running_loop().create_future()
            inner.cancel()
            await inner
        raise_for(request)
        return request

    async def count(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            if request == b"forever":
                index = 0
                while True:
                    yield str(index).encode()
                    index += 1
                    await asyncio.sleep(0.01)
            for index in range(3):
                yield str(index).encode()
            raise_for(request)
        finally:
            # Cancellation must reach the handler's cleanup (habit 5).
            self.stream_cleanups += 1

    async def count_write(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        for index in range(3):
            await context.write(str(index).encode())
        raise_for(request)

    async def sum(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        parts = []
        async for part in requests:
            raise_for(part)
            parts.append(part)
        return b"+".join(parts)

    async def chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            raise_for(request)
            yield b"re: " + request

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "CountWrite": grpc.unary_stream_rpc_method_handler(self.count_write),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }


@pytest.fixture
def servicer() -> PlumbingServicer:
    return PlumbingServicer()


@pytest.fixture
async def running(servicer: PlumbingServicer) -> AsyncIterator[RunningServer]:
    server = await start_server(
        [generic_binding(SERVICE, servicer.handlers())],
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
    )
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def channel(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def unpack_details(status: status_pb2.Status | None) -> dict[str, message.Message]:
    """The status's details by type name."""
    assert status is not None, "no google.rpc.Status in the trailers"
    types: list[type[message.Message]] = [
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.ResourceInfo,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.RetryInfo,
    ]
    unpacked: dict[str, message.Message] = {}
    for detail in status.details:
        for cls in types:
            if detail.TypeName() == cls.DESCRIPTOR.full_name:
                target = cls()
                detail.Unpack(target)
                unpacked[cls.DESCRIPTOR.name] = target
    return unpacked


def error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo:
    info = unpack_details(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


async def request_stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# --- errors -------------------------------------------------------------------------------


async def test_unary_ok_and_request_id_echoed(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary(ECHO)(b"hello", metadata=(("x-request-id", "abc-123.X_y"),))

    assert await call == b"hello"
    # A unary response carries it in the trailers (one batch with the response).
    assert ("x-request-id", "abc-123.X_y") in list(await call.trailing_metadata())
    assert "x-request-id" not in dict(await call.initial_metadata())


async def test_request_id_is_the_handlers_current_request_id(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary(ECHO)(b"whoami")
    handler_saw = (await call).decode()
    echoed = dict(await call.trailing_metadata())["x-request-id"]

    assert handler_saw == echoed
    assert len(echoed) == 32
    int(echoed, 16)  # a fresh uuid4 hex


@pytest.mark.parametrize("insane", ["a" * 65, "has space", "semi;colon", "../../etc"])
async def test_insane_client_request_id_is_replaced(channel: grpc.aio.Channel, insane: str) -> None:
    call = channel.unary_unary(ECHO)(b"whoami", metadata=(("x-request-id", insane),))
    handler_saw = (await call).decode()

    assert handler_saw != insane
    assert len(handler_saw) == 32
    assert dict(await call.trailing_metadata())["x-request-id"] == handler_saw


async def test_unary_not_found_has_resource_info(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary(ECHO)(b"not-found", metadata=(("x-request-id", "rid-nf"),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "model models/tiny not found"
    status = rpc_status.from_call(caught.value)
    details = unpack_details(status)
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "MODEL_NOT_FOUND",
        "rbee.dev",
        {"request_id": "rid-nf"},
    )
    resource = details["ResourceInfo"]
    assert isinstance(resource, error_details_pb2.ResourceInfo)
    assert (resource.resource_type, resource.resource_name) == (
        "rbee.catalog.v1.Model",
        "models/tiny",
    )
    # The id also arrives in the trailers of a failed call, beside the status details.
    trailers = list(await call.trailing_metadata())
    assert ("x-request-id", "rid-nf") in trailers
    assert any(key == "grpc-status-details-bin" for key, _ in trailers)


async def test_a_stray_cancellation_inside_a_handler_is_internal_not_a_hang(
    channel: grpc.aio.Channel,
) -> None:
    # grpc.aio sends no status for a handler that ends with CancelledError: without the
    # mapping the client would wait out its whole deadline.
    call = channel.unary_unary(ECHO)(b"stray-cancel", metadata=(("x-request-id", "rid-sc"),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call, 20)

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error (request id rid-sc)"


@pytest.mark.parametrize(
    ("payload", "code", "detail_type"),
    [
        (b"bad", grpc.StatusCode.INVALID_ARGUMENT, "BadRequest"),
        (b"busy", grpc.StatusCode.UNAVAILABLE, "RetryInfo"),
        (b"not-ready", grpc.StatusCode.FAILED_PRECONDITION, "PreconditionFailure"),
    ],
)
async def test_unary_domain_errors_have_their_details(
    channel: grpc.aio.Channel, payload: bytes, code: grpc.StatusCode, detail_type: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(ECHO)(payload)

    assert caught.value.code() == code
    details = unpack_details(rpc_status.from_call(caught.value))
    assert set(details) == {"ErrorInfo", detail_type}
    if detail_type == "BadRequest":
        bad_request = details["BadRequest"]
        assert isinstance(bad_request, error_details_pb2.BadRequest)
        assert bad_request.field_violations[0].field == "page_size"
    if detail_type == "RetryInfo":
        retry = details["RetryInfo"]
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToMilliseconds() == 1500


async def test_unexpected_error_is_internal_and_leaks_nothing(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(ECHO)(b"boom", metadata=(("x-request-id", "rid-boom"),))

    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id rid-boom)"
    info = error_info(rpc_status.from_call(error))
    assert (info.reason, dict(info.metadata)) == ("INTERNAL", {"request_id": "rid-boom"})
    everything_sent = repr(error.details()) + repr(error.trailing_metadata())
    for leak in ("secret", "/tmp/x", "0x7f", "ValueError", "Traceback"):
        assert leak not in everything_sent


async def test_handler_abort_passes_through(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(ECHO)(b"abort")

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "handler aborted itself"


@pytest.mark.parametrize("method", [COUNT, COUNT_WRITE])
@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"not-found", grpc.StatusCode.NOT_FOUND), (b"boom", grpc.StatusCode.INTERNAL)],
)
async def test_stream_error_after_three_messages(
    channel: grpc.aio.Channel, method: str, payload: bytes, code: grpc.StatusCode
) -> None:
    call = channel.unary_stream(method)(payload, metadata=(("x-request-id", "rid-stream"),))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call:
            received.append(response)

    assert received == [b"0", b"1", b"2"]
    assert caught.value.code() == code
    info = error_info(rpc_status.from_call(caught.value))
    assert info.metadata["request_id"] == "rid-stream"
    if code == grpc.StatusCode.INTERNAL:
        assert caught.value.details() == "internal error (request id rid-stream)"
    else:
        assert info.reason == "MODEL_NOT_FOUND"
        assert "ResourceInfo" in unpack_details(rpc_status.from_call(caught.value))


@pytest.mark.parametrize("method", [COUNT, COUNT_WRITE])
async def test_stream_ok(channel: grpc.aio.Channel, method: str) -> None:
    call = channel.unary_stream(method)(b"fine")
    assert [response async for response in call] == [b"0", b"1", b"2"]
    assert await call.code() == grpc.StatusCode.OK


async def test_client_stream(channel: grpc.aio.Channel) -> None:
    assert await channel.stream_unary(SUM)(request_stream(b"a", b"b")) == b"a+b"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary(SUM)(request_stream(b"a", b"bad"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BadRequest" in unpack_details(rpc_status.from_call(caught.value))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary(SUM)(request_stream(b"boom"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_bidi_stream(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream(CHAT)(request_stream(b"a", b"b", b"busy"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call:
            received.append(response)

    assert received == [b"re: a", b"re: b"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" in unpack_details(rpc_status.from_call(caught.value))


async def test_unexpected_error_logged_with_traceback_and_request_id(
    channel: grpc.aio.Channel,
) -> None:
    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()
    handler = configure_logging("INFO", "json", stream=buffer)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(ECHO)(b"boom", metadata=(("x-request-id", "rid-log"),))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)

    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    failures = [r for r in records if r.get("request_id") == "rid-log" and "exception" in r]
    assert len(failures) == 1
    # The server log keeps what the client must never see.
    assert LEAKY_TEXT in failures[0]["exception"]
    assert "Traceback" in failures[0]["exception"]
    assert failures[0]["level"] == "ERROR"


def test_configure_logging_is_idempotent_and_stamps_records() -> None:
    root = logging.getLogger()
    level, handlers_before = root.level, list(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging("INFO", "json", stream=first)
        handler = configure_logging("debug", "text", stream=second)
        logging.getLogger("rbee.test").debug("outside any %s", "rpc")
        assert [h for h in root.handlers if h not in handlers_before] == [handler]
        assert root.level == logging.DEBUG
    finally:
        for extra in [h for h in root.handlers if h not in handlers_before]:
            root.removeHandler(extra)
        root.setLevel(level)

    assert first.getvalue() == ""
    assert second.getvalue().rstrip().endswith("DEBUG rbee.test [-] outside any rpc")


# --- health, reflection, metrics, lifecycle -----------------------------------------------


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_health_not_serving_until_set_serving(
    running: RunningServer, channel: grpc.aio.Channel
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health_status(channel, "") == not_serving
    assert await health_status(channel, SERVICE) == not_serving

    await running.set_serving()
    assert await health_status(channel, "") == serving
    assert await health_status(channel, SERVICE) == serving

    await running.set_not_serving()
    assert await health_status(channel, SERVICE) == not_serving


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]

    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {
        SERVICE,
        "rbee.common.v1.InfoService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_describes_health(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health")
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[0].file_descriptor_response.file_descriptor_proto
    ]
    health_file = next(file for file in files if file.package == "grpc.health.v1")
    assert [service.name for service in health_file.service] == ["Health"]
    assert {"Check", "Watch"} <= {method.name for method in health_file.service[0].method}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and index every sample by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_endpoint_counts_calls_by_code(
    running: RunningServer, channel: grpc.aio.Channel
) -> None:
    echo = channel.unary_unary(ECHO)
    await echo(b"a")
    await echo(b"b")
    with pytest.raises(grpc.aio.AioRpcError):
        await echo(b"not-found")
    with pytest.raises(grpc.aio.AioRpcError):
        await echo(b"boom")
    assert [r async for r in channel.unary_stream(COUNT_WRITE)(b"ok")] == [b"0", b"1", b"2"]

    assert running.metrics_port is not None
    samples = await asyncio.to_thread(scrape, running.metrics_port)

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted({"service": SERVICE, **labels}.items()))))

    handled = "rbee_grpc_server_handled_total"
    assert value(handled, method="Echo", code="OK") == 2
    assert value(handled, method="Echo", code="NOT_FOUND") == 1
    assert value(handled, method="Echo", code="INTERNAL") == 1
    assert value(handled, method="CountWrite", code="OK") == 1
    assert value("rbee_grpc_server_started_total", method="Echo") == 4
    assert value("rbee_grpc_server_msg_sent_total", method="CountWrite") == 3
    assert value("rbee_grpc_server_handling_seconds_count", method="Echo", code="OK") == 2
    # Never UNKNOWN, whatever the handler raised.
    assert not any(dict(labels).get("code") == "UNKNOWN" for _, labels in samples)


async def wait_for_sample(
    registry: CollectorRegistry, name: str, labels: dict[str, str], expected: float
) -> float | None:
    """Poll until the sample reaches `expected` (the server records on its own schedule)."""
    for _ in range(200):
        value = registry.get_sample_value(name, labels)
        if value == expected:
            return value
        await asyncio.sleep(0.02)
    return registry.get_sample_value(name, labels)


async def test_client_cancel_is_recorded_as_cancelled(
    running: RunningServer, channel: grpc.aio.Channel, servicer: PlumbingServicer
) -> None:
    call = channel.unary_stream(COUNT)(b"forever")
    received = [await call.read(), await call.read()]
    call.cancel()

    assert received == [b"0", b"1"]
    labels = {"service": SERVICE, "method": "Count", "code": "CANCELLED"}
    assert await wait_for_sample(running.registry, "rbee_grpc_server_handled_total", labels, 1) == 1
    for _ in range(100):
        if servicer.stream_cleanups:
            break
        await asyncio.sleep(0.02)
    assert servicer.stream_cleanups == 1
    # And the server keeps serving.
    assert await channel.unary_unary(ECHO)(b"still here", timeout=5) == b"still here"


async def test_deadline_is_recorded_as_deadline_exceeded(
    running: RunningServer, channel: grpc.aio.Channel
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in channel.unary_stream(COUNT)(b"forever", timeout=0.2):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    labels = {"service": SERVICE, "method": "Count", "code": "DEADLINE_EXCEEDED"}
    assert await wait_for_sample(running.registry, "rbee_grpc_server_handled_total", labels, 1) == 1


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_stop_turns_health_not_serving_then_closes_port(
    servicer: PlumbingServicer,
) -> None:
    running = await start_server(
        [generic_binding(SERVICE, servicer.handlers())], listen="127.0.0.1:0", metrics_listen=None
    )
    await running.set_serving()
    stopped: list[str] = []

    async def close_store() -> None:
        stopped.append("async")

    running.on_stop(lambda: stopped.append("sync first registered"))
    running.on_stop(close_store)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        stopping = asyncio.create_task(running.stop(grace=0.5))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(stopping, timeout=5)

    assert stopped == ["async", "sync first registered"]
    assert not port_is_open(running.port)
    await running.stop(grace=0)  # idempotent


async def test_metrics_endpoint_closes_on_stop(servicer: PlumbingServicer) -> None:
    running = await start_server(
        [generic_binding(SERVICE, servicer.handlers())],
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
    )
    assert running.metrics_port is not None
    assert port_is_open(running.metrics_port)

    await running.stop(grace=0)

    assert not port_is_open(running.metrics_port)


async def test_port_in_use_is_a_clear_error(running: RunningServer) -> None:
    with pytest.raises(ListenError, match=f"127.0.0.1:{running.port}"):
        await start_server([], listen=f"127.0.0.1:{running.port}", metrics_listen=None)

    assert running.metrics_port is not None
    with pytest.raises(ListenError, match="metrics"):
        await start_server(
            [], listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{running.metrics_port}"
        )


async def test_servers_in_one_process_keep_separate_metrics(servicer: PlumbingServicer) -> None:
    first = await start_server(
        [generic_binding(SERVICE, servicer.handlers())], listen="127.0.0.1:0", metrics_listen=None
    )
    second = await start_server(
        [generic_binding(SERVICE, servicer.handlers())], listen="127.0.0.1:0", metrics_listen=None
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            await channel.unary_unary(ECHO)(b"x")
        labels = {"service": SERVICE, "method": "Echo", "code": "OK"}
        assert first.registry.get_sample_value("rbee_grpc_server_handled_total", labels) == 1
        assert second.registry.get_sample_value("rbee_grpc_server_handled_total", labels) is None
    finally:
        await first.stop(0)
        await second.stop(0)


SERVE_SCRIPT = textwrap.dedent(
    """
    import asyncio, grpc
    from services.common.logs import configure_logging
    from services.common.server import generic_binding, serve_until_signal, start_server

    async def echo(request, context):
        return request

    async def main():
        configure_logging("INFO", "text")
        handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        running = await start_server(
            [generic_binding("rbee.test.v1.PlumbingService", handlers)],
            listen="127.0.0.1:0", metrics_listen=None,
        )
        await running.set_serving()
        print(running.port, flush=True)
        await serve_until_signal(running, grace=2)

    asyncio.run(main())
    """
)


@pytest.fixture
def serve_script(tmp_path: Path) -> Iterator[Path]:
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    yield script


async def test_serve_until_signal_exits_cleanly_on_sigterm(serve_script: Path) -> None:
    env: dict[str, Any] = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(serve_script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        port = int(line)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert b"stop signal received" in stderr
    assert not port_is_open(port)
