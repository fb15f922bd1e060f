"""The server interceptor applied to every RPC of every service: metrics, request id, and the
one exception -> status mapping, in ONE wrapper around each handler (`ServerCallInterceptor`
on grpc.aio servers, `ThreadedCallInterceptor` on a threaded server: see the end of the file).

- Request id and errors: binds the request id (see services.common.request_context), echoes it
  as `x-request-id` (initial metadata of a streaming response, trailing metadata of a unary
  one, and with every error status), and turns any exception a handler raises into a rich status
  (services.common.status): domain errors keep their code and message, anything else becomes
  INTERNAL with a fixed message; the traceback goes to the server log only. Without it gRPC
  would send UNKNOWN with the exception text to the client.
- Metrics: rbee_grpc_server_* counters and histogram per (service, method, code)
  (services.common.metrics), counting the status the error mapping produced.

`ServerCallInterceptor` does both (what `start_server` installs); `MetricsInterceptor` and
`ErrorInterceptor` do one each, for a server that puts other interceptors between the two.
Every handler kind is wrapped (unary/stream request x unary/stream response). On grpc.aio
servers handlers must be async: coroutine functions, async generator functions, or
stream-response coroutines that write with `context.write`. `asyncio.CancelledError` and
`grpc.aio.AbortError` (a handler that called `context.abort` itself) always pass through
untouched.

Why one wrapper, built once per method: the catalog serves ~1,000 small RPCs a second on one
event loop, where each interceptor layer used to cost a coroutine at lookup, a new method
handler, an async context manager and metric label lookups per call (about 50 to 75 us of
Python per call for the two layers; about 20 to 30 us now, measured with a stub context; the
whole call, grpc included, is ~700 us of CPU: see bench/rpc_cost.py). Now the wrapped handler is
made on a method's first call and reused (keyed by the handler object the server resolved, so
a different handler for the same method, e.g. the auth check's refusing one, is wrapped on its
own), and the metric children are bound once per method.

A unary response carries the request id in its trailing metadata: grpc.aio has no way to add
initial metadata to the batch that carries the response, and a separate initial-metadata send
(one more sendmsg, wake-up and completion per call) was ~15 to 20% of a small call's server CPU.

A handler may return `EncodedResponse(wire)` instead of a message: bytes it already holds in
serialized form (a cache) go to the client as they are, without a parse and a re-serialization.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import Token
from typing import Any

import grpc
from grpc_status import rpc_status

from services.common.errors import RbeeError, StatusKind
from services.common.metrics import GrpcServerMetrics, MethodMetrics
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

# Wrapped handlers kept per interceptor: one per method, so the bound is only a guard against a
# generic handler that answers for unbounded method names.
_MAX_WRAPPED_METHODS = 4096


class EncodedResponse:
    """A response message in its serialized form: the wrapper sends `wire` as it is.

    Only for handlers served through these interceptors (every server `start_server` builds);
    `wire` must be a valid encoding of the method's response message.
    """

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire


class _WrappedMethods:
    """The wrapped handler per method, built on a method's first call and reused (keyed by the
    handler object the server resolved, so a different handler for the same method, e.g. the
    auth check's refusing one, is wrapped on its own)."""

    def __init__(
        self,
        metrics: GrpcServerMetrics | None,
        map_errors: bool,
        wrap: Callable[[grpc.RpcMethodHandler, _CallBoundary], grpc.RpcMethodHandler],
    ) -> None:
        self._metrics = metrics
        self._map_errors = map_errors
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrapped(
        self, handler: grpc.RpcMethodHandler | None, method: str
    ) -> grpc.RpcMethodHandler | None:
        """`handler` wrapped (None for unknown methods stays None)."""
        if handler is None:
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        boundary = _CallBoundary(
            method,
            self._metrics.for_method(method) if self._metrics is not None else None,
            map_errors=self._map_errors,
        )
        wrapped = self._wrap(handler, boundary)
        # A dict store is atomic: threads racing on a method's first call each wrap it once.
        if len(self._wrapped) >= _MAX_WRAPPED_METHODS:
            self._wrapped.clear()
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class ServerCallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Metrics (when `metrics` is given) and the request id + error mapping (when
    `map_errors`), for every call of a registered method, in one wrapper per method."""

    def __init__(self, metrics: GrpcServerMetrics | None = None, *, map_errors: bool = True):
        self._methods = _WrappedMethods(metrics, map_errors, _wrap_method_handler)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The wrapped handler that serves this call (None for unknown methods stays None)."""
        handler = await continuation(handler_call_details)
        return self._methods.wrapped(handler, handler_call_details.method)


class ErrorInterceptor(ServerCallInterceptor):
    """Request id + the one exception -> status mapping, for every handler kind."""

    def __init__(self) -> None:
        super().__init__(None, map_errors=True)


class MetricsInterceptor(ServerCallInterceptor):
    """rbee_grpc_server_* metrics for every call of a registered method."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        super().__init__(metrics, map_errors=False)


class _CallState:
    """What one call carries from its start to its end."""

    __slots__ = ("request_id", "started", "token")

    def __init__(self, started: float, request_id: str, token: Token[str | None] | None):
        self.started = started
        self.request_id = request_id
        self.token = token


class _CallBoundary:
    """Everything the wrapper does around one method's calls: begin, each sent message, end."""

    def __init__(self, method: str, metrics: MethodMetrics | None, *, map_errors: bool) -> None:
        self.method = method
        self.metrics = metrics
        self.map_errors = map_errors

    async def begin(self, context: Any, *, streaming: bool) -> _CallState:
        """Count the start; bind and echo the request id. A streaming response gets it up front
        as initial metadata, so the client knows it while the stream runs (handlers therefore
        cannot send initial metadata of their own); a unary response gets it in the trailing
        metadata, which travels in the same batch as the response and its status (an extra
        initial-metadata send cost 15-20% of a small call's server CPU: bench/rpc_cost.py).
        Either way the client has it when the call fails too."""
        state = self._start(context)
        if state.token is None:
            return state
        echo = ((REQUEST_ID_METADATA_KEY, state.request_id),)
        try:
            if streaming:
                await context.send_initial_metadata(echo)
            else:
                context.set_trailing_metadata(echo)
        except BaseException as exc:
            self._echo_failed(exc, context, state)
            raise
        return state

    def begin_in_thread(self, context: Any, *, streaming: bool) -> _CallState:
        """`begin` for a call served in a handler thread (a threaded server's sync context)."""
        state = self._start(context)
        if state.token is None:
            return state
        echo = ((REQUEST_ID_METADATA_KEY, state.request_id),)
        try:
            (context.send_initial_metadata if streaming else context.set_trailing_metadata)(echo)
        except BaseException as exc:
            self._echo_failed(exc, context, state)
            raise
        return state

    def _echo_failed(self, exc: BaseException, context: Any, state: _CallState) -> None:
        if state.token is not None:
            unbind_request_id(state.token)
        self._handled(exc, context, state.started)

    def _start(self, context: Any) -> _CallState:
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.started.inc()
        if not self.map_errors:
            return _CallState(started, "", None)
        request_id = request_id_from_metadata(context.invocation_metadata())
        return _CallState(started, request_id, bind_request_id(request_id))

    def message_sent(self) -> None:
        """Count one streamed response message."""
        if self.metrics is not None:
            self.metrics.msg_sent.inc()

    def succeeded(self, context: Any, state: _CallState) -> None:
        """The handler returned: unbind the id, count the call."""
        if state.token is not None:
            unbind_request_id(state.token)
        self._handled(None, context, state.started)

    async def failed(self, exc: BaseException, context: Any, state: _CallState) -> None:
        """The handler raised `exc`. Raises grpc.aio.AbortError once the mapped status is sent;
        returns (the caller re-raises `exc`) when the error is not ours to map."""
        final = exc
        try:
            if self.map_errors and _stray_cancellation(exc, context):
                exc = StrayCancellation(
                    f"{self.method}: something the handler awaited was cancelled, not the call"
                )
            status = self._status_for(exc, state, call_over=context.done() or context.cancelled())
            if status is not None:
                code, details, trailers = self._abort_arguments(status, state)
                # Raises grpc.aio.AbortError, which replaces `exc` on the way out.
                await context.abort(code, details, trailers)
        except BaseException as raised:
            final = raised
            raise
        finally:
            self._handled(final, context, state.started)

    def failed_in_thread(self, exc: BaseException, context: Any, state: _CallState) -> None:
        """`failed` for a call served in a handler thread. Ends the call with the mapped status
        (the sync context's `abort` raises a bare Exception, which replaces `exc` on the way
        out); returns (the caller re-raises `exc`) when `exc` is not ours to map: a status the
        handler set with `context.abort` itself, GeneratorExit, KeyboardInterrupt and the like.
        A call that is over (the client went away, its deadline passed) is aborted too, which
        only keeps grpc from logging the exception as the application's failure."""
        final = exc
        try:
            if _is_thread_abort(exc, context):
                return
            over = not context.is_active()
            if isinstance(exc, asyncio.CancelledError) and not over and self.map_errors:
                # The coroutine run for it on the event loop was cancelled, not the call.
                exc = StrayCancellation(
                    f"{self.method}: the handler's work on the event loop was cancelled"
                )
            if isinstance(exc, asyncio.CancelledError):
                if state.token is not None:
                    unbind_request_id(state.token)
                context.abort(_cancelled_code(context), "the call was cancelled")
            status = self._status_for(exc, state, call_over=False)
            if status is None:
                return
            code, details, trailers = self._abort_arguments(status, state)
            context.abort_with_status(_AbortStatus(code, details, trailers))
        except BaseException as raised:
            final = raised
            raise
        finally:
            self._handled(final, context, state.started)

    def ended_in_thread(self, code: grpc.StatusCode, state: _CallState) -> None:
        """Count a call whose handler returned before the call ended (a non-blocking stream)
        once it has ended with `code`."""
        if self.metrics is not None:
            self.metrics.handled(code.name, time.perf_counter() - state.started)

    def _abort_arguments(self, status: Any, state: _CallState) -> tuple[Any, str, Any]:
        """(code, details, trailers) that send the google.rpc.Status `status`, with its
        details and the request id in the trailers (they replace any set before)."""
        grpc_status = rpc_status.to_status(status)
        trailers = (
            *grpc_status.trailing_metadata,
            (REQUEST_ID_METADATA_KEY, state.request_id),
        )
        return grpc_status.code, grpc_status.details, trailers

    def _status_for(self, exc: BaseException, state: _CallState, *, call_over: bool) -> Any:
        """The google.rpc.Status to send for `exc`, or None to let it through; unbinds."""
        try:
            # CancelledError, GeneratorExit and the like are BaseExceptions: not ours to map.
            if (
                not self.map_errors
                or not isinstance(exc, Exception)
                or isinstance(exc, grpc.aio.AbortError)
            ):
                return None
            status = status_from_error(exc, request_id=state.request_id)
            self._log(exc, state.request_id)
            if call_over:
                return None  # a status was already sent, or the client is gone
            return status
        finally:
            if state.token is not None:
                unbind_request_id(state.token)

    def _handled(self, exc: BaseException | None, context: Any, started: float) -> None:
        if self.metrics is not None:
            self.metrics.handled(
                _final_code_name(exc, context),
                time.perf_counter() - started,
            )

    def _log(self, exc: Exception, request_id: str) -> None:
        if isinstance(exc, RbeeError):
            level = logging.INFO if exc.kind in _CLIENT_ERROR_KINDS else logging.WARNING
            logger.log(
                level,
                "%s failed: %s %s: %s",
                self.method,
                exc.kind.value,
                exc.reason,
                exc.message,
            )
        else:
            logger.error(
                "%s failed with an unexpected error (request id %s)",
                self.method,
                request_id,
                exc_info=exc,
            )


class StrayCancellation(RuntimeError):
    """A handler ended with CancelledError although its call was not cancelled."""


def _stray_cancellation(exc: BaseException, context: Any) -> bool:
    """Whether `exc` is a CancelledError that did not come from cancelling this call: the
    handler awaited something that was cancelled on its own (a client call on a channel that
    closed meanwhile, a future another task cancelled). grpc.aio sends no status for a handler
    that ends with CancelledError, so the client would wait out its whole deadline: it gets
    INTERNAL (with a request id) instead. The call's own cancellation (the client went away,
    the server stops) cancels the handler's task, whose `cancelling()` then counts it."""
    if not isinstance(exc, asyncio.CancelledError) or context.cancelled():
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _is_thread_abort(exc: BaseException, context: Any) -> bool:
    """Whether `exc` is what a sync context's `abort` raises: a bare Exception, with the code
    it set recorded on the context (grpc's sync server has no exception type of its own)."""
    return (
        type(exc) is Exception
        and not exc.args
        and isinstance(getattr(context, "code", _no_code)(), grpc.StatusCode)
    )


def _no_code() -> None:
    return None


class _AbortStatus(
    collections.namedtuple("_AbortStatus", ("code", "details", "trailing_metadata")),
    grpc.Status,  # type: ignore[misc]
):
    """The status a sync context's `abort_with_status` sends."""


def _final_code_name(exc: BaseException | None, context: Any) -> str:
    """The status code name the client ends up with, as seen from inside the handler."""
    if exc is None or isinstance(exc, grpc.aio.AbortError) or _is_thread_abort(exc, context):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
        # abort() records the code; a handler that returned normally without set_code is OK.
        return "OK" if exc is None else "UNKNOWN"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return str(_cancelled_code(context).name)
    if isinstance(exc, RbeeError):
        return exc.kind.value
    # The error mapping (in this wrapper, or an ErrorInterceptor inside) makes it INTERNAL.
    return "INTERNAL"


def _cancelled_code(context: Any) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call's deadline has passed, else CANCELLED."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


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


def _response_serializer(inner: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """`inner` (None: the response is bytes already), letting EncodedResponse through."""

    def serialize(message: Any) -> bytes:
        if type(message) is EncodedResponse:
            return message.wire
        return inner(message) if inner is not None else message  # type: ignore[no-any-return]

    return serialize


_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def rebuilt_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """The same handler (same kind and deserializer) with its behavior replaced by
    `wrap(kind, behavior)`, kind being "unary_unary", "stream_unary", "unary_stream" or
    "stream_stream"; the response serializer lets EncodedResponse through."""
    for kind, make in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return make(
                wrap(kind, behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=_response_serializer(handler.response_serializer),
            )
    return handler


def _wrap_method_handler(
    handler: grpc.RpcMethodHandler, boundary: _CallBoundary
) -> grpc.RpcMethodHandler:
    """The same handler with each call inside the boundary (grpc.aio)."""

    def wrap(kind: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if kind.endswith("_unary"):
            return _wrap_unary_response(behavior, boundary)
        return _wrap_stream_response(behavior, boundary)

    return rebuilt_handler(handler, wrap)


def _wrap_unary_response(
    behavior: Callable[[Any, Any], Any], boundary: _CallBoundary
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request_or_iterator: Any, context: Any) -> Any:
        state = await boundary.begin(context, streaming=False)
        try:
            response = behavior(request_or_iterator, context)
            if inspect.isawaitable(response):
                response = await response
        except BaseException as exc:
            await boundary.failed(exc, context, state)
            raise
        boundary.succeeded(context, state)
        return response

    return call


def _wrap_stream_response(
    behavior: Callable[[Any, Any], Any], boundary: _CallBoundary
) -> Callable[[Any, Any], Any]:
    # grpc.aio tells the two stream styles apart with inspect.isasyncgenfunction, so the
    # wrapper must be of the same style as the handler it wraps.
    if inspect.isasyncgenfunction(behavior):

        async def generate(request_or_iterator: Any, context: Any) -> AsyncIterator[Any]:
            state = await boundary.begin(context, streaming=True)
            try:
                async with contextlib.aclosing(behavior(request_or_iterator, context)) as responses:
                    async for response in responses:
                        boundary.message_sent()
                        yield response
            except BaseException as exc:
                await boundary.failed(exc, context, state)
                raise
            boundary.succeeded(context, state)

        return generate

    async def write(request_or_iterator: Any, context: Any) -> None:
        state = await boundary.begin(context, streaming=True)
        observed = (
            _WriteObservingContext(context, boundary.message_sent)
            if boundary.metrics is not None
            else context
        )
        try:
            await behavior(request_or_iterator, observed)
        except BaseException as exc:
            await boundary.failed(exc, context, state)
            raise
        boundary.succeeded(context, state)

    return write


# ---- the threaded server ------------------------------------------------------------------
#
# A service whose small reads must answer in a millisecond or two serves on grpc's sync server
# (services.common.server.start_server with `handler_threads`): each call runs in a handler
# thread, with no event-loop hop between grpc's completion queue and the handler. On this kind
# of host (idle vCPUs halt) every thread that has to wake costs 0.1 to 0.5 ms at p99; the sync
# server wakes one (the handler thread) where grpc.aio wakes the loop twice.


class LoopBridge:
    """Runs a threaded server's coroutine handlers on the service's event loop and waits for
    them in the handler thread. The call's end (cancelled, deadline passed) cancels the
    coroutine; the handler thread then sees asyncio.CancelledError. The request id bound in the
    handler thread is the coroutine's too (the task copies the calling thread's context)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def run(self, awaitable: Awaitable[Any], context: Any) -> Any:
        """The result of `awaitable`, run on the loop; raises what it raises."""
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._loop)
        if not context.add_callback(future.cancel):  # the call is already over
            future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError() from None


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class ThreadedCallInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """ServerCallInterceptor for grpc's sync server: the same metrics, request id and error
    mapping, with handlers served in the server's handler threads.

    Handlers may be plain functions (run in the handler thread), generators for response
    streams (health's non-blocking Watch included), or coroutine functions for unary-unary
    methods, which run on the service's event loop through `bridge` (they must not use the
    context's async methods: the context is the sync one). A plain unary-unary function may
    also return an awaitable, to finish on the loop what it could not answer in the thread (a
    cache miss). Coroutine handlers of any other kind fail with INTERNAL and a logged
    TypeError.
    """

    def __init__(self, metrics: GrpcServerMetrics | None, bridge: LoopBridge) -> None:
        def wrap(handler: grpc.RpcMethodHandler, boundary: _CallBoundary) -> Any:
            return rebuilt_handler(
                handler, lambda kind, behavior: in_thread(kind, behavior, boundary)
            )

        def in_thread(kind: str, behavior: Any, boundary: _CallBoundary) -> Any:
            if kind == "unary_unary":
                return _wrap_unary_in_thread(behavior, boundary, bridge)
            if kind == "stream_unary":
                return _wrap_unary_in_thread(behavior, boundary, None)
            return _wrap_stream_in_thread(behavior, boundary)

        self._methods = _WrappedMethods(metrics, True, wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The wrapped handler that serves this call (None for unknown methods stays None)."""
        handler = continuation(handler_call_details)
        return self._methods.wrapped(handler, handler_call_details.method)


def _not_for_threads(behavior: Callable[..., Any], what: str) -> TypeError:
    name = getattr(behavior, "__qualname__", repr(behavior))
    return TypeError(f"{name}: {what} cannot be served by a threaded server")


def _wrap_unary_in_thread(
    behavior: Callable[[Any, Any], Any], boundary: _CallBoundary, bridge: LoopBridge | None
) -> Callable[[Any, Any], Any]:
    def call(request_or_iterator: Any, context: Any) -> Any:
        state = boundary.begin_in_thread(context, streaming=False)
        try:
            response = behavior(request_or_iterator, context)
            if inspect.isawaitable(response):
                if bridge is None:
                    _close_awaitable(response)
                    raise _not_for_threads(behavior, "a coroutine with a request stream")
                response = bridge.run(response, context)
        except BaseException as exc:
            boundary.failed_in_thread(exc, context, state)
            raise
        boundary.succeeded(context, state)
        return response

    return call


def _close_awaitable(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # no "coroutine was never awaited" warning


def _wrap_stream_in_thread(
    behavior: Callable[..., Any], boundary: _CallBoundary
) -> Callable[..., Any]:
    if getattr(behavior, "experimental_non_blocking", False):
        return _wrap_non_blocking_stream(behavior, boundary)

    def generate(request_or_iterator: Any, context: Any) -> Iterator[Any]:
        state = boundary.begin_in_thread(context, streaming=True)
        try:
            if inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior):
                raise _not_for_threads(behavior, "an async response stream")
            for response in behavior(request_or_iterator, context):
                boundary.message_sent()
                yield response
        except BaseException as exc:
            boundary.failed_in_thread(exc, context, state)
            raise
        boundary.succeeded(context, state)

    return generate


def _wrap_non_blocking_stream(
    behavior: Callable[..., Any], boundary: _CallBoundary
) -> Callable[..., Any]:
    """A stream whose handler returns at once and sends later through a callback (grpc's
    experimental non-blocking handlers: health's Watch). The call is counted when it ends."""

    def start(request: Any, context: Any, send_response_callback: Any = None) -> Any:
        state = boundary.begin_in_thread(context, streaming=True)

        def send(response: Any) -> None:
            if response is not None:  # None ends the stream
                boundary.message_sent()
            send_response_callback(response)

        def ended() -> None:
            code = context.code()
            boundary.ended_in_thread(
                code if isinstance(code, grpc.StatusCode) else _cancelled_code(context), state
            )

        try:
            result = behavior(request, context, send if send_response_callback else None)
        except BaseException as exc:
            boundary.failed_in_thread(exc, context, state)
            raise
        if state.token is not None:
            unbind_request_id(state.token)
        if not context.add_callback(ended):
            ended()
        return result

    start.experimental_non_blocking = True  # type: ignore[attr-defined]
    start.experimental_thread_pool = getattr(  # type: ignore[attr-defined]
        behavior, "experimental_thread_pool", None
    )
    return start
