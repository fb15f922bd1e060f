"""grpc.aio server interceptors applied to every RPC of every service.

- `ErrorInterceptor`: binds the request id (see services.common.request_context), echoes it as
  initial metadata `x-request-id`, and turns any exception a handler raises into a rich status
  (services.common.status): domain errors keep their code and message, anything else becomes
  INTERNAL with a fixed message; the traceback goes to the server log only. Without it gRPC
  would send UNKNOWN with the exception text to the client.
- `MetricsInterceptor`: rbee_grpc_server_* counters and histogram per (service, method, code)
  (services.common.metrics).

Both wrap all four handler kinds (unary/stream request x unary/stream response). Handlers must
be async: coroutine functions, async generator functions, or stream-response coroutines that
write with `context.write`. `asyncio.CancelledError` and `grpc.aio.AbortError` (a handler that
called `context.abort` itself) always pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import Token
from types import TracebackType
from typing import Any, Protocol

import grpc
from grpc_status import rpc_status

from services.common.errors import RbeeError, StatusKind
from services.common.metrics import GrpcServerMetrics, RpcMethodLabels
from services.common.request_context import (
    REQUEST_ID_METADATA_KEY,
    bind_request_id,
    request_id_from_metadata,
    unbind_request_id,
)
from services.common.status import status_from_error

logger = logging.getLogger(__name__)

# Errors the client caused or expects (a miss, a bad field) are routine: log them quietly.
_CLIENT_ERROR_KINDS = frozenset(
    {
        StatusKind.INVALID_ARGUMENT,
        StatusKind.NOT_FOUND,
        StatusKind.ALREADY_EXISTS,
        StatusKind.FAILED_PRECONDITION,
        StatusKind.PERMISSION_DENIED,
        StatusKind.UNAUTHENTICATED,
        StatusKind.CANCELLED,
    }
)


class _CallScope(Protocol):
    """What an interceptor does around one call: enter, per sent message, exit."""

    async def __aenter__(self) -> None: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

    def message_sent(self) -> None: ...


_ScopeFactory = Callable[[grpc.HandlerCallDetails, Any], _CallScope]


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request id + the one exception -> status mapping, for every handler kind."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the handler that serves this call (None for unknown methods stays None)."""
        handler = await continuation(handler_call_details)
        return _wrap_method_handler(handler, handler_call_details, _ErrorScope)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """rbee_grpc_server_* metrics for every call of a registered method."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the handler that serves this call (None for unknown methods stays None)."""
        handler = await continuation(handler_call_details)

        def scope(details: grpc.HandlerCallDetails, context: Any) -> _CallScope:
            return _MetricsScope(self._metrics, details, context)

        return _wrap_method_handler(handler, handler_call_details, scope)


class _ErrorScope:
    def __init__(self, details: grpc.HandlerCallDetails, context: Any) -> None:
        self._method = details.method
        self._context = context
        self._request_id = request_id_from_metadata(details.invocation_metadata)
        self._token: Token[str | None] | None = None

    async def __aenter__(self) -> None:
        self._token = bind_request_id(self._request_id)
        try:
            # Sent up front so the client has the id even when the call later fails. Handlers
            # therefore cannot send initial metadata of their own (use trailing metadata).
            await self._context.send_initial_metadata(
                ((REQUEST_ID_METADATA_KEY, self._request_id),)
            )
        except BaseException:
            unbind_request_id(self._token)
            raise

    def message_sent(self) -> None:
        pass

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            # CancelledError, GeneratorExit and the like are BaseExceptions: not ours to map.
            if (
                exc is None
                or not isinstance(exc, Exception)
                or isinstance(exc, grpc.aio.AbortError)
            ):
                return False
            status = status_from_error(exc, request_id=self._request_id)
            self._log(exc)
            if self._context.done() or self._context.cancelled():
                return False  # a status was already sent, or the client is gone
        finally:
            if self._token is not None:
                unbind_request_id(self._token)
        # Raises grpc.aio.AbortError, which replaces `exc` on the way out.
        await self._context.abort_with_status(rpc_status.to_status(status))
        return False

    def _log(self, exc: Exception) -> None:
        if isinstance(exc, RbeeError):
            level = logging.INFO if exc.kind in _CLIENT_ERROR_KINDS else logging.WARNING
            logger.log(
                level,
                "%s failed: %s %s: %s",
                self._method,
                exc.kind.value,
                exc.reason,
                exc.message,
            )
        else:
            logger.error(
                "%s failed with an unexpected error (request id %s)",
                self._method,
                self._request_id,
                exc_info=exc,
            )


class _MetricsScope:
    def __init__(
        self, metrics: GrpcServerMetrics, details: grpc.HandlerCallDetails, context: Any
    ) -> None:
        self._metrics = metrics
        self._labels = RpcMethodLabels.from_full_method(details.method)
        self._context = context
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()
        self._metrics.record_started(self._labels)

    def message_sent(self) -> None:
        self._metrics.record_message_sent(self._labels)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        code = _final_code_name(exc, self._context)
        self._metrics.record_handled(self._labels, code, time.perf_counter() - self._started)
        return False


def _final_code_name(exc: BaseException | None, context: Any) -> str:
    """The status code name the client ends up with, as seen from inside the handler."""
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
        # abort() records the code; a handler that returned normally without set_code is OK.
        return "OK" if exc is None else "UNKNOWN"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    if isinstance(exc, RbeeError):
        return exc.kind.value
    # The error interceptor (inside this one) turns anything else into INTERNAL.
    return "INTERNAL"


class _WriteObservingContext:
    """A servicer context whose `write` also reports each sent message."""

    def __init__(self, context: Any, on_write: Callable[[], None]) -> None:
        self._context = context
        self._on_write = on_write

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._on_write()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _wrap_method_handler(
    handler: grpc.RpcMethodHandler | None,
    details: grpc.HandlerCallDetails,
    make_scope: _ScopeFactory,
) -> grpc.RpcMethodHandler | None:
    """The same handler (same kind and (de)serializers) with each call inside a scope."""
    if handler is None:
        return None
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, details, make_scope), **serializers
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, details, make_scope), **serializers
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, details, make_scope), **serializers
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, details, make_scope), **serializers
        )
    return handler


def _wrap_unary_response(
    behavior: Callable[[Any, Any], Any],
    details: grpc.HandlerCallDetails,
    make_scope: _ScopeFactory,
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request_or_iterator: Any, context: Any) -> Any:
        async with make_scope(details, context):
            response = behavior(request_or_iterator, context)
            if inspect.isawaitable(response):
                response = await response
            return response

    return call


def _wrap_stream_response(
    behavior: Callable[[Any, Any], Any],
    details: grpc.HandlerCallDetails,
    make_scope: _ScopeFactory,
) -> Callable[[Any, Any], Any]:
    # grpc.aio tells the two stream styles apart with inspect.isasyncgenfunction, so the
    # wrapper must be of the same style as the handler it wraps.
    if inspect.isasyncgenfunction(behavior):

        async def generate(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
            scope = make_scope(details, context)
            async with (
                scope,
                contextlib.aclosing(behavior(request_or_iterator, context)) as responses,
            ):
                async for response in responses:
                    scope.message_sent()
                    yield response

        return generate

    async def write(request_or_iterator: Any, context: Any) -> None:
        scope = make_scope(details, context)
        async with scope:
            await behavior(request_or_iterator, _WriteObservingContext(context, scope.message_sent))

    return write
