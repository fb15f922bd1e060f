"""The bearer-token check, the access settings and what a spawned worker inherits (no sockets)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.auth import (
    AuthInterceptor,
    AuthMetrics,
    ServerSecurity,
    bearer_token_problem,
    is_loopback_host,
)
from services.common.channels import ChannelSecurity
from services.common.errors import Unauthenticated
from services.common.logs import log_settings
from services.common.settings import (
    ServiceSettings,
    SettingsError,
    load_settings,
    non_default_settings,
)
from services.worker.pool.settings import PoolSettings
from services.worker.settings import WorkerSettings

pytestmark = [pytest.mark.unit, pytest.mark.security]

TOKEN = "unit-token-7c2d9e"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
ACCESS_VARIABLES = (
    "RBEE_AUTH_TOKEN",
    "RBEE_AUTH_TOKEN_FILE",
    "RBEE_AUTH_EXEMPT_HEALTH",
    "RBEE_AUTH_EXEMPT_REFLECTION",
    "RBEE_TLS_CERT_FILE",
    "RBEE_TLS_KEY_FILE",
    "RBEE_TLS_CLIENT_CA_FILE",
    "RBEE_TLS_CA_FILE",
    "RBEE_TLS_SERVER_NAME",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ACCESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.replace("RBEE_", "RBEE_WORKER_", 1), raising=False)
        monkeypatch.delenv(name.replace("RBEE_", "RBEE_POOL_", 1), raising=False)


# ---------------------------------------------------------------- the token check


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ((("authorization", f"Bearer {TOKEN}"),), None),
        ((("authorization", f"bearer {TOKEN}"),), None),  # the scheme is case-insensitive
        ((("x-request-id", "r1"), ("authorization", f"Bearer  {TOKEN} ")), None),
        ((), "missing"),
        (None, "missing"),
        ((("x-request-id", "r1"),), "missing"),
        ((("authorization", TOKEN),), "malformed"),  # no scheme
        ((("authorization", f"Basic {TOKEN}"),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
        ((("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")), "malformed"),
        ((("authorization", f"Bearer {TOKEN}x"),), "invalid"),
        ((("authorization", f"Bearer {TOKEN[:-1]}"),), "invalid"),
        ((("authorization", "Bearer tökén"),), "invalid"),  # non-ASCII: refused, no crash
    ],
)
def test_bearer_token_problem(metadata: Any, problem: str | None) -> None:
    assert bearer_token_problem(metadata, TOKEN) == problem


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("hive.example.org", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_exemptions_by_method_path() -> None:
    default = ServerSecurity(token=TOKEN)
    assert default.is_exempt("/grpc.health.v1.Health/Check")
    assert default.is_exempt("/grpc.health.v1.Health/Watch")
    assert not default.is_exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not default.is_exempt("/rbee.catalog.v1.CatalogService/ListModels")
    # A look-alike service name is not the health service.
    assert not default.is_exempt("/grpc.health.v1.HealthX/Check")
    strict = ServerSecurity(token=TOKEN, exempt_health=False, exempt_reflection=True)
    assert not strict.is_exempt("/grpc.health.v1.Health/Check")
    assert strict.is_exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert strict.is_exempt("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")


def test_server_security_checks_its_tls_parts() -> None:
    with pytest.raises(ValueError, match="both a certificate and its private key"):
        ServerSecurity(tls_certificate_chain=b"cert")
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerSecurity(tls_client_ca=b"ca")
    assert TOKEN not in repr(ServerSecurity(token=TOKEN))


class _Details:
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


def _intercept(
    interceptor: AuthInterceptor, method: str, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]:
    async def behaviour(request: bytes, _context: Any) -> bytes:
        return request

    real = grpc.unary_unary_rpc_method_handler(behaviour)

    async def continuation(_details: Any) -> grpc.RpcMethodHandler:
        return real

    got = asyncio.run(interceptor.intercept_service(continuation, _Details(method, metadata)))
    return real, got


def test_interceptor_passes_the_token_and_refuses_the_rest() -> None:
    registry = CollectorRegistry()
    interceptor = AuthInterceptor(ServerSecurity(token=TOKEN), AuthMetrics(registry))
    method = "/rbee.catalog.v1.CatalogService/ListModels"

    real, got = _intercept(interceptor, method, (("authorization", f"Bearer {TOKEN}"),))
    assert got is real  # a valid call runs the real handler, untouched

    real, got = _intercept(interceptor, "/grpc.health.v1.Health/Check", ())
    assert got is real  # exempt

    for metadata in ((), (("authorization", "Bearer nope"),)):
        real, got = _intercept(interceptor, method, metadata)
        assert got is not real and got.unary_unary is not None
        with pytest.raises(Unauthenticated) as caught:
            asyncio.run(got.unary_unary(b"", None))
        assert caught.value.reason == "UNAUTHENTICATED"
        assert TOKEN not in caught.value.message

    assert registry.get_sample_value("rbee_auth_rejected_total", {"cause": "missing"}) == 1
    assert registry.get_sample_value("rbee_auth_rejected_total", {"cause": "invalid"}) == 1
    assert TOKEN not in generate_latest(registry).decode()


def test_refusing_handlers_keep_the_stream_kind() -> None:
    interceptor = AuthInterceptor(ServerSecurity(token=TOKEN))

    async def stream(_request: Any, _context: Any) -> Any:
        yield b""

    real = grpc.unary_stream_rpc_method_handler(stream)

    async def continuation(_details: Any) -> grpc.RpcMethodHandler:
        return real

    got = asyncio.run(interceptor.intercept_service(continuation, _Details("/x.Y/Z", ())))
    assert got.unary_stream is not None and got.unary_unary is None

    async def drain() -> None:
        async for _ in got.unary_stream(b"", None):
            pass

    with pytest.raises(Unauthenticated):
        asyncio.run(drain())


def test_interceptor_needs_a_token() -> None:
    with pytest.raises(ValueError):
        AuthInterceptor(ServerSecurity())


# ---------------------------------------------------------------- settings


def test_defaults_are_auth_off_and_loopback() -> None:
    settings = ServiceSettings()
    assert settings.auth_token is None
    assert settings.server_security() == ServerSecurity()
    assert settings.client_security() == ChannelSecurity()
    from services.catalog.settings import CatalogSettings
    from services.provisioner.settings import ProvisionerSettings

    for cls in (CatalogSettings, ProvisionerSettings, PoolSettings, WorkerSettings):
        assert issubclass(cls, ServiceSettings)
        defaults = cls()
        assert defaults.listen.startswith("127.0.0.1:"), cls.__name__
        metrics = defaults.metrics_listen
        assert metrics is None or metrics.startswith("127.0.0.1:"), cls.__name__


def test_token_from_the_hive_wide_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_AUTH_TOKEN", TOKEN)
    for cls in (ServiceSettings, PoolSettings, WorkerSettings):
        settings = cls()
        assert settings.server_security().token == TOKEN
        assert settings.client_security().token == TOKEN
    # The service-prefixed variable wins over the hive-wide one; empty means unset.
    monkeypatch.setenv("RBEE_WORKER_AUTH_TOKEN", "worker-only")
    assert WorkerSettings().server_security().token == "worker-only"
    monkeypatch.setenv("RBEE_AUTH_TOKEN", "")
    assert ServiceSettings().auth_token is None


def test_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    monkeypatch.setenv("RBEE_AUTH_TOKEN_FILE", str(path))
    settings = ServiceSettings()
    assert settings.server_security().token == TOKEN
    assert non_default_settings(settings)["auth_token"] == "**********"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"auth_token": "a", "auth_token_file": "{dir}/token"}, "not both"),
        ({"auth_token_file": "{dir}/missing"}, "cannot read"),
        ({"auth_token_file": "{dir}/empty"}, "is empty"),
        ({"auth_token": "has space"}, "printable ASCII"),
        ({"auth_token": "tök"}, "printable ASCII"),
        ({"tls_cert_file": "{dir}/cert.pem"}, "both tls_cert_file"),
        ({"tls_key_file": "{dir}/cert.pem"}, "both tls_cert_file"),
        ({"tls_client_ca_file": "{dir}/cert.pem"}, "needs the service's own"),
        ({"tls_cert_file": "{dir}/cert.pem", "tls_key_file": "{dir}/nokey"}, "cannot read"),
        ({"tls_cert_file": "{dir}/cert.pem", "tls_key_file": "{dir}/token"}, "not a PEM"),
        ({"tls_ca_file": "{dir}"}, "cannot read"),  # a directory
    ],
)
def test_misconfiguration_is_one_clear_line(
    tmp_path: Path, fields: dict[str, str], message: str
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "cert.pem").write_text(PEM)
    values = {k: v.format(dir=tmp_path) for k, v in fields.items()}
    with pytest.raises(SettingsError) as caught:
        load_settings(ServiceSettings, **values)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and "Traceback" not in text
    assert TOKEN not in text


def test_client_security_follows_the_server_side(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem", "other-ca.pem"):
        (tmp_path / name).write_text(PEM)
    tls = ServiceSettings(
        auth_token=TOKEN,
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
        tls_server_name="rbee.internal",
    )
    assert tls.client_security() == ChannelSecurity(
        token=TOKEN, tls=True, server_name="rbee.internal"
    )
    assert tls.server_security().uses_tls and not tls.server_security().mutual_tls
    mutual = ServiceSettings(
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
        tls_client_ca_file=tmp_path / "ca.pem",
    )
    assert mutual.client_security() == ChannelSecurity(
        tls=True,
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "cert.pem",
        key_file=tmp_path / "key.pem",
    )
    assert mutual.server_security().mutual_tls
    # tls_ca_file, when set, is what the other services are checked against.
    other = ServiceSettings(tls_ca_file=tmp_path / "other-ca.pem")
    assert other.client_security() == ChannelSecurity(tls=True, ca_file=tmp_path / "other-ca.pem")
    assert not other.server_security().uses_tls


def test_settings_log_line_has_no_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log_settings(logging.getLogger("services.test"), ServiceSettings(auth_token=TOKEN))
    assert "auth_token=**********" in caplog.text
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(ServiceSettings(auth_token=TOKEN))


# ---------------------------------------------------------------- the pool's workers


def test_pool_hands_its_token_to_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = PoolSettings(auth_token=TOKEN, auth_exempt_health=False)
    env = pool.pool_config().worker_env
    assert env["RBEE_WORKER_AUTH_TOKEN"] == TOKEN
    assert env["RBEE_WORKER_AUTH_TOKEN_FILE"] == ""
    assert env["RBEE_WORKER_AUTH_EXEMPT_HEALTH"] == "false"
    # What the worker reads from that environment is the pool's access configuration, even
    # with a different hive-wide token around.
    monkeypatch.setenv("RBEE_AUTH_TOKEN", "some-other-token")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker = WorkerSettings()
    assert worker.server_security() == pool.server_security()
    assert worker.client_security() == pool.client_security()


def test_pool_hands_on_a_token_file_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text(PEM)
    pool = PoolSettings(
        auth_token_file=path,
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
        tls_client_ca_file=tmp_path / "ca.pem",
    )
    env = pool.worker_access_env()
    assert TOKEN not in env.values()  # the path travels, not the secret
    assert env["RBEE_WORKER_AUTH_TOKEN_FILE"] == str(path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker = WorkerSettings()
    assert worker.server_security() == pool.server_security()
    assert worker.client_security() == pool.client_security()


def test_pool_without_auth_gives_workers_none(monkeypatch: pytest.MonkeyPatch) -> None:
    env = PoolSettings().worker_access_env()
    assert env["RBEE_WORKER_AUTH_TOKEN"] == "" and env["RBEE_WORKER_TLS_CERT_FILE"] == ""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert WorkerSettings().server_security() == ServerSecurity()


def test_entry_points_print_a_settings_error_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.catalog.__main__ import main as catalog_main
    from services.provisioner.__main__ import main as provisioner_main
    from services.worker.pool.__main__ import main as pool_main

    monkeypatch.setenv("RBEE_HOME", str(tmp_path))
    monkeypatch.setenv("RBEE_TLS_CERT_FILE", str(tmp_path / "missing.pem"))
    for main in (catalog_main, provisioner_main, pool_main):
        assert main([]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: invalid ") and "both tls_cert_file" in err
        assert "Traceback" not in err
