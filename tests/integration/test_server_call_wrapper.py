"""The one server wrapper (services.common.interceptors) on real grpc.aio servers: handlers that
answer with already-serialized messages, per-call state in a wrapper built once per method, the
auth check's refusing handler on the same method, and the two-interceptor arrangement that
extra interceptors get.

test_server_plumbing.py covers the error table, request ids and metrics with the default
arrangement; these are the parts the one-wrapper rewrite added or could have broken.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.auth import ServerSecurity
from services.common.interceptors import EncodedResponse
from services.common.request_context import current_request_id
from services.common.server import RunningServer, generic_binding, start_server

pytestmark = pytest.mark.integration

SERVICE = "rbee.test.v1.WrapperService"
STRING_VALUE = wrappers_pb2.StringValue
TOKEN = "wrapper-test-token-9b1e"


async def encoded_string(request: Any, context: grpc.aio.ServicerContext) -> EncodedResponse:
    """Answers with the serialized StringValue it builds itself."""
    return EncodedResponse(STRING_VALUE(value=f"pre-{request.value}").SerializeToString())


async def encoded_stream(
    request: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[EncodedResponse | wrappers_pb2.StringValue]:
    """A stream mixing serialized and plain messages."""
    yield EncodedResponse(STRING_VALUE(value="one").SerializeToString())
    yield STRING_VALUE(value="two")


async def encoded_bytes(request: bytes, context: grpc.aio.ServicerContext) -> EncodedResponse:
    """A method without serializers (bytes in and out) answering with EncodedResponse."""
    return EncodedResponse(b"raw:" + request)


async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """The request id the handler sees, after a yield to the loop (calls interleave)."""
    await asyncio.sleep(0.01)
    if request == b"boom":
        raise ValueError("unexpected")
    if request == b"missing":
        raise errors.NotFound(
            "nothing here",
            resource_type="rbee.catalog.v1.Model",
            resource_name="models/none",
            reason="MODEL_NOT_FOUND",
        )
    return (current_request_id() or "").encode()


def handlers() -> dict[str, grpc.RpcMethodHandler]:
    string_serializers = {
        "request_deserializer": STRING_VALUE.FromString,
        "response_serializer": STRING_VALUE.SerializeToString,
    }
    return {
        "Encoded": grpc.unary_unary_rpc_method_handler(encoded_string, **string_serializers),
        "EncodedStream": grpc.unary_stream_rpc_method_handler(encoded_stream, **string_serializers),
        "EncodedBytes": grpc.unary_unary_rpc_method_handler(encoded_bytes),
        "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
    }


async def started(
    *,
    security: ServerSecurity | None = None,
    extra_interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
) -> RunningServer:
    return await start_server(
        [generic_binding(SERVICE, handlers())],
        listen="127.0.0.1:0",
        metrics_listen=None,
        security=security,
        extra_interceptors=extra_interceptors,
    )


@pytest.fixture
async def running() -> AsyncIterator[RunningServer]:
    server = await started()
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def channel(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel


def string_method(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=STRING_VALUE.SerializeToString,
        response_deserializer=STRING_VALUE.FromString,
    )


async def test_encoded_response_reaches_the_client_as_the_message(
    channel: grpc.aio.Channel,
) -> None:
    call = string_method(channel, "Encoded")(STRING_VALUE(value="x"), timeout=5)

    assert await call == STRING_VALUE(value="pre-x")
    assert dict(await call.trailing_metadata())["x-request-id"]  # still echoed

    stream = channel.unary_stream(
        f"/{SERVICE}/EncodedStream",
        request_serializer=STRING_VALUE.SerializeToString,
        response_deserializer=STRING_VALUE.FromString,
    )(STRING_VALUE(value=""), timeout=5)
    assert [m.value async for m in stream] == ["one", "two"]

    raw = await channel.unary_unary(f"/{SERVICE}/EncodedBytes")(b"abc", timeout=5)
    assert raw == b"raw:abc"


async def test_concurrent_calls_keep_their_own_request_ids(channel: grpc.aio.Channel) -> None:
    # The wrapper is built once per method; everything per call must stay per call.
    who = channel.unary_unary(f"/{SERVICE}/WhoAmI")
    ids = [f"rid-{index}" for index in range(40)]

    seen = await asyncio.gather(
        *(who(b"", metadata=(("x-request-id", rid),), timeout=5) for rid in ids)
    )

    assert [s.decode() for s in seen] == ids


async def run_interleaved(
    calls: list[Callable[[], Awaitable[Any]]],
) -> list[grpc.StatusCode]:
    codes = []
    for call in calls:
        try:
            await call()
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
    return codes


async def test_refused_and_accepted_calls_on_one_method_interleave() -> None:
    # With auth on, a refused call resolves to a different handler for the same method than
    # an accepted one; the wrapper cache must never serve one in place of the other.
    server = await started(security=ServerSecurity(token=TOKEN))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            who = channel.unary_unary(f"/{SERVICE}/WhoAmI")
            good = (("authorization", f"Bearer {TOKEN}"),)
            bad = (("authorization", "Bearer nope"),)

            def call(metadata: tuple[tuple[str, str], ...]) -> Callable[[], Awaitable[Any]]:
                return lambda: who(b"", metadata=metadata, timeout=5)

            codes = await run_interleaved([call(good), call(bad), call(good), call(()), call(good)])
    finally:
        await server.stop(0)

    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
    assert codes == [ok, refused, ok, refused, ok]


class PassThrough(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An extra interceptor that only counts the calls it sees."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.calls += 1
        return await continuation(handler_call_details)


async def test_extra_interceptors_keep_metrics_and_error_mapping() -> None:
    extra = PassThrough()
    server = await started(extra_interceptors=(extra,))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            who = channel.unary_unary(f"/{SERVICE}/WhoAmI")
            call = who(b"", metadata=(("x-request-id", "rid-extra"),), timeout=5)
            assert await call == b"rid-extra"
            assert ("x-request-id", "rid-extra") in list(await call.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as boom:
                await who(b"boom", metadata=(("x-request-id", "rid-boom"),), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await who(b"missing", timeout=5)
            encoded = await string_method(channel, "Encoded")(STRING_VALUE(value="y"), timeout=5)
    finally:
        await server.stop(0)

    assert extra.calls == 4
    assert boom.value.code() == grpc.StatusCode.INTERNAL
    assert boom.value.details() == "internal error (request id rid-boom)"
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(missing.value)
    assert status is not None and status.details  # ErrorInfo attached
    assert encoded == STRING_VALUE(value="pre-y")

    def handled(code: str) -> float | None:
        return server.registry.get_sample_value(
            "rbee_grpc_server_handled_total",
            {"service": SERVICE, "method": "WhoAmI", "code": code},
        )

    assert (handled("OK"), handled("INTERNAL"), handled("NOT_FOUND")) == (1, 1, 1)
