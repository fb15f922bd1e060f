"""The SDK's sync and asyncio clients against real servers on 127.0.0.1:0.

A catalog and a provisioner (with the fake Hub for a pull), a worker around the FakeEngine (the
accepted fake for the worker's protocol), and the pool spawning a real llama.cpp worker on a tiny
GGUF. Also: a server that is down and comes back (the retry), and a NOT_FOUND turned into the
typed exception with its reason and resource.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rbee.worker.v1 import generation_pb2 as gen
from rbee.worker.v1 import image_pb2 as img
from rbee.worker.v1 import pool_pb2, worker_pb2
from rbee_client import (
    CatalogClient,
    ChannelSecurity,
    FailedPreconditionError,
    NotFoundError,
    PoolClient,
    ProvisionerClient,
    PullUpdate,
    RetryPolicy,
    ServiceUnavailableError,
    UnimplementedError,
    WorkerClient,
    aio,
)
from rbee_client.calls import NO_RETRY
from services.catalog.domain import DeviceKind, Model, ModelState, Verdict
from services.catalog.service import CatalogService, HostInfo
from services.catalog.servicer import CatalogServicer, catalog_binding
from services.catalog.settings import DEFAULT_HANDLER_THREADS
from services.catalog.store import CatalogStore
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.server import RunningServer, start_server
from services.worker.engines.fake import FakeEngine
from services.worker.pool.__main__ import start_pool
from services.worker.pool.settings import PoolSettings
from tests.fixtures.fake_hub import FakeHub
from tests.fixtures.gguf_models import write_tiny_llama_gguf
from tests.integration.catalog_harness import SERVICE_NAME as CATALOG_SERVICE
from tests.integration.catalog_harness import running_catalog
from tests.integration.provisioner_harness import (
    Mesh,
    provisioner_settings,
    running_provisioner,
)
from tests.integration.server_harness import serve_in_thread, serve_worker

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 20.0
SPAWN_TIMEOUT = 120.0
SHORT = gen.StoppingCriteria(max_tokens=8)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@dataclass(frozen=True)
class RecordingPolicy(RetryPolicy):
    """A retry policy that notes every wait it was asked for (what a retry looks like)."""

    waits: list[float] = field(default_factory=list)

    def delay(
        self, attempt: int, retry_after: float | None, rng: Callable[[], float] = random.random
    ) -> float:
        wait = super().delay(attempt, retry_after, rng)
        self.waits.append(wait)
        return wait


# ---- catalog --------------------------------------------------------------------------------


def test_catalog_sync(tmp_path: Path, tiny_gguf: Path) -> None:
    with (
        running_catalog(tmp_path / "home") as server,
        CatalogClient(server.address, timeout=CALL_TIMEOUT) as catalog,
    ):
        model = catalog.register_local(str(tiny_gguf), model_id="tiny")
        assert model.name == "models/tiny" and model.state is ModelState.READY
        assert catalog.get_model("tiny").etag == model.etag
        models, total = catalog.list_models(all_pages=True)
        assert [m.name for m in models] == ["models/tiny"] and total == 1

        updated = catalog.update_model("tiny", display_name="Tiny", labels={"team": "sdk"})
        assert updated.display_name == "Tiny" and updated.labels == {"team": "sdk"}
        assert updated.paths == model.paths  # not in the mask: unchanged
        assert catalog.inspect_model("tiny").metadata is not None

        types = dict((wt.id, supported) for wt, supported in catalog.list_worker_types())
        assert "cpu-llm" in types
        cpu_llm, _ = catalog.get_worker_type("worker-types/cpu-llm")
        assert cpu_llm.id == "cpu-llm"

        install = catalog.create_install("cpu-llm", install_id="cpu-llm-test", version="1.0")
        assert install.name == "installs/cpu-llm-test" and install.worker_type == "cpu-llm"
        assert catalog.get_install("cpu-llm-test").version == "1.0"
        assert "installs/cpu-llm-test" in [i.name for i in catalog.list_installs()]
        catalog.delete_install("cpu-llm-test")
        with pytest.raises(NotFoundError):
            catalog.get_install("cpu-llm-test")

        results, _ = catalog.evaluate_compatibility("tiny", worker_types=["cpu-llm"])
        assert [r.verdict for r in results] == [Verdict.COMPATIBLE]
        rows = catalog.compatibility_matrix()
        assert [name for name, _, _ in rows] == ["models/tiny"]

        assert catalog.delete_model("tiny").name == "models/tiny"
        with pytest.raises(NotFoundError) as caught:
            catalog.get_model("tiny")
    err = caught.value
    assert err.code == "NOT_FOUND" and err.reason == "MODEL_NOT_FOUND"
    assert err.resource_name == "models/tiny"
    assert err.request_id  # the server's ErrorInfo metadata


async def test_catalog_async(tmp_path: Path, tiny_gguf: Path) -> None:
    with running_catalog(tmp_path / "home") as server:
        async with aio.CatalogClient(server.address, timeout=CALL_TIMEOUT) as catalog:
            model = await catalog.register_local(str(tiny_gguf), model_id="tiny")
            assert (await catalog.get_model("models/tiny")).name == model.name
            models, total = await catalog.list_models()
            assert total == 1 and models[0].name == "models/tiny"
            updated = await catalog.update_model("tiny", state_message="checked", etag=model.etag)
            assert updated.state_message == "checked"
            (result,), _ = await catalog.evaluate_compatibility("tiny", worker_types=["cpu-llm"])
            assert result.verdict is Verdict.COMPATIBLE
            assert any(wt.id == "cpu-sd" for wt, _ in await catalog.list_worker_types())
            with pytest.raises(NotFoundError) as caught:
                await catalog.get_model("missing")
            assert caught.value.reason == "MODEL_NOT_FOUND"
            assert caught.value.resource_name == "models/missing"


async def test_clients_open_channels_with_channel_security(tmp_path: Path) -> None:
    """A token rides on every call (sync and aio channels); a server without auth ignores it."""
    security = ChannelSecurity(token="sdk-test-token")
    with running_catalog(tmp_path / "home") as server:
        with CatalogClient(server.address, security=security) as catalog:
            assert catalog.list_models() == ([], 0)
        async with aio.CatalogClient(server.address, security=security) as async_catalog:
            assert await async_catalog.list_models() == ([], 0)


def test_service_info(tmp_path: Path) -> None:
    with running_catalog(tmp_path / "home") as server, CatalogClient(server.address) as catalog:
        info = catalog.get_service_info()
    assert CATALOG_SERVICE in info.services and info.version
    assert info.metrics_url == "" or info.metrics_url.startswith("http://127.0.0.1:")
    assert info.start_time.seconds > 0 and not info.auth_required


# ---- a server that is down, then comes back -------------------------------------------------


def reserve_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def late_catalog(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """An address where a catalog starts listening 0.6 s from now, and the event set then."""
    port = reserve_port()
    started = threading.Event()
    finish = threading.Event()

    async def build() -> tuple[RunningServer, None]:
        store = CatalogStore.open(tmp_path / "catalog.db")
        host = HostInfo("linux", "x86_64", frozenset({DeviceKind.CPU}))
        service = CatalogService(store, WorkerTypeRegistry(), host=host)
        running = await start_server(
            [catalog_binding(CatalogServicer(service))],
            listen=f"127.0.0.1:{port}",
            metrics_listen=None,
            registry=CollectorRegistry(),
            handler_threads=DEFAULT_HANDLER_THREADS,
        )
        running.on_stop(service.close)
        await running.set_serving()
        return running, None

    def serve_later() -> None:
        if finish.wait(0.6):
            return
        with serve_in_thread(build, name="late-catalog"):
            started.set()
            finish.wait(30)

    thread = threading.Thread(target=serve_later, name="late-catalog-starter", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}", started
    finally:
        finish.set()
        thread.join(30)


def test_unavailable_is_retried_until_the_server_comes_back(
    late_catalog: tuple[str, threading.Event],
) -> None:
    address, started = late_catalog
    with (
        CatalogClient(address, timeout=5, retry=NO_RETRY) as impatient,
        pytest.raises(ServiceUnavailableError),
    ):
        impatient.list_models()  # nothing listens yet
    policy = RecordingPolicy(max_attempts=8, initial_backoff=0.25, max_backoff=1.0, jitter=0.1)
    with CatalogClient(address, timeout=CALL_TIMEOUT, retry=policy) as patient:
        models, total = patient.list_models()
    assert started.is_set()
    assert (models, total) == ([], 0)
    assert policy.waits, "the first attempts failed UNAVAILABLE and were retried"


async def test_async_unavailable_is_retried_until_the_server_comes_back(
    late_catalog: tuple[str, threading.Event],
) -> None:
    address, started = late_catalog
    policy = RecordingPolicy(max_attempts=8, initial_backoff=0.25, max_backoff=1.0, jitter=0.1)
    async with aio.CatalogClient(address, timeout=CALL_TIMEOUT, retry=policy) as catalog:
        models, total = await catalog.list_models()
    assert started.is_set() and total == 0 and models == []
    assert policy.waits


# ---- provisioner ----------------------------------------------------------------------------


def test_provisioner_pull_sync(mesh: Mesh, hub: FakeHub, tiny_gguf: Path) -> None:
    hub.add_repo("org/tiny-GGUF", {"tiny.Q8_0.gguf": tiny_gguf})
    with ProvisionerClient(mesh.address, timeout=CALL_TIMEOUT) as prov:
        events = list(prov.pull("hf:org/tiny-GGUF:tiny.Q8_0.gguf", timeout=60))
        updates = [e for e in events if isinstance(e, PullUpdate)]
        *_, model = events
        assert isinstance(model, Model) and model.state is ModelState.READY
        assert updates and updates[0].pull.startswith("pulls/")
        assert updates[-1].done_bytes == tiny_gguf.stat().st_size
        pulls = prov.list_pulls()
        assert [p.name for p in pulls] == [updates[0].pull]
        assert prov.get_pull(updates[0].pull).name == updates[0].pull
        recipes = prov.list_recipes()
        if recipes:
            assert prov.get_recipe(recipes[0].name).name == recipes[0].name
        assert prov.list_install_jobs() == []
        with pytest.raises(NotFoundError) as caught:
            prov.get_pull("pulls/missing")
        assert caught.value.reason and caught.value.resource_name == "pulls/missing"


async def test_provisioner_pull_async(mesh: Mesh, hub: FakeHub, tiny_gguf: Path) -> None:
    hub.add_repo("org/tiny-GGUF", {"tiny.Q8_0.gguf": tiny_gguf})
    async with aio.ProvisionerClient(mesh.address, timeout=CALL_TIMEOUT) as prov:
        events = [e async for e in prov.pull("hf:org/tiny-GGUF:tiny.Q8_0.gguf", timeout=60)]
        assert isinstance(events[-1], Model) and events[-1].state is ModelState.READY
        assert all(isinstance(e, PullUpdate) for e in events[:-1])
        assert len(await prov.list_pulls()) == 1
        with pytest.raises(NotFoundError):
            await prov.get_preload("preloads/missing")


# ---- worker (FakeEngine) --------------------------------------------------------------------


@pytest.fixture
def fake_worker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"GGUF" + bytes(60))
    with serve_worker(FakeEngine(reply="héllo, wörld"), engine_name="fake") as (running, _):
        yield f"127.0.0.1:{running.port}", model_file


def test_worker_sync(fake_worker: tuple[str, Path]) -> None:
    address, model_file = fake_worker
    with WorkerClient(address, timeout=CALL_TIMEOUT) as worker:
        assert worker.get_worker().state == worker_pb2.WORKER_STATE_IDLE
        events = list(worker.load_model("models/tiny", paths=[str(model_file)], timeout=30))
        assert all(isinstance(e, worker_pb2.LoadProgress) for e in events[:-1])
        loaded = events[-1]
        assert isinstance(loaded, worker_pb2.Worker)
        assert loaded.state == worker_pb2.WORKER_STATE_READY
        assert loaded.loaded_model.model == "models/tiny"

        out = list(worker.generate("hi", stopping=SHORT, timeout=30))
        deltas = [e.text for e in out if isinstance(e, gen.TokenDelta)]
        result = out[-1]
        assert isinstance(result, gen.GenerationResult) and deltas
        assert "héllo, wörld".startswith("".join(deltas))  # the fake's reply, cut at 8 tokens
        assert result.finish_reason == gen.FINISH_REASON_LENGTH
        assert result.usage.completion_tokens == SHORT.max_tokens

        chat = list(worker.chat([("system", "be brief"), ("user", "hi")], timeout=30))
        assert isinstance(chat[-1], gen.GenerationResult)
        assert "".join(e.text for e in chat if isinstance(e, gen.TokenDelta))

        ids = worker.tokenize("abc")
        assert ids and worker.detokenize(ids)
        with pytest.raises(UnimplementedError) as caught:
            list(worker.generate_image(img.ImageParams(prompt="a cat", steps=2)))
        assert caught.value.reason == "WRONG_ENGINE"
        assert worker.unload_model().state == worker_pb2.WORKER_STATE_IDLE


async def test_worker_async(fake_worker: tuple[str, Path]) -> None:
    address, model_file = fake_worker
    async with aio.WorkerClient(address, timeout=CALL_TIMEOUT) as worker:
        loaded = [e async for e in worker.load_model("models/tiny", paths=[str(model_file)])]
        assert isinstance(loaded[-1], worker_pb2.Worker)
        text = ""
        async for event in worker.chat([("user", "hi")], stopping=SHORT, timeout=30):
            if isinstance(event, gen.TokenDelta):
                text += event.text
            else:
                assert event.finish_reason != gen.FINISH_REASON_UNSPECIFIED
        assert text
        generated = [e async for e in worker.generate("x", stopping=SHORT, timeout=30)]
        assert isinstance(generated[-1], gen.GenerationResult)
        assert await worker.detokenize(await worker.tokenize("abc"))
        with pytest.raises(UnimplementedError):
            async for _ in worker.generate_image(img.ImageParams(prompt="a cat")):
                pass
        assert (await worker.get_worker()).counters.requests_succeeded >= 2
        assert (await worker.unload_model()).state == worker_pb2.WORKER_STATE_IDLE


# ---- pool -----------------------------------------------------------------------------------


@pytest.fixture
def pool_address(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A catalog, a provisioner and a pool (spawning real workers): (pool, catalog) addresses."""
    home = tmp_path / "home"
    with (
        running_catalog(home) as catalog,
        running_provisioner(provisioner_settings(home, catalog.address)) as (prov_address, _, _),
    ):
        settings = PoolSettings(
            home=home,
            listen="127.0.0.1:0",
            metrics_listen=None,
            catalog_address=catalog.address,
            provisioner_address=prov_address,
            stop_grace=5.0,
        )

        async def build() -> tuple[RunningServer, None]:
            running, _ = await start_pool(settings, CollectorRegistry())
            await running.set_serving()
            return running, None

        with serve_in_thread(build, name="sdk-pool-test-server") as (running, _):
            yield f"127.0.0.1:{running.port}", catalog.address


def test_pool_sync_spawn_generate_stop(pool_address: tuple[str, str], tiny_gguf: Path) -> None:
    address, catalog_address = pool_address
    with CatalogClient(catalog_address) as catalog:
        model = catalog.register_local(str(tiny_gguf), model_id="tiny").name
    with PoolClient(address, timeout=CALL_TIMEOUT) as pool:
        (cpu,) = [d for d in pool.list_devices() if d.name == "devices/cpu"]
        assert pool.get_device("cpu").name == cpu.name

        events = list(pool.spawn_worker(pool_pb2.SpawnWorkerRequest(model=model), timeout=120))
        stages = [e.stage for e in events if isinstance(e, pool_pb2.SpawnProgress)]
        assert pool_pb2.SPAWN_STAGE_VALIDATING in stages
        spawned = events[-1]
        assert isinstance(spawned, worker_pb2.Worker)
        assert spawned.state == worker_pb2.WORKER_STATE_READY
        assert [w.name for w in pool.list_workers()] == [spawned.name]
        assert pool.get_worker(spawned.name.removeprefix("workers/")).pid == spawned.pid

        with WorkerClient(spawned.endpoint, timeout=CALL_TIMEOUT) as worker:
            stopping = gen.StoppingCriteria(max_tokens=4, ignore_eos=True)
            out = list(worker.generate("hi", stopping=stopping, timeout=60))
        assert isinstance(out[-1], gen.GenerationResult)

        assert any("worker serving" in line for line in pool.worker_logs(spawned.name))
        stopped = pool.stop_worker(spawned.name, timeout=30)
        assert stopped.state == worker_pb2.WORKER_STATE_STOPPED
        pool.delete_worker(spawned.name)
        assert pool.list_workers() == []
        with pytest.raises(NotFoundError) as caught:
            pool.get_worker(spawned.name)
        assert caught.value.resource_name == spawned.name


async def test_pool_async(pool_address: tuple[str, str], tiny_gguf: Path) -> None:
    address, catalog_address = pool_address
    async with aio.CatalogClient(catalog_address) as catalog:
        model = (await catalog.register_local(str(tiny_gguf), model_id="tiny")).name
    async with aio.PoolClient(address, timeout=CALL_TIMEOUT) as pool:
        assert any(d.name == "devices/cpu" for d in await pool.list_devices())
        request = pool_pb2.SpawnWorkerRequest(model=model, validate_only=True)
        events = [e async for e in pool.spawn_worker(request, timeout=60)]
        would_be = events[-1]
        assert isinstance(would_be, worker_pb2.Worker) and would_be.pid == 0
        assert await pool.list_workers() == []
        refused = pool_pb2.SpawnWorkerRequest(model=model, worker_type="cpu-sd")
        with pytest.raises(FailedPreconditionError) as caught:
            async for _ in pool.spawn_worker(refused, timeout=60):
                pass
        assert caught.value.reason == "INCOMPATIBLE_MODEL"
        with pytest.raises(NotFoundError):
            await pool.get_worker("nope")
