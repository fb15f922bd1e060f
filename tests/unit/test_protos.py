"""The wire contract: generated stubs import, follow the API conventions, and match the domain.

These tests read the descriptors of the generated modules (no sockets, no subprocesses). The
codegen staleness check and `buf lint` run in tests/integration/test_codegen.py.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel

from rbee.catalog.v1 import catalog_pb2
from rbee.common.v1 import device_pb2, errors_pb2, runtime_pb2
from services.catalog import domain
from services.common import errors

pytestmark = pytest.mark.unit

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"

# Every RPC of every service: name -> (client streaming, server streaming).
UNARY = (False, False)
SERVER_STREAM = (False, True)
EXPECTED_RPCS: dict[str, dict[str, tuple[bool, bool]]] = {
    "rbee.common.v1.InfoService": {"GetServiceInfo": UNARY},
    "rbee.catalog.v1.CatalogService": {
        "GetModel": UNARY,
        "ListModels": UNARY,
        "CreateModel": UNARY,
        "UpdateModel": UNARY,
        "DeleteModel": UNARY,
        "InspectModel": UNARY,
        "InspectPath": UNARY,
        "GetWorkerType": UNARY,
        "ListWorkerTypes": UNARY,
        "GetInstall": UNARY,
        "ListInstalls": UNARY,
        "CreateInstall": UNARY,
        "DeleteInstall": UNARY,
        "EvaluateCompatibility": UNARY,
        "ComputeCompatibilityMatrix": UNARY,
    },
    "rbee.provisioner.v1.ProvisionerService": {
        "PullModel": SERVER_STREAM,
        "GetPull": UNARY,
        "ListPulls": UNARY,
        "WatchPull": SERVER_STREAM,
        "CancelPull": UNARY,
        "ResumePull": SERVER_STREAM,
        "DeletePull": UNARY,
        "ResolveSource": UNARY,
        "InspectRemote": UNARY,
        "SearchModels": UNARY,
        "InstallWorker": SERVER_STREAM,
        "GetInstallJob": UNARY,
        "ListInstallJobs": UNARY,
        "WatchInstallJob": SERVER_STREAM,
        "CancelInstallJob": UNARY,
        "GetRecipe": UNARY,
        "ListRecipes": UNARY,
        "Preload": SERVER_STREAM,
        "GetPreload": UNARY,
        "ListPreloads": UNARY,
        "DeletePreload": UNARY,
    },
    "rbee.worker.v1.WorkerService": {
        "GetWorker": UNARY,
        "LoadModel": SERVER_STREAM,
        "UnloadModel": UNARY,
        "Generate": SERVER_STREAM,
        "Chat": SERVER_STREAM,
        "Tokenize": UNARY,
        "Detokenize": UNARY,
        "GenerateImage": SERVER_STREAM,
    },
    "rbee.worker.v1.PoolService": {
        "ListDevices": UNARY,
        "GetDevice": UNARY,
        "SpawnWorker": SERVER_STREAM,
        "GetWorker": UNARY,
        "ListWorkers": UNARY,
        "StopWorker": UNARY,
        "DeleteWorker": UNARY,
        "WatchWorkers": SERVER_STREAM,
        "GetWorkerLogs": SERVER_STREAM,
    },
}

# Streams of long work: progress events, then exactly one terminal result, in `oneof event`.
# (WatchWorkers and GetWorkerLogs are open-ended feeds, not jobs.)
JOB_STREAMS = {
    "PullModel",
    "WatchPull",
    "ResumePull",
    "InstallWorker",
    "WatchInstallJob",
    "Preload",
    "LoadModel",
    "Generate",
    "Chat",
    "GenerateImage",
    "SpawnWorker",
}

# The ErrorInfo reasons later work relies on (the brief's list).
REQUIRED_REASONS = [
    "INVALID_ARGUMENT",
    "INVALID_NAME",
    "INVALID_FILTER",
    "INVALID_PAGE_TOKEN",
    "INVALID_SOURCE",
    "NOT_FOUND",
    "FILE_NOT_FOUND",
    "MODEL_NOT_FOUND",
    "WORKER_TYPE_NOT_FOUND",
    "INSTALL_NOT_FOUND",
    "PULL_NOT_FOUND",
    "WORKER_NOT_FOUND",
    "DEVICE_NOT_FOUND",
    "REPO_NOT_FOUND",
    "REVISION_NOT_FOUND",
    "ALREADY_EXISTS",
    "MODEL_ALREADY_EXISTS",
    "INSTALL_ALREADY_EXISTS",
    "ETAG_MISMATCH",
    "MODEL_FILE_INVALID",
    "UNSUPPORTED_FILE_FORMAT",
    "MODEL_NOT_READY",
    "MODEL_IN_USE",
    "INCOMPATIBLE_MODEL",
    "UNSUPPORTED_PLATFORM",
    "INSUFFICIENT_MEMORY",
    "DISK_FULL",
    "CONTEXT_TOO_LONG",
    "QUEUE_FULL",
    "GATED_REPO",
    "ACCESS_DENIED",
    "TOKEN_MISSING",
    "TOKEN_INVALID",
    "HASH_MISMATCH",
    "DOWNLOAD_FAILED",
    "UPSTREAM_UNAVAILABLE",
    "RATE_LIMITED",
    "RECIPE_INVALID",
    "BUILD_FAILED",
    "SOURCE_CHECKSUM_MISMATCH",
    "WORKER_UNAVAILABLE",
    "WORKER_CRASHED",
    "MODEL_NOT_LOADED",
    "NO_CHAT_TEMPLATE",
    "GRAMMAR_INVALID",
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "INTERNAL",
]


def generated_module_names() -> list[str]:
    """Every generated stub module under protos/rbee, as an import path."""
    names = []
    for pattern in ("*_pb2.py", "*_pb2_grpc.py"):
        for path in PROTO_ROOT.joinpath("rbee").rglob(pattern):
            relative = path.relative_to(PROTO_ROOT).with_suffix("")
            names.append(".".join(relative.parts))
    return sorted(names)


def rbee_files() -> list[FileDescriptor]:
    """The file descriptors of every rbee .proto (imports them all first)."""
    for name in generated_module_names():
        importlib.import_module(name)
    pool = descriptor_pool.Default()
    files = []
    for path in sorted(PROTO_ROOT.joinpath("rbee").rglob("*.proto")):
        files.append(pool.FindFileByName(path.relative_to(PROTO_ROOT).as_posix()))
    return files


def all_enums(files: list[FileDescriptor]) -> Iterator[EnumDescriptor]:
    """Every enum, top-level and nested, of the given files."""

    def nested(message: Descriptor) -> Iterator[EnumDescriptor]:
        yield from message.enum_types
        for inner in message.nested_types:
            yield from nested(inner)

    for file in files:
        yield from file.enum_types_by_name.values()
        for message in file.message_types_by_name.values():
            yield from nested(message)


def all_services(files: list[FileDescriptor]) -> dict[str, ServiceDescriptor]:
    """Every service of the given files, by full name."""
    return {
        service.full_name: service for file in files for service in file.services_by_name.values()
    }


def test_every_generated_module_imports() -> None:
    names = generated_module_names()
    # Four packages, each with a *_pb2 and a *_pb2_grpc per .proto.
    assert len(names) == 2 * len(list(PROTO_ROOT.joinpath("rbee").rglob("*.proto")))
    for name in names:
        module = importlib.import_module(name)
        assert isinstance(module, ModuleType)
    # Each stub module has its typed .pyi beside it (mypy-protobuf).
    for name in names:
        assert PROTO_ROOT.joinpath(*name.split(".")).with_suffix(".pyi").is_file(), name


def test_every_enum_zero_value_is_unspecified_and_values_are_prefixed() -> None:
    enums = list(all_enums(rbee_files()))
    assert len(enums) > 20
    for enum_descriptor in enums:
        zero = enum_descriptor.values_by_number[0].name
        prefix = "".join(
            "_" + char if char.isupper() and index else char
            for index, char in enumerate(enum_descriptor.name)
        ).upper()
        assert zero == f"{prefix}_UNSPECIFIED", enum_descriptor.full_name
        for value in enum_descriptor.values:
            assert value.name.startswith(prefix + "_"), value.name


def test_error_reasons_are_unique_and_cover_the_documented_list() -> None:
    values = errors_pb2.ErrorReason.DESCRIPTOR.values
    names = [value.name.removeprefix("ERROR_REASON_") for value in values]
    numbers = [value.number for value in values]
    assert len(names) == len(set(names))
    assert len(numbers) == len(set(numbers))
    missing = set(REQUIRED_REASONS) - set(names)
    assert not missing, sorted(missing)


def test_every_domain_error_default_reason_is_a_documented_reason() -> None:
    names = {
        value.name.removeprefix("ERROR_REASON_")
        for value in errors_pb2.ErrorReason.DESCRIPTOR.values
    }

    def subclasses(cls: type[errors.RbeeError]) -> Iterator[type[errors.RbeeError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = list(subclasses(errors.RbeeError))
    assert len(found) >= 10
    classes: list[type[errors.RbeeError]] = [errors.RbeeError, *found]
    for cls in classes:
        assert cls.default_reason in names, cls.__name__


def test_services_list_exactly_the_designed_rpcs() -> None:
    services = all_services(rbee_files())
    assert set(services) == set(EXPECTED_RPCS)
    for service_name, expected in EXPECTED_RPCS.items():
        methods = services[service_name].methods_by_name
        actual = {
            name: (bool(method.client_streaming), bool(method.server_streaming))
            for name, method in methods.items()
        }
        assert actual == expected, service_name


def test_job_streams_send_progress_then_one_terminal_result() -> None:
    services = all_services(rbee_files())
    seen = set()
    for service in services.values():
        for method in service.methods:
            if method.name not in JOB_STREAMS:
                continue
            seen.add(method.name)
            output = method.output_type
            assert [oneof.name for oneof in output.oneofs] == ["event"], method.full_name
            members = [field.name for field in output.oneofs_by_name["event"].fields]
            # One progress kind and one terminal kind, nothing else.
            assert len(members) == 2, method.full_name
            assert members[0] in {"progress", "delta"}, method.full_name
    assert seen == JOB_STREAMS


def test_list_methods_are_paginated() -> None:
    services = all_services(rbee_files())
    lists = [
        method
        for service in services.values()
        for method in service.methods
        if method.name.startswith("List") or method.name == "SearchModels"
    ]
    assert len(lists) >= 10
    for method in lists:
        request = method.input_type.fields_by_name
        response = method.output_type.fields_by_name
        assert request["page_size"].type == FieldDescriptor.TYPE_INT32, method.full_name
        assert request["page_token"].type == FieldDescriptor.TYPE_STRING, method.full_name
        assert "next_page_token" in response, method.full_name
        if method.name != "SearchModels":  # upstream searches give no total
            assert response["total_size"].type == FieldDescriptor.TYPE_INT32, method.full_name


def test_model_with_metadata_round_trips_and_keeps_absent_apart_from_zero() -> None:
    created = Timestamp()
    created.FromDatetime(datetime(2025, 1, 2, 3, 4, 5))
    model = catalog_pb2.Model(
        name="models/tiny-llama-q4-k-m",
        display_name="Tiny Llama",
        source=catalog_pb2.ModelSource(
            kind=catalog_pb2.SOURCE_KIND_HUGGINGFACE,
            repo="org/tiny-llama",
            revision="main",
            files=["tiny-Q4_K_M.gguf"],
        ),
        paths=["/data/tiny-Q4_K_M.gguf"],
        size_bytes=123_456,
        sha256="ab" * 32,
        state=catalog_pb2.MODEL_STATE_READY,
        metadata=catalog_pb2.ModelMetadata(
            format=catalog_pb2.MODEL_FORMAT_GGUF,
            model_type=catalog_pb2.MODEL_TYPE_LLM,
            architecture="llama",
            quantization="Q4_K_M",
            parameter_count=30_000_000,
            context_length=0,  # present, and zero
            has_chat_template=False,
            dtypes={"F32": 10, "Q4_K": 20},
            split=catalog_pb2.SplitInfo(index=1, count=2, files_found=2),
            weights=catalog_pb2.WeightsBreakdown(total_bytes=100, layer_bytes=[40, 60]),
            hints={"modelspec.title": "tiny"},
            warnings=["no tokenizer"],
        ),
        labels={"team": "ml"},
        create_time=created,
        update_time=created,
        etag="e1",
    )
    decoded = catalog_pb2.Model.FromString(model.SerializeToString())
    assert decoded == model
    metadata = decoded.metadata
    assert metadata.HasField("context_length") and metadata.context_length == 0
    assert metadata.HasField("has_chat_template") and not metadata.has_chat_template
    assert not metadata.HasField("block_count")
    assert not metadata.HasField("name")
    assert not decoded.source.HasField("civitai_version_id")
    assert decoded.create_time.ToDatetime() == datetime(2025, 1, 2, 3, 4, 5)
    assert list(metadata.weights.layer_bytes) == [40, 60]


def proto_enum_suffixes(enum_descriptor: EnumDescriptor) -> set[str]:
    """The value names of a proto enum without its prefix, UNSPECIFIED left out."""
    prefix = enum_descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return {value.name.removeprefix(prefix) for value in enum_descriptor.values if value.number}


@pytest.mark.parametrize(
    ("domain_enum", "proto_enum"),
    [
        (domain.ModelFormat, catalog_pb2.ModelFormat.DESCRIPTOR),
        (domain.ModelType, catalog_pb2.ModelType.DESCRIPTOR),
        (domain.SourceKind, catalog_pb2.SourceKind.DESCRIPTOR),
        (domain.ModelState, catalog_pb2.ModelState.DESCRIPTOR),
        (domain.Verdict, catalog_pb2.Verdict.DESCRIPTOR),
        (domain.DeviceKind, device_pb2.DeviceKind.DESCRIPTOR),
        (domain.Backend, runtime_pb2.Backend.DESCRIPTOR),
        (domain.KvCacheType, runtime_pb2.KvCacheType.DESCRIPTOR),
    ],
)
def test_domain_enums_and_proto_enums_have_the_same_members(
    domain_enum: type[enum.Enum], proto_enum: EnumDescriptor
) -> None:
    assert {member.name for member in domain_enum} == proto_enum_suffixes(proto_enum)


# Domain field -> wire field where the names differ by AIP convention (ids become names).
RENAMED = {"id": "name", "created_at": "create_time", "updated_at": "update_time"}


@pytest.mark.parametrize(
    ("domain_type", "message"),
    [
        (domain.ModelMetadata, catalog_pb2.ModelMetadata.DESCRIPTOR),
        (domain.SplitInfo, catalog_pb2.SplitInfo.DESCRIPTOR),
        (domain.WeightsBreakdown, catalog_pb2.WeightsBreakdown.DESCRIPTOR),
        (domain.ModelSource, catalog_pb2.ModelSource.DESCRIPTOR),
        (domain.Model, catalog_pb2.Model.DESCRIPTOR),
        (domain.WorkerType, catalog_pb2.WorkerType.DESCRIPTOR),
        (domain.Install, catalog_pb2.Install.DESCRIPTOR),
        (domain.MemoryEstimate, catalog_pb2.MemoryEstimate.DESCRIPTOR),
        (domain.CompatibilityResult, catalog_pb2.CompatibilityResult.DESCRIPTOR),
        (domain.Device, device_pb2.Device.DESCRIPTOR),
    ],
)
def test_every_domain_field_has_a_wire_field(
    domain_type: type[BaseModel], message: Descriptor
) -> None:
    wire = set(message.fields_by_name)
    # domain.Device.name is the product name; on the wire `name` is the resource name.
    renamed = {**RENAMED, "name": "display_name"} if domain_type is domain.Device else RENAMED
    for field_name, info in domain_type.model_fields.items():
        wire_name = renamed.get(field_name, field_name)
        assert wire_name in wire, f"{domain_type.__name__}.{field_name}"
        field = message.fields_by_name[wire_name]
        # A domain number or bool that may be None needs presence on the wire (a message or an
        # `optional` scalar), so None and 0 stay apart. Strings map None to "".
        may_be_none = info.default is None and not info.is_required()
        if may_be_none and field.type != FieldDescriptor.TYPE_STRING:
            assert field.has_presence, f"{domain_type.__name__}.{field_name} needs presence"
