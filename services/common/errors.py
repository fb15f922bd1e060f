"""Domain errors shared by every service.

Domain code raises these; ONE interceptor (services.common.interceptors) maps them to gRPC
status codes with google.rpc details (ErrorInfo, BadRequest, ResourceInfo,
PreconditionFailure, RetryInfo). Nothing else in the code base knows about status codes.

`reason` is one of the documented `rbee.common.v1.ErrorReason` names (without the
`ERROR_REASON_` prefix), e.g. "MODEL_NOT_FOUND". Messages are for humans and must never contain
secrets, tracebacks or memory addresses.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ERROR_DOMAIN = "rbee.dev"


class StatusKind(enum.Enum):
    """The status a domain error maps to (a mirror of grpc.StatusCode, without importing grpc)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    DATA_LOSS = "DATA_LOSS"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    """One failed precondition (google.rpc.PreconditionFailure.Violation)."""

    type: str
    subject: str
    description: str


class RbeeError(Exception):
    """Base of every error a service may return to a client on purpose."""

    kind: StatusKind = StatusKind.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return self.message


class InvalidArgument(RbeeError):
    kind = StatusKind.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field_violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.field_violations = list(field_violations)

    @classmethod
    def for_field(
        cls, field_name: str, description: str, *, reason: str | None = None
    ) -> InvalidArgument:
        """One bad field: the message names the field and says what is wrong."""
        return cls(
            f"{field_name}: {description}",
            reason=reason,
            field_violations=[FieldViolation(field_name, description)],
        )


class NotFound(RbeeError):
    kind = StatusKind.NOT_FOUND
    default_reason = "NOT_FOUND"

    def __init__(
        self,
        message: str,
        *,
        resource_type: str,
        resource_name: str,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.resource_name = resource_name


class AlreadyExists(RbeeError):
    kind = StatusKind.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"

    def __init__(
        self,
        message: str,
        *,
        resource_type: str,
        resource_name: str,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.resource_name = resource_name


class FailedPrecondition(RbeeError):
    kind = StatusKind.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[PreconditionViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)


class PermissionDenied(RbeeError):
    kind = StatusKind.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(RbeeError):
    kind = StatusKind.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(RbeeError):
    kind = StatusKind.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(RbeeError):
    """A transient failure: the client may retry, after `retry_after_seconds` when set."""

    kind = StatusKind.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after_seconds: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds


class Unimplemented(RbeeError):
    kind = StatusKind.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Aborted(RbeeError):
    kind = StatusKind.ABORTED
    default_reason = "ABORTED"


class Cancelled(RbeeError):
    kind = StatusKind.CANCELLED
    default_reason = "CANCELLED"


class DataLoss(RbeeError):
    kind = StatusKind.DATA_LOSS
    default_reason = "DATA_LOSS"


_ERROR_CLASSES: dict[StatusKind, type[RbeeError]] = {
    cls.kind: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        Aborted,
        Cancelled,
        DataLoss,
    )
}


def error_for_status(
    status: str,
    message: str,
    *,
    reason: str | None = None,
    metadata: Mapping[str, str] | None = None,
    resource_type: str = "",
    resource_name: str = "",
) -> RbeeError:
    """Our error for a status name ("UNAVAILABLE", ...): to pass on a peer service's error, or to
    raise again the error a stored job ended with. Unknown names become INTERNAL."""
    kind = StatusKind.__members__.get(status, StatusKind.INTERNAL)
    cls = _ERROR_CLASSES.get(kind)
    if cls is NotFound or cls is AlreadyExists:
        return cls(
            message,
            resource_type=resource_type or "resource",
            resource_name=resource_name,
            reason=reason,
            metadata=metadata,
        )
    if cls is None:
        error = RbeeError(message, reason=reason, metadata=metadata)
        error.kind = kind
        return error
    return cls(message, reason=reason, metadata=metadata)
