"""The one place client channels are opened: plain, TLS or mutual TLS, with an optional token.

Every caller (the SDK, the CLI, and the services' links to one another) opens its channels here,
so a mesh with auth or TLS turned on needs the settings in one place only:

    security = ChannelSecurity.from_env()          # RBEE_TOKEN, RBEE_TLS_CA, ...
    channel = open_channel("127.0.0.1:50061", security)
    async_channel = open_aio_channel("127.0.0.1:50061", security)

The token travels as `authorization: Bearer TOKEN` metadata on every call. With TLS it rides on
the channel's call credentials; without TLS (a loopback mesh with auth on) an interceptor adds it,
because gRPC refuses call credentials on an insecure channel. The token is never logged and never
part of a repr.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]

AUTHORIZATION_KEY = "authorization"

ENV_TOKEN = "RBEE_TOKEN"
ENV_SERVICE_TOKEN = "RBEE_AUTH_TOKEN"  # what the services check; the fallback for clients
ENV_TLS = "RBEE_TLS"
ENV_TLS_CA = "RBEE_TLS_CA"
ENV_TLS_CERT = "RBEE_TLS_CERT"
ENV_TLS_KEY = "RBEE_TLS_KEY"
ENV_TLS_SERVER_NAME = "RBEE_TLS_SERVER_NAME"


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client proves itself and checks the server.

    token: sent as a bearer token on every call ("" = none).
    tls: use TLS. Implied by any certificate path below.
    ca_file: PEM roots to check the server with (None = the system roots).
    cert_file / key_file: this client's certificate and key, for mutual TLS.
    server_name: the name to check the server's certificate against, when it differs from the
        host in the address (a certificate issued for "rbee-catalog" reached at 127.0.0.1).
    """

    token: str = field(default="", repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mutual TLS needs both a certificate file and a key file")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ChannelSecurity:
        """Read RBEE_TOKEN (else RBEE_AUTH_TOKEN), RBEE_TLS (1/true), RBEE_TLS_CA,
        RBEE_TLS_CERT, RBEE_TLS_KEY and RBEE_TLS_SERVER_NAME."""
        env = os.environ if environ is None else environ

        def path(key: str) -> Path | None:
            value = env.get(key, "").strip()
            return Path(value).expanduser() if value else None

        return cls(
            # One token per mesh: a shell that starts the services with RBEE_AUTH_TOKEN can
            # call them with it too.
            token=(env.get(ENV_TOKEN, "") or env.get(ENV_SERVICE_TOKEN, "")).strip(),
            tls=env.get(ENV_TLS, "").strip().lower() in {"1", "true", "yes", "on"},
            ca_file=path(ENV_TLS_CA),
            cert_file=path(ENV_TLS_CERT),
            key_file=path(ENV_TLS_KEY),
            server_name=env.get(ENV_TLS_SERVER_NAME, "").strip(),
        )

    def ssl_credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials for TLS (reads the PEM files now)."""

        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"Bearer {self.token}"),) if self.token else ()


NO_SECURITY = ChannelSecurity()


def _with_metadata(
    metadata: Sequence[tuple[str, str]] | None, extra: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    merged = [m for m in (metadata or ()) if m[0] != AUTHORIZATION_KEY]
    merged.extend(extra)
    return merged


class _ClientCallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the bearer token to every call of a sync channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _ClientCallDetails(details, _with_metadata(details.metadata, self._metadata))

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, req: Any
    ) -> Any:
        return continuation(self._details(details), req)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, req: Any
    ) -> Any:
        return continuation(self._details(details), req)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, reqs: Any
    ) -> Any:
        return continuation(self._details(details), reqs)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, reqs: Any
    ) -> Any:
        return continuation(self._details(details), reqs)


def _aio_details(details: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
    merged = grpc.aio.Metadata(*_with_metadata(list(details.metadata or ()), metadata))
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=merged,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), requests)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), requests)


def _tls_options(security: ChannelSecurity, options: ChannelOptions) -> list[tuple[str, Any]]:
    opts = list(options)
    if security.server_name:
        opts.append(("grpc.ssl_target_name_override", security.server_name))
    return opts


def open_channel(
    target: str, security: ChannelSecurity | None = None, *, options: ChannelOptions = ()
) -> grpc.Channel:
    """A sync channel to `target` with the given security (None = plain, no token)."""
    security = security or NO_SECURITY
    if security.uses_tls:
        channel = grpc.secure_channel(
            target, security.ssl_credentials(), options=_tls_options(security, options)
        )
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if security.token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.metadata()))
    return channel


def open_aio_channel(
    target: str, security: ChannelSecurity | None = None, *, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """An asyncio channel to `target` with the given security (None = plain, no token)."""
    security = security or NO_SECURITY
    interceptors: list[Any] = []
    if security.token:
        md = security.metadata()
        interceptors = [
            _AioUnaryUnary(md),
            _AioUnaryStream(md),
            _AioStreamUnary(md),
            _AioStreamStream(md),
        ]
    if security.uses_tls:
        return grpc.aio.secure_channel(
            target,
            security.ssl_credentials(),
            options=_tls_options(security, options),
            interceptors=interceptors or None,
        )
    return grpc.aio.insecure_channel(
        target, options=list(options), interceptors=interceptors or None
    )
