"""The call policy every SDK client shares: deadlines, typed errors, retries on UNAVAILABLE only.

Unary calls (`unary_call`, `unary_call_async`):
- the `timeout` is one deadline for the whole call, retries included: every attempt gets the
  time that is left, and a retry that could not start before the deadline is not made;
- a failure raises the typed exception of rbee_client.errors (built from ErrorInfo & co.);
- only UNAVAILABLE is retried, at most `RetryPolicy.max_attempts` attempts, after the server's
  RetryInfo delay when it sent one, else after a capped exponential backoff with jitter.

Streams (`stream_call`, `stream_call_async`) follow the same rules until their first event: a
stream that failed UNAVAILABLE before yielding anything is opened again; once it has yielded an
event it is never retried (the caller has seen part of a result, and a second pull or generation
would not continue it). Leaving a stream early (break, Ctrl-C, an exception) cancels the call, so
the server stops the work.

Nothing here knows a service: the clients pass their stub's method and the request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from rbee.common.v1 import info_pb2, info_pb2_grpc
from rbee_client.errors import RbeeClientError, ServiceUnavailableError, error_from_rpc
from services.common.channels import ChannelSecurity, open_aio_channel, open_channel

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried. Attempt n (n >= 1) that failed waits, before attempt n + 1,
    the server's RetryInfo delay if given, else min(max_backoff, initial_backoff * multiplier **
    (n - 1)) scaled by a random factor in [1 - jitter, 1]."""

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")

    def delay(
        self, attempt: int, retry_after: float | None, rng: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        if retry_after is not None and retry_after > 0:
            return retry_after  # the server knows when it will be back
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        # jitter spreads clients that failed together, so they do not all come back at once
        return base * (1.0 - self.jitter * rng())


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


class _Deadline:
    """A point in time (monotonic) or none; hands each attempt the time that is left."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        return max(0.0, self._at - time.monotonic())

    def allows(self, wait: float) -> bool:
        """Whether waiting `wait` seconds still leaves time for another attempt."""
        left = self.remaining()
        return left is None or wait < left


def _retry_delay(
    err: RbeeClientError, attempt: int, policy: RetryPolicy, deadline: _Deadline
) -> float | None:
    """The wait before the next attempt, or None when `err` must be raised now."""
    if not isinstance(err, ServiceUnavailableError) or attempt >= policy.max_attempts:
        return None
    wait = policy.delay(attempt, err.retry_after_seconds)
    return wait if deadline.allows(wait) else None


def _cancel(call: object) -> None:
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()


# ---- sync ---------------------------------------------------------------------------------------


def unary_call(
    method: Callable[..., Any],
    request: object,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Call `method(request, timeout=...)` under the policy; returns its response."""
    deadline = _Deadline(timeout)
    attempt = 0
    while True:
        attempt += 1
        try:
            return method(request, timeout=deadline.remaining())
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
        wait = _retry_delay(err, attempt, policy, deadline)
        if wait is None:
            raise err
        sleep(wait)


def stream_call(
    method: Callable[..., Any],
    request: object,
    *,
    timeout: float | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[Any, None, None]:
    """Iterate the responses of server-streaming `method(request, timeout=...)`.

    `timeout` bounds the whole stream (None: no deadline, for work that may take hours). The call
    starts when iteration starts; leaving the iteration early cancels it."""
    deadline = _Deadline(timeout)
    attempt = 0
    while True:
        attempt += 1
        started = False
        call = method(request, timeout=deadline.remaining())
        try:
            for response in call:
                started = True
                yield response
            return
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
        finally:
            _cancel(call)  # a no-op once the call has ended; stops the server's work otherwise
        wait = None if started else _retry_delay(err, attempt, policy, deadline)
        if wait is None:
            raise err
        sleep(wait)


# ---- asyncio ------------------------------------------------------------------------------------


async def unary_call_async(
    method: Callable[..., Awaitable[Any]],
    request: object,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Any:
    """The asyncio twin of `unary_call` (grpc.aio stub methods)."""
    deadline = _Deadline(timeout)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await method(request, timeout=deadline.remaining())
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
            err = error_from_rpc(exc)
        wait = _retry_delay(err, attempt, policy, deadline)
        if wait is None:
            raise err
        await sleep(wait)


async def stream_call_async(
    method: Callable[..., Any],
    request: object,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[Any, None]:
    """The asyncio twin of `stream_call` (grpc.aio stub methods)."""
    deadline = _Deadline(timeout)
    attempt = 0
    while True:
        attempt += 1
        started = False
        call = method(request, timeout=deadline.remaining())
        try:
            async for response in call:
                started = True
                yield response
            return
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
        finally:
            _cancel(call)
        wait = None if started else _retry_delay(err, attempt, policy, deadline)
        if wait is None:
            raise err
        await sleep(wait)


# ---- the clients' common part ----------------------------------------------------------------


class ServiceClient:
    """What every sync client shares: one channel (opened with `security`, or the caller's own
    `channel`, which is then left open on close), the default deadline of unary calls, the retry
    policy, and GetServiceInfo (every rbee service serves rbee.common.v1.InfoService)."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self._own_channel = channel is None
        self._channel = channel if channel is not None else open_channel(target, security)
        self._timeout = timeout
        self._retry = retry
        self._info_stub = info_pb2_grpc.InfoServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel this client opened (a channel passed in stays open)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(
        self, method: Callable[..., Any], request: object, timeout: float | None = None
    ) -> Any:
        """A unary call under this client's policy (`timeout` None: the client's deadline)."""
        deadline = self._timeout if timeout is None else timeout
        return unary_call(method, request, timeout=deadline, policy=self._retry)

    def _stream(
        self, method: Callable[..., Any], request: object, timeout: float | None
    ) -> Iterator[Any]:
        return stream_call(method, request, timeout=timeout, policy=self._retry)

    def get_service_info(self) -> info_pb2.ServiceInfo:
        """The service's version, platform, start time, whether it requires auth, metrics URL."""
        info: info_pb2.ServiceInfo = self._unary(
            self._info_stub.GetServiceInfo, info_pb2.GetServiceInfoRequest()
        )
        return info


class AsyncServiceClient:
    """The asyncio twin of ServiceClient (a grpc.aio channel; `async with` closes it)."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self._own_channel = channel is None
        self._channel = channel if channel is not None else open_aio_channel(target, security)
        self._timeout = timeout
        self._retry = retry
        self._info_stub = info_pb2_grpc.InfoServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel this client opened (a channel passed in stays open)."""
        if self._own_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: Callable[..., Any],
        request: object,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> Any:
        """A unary call under this client's policy (`timeout` None: the client's deadline)."""
        deadline = self._timeout if timeout is None else timeout
        return await unary_call_async(method, request, timeout=deadline, policy=self._retry)

    def _stream(
        self, method: Callable[..., Any], request: object, timeout: float | None
    ) -> AsyncIterator[Any]:
        return stream_call_async(method, request, timeout=timeout, policy=self._retry)

    async def get_service_info(self) -> info_pb2.ServiceInfo:
        """The service's version, platform, start time, whether it requires auth, metrics URL."""
        info: info_pb2.ServiceInfo = await self._unary(
            self._info_stub.GetServiceInfo, info_pb2.GetServiceInfoRequest()
        )
        return info
