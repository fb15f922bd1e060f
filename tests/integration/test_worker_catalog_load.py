"""LoadModel by catalog name: a real catalog and a real llama.cpp worker over gRPC.

The catalog (tests/integration/catalog_harness.py) registers a tiny generated GGUF; the worker
(the real LlamaCppEngine, CPU) is given a GrpcCatalogLink to it, as `rbee-worker --catalog`
builds one, and loads the model from its name alone. Also: a model still DOWNLOADING, an
unknown one, one the worker type cannot run (refused before the engine), and a catalog that
cannot be reached.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2 as catalog_pb
from rbee.catalog.v1 import catalog_pb2_grpc
from rbee.worker.v1 import generation_pb2 as gen_pb
from rbee.worker.v1 import worker_pb2 as pb
from rbee.worker.v1 import worker_pb2_grpc
from services.catalog.domain import DeviceKind
from services.catalog.link import GrpcCatalogLink
from services.common.server import RunningServer, ServiceBinding, start_server
from services.worker.devices import DeviceSpec
from services.worker.engines.base import LlmEngine
from services.worker.engines.fake import FakeEngine
from services.worker.metrics import WorkerMetrics
from services.worker.service import WorkerService
from services.worker.servicer import SERVICE_NAME, WorkerServicer
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.fixtures.safetensors_models import write_family
from tests.integration.catalog_harness import CatalogServer, running_catalog
from tests.integration.server_harness import error_reason, serve_in_thread

pytestmark = pytest.mark.integration

RPC_TIMEOUT = 20
CATALOG_DEADLINE_S = 5.0


@contextmanager
def worker_with_catalog(
    engine: LlmEngine, catalog_address: str, *, engine_name: str
) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    """A WorkerService on a CPU device with a GrpcCatalogLink, served on 127.0.0.1:0."""

    async def build() -> tuple[RunningServer, None]:
        # Built on the server's loop: a grpc.aio channel belongs to the loop it was made on.
        catalog = GrpcCatalogLink(catalog_address, deadline=CATALOG_DEADLINE_S)
        registry = CollectorRegistry()
        service = WorkerService(
            engine,
            device=DeviceSpec(kind=DeviceKind.CPU),
            engine_name=engine_name,
            queue_size=2,
            metrics=WorkerMetrics(registry),
            catalog=catalog,
        )
        running = await start_server(
            [
                ServiceBinding(
                    worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                    WorkerServicer(service),
                    SERVICE_NAME,
                )
            ],
            listen="127.0.0.1:0",
            metrics_listen=None,
            registry=registry,
        )
        running.on_stop(catalog.close)
        running.on_stop(service.close)
        await running.set_serving()
        return running, None

    with (
        serve_in_thread(build, name=f"{engine_name}-catalog-worker") as (running, _),
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def register(
    catalog: CatalogServer, model_id: str, path: Path, *, downloading: bool = False
) -> catalog_pb.Model:
    """CreateModel in the real catalog (READY ones are inspected by the catalog)."""
    with grpc.insecure_channel(catalog.address) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        created: catalog_pb.Model = stub.CreateModel(
            catalog_pb.CreateModelRequest(
                model_id=model_id,
                model=catalog_pb.Model(
                    source=catalog_pb.ModelSource(
                        kind=catalog_pb.SOURCE_KIND_LOCAL, path=str(path)
                    ),
                    paths=[str(path)],
                    state=(
                        catalog_pb.MODEL_STATE_DOWNLOADING
                        if downloading
                        else catalog_pb.MODEL_STATE_READY
                    ),
                    state_message="12% downloaded" if downloading else "",
                ),
            ),
            timeout=RPC_TIMEOUT,
        )
    return created


def load_by_name(stub: worker_pb2_grpc.WorkerServiceStub, model: str) -> pb.Worker:
    responses = list(stub.LoadModel(pb.LoadModelRequest(model=model), timeout=RPC_TIMEOUT))
    assert responses[-1].WhichOneof("event") == "worker"
    worker: pb.Worker = responses[-1].worker
    return worker


def load_error(stub: worker_pb2_grpc.WorkerServiceStub, model: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        load_by_name(stub, model)
    return failed.value


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogServer]:
    home = tmp_path_factory.mktemp("home")
    models = tmp_path_factory.mktemp("models")
    with running_catalog(home) as server:
        register(server, "tiny", write_tiny_llama_gguf(models / "tiny.gguf"))
        # A pull in progress: its file is partial (the catalog inspects it only when READY).
        partial = models / "pulling.gguf"
        partial.write_bytes((models / "tiny.gguf").read_bytes()[:4096])
        register(server, "pulling", partial, downloading=True)
        register(server, "sd1", write_family(models / "sd1.safetensors", "sd1"))
        yield server


@pytest.mark.llm
def test_a_llama_worker_loads_a_catalog_model_by_name_and_generates(
    catalog: CatalogServer,
) -> None:
    pytest.importorskip("llama_cpp")
    from services.worker.engines.llama_cpp import LlamaCppEngine

    with worker_with_catalog(LlamaCppEngine(), catalog.address, engine_name="llama_cpp") as stub:
        worker = load_by_name(stub, "models/tiny")
        assert worker.state == pb.WORKER_STATE_READY and worker.model == "models/tiny"
        assert worker.loaded_model.paths[0].endswith("tiny.gguf")
        assert worker.worker_type == "worker-types/cpu-llm"

        deltas: list[gen_pb.TokenDelta] = []
        results: list[gen_pb.GenerationResult] = []
        request = gen_pb.GenerateRequest(
            model="models/tiny",  # the catalog name is what requests are checked against
            prompt="hello",
            stopping=gen_pb.StoppingCriteria(max_tokens=4, ignore_eos=True),
        )
        for message in stub.Generate(request, timeout=RPC_TIMEOUT):
            if message.WhichOneof("event") == "delta":
                deltas.append(message.delta)
            else:
                results.append(message.result)
        assert len(results) == 1 and results[0].usage.completion_tokens == 4
        assert sum(len(delta.token_ids) for delta in deltas) == 4

        with pytest.raises(grpc.RpcError) as mismatch:
            list(
                stub.Generate(
                    gen_pb.GenerateRequest(model="models/other", prompt="hi"),
                    timeout=RPC_TIMEOUT,
                )
            )
        assert error_reason(mismatch.value) == "MODEL_MISMATCH"

        # Refusals leave the loaded model in place: they come before the engine.
        not_ready = load_error(stub, "models/pulling")
        assert not_ready.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(not_ready) == "MODEL_NOT_READY"
        assert "downloading" in (not_ready.details() or "")
        assert "12% downloaded" in (not_ready.details() or "")

        unknown = load_error(stub, "models/nope")
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(unknown) == "MODEL_NOT_FOUND"

        wrong = load_error(stub, "models/sd1")
        assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(wrong) == "INCOMPATIBLE_MODEL"
        assert "sd worker" in (wrong.details() or "")

        after = stub.GetWorker(pb.WorkerServiceGetWorkerRequest(), timeout=RPC_TIMEOUT)
        assert after.state == pb.WORKER_STATE_READY and after.model == "models/tiny"


def test_an_unreachable_catalog_is_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on (bound, then released)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with worker_with_catalog(FakeEngine(), f"127.0.0.1:{port}", engine_name="fake") as stub:
        error = load_error(stub, "models/tiny")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(error) == "DEPENDENCY_UNAVAILABLE"


def test_the_fake_engine_loads_catalog_paths_too(catalog: CatalogServer) -> None:
    with worker_with_catalog(FakeEngine(), catalog.address, engine_name="fake") as stub:
        worker = load_by_name(stub, "tiny")  # a bare id is accepted
        assert worker.model == "models/tiny" and worker.state == pb.WORKER_STATE_READY
