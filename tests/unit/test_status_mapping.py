"""The exception -> google.rpc.Status table (services.common.status)."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common import errors
from services.common.errors import ERROR_DOMAIN, FieldViolation, PreconditionViolation
from services.common.status import status_from_error

pytestmark = pytest.mark.unit

REQUEST_ID = "req-123.abc_DEF"


def unpack_details(status: status_pb2.Status) -> dict[str, message.Message]:
    """Every detail unpacked, keyed by its message type name; each type at most once."""
    types: dict[str, type[message.Message]] = {
        "ErrorInfo": error_details_pb2.ErrorInfo,
        "BadRequest": error_details_pb2.BadRequest,
        "ResourceInfo": error_details_pb2.ResourceInfo,
        "PreconditionFailure": error_details_pb2.PreconditionFailure,
        "RetryInfo": error_details_pb2.RetryInfo,
    }
    unpacked: dict[str, message.Message] = {}
    for detail in status.details:
        assert isinstance(detail, any_pb2.Any)
        for name, cls in types.items():
            if detail.TypeName() == cls.DESCRIPTOR.full_name:
                target = cls()
                assert detail.Unpack(target)
                assert name not in unpacked, f"{name} twice"
                unpacked[name] = target
                break
        else:
            pytest.fail(f"unexpected detail type {detail.type_url}")
    return unpacked


# Every domain error class, built with its specific fields, and the code it must map to.
DOMAIN_ERRORS: list[tuple[errors.RbeeError, int]] = [
    (errors.InvalidArgument("bad"), code_pb2.INVALID_ARGUMENT),
    (errors.NotFound("gone", resource_type="model", resource_name="models/x"), code_pb2.NOT_FOUND),
    (
        errors.AlreadyExists("dup", resource_type="model", resource_name="models/x"),
        code_pb2.ALREADY_EXISTS,
    ),
    (errors.FailedPrecondition("not ready"), code_pb2.FAILED_PRECONDITION),
    (errors.PermissionDenied("no"), code_pb2.PERMISSION_DENIED),
    (errors.Unauthenticated("who"), code_pb2.UNAUTHENTICATED),
    (errors.ResourceExhausted("full"), code_pb2.RESOURCE_EXHAUSTED),
    (errors.Unavailable("later"), code_pb2.UNAVAILABLE),
    (errors.Unimplemented("todo"), code_pb2.UNIMPLEMENTED),
    (errors.Aborted("conflict"), code_pb2.ABORTED),
    (errors.Cancelled("stopped"), code_pb2.CANCELLED),
    (errors.DataLoss("corrupt"), code_pb2.DATA_LOSS),
    (errors.RbeeError("plain"), code_pb2.INTERNAL),
]


@pytest.mark.parametrize(
    ("error", "code"), DOMAIN_ERRORS, ids=[type(e).__name__ for e, _ in DOMAIN_ERRORS]
)
def test_domain_error_keeps_code_message_and_reason(error: errors.RbeeError, code: int) -> None:
    status = status_from_error(error, request_id=REQUEST_ID)

    assert status.code == code
    assert status.message == error.message
    info = unpack_details(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == error.default_reason
    assert info.domain == ERROR_DOMAIN
    assert dict(info.metadata) == {"request_id": REQUEST_ID}


def test_every_status_kind_has_a_grpc_code() -> None:
    for kind in errors.StatusKind:
        error = errors.RbeeError("x")
        error.kind = kind
        status = status_from_error(error, request_id=REQUEST_ID)
        assert status.code == code_pb2.Code.Value(kind.name)


def test_error_info_carries_reason_and_metadata_plus_request_id() -> None:
    error = errors.PermissionDenied(
        "token lacks scope",
        reason="TOKEN_SCOPE",
        metadata={"scope": "models.write", "request_id": "client-chosen"},
    )

    info = unpack_details(status_from_error(error, request_id=REQUEST_ID))["ErrorInfo"]

    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "TOKEN_SCOPE"
    # The server's request id wins: it is the one in the server log.
    assert dict(info.metadata) == {"scope": "models.write", "request_id": REQUEST_ID}


def test_invalid_argument_has_bad_request_field_violations() -> None:
    error = errors.InvalidArgument(
        "two bad fields",
        reason="INVALID_PAGE_SIZE",
        field_violations=[
            FieldViolation("page_size", "must be >= 0"),
            FieldViolation("filter", "unknown key 'colour'"),
        ],
    )

    details = unpack_details(status_from_error(error, request_id=REQUEST_ID))

    bad_request = details["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("page_size", "must be >= 0"),
        ("filter", "unknown key 'colour'"),
    ]
    assert set(details) == {"ErrorInfo", "BadRequest"}


def test_invalid_argument_for_field_names_the_field() -> None:
    status = status_from_error(
        errors.InvalidArgument.for_field("name", "must look like models/{model}"),
        request_id=REQUEST_ID,
    )

    assert status.message == "name: must look like models/{model}"
    bad_request = unpack_details(status)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert bad_request.field_violations[0].field == "name"


def test_invalid_argument_without_violations_has_no_bad_request() -> None:
    details = unpack_details(status_from_error(errors.InvalidArgument("x"), request_id="r"))
    assert set(details) == {"ErrorInfo"}


@pytest.mark.parametrize("error_class", [errors.NotFound, errors.AlreadyExists])
def test_not_found_and_already_exists_have_resource_info(
    error_class: type[errors.NotFound] | type[errors.AlreadyExists],
) -> None:
    error = error_class(
        "model models/tiny-llama not here",
        resource_type="rbee.catalog.v1.Model",
        resource_name="models/tiny-llama",
        reason="MODEL_NOT_FOUND",
    )

    details = unpack_details(status_from_error(error, request_id=REQUEST_ID))

    info = details["ResourceInfo"]
    assert isinstance(info, error_details_pb2.ResourceInfo)
    assert info.resource_type == "rbee.catalog.v1.Model"
    assert info.resource_name == "models/tiny-llama"
    error_info = details["ErrorInfo"]
    assert isinstance(error_info, error_details_pb2.ErrorInfo)
    assert error_info.reason == "MODEL_NOT_FOUND"


def test_failed_precondition_has_violations() -> None:
    error = errors.FailedPrecondition(
        "model is still downloading",
        reason="MODEL_NOT_READY",
        violations=[PreconditionViolation("STATE", "models/tiny", "state is DOWNLOADING")],
    )

    failure = unpack_details(status_from_error(error, request_id=REQUEST_ID))["PreconditionFailure"]

    assert isinstance(failure, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject, v.description) for v in failure.violations] == [
        ("STATE", "models/tiny", "state is DOWNLOADING")
    ]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(2.5, (2, 500_000_000)), (0.0, (0, 0)), (1.9999999999, (2, 0)), (-3.0, (0, 0))],
)
def test_unavailable_has_retry_info(seconds: float, expected: tuple[int, int]) -> None:
    error = errors.Unavailable("worker busy", retry_after_seconds=seconds)

    retry = unpack_details(status_from_error(error, request_id=REQUEST_ID))["RetryInfo"]

    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == expected


def test_unavailable_without_delay_has_no_retry_info() -> None:
    details = unpack_details(status_from_error(errors.Unavailable("x"), request_id="r"))
    assert set(details) == {"ErrorInfo"}


class _LeakyError(Exception):
    def __repr__(self) -> str:
        return f"<_LeakyError at {hex(id(self))}>"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("secret-ish text /tmp/x at 0x7f00deadbeef token=hf_abc"),
        KeyError("hf_abc"),
        _LeakyError("password=hunter2"),
        RuntimeError(),
    ],
)
def test_unexpected_error_becomes_internal_with_fixed_message(error: Exception) -> None:
    status = status_from_error(error, request_id=REQUEST_ID)

    assert status.code == code_pb2.INTERNAL
    assert status.message == f"internal error (request id {REQUEST_ID})"
    info = unpack_details(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "INTERNAL"
    assert info.domain == ERROR_DOMAIN
    assert dict(info.metadata) == {"request_id": REQUEST_ID}
    # Nothing of the exception reaches the client, in any field of the status.
    wire = status.SerializeToString()
    for leak in (b"secret", b"/tmp/x", b"0x7f", b"hf_abc", b"hunter2", b"Traceback"):
        assert leak not in wire
    for leak_type in (b"ValueError", b"KeyError", b"RuntimeError", b"_LeakyError"):
        assert leak_type not in wire


def test_unexpected_base_exception_also_becomes_internal() -> None:
    status = status_from_error(KeyboardInterrupt("stop now"), request_id=REQUEST_ID)
    assert status.code == code_pb2.INTERNAL
    assert "stop now" not in status.message
