"""The threaded server (start_server with `handler_threads`) against real servers on 127.0.0.1:0.

Plain-function handlers run in the server's handler threads; coroutine handlers of unary
methods run on the event loop that started the server (services.common.interceptors.LoopBridge).
Both must get what every rbee server gives: the request id, the one error mapping, metrics by
status code, health, reflection, the token check and the stop sequence.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.common.auth import ServerSecurity
from services.common.request_context import current_request_id
from services.common.server import RunningServer, generic_binding, start_server
from tests.integration.test_server_plumbing import (
    LEAKY_TEXT,
    error_info,
    raise_for,
    scrape,
    unpack_details,
    wait_for_sample,
)

pytestmark = pytest.mark.integration

SERVICE = "rbee.test.v1.ThreadedService"
HANDLED = "rbee_grpc_server_handled_total"
TOKEN = "threaded-test-token-4c2d"


class ThreadedServicer:
    """Handlers of every kind a threaded server takes; the request says how they fail."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()  # made on the test's event loop
        self.coroutine_cancelled = threading.Event()
        self.stream_cleanups = 0
        self.release = threading.Event()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"whoami":
            where = threading.current_thread().name
            return f"{current_request_id()} {where}".encode()
        if request == b"abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted itself")
        if request == b"hold":
            self.release.wait(10)
        raise_for(request)
        return request

    async def echo_async(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"whoami":
            on_loop = threading.get_ident() == self.loop_thread
            return f"{current_request_id()} {'loop' if on_loop else 'elsewhere'}".encode()
        if request == b"stray-cancel":
            inner = asyncio.get_running_loop().create_future()
            inner.cancel()
            await inner
        if request == b"wait":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.coroutine_cancelled.set()
                raise
        if request == b"slow":
            await asyncio.sleep(0.3)
        raise_for(request)
        return request

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            if request == b"forever":
                index = 0
                while True:
                    yield str(index).encode()
                    index += 1
                    time.sleep(0.01)
            for index in range(3):
                yield str(index).encode()
            raise_for(request)
        finally:
            self.stream_cleanups += 1

    async def count_async(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield request

    def total(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        parts = []
        for part in requests:
            raise_for(part)
            parts.append(part)
        return b"+".join(parts)

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            raise_for(request)
            yield b"re: " + request

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "EchoAsync": grpc.unary_unary_rpc_method_handler(self.echo_async),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "CountAsync": grpc.unary_stream_rpc_method_handler(self.count_async),
            "Sum": grpc.stream_unary_rpc_method_handler(self.total),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def threaded(
    servicer: ThreadedServicer,
    *,
    threads: int = 4,
    security: ServerSecurity | None = None,
) -> RunningServer:
    return await start_server(
        [generic_binding(SERVICE, servicer.handlers())],
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        security=security,
        handler_threads=threads,
    )


@pytest.fixture
def servicer() -> ThreadedServicer:
    return ThreadedServicer()


@pytest.fixture
async def running(servicer: ThreadedServicer) -> AsyncIterator[RunningServer]:
    server = await threaded(servicer)
    try:
        yield server
    finally:
        servicer.release.set()
        await server.stop(0)


@pytest.fixture
async def channel(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def handled(running: RunningServer, name: str, code: str) -> float | None:
    return running.registry.get_sample_value(
        HANDLED, {"service": SERVICE, "method": name, "code": code}
    )


# --- where handlers run, request ids, errors ---------------------------------------------


async def test_functions_run_in_handler_threads_and_coroutines_on_the_loop(
    channel: grpc.aio.Channel,
) -> None:
    for name, where in (("Echo", "grpc-handler"), ("EchoAsync", "loop")):
        call = channel.unary_unary(method(name))(
            b"whoami", metadata=(("x-request-id", f"rid-{name}"),), timeout=5
        )
        request_id, thread = (await call).decode().split(" ")

        assert request_id == f"rid-{name}"  # bound in the thread, and in the coroutine too
        assert thread.startswith(where)
        assert ("x-request-id", f"rid-{name}") in list(await call.trailing_metadata())


async def test_concurrent_calls_keep_their_own_request_ids(channel: grpc.aio.Channel) -> None:
    calls = [
        channel.unary_unary(method(name))(
            b"whoami", metadata=(("x-request-id", f"rid-{name}-{index}"),), timeout=10
        )
        for index in range(20)
        for name in ("Echo", "EchoAsync")
    ]
    answers = await asyncio.gather(*calls)

    expected = [f"rid-{name}-{index}" for index in range(20) for name in ("Echo", "EchoAsync")]
    assert [answer.decode().split(" ")[0] for answer in answers] == expected


@pytest.mark.parametrize("name", ["Echo", "EchoAsync"])
@pytest.mark.parametrize(
    ("payload", "code", "detail_type"),
    [
        (b"not-found", grpc.StatusCode.NOT_FOUND, "ResourceInfo"),
        (b"bad", grpc.StatusCode.INVALID_ARGUMENT, "BadRequest"),
        (b"busy", grpc.StatusCode.UNAVAILABLE, "RetryInfo"),
        (b"not-ready", grpc.StatusCode.FAILED_PRECONDITION, "PreconditionFailure"),
    ],
)
async def test_domain_errors_keep_their_code_and_details(
    channel: grpc.aio.Channel, name: str, payload: bytes, code: grpc.StatusCode, detail_type: str
) -> None:
    call = channel.unary_unary(method(name))(
        payload, metadata=(("x-request-id", "rid-err"),), timeout=5
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call

    assert caught.value.code() == code
    details = unpack_details(rpc_status.from_call(caught.value))
    assert set(details) == {"ErrorInfo", detail_type}
    assert dict(error_info(rpc_status.from_call(caught.value)).metadata) == {
        "request_id": "rid-err"
    }
    assert ("x-request-id", "rid-err") in list(await call.trailing_metadata())


@pytest.mark.parametrize("name", ["Echo", "EchoAsync", "Sum"])
async def test_unexpected_error_is_internal_and_leaks_nothing(
    channel: grpc.aio.Channel, running: RunningServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    metadata = (("x-request-id", "rid-boom"),)
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
        if name == "Sum":
            await channel.stream_unary(method(name))(iter([b"a", b"boom"]), metadata=metadata)
        else:
            await channel.unary_unary(method(name))(b"boom", metadata=metadata, timeout=5)

    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id rid-boom)"
    assert error_info(rpc_status.from_call(error)).reason == "INTERNAL"
    sent = repr(error.details()) + repr(error.trailing_metadata())
    for leak in ("secret", "/tmp/x", "0x7f", "ValueError", "Traceback"):
        assert leak not in sent
    # The traceback went to our log with the request id, not grpc's "Exception calling
    # application" line.
    logged = [r for r in caplog.records if "rid-boom" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert LEAKY_TEXT in str(logged[0].exc_info[1])
    assert not any("Exception calling application" in r.getMessage() for r in caplog.records)
    assert handled(running, name, "INTERNAL") == 1


async def test_handler_abort_passes_through(
    channel: grpc.aio.Channel, running: RunningServer
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method("Echo"))(b"abort", timeout=5)

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "handler aborted itself"
    assert handled(running, "Echo", "PERMISSION_DENIED") == 1


async def test_a_stray_cancellation_in_a_coroutine_is_internal(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.unary_unary(method("EchoAsync"))(
        b"stray-cancel", metadata=(("x-request-id", "rid-sc"),), timeout=20
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error (request id rid-sc)"


async def test_the_deadline_cancels_the_coroutine_on_the_loop(
    channel: grpc.aio.Channel, running: RunningServer, servicer: ThreadedServicer
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method("EchoAsync"))(b"wait", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert await asyncio.to_thread(servicer.coroutine_cancelled.wait, 5)
    labels = {"service": SERVICE, "method": "EchoAsync", "code": "DEADLINE_EXCEEDED"}
    assert await wait_for_sample(running.registry, HANDLED, labels, 1) == 1
    # The handler thread is free again.
    assert await channel.unary_unary(method("Echo"))(b"still here", timeout=5) == b"still here"


# --- streams ------------------------------------------------------------------------------


async def test_response_stream_counts_messages_and_maps_a_late_error(
    channel: grpc.aio.Channel, running: RunningServer
) -> None:
    count = channel.unary_stream(method("Count"))
    assert [m async for m in count(b"ok", timeout=5)] == [b"0", b"1", b"2"]

    call = count(b"not-found", metadata=(("x-request-id", "rid-stream"),), timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call:
            received.append(message)

    assert received == [b"0", b"1", b"2"]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A stream gets the id up front, in its initial metadata.
    assert ("x-request-id", "rid-stream") in list(await call.initial_metadata())
    samples = running.registry.get_sample_value
    labels = {"service": SERVICE, "method": "Count"}
    assert samples("rbee_grpc_server_msg_sent_total", labels) == 6
    assert handled(running, "Count", "OK") == 1
    assert handled(running, "Count", "NOT_FOUND") == 1


async def test_client_cancel_of_a_stream_is_recorded_and_cleans_up(
    channel: grpc.aio.Channel, running: RunningServer, servicer: ThreadedServicer
) -> None:
    call = channel.unary_stream(method("Count"))(b"forever", timeout=10)
    assert [await call.read(), await call.read()] == [b"0", b"1"]
    call.cancel()

    labels = {"service": SERVICE, "method": "Count", "code": "CANCELLED"}
    assert await wait_for_sample(running.registry, HANDLED, labels, 1) == 1
    for _ in range(100):
        if servicer.stream_cleanups:
            break
        await asyncio.sleep(0.02)
    assert servicer.stream_cleanups == 1


async def test_client_and_bidirectional_streams(channel: grpc.aio.Channel) -> None:
    assert await channel.stream_unary(method("Sum"))(iter([b"a", b"b"]), timeout=5) == b"a+b"

    replies = channel.stream_stream(method("Chat"))(iter([b"x", b"y"]), timeout=5)
    assert [m async for m in replies] == [b"re: x", b"re: y"]


async def test_an_async_response_stream_is_refused_with_internal(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in channel.unary_stream(method("CountAsync"))(b"x", timeout=5):
            pass

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert any(
        "cannot be served by a threaded server" in str(r.exc_info[1])
        for r in caplog.records
        if r.exc_info
    )


# --- health, reflection, auth, metrics, lifecycle -----------------------------------------


async def test_health_turns_serving_and_a_watch_holds_no_handler_thread(
    servicer: ThreadedServicer,
) -> None:
    running = await threaded(servicer, threads=1)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # With one handler thread, a blocking Watch would leave none for this call.
            assert await channel.unary_unary(method("Echo"))(b"one", timeout=5) == b"one"

            await running.set_serving()
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            stopping = asyncio.create_task(running.stop(grace=0.5))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await asyncio.wait_for(stopping, timeout=5)
    finally:
        await running.stop(0)


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]

    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {
        SERVICE,
        "rbee.common.v1.InfoService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_the_token_is_checked_for_functions_coroutines_and_streams(
    servicer: ThreadedServicer,
) -> None:
    running = await threaded(servicer, security=ServerSecurity(token=TOKEN))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            good = (("authorization", f"Bearer {TOKEN}"),)
            bad = (("authorization", "Bearer nope"), ("x-request-id", "rid-auth"))
            for name in ("Echo", "EchoAsync"):
                rpc = channel.unary_unary(method(name))
                assert await rpc(b"hi", metadata=good, timeout=5) == b"hi"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await rpc(b"hi", metadata=bad, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                info = error_info(rpc_status.from_call(caught.value))
                assert (info.reason, dict(info.metadata)) == (
                    "UNAUTHENTICATED",
                    {"request_id": "rid-auth"},
                )
                assert TOKEN not in repr(caught.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in channel.unary_stream(method("Count"))(b"ok", timeout=5):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health is exempt by default.
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        rejected = running.registry.get_sample_value
        assert rejected("rbee_auth_rejected_total", {"cause": "invalid"}) == 2
        assert rejected("rbee_auth_rejected_total", {"cause": "missing"}) == 1
        assert handled(running, "Echo", "UNAUTHENTICATED") == 1
    finally:
        await running.stop(0)


async def test_metrics_endpoint_counts_threaded_calls(
    channel: grpc.aio.Channel, running: RunningServer
) -> None:
    echo = channel.unary_unary(method("Echo"))
    await echo(b"a", timeout=5)
    await channel.unary_unary(method("EchoAsync"))(b"b", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await echo(b"not-found", timeout=5)

    assert running.metrics_port is not None
    samples = await asyncio.to_thread(scrape, running.metrics_port)

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted({"service": SERVICE, **labels}.items()))))

    assert value(HANDLED, method="Echo", code="OK") == 1
    assert value(HANDLED, method="EchoAsync", code="OK") == 1
    assert value(HANDLED, method="Echo", code="NOT_FOUND") == 1
    assert value("rbee_grpc_server_started_total", method="Echo") == 2
    assert not any(dict(labels).get("code") == "UNKNOWN" for _, labels in samples)


async def test_stop_lets_in_flight_calls_finish_then_closes_the_port(
    servicer: ThreadedServicer,
) -> None:
    running = await threaded(servicer)
    await running.set_serving()
    closed: list[str] = []
    running.on_stop(lambda: closed.append("store"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        slow = asyncio.ensure_future(channel.unary_unary(method("EchoAsync"))(b"slow", timeout=5))
        held = asyncio.ensure_future(channel.unary_unary(method("Echo"))(b"hold", timeout=5))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(running.stop(grace=3))
        await asyncio.sleep(0.05)
        servicer.release.set()

        assert await slow == b"slow"  # its coroutine ran on, on the loop
        assert await held == b"hold"
        await asyncio.wait_for(stopping, timeout=5)

    assert closed == ["store"]
    with pytest.raises(grpc.aio.AioRpcError):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await channel.unary_unary(method("Echo"))(b"x", timeout=1)


async def test_handler_threads_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="handler_threads must be at least 1"):
        await start_server([], listen="127.0.0.1:0", metrics_listen=None, handler_threads=0)
