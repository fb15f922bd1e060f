"""The SDK's call policy (rbee_client.calls) against fake stub methods: no sockets.

What is checked: only UNAVAILABLE is retried, RetryInfo's delay is the wait, the backoff is
capped and jittered, the deadline covers the whole call (retries included), a stream is retried
only before its first event, leaving a stream cancels the call, and errors come back typed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from rbee.worker.v1 import generation_pb2 as gen
from rbee_client.calls import (
    RetryPolicy,
    stream_call,
    stream_call_async,
    unary_call,
    unary_call_async,
)
from rbee_client.errors import (
    InvalidArgumentError,
    NotFoundError,
    RbeeClientError,
    ServiceUnavailableError,
)
from rbee_client.worker import chat_message

pytestmark = pytest.mark.unit

POLICY = RetryPolicy(max_attempts=4, initial_backoff=0.2, max_backoff=1.0, jitter=0.0)


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What grpc raises: an RpcError that is also the Call, with rich details in the trailers."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str = "failed",
        *,
        reason: str = "",
        retry_after: float | None = None,
        resource: tuple[str, str] | None = None,
    ) -> None:
        self._code = code
        self._message = message
        status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
        if reason:
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="rbee"))
        if retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(retry_after * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        if resource is not None:
            status.details.add().Pack(
                error_details_pb2.ResourceInfo(resource_type=resource[0], resource_name=resource[1])
            )
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers

    # the rest of grpc.Call, unused here
    def initial_metadata(self) -> None:
        return None

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def unavailable(retry_after: float | None = None) -> FakeRpcError:
    return FakeRpcError(
        grpc.StatusCode.UNAVAILABLE, "try later", reason="UNAVAILABLE", retry_after=retry_after
    )


@dataclass
class FakeUnary:
    """A unary stub method: each call takes the next outcome (an error to raise or a value)."""

    outcomes: list[Any]
    timeouts: list[float | None] = field(default_factory=list)

    def __call__(self, request: object, *, timeout: float | None) -> Any:
        self.timeouts.append(timeout)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@dataclass
class FakeStreamCall:
    """One server-streaming call: yields `events`, then raises `error` (if any)."""

    events: Sequence[str]
    error: FakeRpcError | None = None
    cancelled: bool = False

    def __iter__(self) -> Iterator[str]:
        yield from self.events
        if self.error is not None:
            raise self.error

    async def _aiter(self) -> AsyncIterator[str]:
        for event in self.events:
            yield event
        if self.error is not None:
            raise self.error

    def __aiter__(self) -> AsyncIterator[str]:
        return self._aiter()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@dataclass
class FakeStream:
    """A server-streaming stub method: each call returns the next FakeStreamCall."""

    calls: list[FakeStreamCall]
    made: list[FakeStreamCall] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)

    def __call__(self, request: object, *, timeout: float | None) -> FakeStreamCall:
        self.timeouts.append(timeout)
        call = self.calls.pop(0)
        self.made.append(call)
        return call


class Sleeps(list[float]):
    """Records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class AsyncSleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


# ---- unary ----------------------------------------------------------------------------------


def test_unavailable_is_retried_with_capped_exponential_backoff() -> None:
    method = FakeUnary([unavailable(), unavailable(), unavailable(), "ok"])
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.4, max_backoff=1.0, jitter=0.0)
    assert unary_call(method, "req", timeout=30, policy=policy, sleep=sleeps) == "ok"
    assert sleeps == [0.4, 0.8, 1.0]  # doubled, then capped at max_backoff
    assert len(method.timeouts) == 4


def test_unavailable_gives_up_after_max_attempts() -> None:
    method = FakeUnary([unavailable() for _ in range(4)])
    sleeps = Sleeps()
    with pytest.raises(ServiceUnavailableError) as caught:
        unary_call(method, "req", timeout=30, policy=POLICY, sleep=sleeps)
    assert len(method.timeouts) == POLICY.max_attempts
    assert len(sleeps) == POLICY.max_attempts - 1
    assert caught.value.reason == "UNAVAILABLE"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    ],
)
def test_other_codes_are_not_retried(code: grpc.StatusCode) -> None:
    method = FakeUnary([FakeRpcError(code, "no", reason="SOME_REASON"), "never reached"])
    sleeps = Sleeps()
    with pytest.raises(RbeeClientError) as caught:
        unary_call(method, "req", timeout=30, policy=POLICY, sleep=sleeps)
    assert caught.value.code == code.name
    assert caught.value.reason == "SOME_REASON"
    assert len(method.timeouts) == 1
    assert sleeps == []


def test_retry_info_delay_is_the_wait() -> None:
    method = FakeUnary([unavailable(retry_after=2.5), "ok"])
    sleeps = Sleeps()
    assert unary_call(method, "req", timeout=30, policy=POLICY, sleep=sleeps) == "ok"
    assert sleeps == [2.5]


def test_a_retry_that_cannot_start_before_the_deadline_is_not_made() -> None:
    method = FakeUnary([unavailable(retry_after=5.0), "never reached"])
    sleeps = Sleeps()
    with pytest.raises(ServiceUnavailableError) as caught:
        unary_call(method, "req", timeout=1.0, policy=POLICY, sleep=sleeps)
    assert caught.value.retry_after_seconds == 5.0
    assert sleeps == []
    assert len(method.timeouts) == 1


def test_the_deadline_is_passed_and_covers_every_attempt() -> None:
    method = FakeUnary([unavailable(), "ok"])
    unary_call(method, "req", timeout=7.0, policy=POLICY, sleep=Sleeps())
    first, second = method.timeouts
    assert first is not None and second is not None
    assert 6.0 < first <= 7.0
    assert second <= first  # the second attempt gets what is left, not a fresh 7 s


def test_jitter_shortens_the_wait_within_bounds() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=10.0, multiplier=2.0, jitter=0.5)
    assert policy.delay(1, None, rng=lambda: 0.0) == 1.0
    assert policy.delay(1, None, rng=lambda: 1.0) == 0.5
    assert policy.delay(3, None, rng=lambda: 0.5) == 4.0 * 0.75
    assert policy.delay(9, None, rng=lambda: 0.0) == 10.0  # capped
    assert policy.delay(1, 3.0, rng=lambda: 1.0) == 3.0  # RetryInfo is not jittered


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


def test_errors_carry_reason_and_resource() -> None:
    err = FakeRpcError(
        grpc.StatusCode.NOT_FOUND,
        "models/x not found",
        reason="MODEL_NOT_FOUND",
        resource=("rbee.catalog.v1.Model", "models/x"),
    )
    with pytest.raises(NotFoundError) as caught:
        unary_call(FakeUnary([err]), "req", timeout=5, policy=POLICY, sleep=Sleeps())
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert caught.value.resource_name == "models/x"
    assert caught.value.resource_type == "rbee.catalog.v1.Model"
    assert str(caught.value) == "models/x not found"


# ---- streams --------------------------------------------------------------------------------


def test_stream_unavailable_before_the_first_event_is_retried() -> None:
    method = FakeStream([FakeStreamCall([], unavailable()), FakeStreamCall(["a", "b"])])
    sleeps = Sleeps()
    events = list(stream_call(method, "req", timeout=None, policy=POLICY, sleep=sleeps))
    assert events == ["a", "b"]
    assert len(method.made) == 2
    assert sleeps == [0.2]
    assert method.timeouts == [None, None]  # no deadline unless asked for one


def test_stream_is_never_retried_after_its_first_event() -> None:
    method = FakeStream([FakeStreamCall(["a"], unavailable()), FakeStreamCall(["never"])])
    sleeps = Sleeps()
    seen: list[str] = []
    with pytest.raises(ServiceUnavailableError):
        for event in stream_call(method, "req", timeout=None, policy=POLICY, sleep=sleeps):
            seen.append(event)
    assert seen == ["a"]
    assert len(method.made) == 1
    assert sleeps == []


def test_stream_errors_are_typed_and_not_retried() -> None:
    method = FakeStream([FakeStreamCall([], FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT))])
    with pytest.raises(InvalidArgumentError):
        list(stream_call(method, "req", timeout=5, policy=POLICY, sleep=Sleeps()))
    assert len(method.made) == 1


def test_stream_deadline_is_passed() -> None:
    method = FakeStream([FakeStreamCall(["a"])])
    list(stream_call(method, "req", timeout=9.0, policy=POLICY, sleep=Sleeps()))
    (timeout,) = method.timeouts
    assert timeout is not None and 8.0 < timeout <= 9.0


def test_leaving_a_stream_early_cancels_the_call() -> None:
    call = FakeStreamCall(["a", "b", "c"])
    stream = stream_call(FakeStream([call]), "req", timeout=None, policy=POLICY)
    assert next(stream) == "a"
    stream.close()  # what `break` does once the iterator is dropped
    assert call.cancelled


# ---- asyncio --------------------------------------------------------------------------------


@dataclass
class FakeAsyncUnary:
    outcomes: list[Any]
    timeouts: list[float | None] = field(default_factory=list)

    async def __call__(self, request: object, *, timeout: float | None) -> Any:  # noqa: ASYNC109
        self.timeouts.append(timeout)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def test_async_unary_retries_only_unavailable() -> None:
    sleeps = AsyncSleeps()
    method = FakeAsyncUnary([unavailable(retry_after=0.7), "ok"])
    assert await unary_call_async(method, "r", timeout=10, policy=POLICY, sleep=sleeps) == "ok"
    assert sleeps == [0.7]
    failing = FakeAsyncUnary([FakeRpcError(grpc.StatusCode.NOT_FOUND, reason="NOPE"), "never"])
    with pytest.raises(NotFoundError):
        await unary_call_async(failing, "r", timeout=10, policy=POLICY, sleep=sleeps)
    assert len(failing.timeouts) == 1


async def test_async_stream_retried_only_before_its_first_event() -> None:
    sleeps = AsyncSleeps()
    method = FakeStream([FakeStreamCall([], unavailable()), FakeStreamCall(["a", "b"])])
    events = [e async for e in stream_call_async(method, "r", policy=POLICY, sleep=sleeps)]
    assert events == ["a", "b"]
    assert len(method.made) == 2

    broken = FakeStream([FakeStreamCall(["a"], unavailable()), FakeStreamCall(["never"])])
    seen: list[str] = []
    with pytest.raises(ServiceUnavailableError):
        async for event in stream_call_async(broken, "r", policy=POLICY, sleep=sleeps):
            seen.append(event)
    assert seen == ["a"]
    assert len(broken.made) == 1


async def test_async_stream_left_early_is_cancelled() -> None:
    call = FakeStreamCall(["a", "b"])
    stream = stream_call_async(FakeStream([call]), "r", policy=POLICY)
    assert await anext(stream) == "a"
    await stream.aclose()
    assert call.cancelled
    await asyncio.sleep(0)


# ---- request building -----------------------------------------------------------------------


def test_chat_messages_from_role_and_content_pairs() -> None:
    msg = chat_message(("system", "be brief"))
    assert msg.role == gen.CHAT_ROLE_SYSTEM and msg.content == "be brief"
    assert chat_message(("Assistant", "hi")).role == gen.CHAT_ROLE_ASSISTANT
    given = gen.ChatMessage(role=gen.CHAT_ROLE_USER, content="x")
    assert chat_message(given) is given
    with pytest.raises(InvalidArgumentError) as caught:
        chat_message(("robot", "beep"))
    assert caught.value.field_violations[0][0] == "messages.role"
