"""Typed SDK exceptions, built from the server's status and google.rpc details.

Nothing here parses message strings: the reason comes from ErrorInfo, fields from BadRequest,
the resource from ResourceInfo and the retry delay from RetryInfo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class RbeeClientError(Exception):
    """An RPC failed. `code` is the gRPC status name, `reason` the ErrorInfo reason."""

    message: str
    code: str = "UNKNOWN"
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    resource_type: str = ""
    resource_name: str = ""
    retry_after_seconds: float | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def request_id(self) -> str:
        return self.metadata.get("request_id", "")

    @property
    def hint(self) -> str:
        if self.field_violations:
            return "; ".join(f"{f}: {d}" for f, d in self.field_violations if d not in self.message)
        return ""


class InvalidArgumentError(RbeeClientError):
    pass


class NotFoundError(RbeeClientError):
    pass


class AlreadyExistsError(RbeeClientError):
    pass


class FailedPreconditionError(RbeeClientError):
    pass


class PermissionDeniedError(RbeeClientError):
    pass


class UnauthenticatedError(RbeeClientError):
    pass


class ResourceExhaustedError(RbeeClientError):
    pass


class AbortedError(RbeeClientError):
    pass


class CancelledError(RbeeClientError):
    pass


class DeadlineExceededError(RbeeClientError):
    pass


class ServiceUnavailableError(RbeeClientError):
    """UNAVAILABLE: the only status the SDK retries."""


class UnimplementedError(RbeeClientError):
    pass


class InternalError(RbeeClientError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[RbeeClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_from_status(
    code: grpc.StatusCode, status: status_pb2.Status | None, message: str
) -> RbeeClientError:
    """Build the typed exception for a status code and its rich details (if any)."""
    cls = _BY_CODE.get(code, RbeeClientError)
    err = cls(message=message or code.name, code=code.name)
    if status is None:
        return err
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            err.reason = info.reason
            err.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            err.field_violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            res = error_details_pb2.ResourceInfo()
            detail.Unpack(res)
            err.resource_type = res.resource_type
            err.resource_name = res.resource_name
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            err.retry_after_seconds = retry.retry_delay.ToTimedelta().total_seconds()
    return err


def error_from_rpc(exc: grpc.RpcError) -> RbeeClientError:
    """Turn a failed call (sync or aio) into the typed exception."""
    call: grpc.Call = exc  # type: ignore[assignment]
    code = call.code()
    details = call.details() or ""
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # mismatched status and details: keep the plain status
        status = None
    return error_from_status(code, status, details)
