"""The one exception -> google.rpc.Status table (pure: no grpc server, no I/O).

Domain errors (services.common.errors.RbeeError) map to the status code their `kind` names, with
their message as given and google.rpc details: always ErrorInfo (reason, domain, metadata plus
the request id), and BadRequest / ResourceInfo / PreconditionFailure / RetryInfo when the error
carries that information. Anything else is a bug: it becomes INTERNAL with a fixed message that
holds only the request id, so no exception text, path, secret or memory address reaches a client.
"""

from __future__ import annotations

import math

from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RbeeError,
    Unavailable,
)

INTERNAL_REASON = "INTERNAL"
REQUEST_ID_METADATA = "request_id"


def internal_error_message(request_id: str) -> str:
    """The only message a client sees for an unexpected error."""
    return f"internal error (request id {request_id})"


def status_from_error(exc: BaseException, *, request_id: str) -> status_pb2.Status:
    """Map an exception raised by a handler to the google.rpc.Status sent to the client."""
    if not isinstance(exc, RbeeError):
        return status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=internal_error_message(request_id),
            details=[
                _pack(
                    error_details_pb2.ErrorInfo(
                        reason=INTERNAL_REASON,
                        domain=ERROR_DOMAIN,
                        metadata={REQUEST_ID_METADATA: request_id},
                    )
                )
            ],
        )

    details: list[any_pb2.Any] = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=exc.reason,
                domain=ERROR_DOMAIN,
                # The request id wins over a same-named key: it is what support looks up.
                metadata={**exc.metadata, REQUEST_ID_METADATA: request_id},
            )
        )
    ]
    details.extend(_pack(detail) for detail in _specific_details(exc))
    return status_pb2.Status(
        code=code_pb2.Code.Value(exc.kind.value),
        message=exc.message,
        details=details,
    )


def _specific_details(exc: RbeeError) -> list[message.Message]:
    """The details beyond ErrorInfo that this kind of error carries."""
    if isinstance(exc, InvalidArgument) and exc.field_violations:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=violation.field, description=violation.description
                    )
                    for violation in exc.field_violations
                ]
            )
        ]
    if isinstance(exc, NotFound | AlreadyExists):
        return [
            error_details_pb2.ResourceInfo(
                resource_type=exc.resource_type,
                resource_name=exc.resource_name,
                description=exc.message,
            )
        ]
    if isinstance(exc, FailedPrecondition) and exc.violations:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=violation.type,
                        subject=violation.subject,
                        description=violation.description,
                    )
                    for violation in exc.violations
                ]
            )
        ]
    if isinstance(exc, Unavailable) and exc.retry_after_seconds is not None:
        return [error_details_pb2.RetryInfo(retry_delay=_duration(exc.retry_after_seconds))]
    return []


def _duration(seconds: float) -> duration_pb2.Duration:
    """A non-negative protobuf Duration (a negative or NaN retry delay means "now")."""
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0.0
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed
