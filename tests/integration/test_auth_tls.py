"""Access control on real servers: bearer tokens on every RPC of every service, TLS and mutual
TLS, the loopback warning, and no token in logs or metrics.

The services are started through their own entry functions (start_catalog, start_provisioner,
start_pool, start_worker with the FakeEngine) from settings that carry the token, so the wiring
in each __main__ is what is tested. Certificates come from a throwaway CA made with the
`openssl` CLI (the `cryptography` package is not installed here).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import CollectorRegistry

from rbee.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from rbee.provisioner.v1 import provisioner_pb2, provisioner_pb2_grpc
from rbee.worker.v1 import pool_pb2, pool_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.catalog.__main__ import start_catalog
from services.catalog.domain import DeviceKind
from services.catalog.settings import CatalogSettings
from services.common.channels import ChannelSecurity, open_channel
from services.common.server import RunningServer, generic_binding, start_server
from services.common.settings import ServiceSettings
from services.provisioner.__main__ import start_provisioner
from services.worker.__main__ import start_worker
from services.worker.devices import DeviceSpec
from services.worker.engines.fake import FakeEngine
from services.worker.pool.__main__ import start_pool
from services.worker.pool.settings import PoolSettings
from services.worker.pool.worker_link import WorkerLink
from services.worker.settings import WorkerSettings
from tests.integration.provisioner_harness import provisioner_settings
from tests.integration.server_harness import error_reason, serve_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.security]

TOKEN = "rbee-test-token-4f1c9a7e2b"
WRONG_TOKEN = "rbee-wrong-token-0d3e8b6a55"
CALL_TIMEOUT_S = 5.0
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


# ---------------------------------------------------------------- the mesh with auth on


@dataclass
class Served:
    """One running service of the mesh."""

    name: str
    address: str
    registry: CollectorRegistry
    metrics_port: int | None


@contextmanager
def serve(name: str, build: Any, registry: CollectorRegistry) -> Iterator[Served]:
    async def started() -> tuple[RunningServer, None]:
        result = await build()
        running = result[0] if isinstance(result, tuple) else result
        await running.set_serving()
        return running, None

    with serve_in_thread(started, name=f"{name}-auth-test") as (running, _):
        yield Served(name, f"127.0.0.1:{running.port}", registry, running.metrics_port)


@contextmanager
def running_mesh(home: Path, **access: Any) -> Iterator[dict[str, Served]]:
    """Catalog, provisioner, pool and a FakeEngine worker, every one with `access` settings."""
    common = {"home": home, "listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", **access}
    with ExitStack() as stack:
        registry = CollectorRegistry()
        catalog_settings = CatalogSettings(**common)
        catalog = stack.enter_context(
            serve("catalog", lambda: start_catalog(catalog_settings, registry), registry)
        )
        prov_registry = CollectorRegistry()
        prov_settings = provisioner_settings(home, catalog.address, **access)
        provisioner = stack.enter_context(
            serve(
                "provisioner",
                lambda: start_provisioner(prov_settings, prov_registry),
                prov_registry,
            )
        )
        pool_registry = CollectorRegistry()
        pool_settings = PoolSettings(
            **common, catalog_address=catalog.address, provisioner_address=provisioner.address
        )
        pool = stack.enter_context(
            serve("pool", lambda: start_pool(pool_settings, pool_registry), pool_registry)
        )
        worker_registry = CollectorRegistry()
        worker_settings = WorkerSettings(**common, engine="fake", catalog_address=catalog.address)
        worker = stack.enter_context(
            serve(
                "worker",
                lambda: start_worker(
                    worker_settings, DeviceSpec(kind=DeviceKind.CPU), FakeEngine(), worker_registry
                ),
                worker_registry,
            )
        )
        yield {s.name: s for s in (catalog, provisioner, pool, worker)}


@pytest.fixture(scope="module")
def strict_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    """Auth on, nothing exempt: every method of every service needs the token."""
    home = tmp_path_factory.mktemp("strict-mesh")
    with running_mesh(
        home, auth_token=TOKEN, auth_exempt_health=False, auth_exempt_reflection=False
    ) as mesh:
        yield mesh


@dataclass(frozen=True)
class Method:
    path: str  # "/pkg.Service/Method"
    client_streaming: bool
    server_streaming: bool


def list_methods(address: str, security: ChannelSecurity) -> list[Method]:
    """Every method of every service the server lists through reflection."""
    with open_channel(address, security) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        methods: list[Method] = []
        for service_name in database.get_services():
            service = pool.FindServiceByName(service_name)
            methods.extend(
                Method(
                    f"/{service.full_name}/{method.name}",
                    method.client_streaming,
                    method.server_streaming,
                )
                for method in service.methods
            )
        return methods


def call_empty(channel: grpc.Channel, method: Method) -> None:
    """Call `method` with one empty request message (bytes in, bytes out); raises RpcError."""
    kwargs: dict[str, Any] = {"timeout": CALL_TIMEOUT_S}
    if method.client_streaming and method.server_streaming:
        for _ in channel.stream_stream(method.path)(iter([b""]), **kwargs):
            pass
    elif method.client_streaming:
        channel.stream_unary(method.path)(iter([b""]), **kwargs)
    elif method.server_streaming:
        for _ in channel.unary_stream(method.path)(b"", **kwargs):
            pass
    else:
        channel.unary_unary(method.path)(b"", **kwargs)


def expect_unauthenticated(channel: grpc.Channel, method: Method) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call_empty(channel, method)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (method.path, err.code())
    assert error_reason(err) == "UNAUTHENTICATED", method.path
    assert TOKEN not in (err.details() or "")


SERVICE_NAMES = {
    "catalog": "rbee.catalog.v1.CatalogService",
    "provisioner": "rbee.provisioner.v1.ProvisionerService",
    "pool": "rbee.worker.v1.PoolService",
    "worker": "rbee.worker.v1.WorkerService",
}


@pytest.mark.parametrize("name", ["catalog", "provisioner", "pool", "worker"])
def test_every_rpc_from_reflection_needs_the_token(
    strict_mesh: dict[str, Served], name: str
) -> None:
    served = strict_mesh[name]
    methods = list_methods(served.address, ChannelSecurity(token=TOKEN))
    services = {m.path.split("/")[1] for m in methods}
    assert {SERVICE_NAMES[name], HEALTH, REFLECTION} <= services
    own = [m for m in methods if m.path.startswith(f"/{SERVICE_NAMES[name]}/")]
    assert len(own) >= 5  # the walk covers the service's methods, not just the plumbing
    assert any(m.server_streaming for m in methods) and any(m.client_streaming for m in methods)

    with (
        open_channel(served.address) as anonymous,
        open_channel(served.address, ChannelSecurity(token=WRONG_TOKEN)) as wrong,
    ):
        for method in methods:
            expect_unauthenticated(anonymous, method)
            expect_unauthenticated(wrong, method)
        # Reflection itself is a method like the others: without the token it lists nothing.
        with pytest.raises(grpc.RpcError) as caught:
            list_methods(served.address, ChannelSecurity())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    rejected = served.registry.get_sample_value("rbee_auth_rejected_total", {"cause": "missing"})
    assert rejected is not None and rejected >= len(methods)
    handled = served.registry.get_sample_value(
        "rbee_grpc_server_handled_total",
        {
            "service": SERVICE_NAMES[name],
            "method": own[0].path.rsplit("/", 1)[1],
            "code": "UNAUTHENTICATED",
        },
    )
    assert handled is not None and handled >= 2


def test_the_right_token_works_on_every_service(strict_mesh: dict[str, Served]) -> None:
    security = ChannelSecurity(token=TOKEN)
    for served in strict_mesh.values():
        with open_channel(served.address, security) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING, served.name
    with open_channel(strict_mesh["catalog"].address, security) as channel:
        catalog_pb2_grpc.CatalogServiceStub(channel).ListModels(
            catalog_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S
        )
    with open_channel(strict_mesh["provisioner"].address, security) as channel:
        provisioner_pb2_grpc.ProvisionerServiceStub(channel).ListPulls(
            provisioner_pb2.ListPullsRequest(), timeout=CALL_TIMEOUT_S
        )
    with open_channel(strict_mesh["pool"].address, security) as channel:
        pool_pb2_grpc.PoolServiceStub(channel).ListDevices(
            pool_pb2.ListDevicesRequest(), timeout=CALL_TIMEOUT_S
        )
    with open_channel(strict_mesh["worker"].address, security) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel).GetWorker(
            worker_pb2.WorkerServiceGetWorkerRequest(), timeout=CALL_TIMEOUT_S
        )
        assert worker.state == worker_pb2.WORKER_STATE_IDLE


def _not_found_through_the_catalog(call: Any) -> None:
    """`call` makes a service look up a missing model in the catalog: NOT_FOUND proves its own
    link reached the catalog with the token (without it the catalog says UNAUTHENTICATED)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()


def test_services_call_one_another_with_the_token(strict_mesh: dict[str, Served]) -> None:
    security = ChannelSecurity(token=TOKEN)
    missing = "models/not-in-the-catalog"
    with open_channel(strict_mesh["worker"].address, security) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        _not_found_through_the_catalog(
            lambda: list(stub.LoadModel(worker_pb2.LoadModelRequest(model=missing), timeout=10))
        )
    with open_channel(strict_mesh["provisioner"].address, security) as channel:
        prov = provisioner_pb2_grpc.ProvisionerServiceStub(channel)
        _not_found_through_the_catalog(
            lambda: list(prov.Preload(provisioner_pb2.PreloadRequest(model=missing), timeout=10))
        )
    with open_channel(strict_mesh["pool"].address, security) as channel:
        pool = pool_pb2_grpc.PoolServiceStub(channel)
        request = pool_pb2.SpawnWorkerRequest(model=missing, validate_only=True)
        _not_found_through_the_catalog(lambda: list(pool.SpawnWorker(request, timeout=10)))


async def test_the_pools_worker_link_sends_the_token(strict_mesh: dict[str, Served]) -> None:
    worker_address = strict_mesh["worker"].address
    link = WorkerLink(worker_address, security=ChannelSecurity(token=TOKEN))
    try:
        live = await link.status()
        assert live.queue_capacity > 0
    finally:
        await link.close()
    anonymous = WorkerLink(worker_address)
    try:
        with pytest.raises(Exception) as caught:
            await anonymous.status()
        assert getattr(caught.value, "reason", "") == "UNAUTHENTICATED"
    finally:
        await anonymous.close()


def test_no_token_in_metrics(strict_mesh: dict[str, Served]) -> None:
    for served in strict_mesh.values():
        with (
            open_channel(served.address, ChannelSecurity(token=WRONG_TOKEN)) as channel,
            pytest.raises(grpc.RpcError),
        ):
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
        assert served.metrics_port is not None
        url = f"http://127.0.0.1:{served.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as response:
            text = response.read().decode()
        assert "rbee_auth_rejected_total" in text
        assert TOKEN not in text and WRONG_TOKEN not in text


# ---------------------------------------------------------------- exemptions, logs, warning


@contextmanager
def plain_server(
    settings: ServiceSettings, *, listen: str = "127.0.0.1:0"
) -> Iterator[tuple[str, CollectorRegistry]]:
    """A server with one echo method, started with `settings`' access options."""
    registry = CollectorRegistry()

    async def echo(request: bytes, _context: Any) -> bytes:
        return request

    async def build() -> tuple[RunningServer, None]:
        running = await start_server(
            [
                generic_binding(
                    "rbee.test.v1.Echo",
                    {"Echo": grpc.unary_unary_rpc_method_handler(echo)},
                )
            ],
            listen=listen,
            metrics_listen=None,
            registry=registry,
            security=settings.server_security(),
        )
        await running.set_serving()
        return running, None

    with serve_in_thread(build, name="auth-plain-server") as (running, _):
        yield f"127.0.0.1:{running.port}", registry


def health_check(address: str, security: ChannelSecurity | None = None) -> grpc.StatusCode:
    with open_channel(address, security) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def reflection_listing(address: str) -> grpc.StatusCode:
    """The status of listing the services through reflection without a token."""
    try:
        with open_channel(address) as channel:
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "rbee.test.v1.Echo" in services
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("exempt_health", [True, False])
@pytest.mark.parametrize("exempt_reflection", [True, False])
def test_health_and_reflection_exemptions(exempt_health: bool, exempt_reflection: bool) -> None:
    settings = ServiceSettings(
        auth_token=TOKEN,
        auth_exempt_health=exempt_health,
        auth_exempt_reflection=exempt_reflection,
    )
    refused = grpc.StatusCode.UNAUTHENTICATED
    with plain_server(settings) as (address, _):
        assert health_check(address) == (grpc.StatusCode.OK if exempt_health else refused)
        assert reflection_listing(address) == (grpc.StatusCode.OK if exempt_reflection else refused)
        # Exempt or not, the service's own methods always need the token.
        with open_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/rbee.test.v1.Echo/Echo")(b"x", timeout=CALL_TIMEOUT_S)
            assert caught.value.code() == refused
        with open_channel(address, ChannelSecurity(token=TOKEN)) as channel:
            assert channel.unary_unary("/rbee.test.v1.Echo/Echo")(b"x", timeout=5) == b"x"


def test_auth_off_lets_everything_through() -> None:
    with plain_server(ServiceSettings()) as (address, _):
        assert health_check(address) == grpc.StatusCode.OK
        assert reflection_listing(address) == grpc.StatusCode.OK
        # A token the server does not expect is ignored, as before auth existed.
        assert health_check(address, ChannelSecurity(token=WRONG_TOKEN)) == grpc.StatusCode.OK


def test_the_token_never_reaches_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = ServiceSettings(auth_token_file=token_file, auth_exempt_health=False)
    from services.common.logs import log_settings

    log_settings(logging.getLogger("services.test"), settings)
    with plain_server(settings) as (address, _):
        assert health_check(address, ChannelSecurity(token=WRONG_TOKEN)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert health_check(address) == grpc.StatusCode.UNAUTHENTICATED
        assert health_check(address, ChannelSecurity(token=TOKEN)) == grpc.StatusCode.OK
    text = "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    assert "UNAUTHENTICATED" in text  # the refusals were logged...
    assert TOKEN not in text and WRONG_TOKEN not in text  # ...without either token


LOOPBACK_WARNING = "with no authentication"


def test_listening_beyond_loopback_without_a_token_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="services.common.server")
    with plain_server(ServiceSettings(), listen="0.0.0.0:0"):
        pass
    assert any(LOOPBACK_WARNING in r.getMessage() for r in caplog.records)

    caplog.clear()
    with plain_server(ServiceSettings(auth_token=TOKEN), listen="0.0.0.0:0"):
        pass
    with plain_server(ServiceSettings(), listen="127.0.0.1:0"):
        pass
    assert not any(LOOPBACK_WARNING in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- TLS and mutual TLS


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: its certificates must not be accepted


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    (directory / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not on PATH (needed to make test certificates)")
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "rbee-test-ca")
    other = _make_ca(directory, "other-ca")
    server = _make_leaf(directory, "server", ca)
    client = _make_leaf(directory, "client", ca)
    return Pki(ca[0], server[0], server[1], client[0], client[1], other[0])


def test_tls(pki: Pki) -> None:
    settings = ServiceSettings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    with plain_server(settings) as (address, _):
        assert health_check(address, ChannelSecurity(ca_file=pki.ca)) == grpc.StatusCode.OK
        # A plaintext client cannot talk to a TLS port; nor can one that trusts another CA.
        assert health_check(address) == grpc.StatusCode.UNAVAILABLE
        assert health_check(address, ChannelSecurity(ca_file=pki.other_ca)) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_with_a_token(pki: Pki) -> None:
    settings = ServiceSettings(
        auth_token=TOKEN,
        auth_exempt_health=False,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
    )
    client = ChannelSecurity(
        token=TOKEN, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
    )
    with plain_server(settings) as (address, _):
        assert health_check(address, client) == grpc.StatusCode.OK
        # No client certificate: the handshake fails before any call.
        no_cert = ChannelSecurity(token=TOKEN, ca_file=pki.ca)
        assert health_check(address, no_cert) == grpc.StatusCode.UNAVAILABLE
        # A certificate, but no token: TLS passes, the call does not.
        no_token = ChannelSecurity(
            ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
        )
        assert health_check(address, no_token) == grpc.StatusCode.UNAUTHENTICATED


def test_a_mesh_under_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    """Every service serves mutual TLS and calls the others with its own certificate, the CA
    and the token (settings.client_security())."""
    access = {
        "auth_token": TOKEN,
        "tls_cert_file": pki.server_cert,
        "tls_key_file": pki.server_key,
        "tls_client_ca_file": pki.ca,
    }
    client = ChannelSecurity(
        token=TOKEN, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
    )
    with running_mesh(tmp_path / "home", **access) as mesh:
        for served in mesh.values():
            assert health_check(served.address, client) == grpc.StatusCode.OK, served.name
            assert health_check(served.address) == grpc.StatusCode.UNAVAILABLE, served.name
        with open_channel(mesh["worker"].address, client) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.LoadModelRequest(model="models/not-in-the-catalog")
            _not_found_through_the_catalog(lambda: list(stub.LoadModel(request, timeout=10)))
        with open_channel(mesh["pool"].address, client) as channel:
            pool = pool_pb2_grpc.PoolServiceStub(channel)
            spawn = pool_pb2.SpawnWorkerRequest(
                model="models/not-in-the-catalog", validate_only=True
            )
            _not_found_through_the_catalog(lambda: list(pool.SpawnWorker(spawn, timeout=10)))


# ---------------------------------------------------------------- the pool and its workers


def _pool_can_secure_its_worker_links() -> bool:
    # PoolConfig (services/worker/pool/service.py) must carry the pool's ChannelSecurity to the
    # WorkerLinks it opens; until it does, a spawn under auth cannot load its model.
    from services.worker.pool.service import PoolConfig

    return "worker_security" in {f.name for f in dataclasses.fields(PoolConfig)}


@pytest.mark.skipif(
    not _pool_can_secure_its_worker_links(),
    reason="needs PoolConfig.worker_security in services/worker/pool/service.py",
)
def test_the_pool_spawns_workers_that_check_the_token(tmp_path: Path) -> None:
    """The pool hands its token to the worker process it spawns (RBEE_WORKER_AUTH_TOKEN) and
    calls it with the token: the spawn is READY, and the worker refuses anonymous calls."""
    from tests.fixtures.gguf_models import write_tiny_llama_gguf

    security = ChannelSecurity(token=TOKEN)
    with running_mesh(tmp_path / "home", auth_token=TOKEN, auth_exempt_health=False) as mesh:
        path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
        with open_channel(mesh["catalog"].address, security) as channel:
            catalog_pb2_grpc.CatalogServiceStub(channel).CreateModel(
                catalog_pb2.CreateModelRequest(
                    model_id="tiny",
                    model=catalog_pb2.Model(
                        source=catalog_pb2.ModelSource(
                            kind=catalog_pb2.SOURCE_KIND_LOCAL, path=str(path)
                        ),
                        paths=[str(path)],
                        state=catalog_pb2.MODEL_STATE_READY,
                    ),
                ),
                timeout=30,
            )
        with open_channel(mesh["pool"].address, security) as channel:
            pool = pool_pb2_grpc.PoolServiceStub(channel)
            request = pool_pb2.SpawnWorkerRequest(model="models/tiny")
            messages = list(pool.SpawnWorker(request, timeout=120))
            worker = messages[-1].worker
            assert worker.state == worker_pb2.WORKER_STATE_READY
            try:
                assert health_check(worker.endpoint) == grpc.StatusCode.UNAUTHENTICATED
                assert health_check(worker.endpoint, security) == grpc.StatusCode.OK
            finally:
                pool.StopWorker(pool_pb2.StopWorkerRequest(name=worker.name), timeout=60)
