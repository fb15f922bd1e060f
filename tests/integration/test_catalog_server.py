"""The catalog over real gRPC on 127.0.0.1:0: the SDK, raw stubs, health, reflection, metrics."""

from __future__ import annotations

import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2 as pb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee_client.catalog import CatalogClient
from rbee_client.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from services.catalog import convert
from services.catalog.__main__ import start_catalog
from services.catalog.domain import (
    Device,
    DeviceKind,
    ModelSource,
    ModelState,
    SourceKind,
    Verdict,
)
from services.catalog.message_cache import MODEL_ENCODING, ModelMessageCache
from services.catalog.service import CatalogService, HostInfo, ModelDraft
from services.catalog.servicer import CatalogServicer, catalog_binding
from services.catalog.settings import DEFAULT_HANDLER_THREADS, CatalogSettings
from services.catalog.store import CatalogStore
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.server import RunningServer, start_server
from tests.fixtures.gguf_models import (
    LLAMA3_8B,
    write_header_only_gguf,
    write_tiny_llama_gguf,
    write_truncated_gguf,
)
from tests.fixtures.safetensors_models import sdxl_tensors, write_header_only_safetensors
from tests.integration.catalog_harness import CatalogServer, running_catalog
from tests.integration.server_harness import serve_in_thread

pytestmark = pytest.mark.integration

GiB = 1024**3


# Every test here runs against both ways the catalog serves: the threaded server (the
# default) and the event loop (RBEE_CATALOG_HANDLER_THREADS=0).
@pytest.fixture(params=[DEFAULT_HANDLER_THREADS, 0], ids=["threaded", "event-loop"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CatalogServer]:
    with running_catalog(tmp_path / "home", handler_threads=request.param) as srv:
        yield srv


@pytest.fixture
def client(server: CatalogServer) -> Iterator[CatalogClient]:
    with CatalogClient(server.address, timeout=10) as c:
        yield c


@pytest.fixture
def stub(server: CatalogServer) -> Iterator[catalog_pb2_grpc.CatalogServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield catalog_pb2_grpc.CatalogServiceStub(channel)


def _details(err: grpc.RpcError) -> dict[str, object]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "rich status details missing"
    found: dict[str, object] = {}
    for detail in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.PreconditionFailure,
        ):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                found[cls.__name__] = msg
    return found


def test_health_serving_and_reflection_lists_the_service(server: CatalogServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rbee.catalog.v1.CatalogService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in responses[0].list_services_response.service}
        assert "rbee.catalog.v1.CatalogService" in names
        assert "grpc.health.v1.Health" in names
        # The descriptors are served too, so grpcurl needs no proto files.
        responses = list(
            refl.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="rbee.catalog.v1.CatalogService"
                        )
                    ]
                ),
                timeout=5,
            )
        )
        assert responses[0].file_descriptor_response.file_descriptor_proto


def test_register_local_gguf_is_inspected(client: CatalogClient, tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf", chat_template="{{ messages }}")
    model = client.register_local(str(path))
    assert model.state is ModelState.READY
    assert model.id.startswith("tiny-llama")
    md = model.metadata
    assert md is not None
    assert md.format.value == "gguf" and md.model_type.value == "llm"
    assert md.architecture == "llama"
    assert md.block_count == 2 and md.has_chat_template is True
    assert model.size_bytes == path.stat().st_size
    again = client.get_model(model.id)
    assert again == model


def test_ids_from_sources_never_collide(client: CatalogClient, tmp_path: Path) -> None:
    # The original rbee mapped '/' and ':' to '-': these two paths would have collided.
    (tmp_path / "a").mkdir()
    one = write_tiny_llama_gguf(tmp_path / "a" / "b-c.gguf")
    two = write_tiny_llama_gguf(tmp_path / "a-b-c.gguf")
    m1 = client.register_local(str(one))
    m2 = client.register_local(str(two))
    assert m1.id != m2.id


def test_same_file_twice_is_already_exists(client: CatalogClient, tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf")
    first = client.register_local(str(path))
    with pytest.raises(AlreadyExistsError) as info:
        client.register_local(str(path), model_id="other-id")
    assert info.value.reason == "MODEL_ALREADY_EXISTS"
    assert info.value.resource_name == first.name


def test_corrupt_file_is_refused_and_nothing_registered(
    client: CatalogClient, tmp_path: Path
) -> None:
    good = write_tiny_llama_gguf(tmp_path / "t.gguf")
    bad = write_truncated_gguf(tmp_path / "truncated.gguf")
    del good
    with pytest.raises(InvalidArgumentError) as info:
        client.register_local(str(bad))
    assert info.value.reason == "MODEL_FILE_INVALID"
    assert "truncated" in info.value.message.lower() or "bytes" in info.value.message
    models, total = client.list_models()
    assert total == 0 and models == []


def test_download_then_corrupt_file_becomes_failed(
    stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path
) -> None:
    bad = write_truncated_gguf(tmp_path / "partial.gguf")
    created = stub.CreateModel(
        pb.CreateModelRequest(
            model_id="pulled",
            model=pb.Model(
                source=pb.ModelSource(
                    kind=pb.SOURCE_KIND_HUGGINGFACE, repo="org/repo", files=["partial.gguf"]
                ),
                paths=[str(bad)],
                state=pb.MODEL_STATE_DOWNLOADING,
            ),
        ),
        timeout=5,
    )
    assert created.state == pb.MODEL_STATE_DOWNLOADING
    assert not created.HasField("metadata")
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name="models/pulled", state=pb.MODEL_STATE_READY),
                update_mask=FieldMask(paths=["state"]),
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(info.value)["ErrorInfo"].reason == "MODEL_FILE_INVALID"  # type: ignore[attr-defined]
    after = stub.GetModel(pb.GetModelRequest(name="models/pulled"), timeout=5)
    assert after.state == pb.MODEL_STATE_FAILED
    assert after.state_message


def test_not_found_and_invalid_name_details(stub: catalog_pb2_grpc.CatalogServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="models/nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    details = _details(info.value)
    assert details["ErrorInfo"].reason == "MODEL_NOT_FOUND"  # type: ignore[attr-defined]
    assert details["ErrorInfo"].domain == "rbee.dev"  # type: ignore[attr-defined]
    assert details["ResourceInfo"].resource_name == "models/nope"  # type: ignore[attr-defined]

    for bad in (
        "models/../etc/passwd",
        "models/A",
        "/etc/passwd",
        "models/",
        "models/a/b",
        "x" * 5000,
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModel(pb.GetModelRequest(name=bad), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        details = _details(info.value)
        assert details["ErrorInfo"].reason == "INVALID_NAME"  # type: ignore[attr-defined]
        assert details["BadRequest"].field_violations[0].field == "name"  # type: ignore[attr-defined]


def test_pagination_and_filters(
    client: CatalogClient, stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path
) -> None:
    for i in range(7):
        client.register_local(str(write_tiny_llama_gguf(tmp_path / f"llm-{i}.gguf")))
    sdxl = write_header_only_safetensors(tmp_path / "sdxl.safetensors", sdxl_tensors())
    client.register_local(str(sdxl))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = stub.ListModels(pb.ListModelsRequest(page_size=3, page_token=token), timeout=5)
        assert resp.total_size == 8
        seen.extend(m.name for m in resp.models)
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == 8 and len(set(seen)) == 8 and seen == sorted(seen)
    everything, total = client.list_models(page_size=3, all_pages=True)
    assert [m.name for m in everything] == seen and total == 8

    gguf, total = client.list_models(filter="format=gguf", all_pages=True)
    assert total == 7 and all(m.metadata and m.metadata.format.value == "gguf" for m in gguf)
    images, total = client.list_models(filter="model_type=image AND family=sdxl", all_pages=True)
    assert [m.id for m in images] == [
        m.id for m in images if m.metadata and m.metadata.family == "sdxl"
    ]
    assert total == 1
    with pytest.raises(InvalidArgumentError) as info:
        client.list_models(filter="colour=blue")
    assert info.value.reason == "INVALID_FILTER"
    with pytest.raises(InvalidArgumentError) as info:
        client.list_models(page_token="forged-token")
    assert info.value.reason == "INVALID_PAGE_TOKEN"


def test_update_etag_and_delete(stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf")
    model = stub.CreateModel(
        pb.CreateModelRequest(
            model_id="mine",
            model=pb.Model(source=pb.ModelSource(kind=pb.SOURCE_KIND_LOCAL), paths=[str(path)]),
        ),
        timeout=5,
    )
    updated = stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(
                name="models/mine", display_name="Mine", labels={"team": "ml"}, etag=model.etag
            ),
            update_mask=FieldMask(paths=["display_name", "labels"]),
        ),
        timeout=5,
    )
    assert updated.display_name == "Mine" and updated.labels["team"] == "ml"
    assert updated.etag != model.etag
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name="models/mine", display_name="stale", etag=model.etag),
                update_mask=FieldMask(paths=["display_name"]),
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name="models/mine"), update_mask=FieldMask(paths=["metadata"])
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    labelled = stub.ListModels(pb.ListModelsRequest(filter="labels.team=ml"), timeout=5)
    assert [m.name for m in labelled.models] == ["models/mine"]

    stub.DeleteModel(pb.DeleteModelRequest(name="models/mine"), timeout=5)
    assert path.exists(), "a model registered in place keeps its files"
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteModel(pb.DeleteModelRequest(name="models/mine"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    stub.DeleteModel(pb.DeleteModelRequest(name="models/mine", allow_missing=True), timeout=5)


def test_sdk_raises_typed_errors(client: CatalogClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.get_model("missing")
    assert info.value.reason == "MODEL_NOT_FOUND" and info.value.request_id
    downloading = client.create_model(
        ModelDraft(
            source=ModelSource(kind=SourceKind.URL, url="https://example.invalid/m.gguf"),
            state=ModelState.DOWNLOADING,
        ),
        model_id="dl",
    )
    assert downloading.state is ModelState.DOWNLOADING and downloading.metadata is None
    with pytest.raises(FailedPreconditionError) as precondition:
        client.evaluate_compatibility("dl")  # a model still downloading cannot be evaluated
    assert precondition.value.reason == "MODEL_NOT_READY"
    with pytest.raises(AbortedError) as aborted:
        client.delete_model("dl", etag="stale")
    assert aborted.value.reason == "ETAG_MISMATCH"


def test_compatibility_per_worker_type_and_device(client: CatalogClient, tmp_path: Path) -> None:
    tiny = client.register_local(str(write_tiny_llama_gguf(tmp_path / "tiny.gguf")))
    results, ctx = client.evaluate_compatibility(tiny.id)
    by_type = {r.worker_type: r for r in results}
    assert set(by_type) == {"cpu-llm", "cuda-llm", "metal-llm", "cpu-sd", "cuda-sd", "metal-sd"}
    assert by_type["cpu-llm"].verdict is Verdict.COMPATIBLE
    assert by_type["cpu-sd"].verdict is Verdict.UNSUPPORTED_MODEL_TYPE
    assert ctx == 256  # the tiny model's own context (below the default cap)

    big = write_header_only_gguf(tmp_path / "llama3-8b.Q4_K_M.gguf", **LLAMA3_8B)
    model = client.register_local(str(big))
    gpu = Device(
        kind=DeviceKind.CUDA,
        name="cuda:0",
        free_vram_bytes=24 * GiB,
        total_vram_bytes=24 * GiB,
        free_ram_bytes=64 * GiB,
        total_ram_bytes=64 * GiB,
    )
    results, ctx = client.evaluate_compatibility(
        model.id, worker_types=["cuda-llm"], device=gpu, context_length=8192
    )
    assert ctx == 8192
    (r,) = results
    assert r.verdict is Verdict.FITS_GPU
    assert r.memory is not None and r.memory.kv_cache_bytes == 1 * GiB
    small = gpu.model_copy(update={"free_vram_bytes": 3 * GiB, "total_vram_bytes": 3 * GiB})
    (r,) = client.evaluate_compatibility(
        model.id, worker_types=["cuda-llm"], device=small, context_length=8192
    )[0]
    assert r.verdict is Verdict.PARTIAL_OFFLOAD
    assert r.memory is not None and 0 < r.memory.gpu_layers < r.memory.total_layers
    tiny_ram = Device(
        kind=DeviceKind.CPU, name="cpu", free_ram_bytes=1 * GiB, total_ram_bytes=1 * GiB
    )
    (r,) = client.evaluate_compatibility(model.id, worker_types=["cpu-llm"], device=tiny_ram)[0]
    assert r.verdict is Verdict.TOO_LARGE

    rows = client.compatibility_matrix()
    assert {name for name, _, _ in rows} == {tiny.name, model.name}
    assert all(len(results) == 6 for _, results, _ in rows)


def test_worker_types_and_installs(stub: catalog_pb2_grpc.CatalogServiceStub) -> None:
    resp = stub.ListWorkerTypes(pb.ListWorkerTypesRequest(), timeout=5)
    names = [w.name for w in resp.worker_types]
    assert names == sorted(names) and len(names) == 6 and resp.total_size == 6
    by_name = {w.name: w for w in resp.worker_types}
    assert by_name["worker-types/cpu-llm"].supported_on_host  # the harness says linux/x86_64
    assert not by_name["worker-types/metal-llm"].supported_on_host
    assert list(by_name["worker-types/cpu-llm"].formats) == [pb.MODEL_FORMAT_GGUF]
    first = stub.ListWorkerTypes(pb.ListWorkerTypesRequest(page_size=4), timeout=5)
    second = stub.ListWorkerTypes(
        pb.ListWorkerTypesRequest(page_size=4, page_token=first.next_page_token), timeout=5
    )
    assert [w.name for w in first.worker_types] + [w.name for w in second.worker_types] == names
    assert not second.next_page_token
    on_host = stub.ListWorkerTypes(
        pb.ListWorkerTypesRequest(filter="supported_on_host=true"), timeout=5
    )
    assert all(w.supported_on_host for w in on_host.worker_types)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetWorkerType(pb.GetWorkerTypeRequest(name="worker-types/rocm-llm"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    install = stub.CreateInstall(
        pb.CreateInstallRequest(
            install=pb.Install(
                worker_type="worker-types/cpu-llm",
                version="0.3.36-1",
                backend_version="llama-cpp-python 0.3.36",
            )
        ),
        timeout=5,
    )
    assert install.name == "installs/cpu-llm-0-3-36-1"
    listed = stub.ListInstalls(
        pb.ListInstallsRequest(filter="worker_type=worker-types/cpu-llm"), timeout=5
    )
    assert [i.name for i in listed.installs] == [install.name]
    stub.DeleteInstall(pb.DeleteInstallRequest(name=install.name), timeout=5)
    assert not stub.ListInstalls(pb.ListInstallsRequest(), timeout=5).installs


def test_inspect_path_rpc(stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "x.gguf")
    md = stub.InspectPath(pb.InspectPathRequest(path=str(path)), timeout=5)
    assert md.architecture == "llama" and md.format == pb.MODEL_FORMAT_GGUF
    with pytest.raises(grpc.RpcError) as info:
        stub.InspectPath(pb.InspectPathRequest(path=str(tmp_path / "missing.gguf")), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert _details(info.value)["ErrorInfo"].reason == "FILE_NOT_FOUND"  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        stub.InspectPath(pb.InspectPathRequest(path="relative/path.gguf"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_are_scraped(
    server: CatalogServer, stub: catalog_pb2_grpc.CatalogServiceStub
) -> None:
    with pytest.raises(grpc.RpcError):
        stub.GetModel(pb.GetModelRequest(name="models/none"), timeout=5)
    stub.ListModels(pb.ListModelsRequest(), timeout=5)
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    labels = 'code="NOT_FOUND",method="GetModel",service="rbee.catalog.v1.CatalogService"'
    assert f"rbee_grpc_server_handled_total{{{labels}}} 1.0" in body
    assert 'method="ListModels"' in body and "rbee_grpc_server_handling_seconds_bucket" in body


def test_restart_keeps_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = write_tiny_llama_gguf(tmp_path / "keep.gguf")
    with running_catalog(home) as srv, CatalogClient(srv.address) as c:
        created = c.register_local(str(path), model_id="keep")
    with running_catalog(home) as srv, CatalogClient(srv.address) as c:
        assert c.get_model("keep") == created


# ---- the servicer's per-version message cache ------------------------------------------------


def _names(stub: catalog_pb2_grpc.CatalogServiceStub, flt: str = "") -> list[str]:
    response = stub.ListModels(pb.ListModelsRequest(filter=flt, page_size=100), timeout=5)
    return [m.name for m in response.models]


def test_every_write_is_visible_at_once_through_the_cache(
    stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", n_ctx=256)
    created = stub.CreateModel(
        pb.CreateModelRequest(
            model_id="cached",
            model=pb.Model(
                source=pb.ModelSource(kind=pb.SOURCE_KIND_LOCAL),
                paths=[str(path)],
                labels={"team": "ml"},
            ),
        ),
        timeout=5,
    )
    get = pb.GetModelRequest(name="models/cached")
    for _ in range(2):  # read twice: the second read is served from the cache
        assert stub.GetModel(get, timeout=5) == created
        listed = stub.ListModels(pb.ListModelsRequest(filter="labels.team=ml"), timeout=5)
        assert list(listed.models) == [created]

    # UpdateModel: labels and name change; every read and every filter sees it at once.
    updated = stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name="models/cached", display_name="Renamed", labels={"team": "ops"}),
            update_mask=FieldMask(paths=["display_name", "labels"]),
        ),
        timeout=5,
    )
    assert stub.GetModel(get, timeout=5) == updated
    assert _names(stub, "labels.team=ml") == []
    listed = stub.ListModels(pb.ListModelsRequest(filter="labels.team=ops"), timeout=5)
    assert list(listed.models) == [updated] and listed.models[0].display_name == "Renamed"

    # A state change as the provisioner makes it (READY -> DOWNLOADING).
    downloading = stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name="models/cached", state=pb.MODEL_STATE_DOWNLOADING),
            update_mask=FieldMask(paths=["state"]),
        ),
        timeout=5,
    )
    assert stub.GetModel(get, timeout=5).state == pb.MODEL_STATE_DOWNLOADING
    assert _names(stub, "state=ready") == []
    assert list(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == [downloading]

    # InspectModel: the file changed on disk; fresh metadata is served at once.
    stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name="models/cached", state=pb.MODEL_STATE_READY),
            update_mask=FieldMask(paths=["state"]),
        ),
        timeout=5,
    )
    assert stub.GetModel(get, timeout=5).metadata.context_length == 256
    write_tiny_llama_gguf(path, n_ctx=512)
    inspected = stub.InspectModel(pb.InspectModelRequest(name="models/cached"), timeout=5)
    assert inspected.metadata.context_length == 512
    assert stub.GetModel(get, timeout=5) == inspected
    assert list(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == [inspected]

    # DeleteModel: gone from every read; a new model under the same id is served fresh.
    stub.DeleteModel(pb.DeleteModelRequest(name="models/cached"), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(get, timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert _names(stub) == [] and _names(stub, "state=ready") == []
    recreated = stub.CreateModel(
        pb.CreateModelRequest(
            model_id="cached",
            model=pb.Model(
                source=pb.ModelSource(kind=pb.SOURCE_KIND_LOCAL),
                paths=[str(path)],
                display_name="Second life",
            ),
        ),
        timeout=5,
    )
    assert stub.GetModel(get, timeout=5) == recreated
    assert stub.GetModel(get, timeout=5).display_name == "Second life"
    assert list(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == [recreated]


def test_reads_in_handler_threads_racing_writes_never_go_back_a_version(
    stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path
) -> None:
    # GetModel and ListModels run in the server's handler threads (GetModel reads the store
    # right there) while writes go through the event loop and the db thread: each reader must
    # only ever see whole versions, in the order they were written, and the last one at the end.
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", n_ctx=256)
    stub.CreateModel(
        pb.CreateModelRequest(
            model_id="raced",
            model=pb.Model(
                source=pb.ModelSource(kind=pb.SOURCE_KIND_LOCAL),
                paths=[str(path)],
                labels={"n": "0"},
                display_name="v0",
            ),
        ),
        timeout=5,
    )
    writes = 40
    done = threading.Event()
    seen: dict[str, list[int]] = {}
    problems: list[str] = []

    def read(kind: str, reader: int) -> None:
        try:
            read_until_done(kind, seen.setdefault(f"{kind} {reader}", []))
        except Exception as exc:  # a failed read fails the test, not just its thread
            problems.append(f"{kind}: {exc!r}")

    def read_until_done(kind: str, versions: list[int]) -> None:
        while not done.is_set():
            if kind == "get":
                models = [stub.GetModel(pb.GetModelRequest(name="models/raced"), timeout=5)]
            else:
                models = list(stub.ListModels(pb.ListModelsRequest(), timeout=5).models)
            for model in models:
                n = int(model.labels["n"])
                if model.display_name != f"v{n}":
                    problems.append(f"{kind}: labels of v{n} with {model.display_name}")
                if versions and n < versions[-1]:
                    problems.append(f"{kind}: v{n} after v{versions[-1]}")
                versions.append(n)

    readers = [
        threading.Thread(target=read, args=(kind, index))
        for index, kind in enumerate(("get", "get", "list"))
    ]
    for reader in readers:
        reader.start()
    try:
        for n in range(1, writes + 1):
            stub.UpdateModel(
                pb.UpdateModelRequest(
                    model=pb.Model(name="models/raced", display_name=f"v{n}", labels={"n": str(n)}),
                    update_mask=FieldMask(paths=["display_name", "labels"]),
                ),
                timeout=5,
            )
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=30)

    assert problems == []
    assert all(versions for versions in seen.values())
    final = stub.GetModel(pb.GetModelRequest(name="models/raced"), timeout=5)
    assert (final.display_name, final.labels["n"]) == (f"v{writes}", str(writes))
    assert list(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == [final]


@pytest.mark.parametrize("threads", [2, 0], ids=["threaded", "event-loop"])
def test_the_handler_threads_setting_picks_the_server(tmp_path: Path, threads: int) -> None:
    # RBEE_CATALOG_HANDLER_THREADS: N threads, or 0 for the event loop; both answer the same.
    settings = CatalogSettings(
        home=tmp_path, listen="127.0.0.1:0", metrics_listen=None, handler_threads=threads
    )

    async def build() -> tuple[RunningServer, None]:
        running = await start_catalog(settings)
        await running.set_serving()
        return running, None

    with serve_in_thread(build, name="catalog-setting-test") as (running, _):
        assert isinstance(running.server, grpc.aio.Server) == (threads == 0)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=5).total_size == 0
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetModel(pb.GetModelRequest(name="models/none"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as caught:
                stub.EvaluateCompatibility(
                    pb.EvaluateCompatibilityRequest(model="models/none"), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@contextmanager
def catalog_server_with(
    home: Path, *, handler_threads: int = DEFAULT_HANDLER_THREADS, **servicer_options: Any
) -> Iterator[tuple[str, CatalogStore]]:
    """A catalog server whose CatalogServicer gets `servicer_options` (its caches); yields its
    address and its store. `handler_threads=0`: served on the event loop."""
    store = CatalogStore.open(home / "catalog.db")

    async def build() -> tuple[RunningServer, None]:
        service = CatalogService(store, WorkerTypeRegistry(), host=HostInfo("linux", "x86_64"))
        threads = handler_threads or None
        servicer = CatalogServicer(service, threaded=threads is not None, **servicer_options)
        running = await start_server(
            [catalog_binding(servicer)],
            listen="127.0.0.1:0",
            metrics_listen=None,
            registry=CollectorRegistry(),
            handler_threads=threads,
        )
        running.on_stop(service.close)
        await running.set_serving()
        return running, None

    with serve_in_thread(build, name="catalog-cache-test") as (running, _):
        yield f"127.0.0.1:{running.port}", store


def test_the_message_cache_is_bounded_and_pages_stay_exact(tmp_path: Path) -> None:
    messages = ModelMessageCache(max_entries=3)
    with (
        catalog_server_with(tmp_path / "home", messages=messages) as (address, store),
        grpc.insecure_channel(address) as channel,
    ):
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for index in range(8):
            stub.CreateModel(
                pb.CreateModelRequest(
                    model_id=f"m{index}",
                    model=pb.Model(
                        source=pb.ModelSource(kind=pb.SOURCE_KIND_URL, url=f"https://x/{index}"),
                        labels={"parity": "odd" if index % 2 else "even"},
                    ),
                ),
                timeout=5,
            )
        expected = {m.id: convert.model_to_pb(m) for m in store.list_models(page_size=100)[0]}
        for flt, page_size in (("", 3), ("labels.parity=odd", 2), ("", 1)):
            for _ in range(2):
                seen: list[pb.Model] = []
                token = ""
                while True:
                    response = stub.ListModels(
                        pb.ListModelsRequest(filter=flt, page_size=page_size, page_token=token),
                        timeout=5,
                    )
                    seen.extend(response.models)
                    assert len(messages.versions) <= 3
                    token = response.next_page_token
                    if not token:
                        break
                wanted = [m for m in expected.values() if not flt or m.labels["parity"] == "odd"]
                assert seen == wanted
        # Walking 8 models through 3 entries evicts before any reuse; a repeated read hits.
        for model_id, message in expected.items():
            for _ in range(2):
                request = pb.GetModelRequest(name=f"models/{model_id}")
                assert stub.GetModel(request, timeout=5) == message
                assert len(messages.versions) <= 3
        assert messages.versions.hits >= len(expected)


def test_reads_serve_the_encoding_stored_with_the_model(
    server: CatalogServer, stub: catalog_pb2_grpc.CatalogServiceStub, tmp_path: Path
) -> None:
    created = stub.CreateModel(
        pb.CreateModelRequest(
            model=pb.Model(
                source=pb.ModelSource(kind=pb.SOURCE_KIND_LOCAL),
                paths=[str(write_tiny_llama_gguf(tmp_path / "m.gguf"))],
            )
        ),
        timeout=10,
    )
    # The create stored the message it answered with, beside the model, for this version.
    with sqlite3.connect(server.database) as connection:
        stored, encoding = connection.execute(
            "SELECT data, encoding FROM model_encodings WHERE model_id = ? AND etag = ?",
            (created.name.removeprefix("models/"), created.etag),
        ).fetchone()
    assert encoding == MODEL_ENCODING
    assert pb.Model.FromString(stored) == created
    assert stub.GetModel(pb.GetModelRequest(name=created.name), timeout=5) == created

    # What a read sends is those bytes, not a conversion: a marked copy is what comes back.
    marked = pb.Model()
    marked.CopyFrom(created)
    marked.display_name = "served from the store"
    with sqlite3.connect(server.database) as connection:
        connection.execute(
            "UPDATE model_encodings SET data = ? WHERE model_id = ?",
            (marked.SerializeToString(), created.name.removeprefix("models/")),
        )
    assert stub.GetModel(pb.GetModelRequest(name=created.name), timeout=5) == marked
    [listed] = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    assert listed == marked

    # The next write stores its own version's encoding.
    updated = stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name=created.name, display_name="renamed"),
            update_mask=FieldMask(paths=["display_name"]),
        ),
        timeout=5,
    )
    assert updated.display_name == "renamed" and updated.etag != created.etag
    assert stub.GetModel(pb.GetModelRequest(name=created.name), timeout=5) == updated
