"""Every RPC of every service, fed requests that hypothesis builds from the message descriptors.

Issue 7, "Bad input": only documented status codes come back (never INTERNAL or UNKNOWN) and the
service keeps serving (grpc.health.v1 answers SERVING after every example).

The services run in this process on 127.0.0.1:0 with temp homes: the catalog, the provisioner
(Hub and CivitAI at a closed loopback port, no retries, an empty recipe directory: nothing
reaches the network or builds), the pool (its "worker" is a command that exits at once, so every
spawn fails fast at STARTING) and a worker around the FakeEngine. The methods are enumerated from
the generated service descriptors, so a new RPC is fuzzed without touching this file.

Run issue 7's tests alone with `-k security`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from rbee.common.v1 import info_pb2
from rbee.provisioner.v1 import provisioner_pb2
from rbee.worker.v1 import pool_pb2, worker_pb2, worker_pb2_grpc
from services.common.server import RunningServer
from services.worker.engines.fake import FakeEngine
from services.worker.pool.__main__ import start_pool
from services.worker.pool.service import PoolService
from services.worker.pool.settings import PoolSettings
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.catalog_harness import running_catalog
from tests.integration.provisioner_harness import provisioner_settings, running_provisioner
from tests.integration.server_harness import serve_in_thread, serve_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.security]

# What the API documents (DESIGN.md "Errors", the protos' comments). UNIMPLEMENTED is documented
# too (GenerateImage on an LLM worker). DEADLINE_EXCEEDED and CANCELLED only for streams we cut.
DOCUMENTED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,  # an upstream (the dead Hub endpoint, a failed worker)
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
STREAM_CUT_CODES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

UNARY_DEADLINE_S = 10.0
# Watch streams never end on their own: they are cut here, which the client sees as
# DEADLINE_EXCEEDED. Long enough for a pull against the dead endpoint to fail on its own.
STREAM_DEADLINE_S = 1.5
MAX_STREAM_MESSAGES = 200
MAX_EXAMPLES = 25
MAX_DEPTH = 3

MODEL_ID = "fuzz-tiny"

# Strings that tend to break things. Absolute paths are restricted to ones that are safe to read
# or copy (small, or missing, or refused as not regular files): a fuzzed local pull of "/" would
# walk the whole file system.
NASTY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "../../../../etc/passwd",
    "models/../../etc",
    "models/..",
    "models/",
    "/",
    "//",
    "\\..\\..\\windows",
    "/etc/passwd",
    "/nonexistent/../../etc/shadow",
    "/dev/zero",
    "/proc/self/status",
    "file:../../etc/passwd",
    "file:/dev/zero",
    "hf:../..",
    "hf:org/repo:../../../etc/passwd",
    "hf:org/repo:file.gguf@../../x",
    "org/repo:/abs.gguf",
    "civitai:-1",
    "civitai:99999999999999999999999",
    "civitai:1:../../x",
    "http://127.0.0.1:9/x.gguf",
    "hf:org/repo",
    "hf:org/repo:model.Q4_K_M.gguf@main",
    "org/repo:model.gguf",
    "civitai:123",
    "civitai:123:x.safetensors",
    "http://user:pass@127.0.0.1:9/x",
    "ftp://example.invalid/x",
    "https://",
    f"models/{MODEL_ID}",
    MODEL_ID,
    "devices/cpu",
    "devices/cuda-0",
    "worker-types/cpu-llm",
    "worker-types/cpu-sd",
    "cpu-llm",
    "state = READY",
    'name = "x" AND (',
    "labels.a = b OR",
    "x" * 300,
    "é" * 1000,
    "x" * (1 << 20),
    "\u202e\ufeff\U0001f600",
    "%00%2e%2e%2f",
    "Q4_K_M",
    "*.gguf",
    "**/../*",
)
# Never sent: they name large local trees (a local pull walks them) or endless files.
_UNSAFE_LOCAL_PREFIXES = ("/", "file:", "\\")
_SAFE_ABSOLUTE = frozenset(s for s in NASTY_STRINGS if s.startswith(_UNSAFE_LOCAL_PREFIXES))
_NAME_PREFIXES = (
    "models/",
    "pulls/",
    "workers/",
    "worker-types/",
    "installs/",
    "install-jobs/",
    "recipes/",
    "preloads/",
    "devices/",
    "hf:",
    "civitai:",
)

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40).filter(
    lambda s: not s.lstrip().startswith(_UNSAFE_LOCAL_PREFIXES) or s in _SAFE_ABSOLUTE
)
# Names of things that exist (or sources that resolve far enough to reach the dead upstream),
# so that examples get past NOT_FOUND into the deeper paths.
KNOWN_STRINGS = (
    f"models/{MODEL_ID}",
    MODEL_ID,
    "devices/cpu",
    "worker-types/cpu-llm",
    "cpu-llm",
    "hf:org/repo",
    "hf:org/repo:model.Q4_K_M.gguf@main",
    "civitai:123",
    "auto",
)
STRINGS: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(KNOWN_STRINGS),
    st.sampled_from(NASTY_STRINGS),
    _TEXT,
    st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(_NAME_PREFIXES), _TEXT),
)

_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int_strategy(low: int, high: int) -> st.SearchStrategy[int]:
    """The bounds and their neighbours, small numbers, and anything in between."""
    edges = [v for v in (low, low + 1, -1, 0, 1, 2, high - 1, high) if low <= v <= high]
    small = st.integers(max(low, -3), min(high, 1024))
    return st.one_of(st.sampled_from(edges), small, st.integers(low, high))


def scalar_strategy(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values for one non-message field."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return STRINGS
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 4096))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 1e308]),
                         st.floats())  # fmt: skip
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.sampled_from([0.0, math.inf, -math.inf, math.nan, 3.4e38]),
                         st.floats(width=32))  # fmt: skip
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        # Open (proto3) enums carry unknown numbers through: the server must refuse or ignore them.
        return st.one_of(st.sampled_from(known), st.integers(-3, 1000), st.just(2**31 - 1))
    low, high = _INT_BOUNDS[kind]
    return _int_strategy(low, high)


def _message_type(field: FieldDescriptor) -> Descriptor:
    message_type = field.message_type
    assert message_type is not None, f"{field.full_name} is not a message field"
    return message_type


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and bool(_message_type(field).GetOptions().map_entry)
        and _is_repeated(field)
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type: any subset of fields set, at most one per oneof,
    nested messages down to MAX_DEPTH, repeated and map fields with a few entries."""
    message_class = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_class()
        if depth >= MAX_DEPTH:
            return message
        chosen: list[FieldDescriptor] = []
        in_oneof: set[str] = set()
        for oneof in descriptor.oneofs:
            in_oneof.update(f.name for f in oneof.fields)
            options: list[FieldDescriptor | None] = [None, *oneof.fields]
            pick = draw(st.sampled_from(options))
            if pick is not None:
                chosen.append(pick)
        # A few fields set is the common case (each bad field alone ends the call at validation,
        # so sparse messages reach deeper); dense ones still come.
        density = draw(st.sampled_from((3, 6, 9)))
        chosen += [
            f
            for f in descriptor.fields
            if f.name not in in_oneof and draw(st.integers(0, 9)) < density
        ]
        for field in chosen:
            _set_field(draw, message, field, depth)
        return message

    return build()


def _set_field(draw: st.DrawFn, message: Message, field: FieldDescriptor, depth: int) -> None:
    if _is_map(field):
        key_field = _message_type(field).fields_by_name["key"]
        value_field = _message_type(field).fields_by_name["value"]
        entries = draw(st.integers(0, 3))
        target = getattr(message, field.name)
        for _ in range(entries):
            key = draw(scalar_strategy(key_field))
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[key].CopyFrom(draw(message_strategy(_message_type(value_field), depth + 1)))
            else:
                target[key] = draw(scalar_strategy(value_field))
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        strategy = message_strategy(_message_type(field), depth + 1)
        if _is_repeated(field):
            for value in draw(st.lists(strategy, max_size=3)):
                getattr(message, field.name).add().CopyFrom(value)
        else:
            getattr(message, field.name).CopyFrom(draw(strategy))
        return
    if _is_repeated(field):
        getattr(message, field.name).extend(draw(st.lists(scalar_strategy(field), max_size=4)))
    else:
        setattr(message, field.name, draw(scalar_strategy(field)))


@dataclass(frozen=True)
class Target:
    """One service under test: where it listens and its descriptor."""

    label: str
    address: str
    service_full_name: str


SERVICES = {
    "catalog": catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
    "provisioner": provisioner_pb2.DESCRIPTOR.services_by_name["ProvisionerService"],
    "pool": pool_pb2.DESCRIPTOR.services_by_name["PoolService"],
    "worker": worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    # Mounted on every server by services.common.server; fuzzed on the catalog's.
    "info": info_pb2.DESCRIPTOR.services_by_name["InfoService"],
}
METHODS = [
    pytest.param(label, method, id=f"{label}.{method.name}")
    for label, service in SERVICES.items()
    for method in service.methods
]


@dataclass
class Hive:
    """The four services, by label, with one channel each."""

    channels: dict[str, grpc.Channel]
    home: Path
    model_path: Path

    def register_model(self) -> None:
        """(Re)create the READY model: an earlier example's DeleteModel may have deleted it."""
        stub = catalog_pb2_grpc.CatalogServiceStub(self.channels["catalog"])
        model = catalog_pb2.Model(
            source=catalog_pb2.ModelSource(
                kind=catalog_pb2.SOURCE_KIND_LOCAL, path=str(self.model_path)
            ),
            paths=[str(self.model_path)],
            state=catalog_pb2.MODEL_STATE_READY,
        )
        try:
            stub.CreateModel(catalog_pb2.CreateModelRequest(model_id=MODEL_ID, model=model),
                             timeout=30)  # fmt: skip
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    def load_worker_model(self) -> None:
        """(Re)load the worker's model: an earlier test's UnloadModel may have unloaded it."""
        stub = worker_pb2_grpc.WorkerServiceStub(self.channels["worker"])
        request = worker_pb2.LoadModelRequest(
            model=f"models/{MODEL_ID}", paths=[str(self.model_path)]
        )
        list(stub.LoadModel(request, timeout=30))


@pytest.fixture(scope="module")
def hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hive]:
    """Catalog, provisioner, pool and a FakeEngine worker, each in its own event-loop thread."""
    root = tmp_path_factory.mktemp("fuzz")
    home = root / "home"
    recipes = root / "recipes"
    recipes.mkdir(parents=True)
    model_path = write_tiny_llama_gguf(root / "tiny.gguf", n_layer=1, n_vocab=260, n_embd=32)
    with ExitStack() as stack:
        catalog = stack.enter_context(running_catalog(home))
        prov_settings = provisioner_settings(
            home, catalog.address, recipe_dirs=[recipes], max_retries=0, upstream_timeout=1.0
        )
        prov_address, _, _ = stack.enter_context(running_provisioner(prov_settings))
        pool_settings = PoolSettings(
            home=home,
            listen="127.0.0.1:0",
            metrics_listen=None,
            catalog_address=catalog.address,
            provisioner_address=prov_address,
            # Every spawn fails fast at STARTING: the "worker" exits at once.
            worker_command=[sys.executable, "-c", "raise SystemExit(3)"],
            stop_grace=0.5,
            start_timeout=5.0,
        )

        async def build_pool() -> tuple[RunningServer, PoolService]:
            running, service = await start_pool(pool_settings, CollectorRegistry())
            await running.set_serving()
            return running, service

        pool_running, _ = stack.enter_context(serve_in_thread(build_pool, name="fuzz-pool"))
        worker_running, _ = stack.enter_context(
            serve_worker(FakeEngine(reply="fuzz"), engine_name="fake", metrics_listen=None)
        )
        addresses = {
            "catalog": catalog.address,
            "provisioner": prov_address,
            "pool": f"127.0.0.1:{pool_running.port}",
            "worker": f"127.0.0.1:{worker_running.port}",
        }
        channels = {
            label: stack.enter_context(grpc.insecure_channel(address))
            for label, address in addresses.items()
        }
        channels["info"] = channels["catalog"]
        hive = Hive(channels=channels, home=home, model_path=model_path)
        # One READY model, so generated names sometimes get past NOT_FOUND (spawn validation,
        # preload, compatibility), and a loaded worker so Generate and Tokenize get past
        # FAILED_PRECONDITION.
        hive.register_model()
        hive.load_worker_model()
        yield hive


def call(
    channel: grpc.Channel, service: str, method: MethodDescriptor, request: Message
) -> tuple[grpc.StatusCode, str]:
    """Call `method` with `request`; return the final code and details (streams are read up to
    MAX_STREAM_MESSAGES messages or STREAM_DEADLINE_S, then cut)."""
    path = f"/{service}/{method.name}"
    response_class = message_factory.GetMessageClass(method.output_type)
    serialize = type(request).SerializeToString
    if method.server_streaming:
        stream = channel.unary_stream(
            path, request_serializer=serialize, response_deserializer=response_class.FromString
        )(request, timeout=STREAM_DEADLINE_S)
        try:
            for count, _ in enumerate(stream):
                if count >= MAX_STREAM_MESSAGES:
                    stream.cancel()
                    break
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""
    unary = channel.unary_unary(
        path, request_serializer=serialize, response_deserializer=response_class.FromString
    )
    try:
        unary(request, timeout=UNARY_DEADLINE_S)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def assert_serving(channel: grpc.Channel, label: str) -> None:
    """grpc.health.v1 still answers SERVING for the whole server."""
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING, f"{label} stopped serving"


def _describe(request: Message) -> str:
    text = str(request)
    return text if len(text) < 2000 else text[:2000] + f"... ({len(text)} chars)"


@pytest.mark.parametrize(("label", "method"), METHODS)
def test_security_fuzzed_requests_get_documented_codes_and_the_service_keeps_serving(
    hive: Hive, label: str, method: MethodDescriptor
) -> None:
    channel = hive.channels[label]
    service = method.containing_service.full_name
    allowed = DOCUMENTED_CODES | (STREAM_CUT_CODES if method.server_streaming else frozenset())
    hive.register_model()
    if label == "worker":
        hive.load_worker_model()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=message_strategy(method.input_type))
    def check(request: Message) -> None:
        code, details = call(channel, service, method, request)
        assert code in allowed, (
            f"{service}/{method.name} answered {code.name}: {details!r}\n"
            f"request:\n{_describe(request)}"
        )
        assert_serving(channel, label)

    check()


def test_security_every_method_is_enumerated() -> None:
    """The descriptors are the source of the list: every service has methods, none skipped."""
    names = {f"{label}.{m.name}" for label, s in SERVICES.items() for m in s.methods}
    assert {"catalog.CreateModel", "provisioner.PullModel", "pool.SpawnWorker"} <= names
    assert "worker.Generate" in names
    assert len(METHODS) == sum(len(s.methods) for s in SERVICES.values())
