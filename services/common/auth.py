"""Who may call a service: bearer-token authentication, TLS and mutual TLS on the server side.

One token per mesh. Every service of a hive (catalog, provisioner, pool, the workers the pool
spawns) is given the same token (`RBEE_AUTH_TOKEN_FILE`, or `RBEE_AUTH_TOKEN`); a service checks
it on every incoming call and sends it on every call it makes to the others (through
services.common.channels, with the same CA and, under mutual TLS, its own certificate). Clients
send it as `authorization: Bearer TOKEN` (the SDK and CLI read `RBEE_TOKEN`).

- No token configured: every call is let through (the default; services listen on loopback, and
  a service that listens anywhere else without a token logs a warning at start-up).
- A token configured: a call without `authorization: Bearer <the token>` ends UNAUTHENTICATED
  with ErrorInfo reason UNAUTHENTICATED before its handler runs, whatever the method. The
  comparison is constant-time (hmac.compare_digest). grpc.health.v1 is exempt by default (load
  balancers and `rbee up` probe it without credentials; it reveals only SERVING or not), server
  reflection is not (it lists every method and message).
- TLS: a certificate and key make the server speak TLS only; a client CA on top makes it mutual
  TLS (a client without a certificate signed by that CA cannot connect).
- The Prometheus /metrics endpoint has no authentication: it binds the host its settings name
  (127.0.0.1 by default, like the gRPC port) and holds no secrets; put it on loopback or behind
  the scraper's network policy when the service listens elsewhere.

The token is never logged, never part of an error message and never a metric label: rejected
calls count in `rbee_grpc_server_handled_total{code="UNAUTHENTICATED"}` and in
`rbee_auth_rejected_total{cause}` (cause: missing, malformed, invalid).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter

from services.common.channels import AUTHORIZATION_KEY
from services.common.errors import Unauthenticated
from services.common.interceptors import rebuilt_handler

logger = logging.getLogger(__name__)

BEARER_SCHEME = "bearer"
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
# v1alpha is what grpcio-reflection serves today; v1 is its successor.
REFLECTION_METHOD_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
UNAUTHENTICATED_REASON = "UNAUTHENTICATED"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class ServerSecurity:
    """How a server checks its callers (built from the service settings at start-up).

    token: the bearer token every call must carry ("" = no authentication).
    exempt_health / exempt_reflection: let grpc.health.v1 / server reflection through without
        a token.
    tls_certificate_chain / tls_private_key: PEM bytes; both set = TLS.
    tls_client_ca: PEM bytes; set = mutual TLS (client certificates signed by it required).
    """

    token: str = field(default="", repr=False)
    exempt_health: bool = True
    exempt_reflection: bool = False
    tls_certificate_chain: bytes | None = field(default=None, repr=False)
    tls_private_key: bytes | None = field(default=None, repr=False)
    tls_client_ca: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_certificate_chain is None) != (self.tls_private_key is None):
            raise ValueError("TLS needs both a certificate and its private key")
        if self.tls_client_ca is not None and self.tls_certificate_chain is None:
            raise ValueError("mutual TLS (a client CA) needs the server's certificate and key")

    @property
    def uses_tls(self) -> bool:
        return self.tls_certificate_chain is not None

    @property
    def mutual_tls(self) -> bool:
        return self.tls_client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """The TLS server credentials (mutual when a client CA is set)."""
        if self.tls_certificate_chain is None or self.tls_private_key is None:
            raise ValueError("no TLS certificate configured")
        return grpc.ssl_server_credentials(
            [(self.tls_private_key, self.tls_certificate_chain)],
            root_certificates=self.tls_client_ca,
            require_client_auth=self.tls_client_ca is not None,
        )

    def is_exempt(self, method: str) -> bool:
        """Whether `method` (a gRPC path, "/pkg.Service/Method") needs no token."""
        if self.exempt_health and method.startswith(HEALTH_METHOD_PREFIX):
            return True
        return self.exempt_reflection and method.startswith(REFLECTION_METHOD_PREFIXES)


NO_SERVER_SECURITY = ServerSecurity()


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an IP address or name, IPv6 without brackets) is this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: may resolve anywhere


def bearer_token_problem(metadata: Sequence[tuple[str, Any]] | None, token: str) -> str | None:
    """None when `metadata` carries exactly one `authorization: Bearer <token>`; else the
    cause: "missing", "malformed" or "invalid". Constant-time in the token's content."""
    values = [value for key, value in (metadata or ()) if key == AUTHORIZATION_KEY]
    if not values:
        return "missing"
    if len(values) != 1 or not isinstance(values[0], str):
        return "malformed"
    scheme, _, credential = values[0].strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != BEARER_SCHEME or not credential:
        return "malformed"
    # Bytes: compare_digest refuses non-ASCII str, and a header may hold anything.
    if not hmac.compare_digest(credential.encode(), token.encode()):
        return "invalid"
    return None


_MESSAGES = {
    "missing": "this service requires a bearer token (authorization: Bearer TOKEN)",
    "malformed": "the authorization metadata must be exactly one 'Bearer TOKEN'",
    "invalid": "the bearer token is not valid for this service",
}


class AuthMetrics:
    """rbee_auth_rejected_total{cause}: calls refused for want of a valid token."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "rbee_auth_rejected_total",
            "Calls refused UNAUTHENTICATED, by cause (missing, malformed, invalid).",
            ["cause"],
            registry=registry,
        )


class _TokenCheck:
    """The bearer-token check both interceptors make: the handler itself for an exempt method
    or a valid token, else `refusing(handler, message)` (counted by cause)."""

    def __init__(
        self,
        security: ServerSecurity,
        metrics: AuthMetrics | None,
        refusing: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler],
    ) -> None:
        if not security.token:
            raise ValueError("AuthInterceptor needs a token")
        self._security = security
        self._metrics = metrics
        self._refusing = refusing

    def checked(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """`handler` itself when the call may go through, else one that refuses it."""
        if handler is None or self._security.is_exempt(details.method):
            return handler
        problem = bearer_token_problem(details.invocation_metadata, self._security.token)
        if problem is None:
            return handler
        if self._metrics is not None:
            self._metrics.rejected.labels(problem).inc()
        return self._refusing(handler, _MESSAGES[problem])


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without the bearer token, for every handler kind.

    Installed inside the error interceptor: a refused call's handler is replaced by one of the
    same kind that raises Unauthenticated, which the error interceptor turns into the status
    (with ErrorInfo and the request id) and logs without the metadata; the metrics interceptor
    outside counts it. The real handler never runs.
    """

    def __init__(self, security: ServerSecurity, metrics: AuthMetrics | None = None) -> None:
        self._check = _TokenCheck(security, metrics, _refusing_handler)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The real handler for an exempt method or a valid token; else a refusing one."""
        return self._check.checked(await continuation(handler_call_details), handler_call_details)


class ThreadedAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """AuthInterceptor for grpc's sync server (a threaded server): the same check, and
    refusing handlers that are plain functions."""

    def __init__(self, security: ServerSecurity, metrics: AuthMetrics | None = None) -> None:
        self._check = _TokenCheck(security, metrics, _refusing_handler_in_thread)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The real handler for an exempt method or a valid token; else a refusing one."""
        return self._check.checked(continuation(handler_call_details), handler_call_details)


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind (same serializers) that ends every call UNAUTHENTICATED."""

    def refuse() -> NoReturn:
        raise Unauthenticated(message, reason=UNAUTHENTICATED_REASON)

    async def unary_response(_request: Any, _context: Any) -> Any:
        refuse()

    async def stream_response(_request: Any, _context: Any) -> AsyncIterator[Any]:
        refuse()
        yield  # an async generator, so grpc.aio treats it as a response stream

    return rebuilt_handler(
        handler, lambda kind, _: unary_response if kind.endswith("_unary") else stream_response
    )


def _refusing_handler_in_thread(
    handler: grpc.RpcMethodHandler, message: str
) -> grpc.RpcMethodHandler:
    """`_refusing_handler` with plain functions, for the threaded server."""

    def refuse(_request: Any, _context: Any) -> NoReturn:
        raise Unauthenticated(message, reason=UNAUTHENTICATED_REASON)

    def stream_response(_request: Any, _context: Any) -> Iterator[Any]:
        refuse(_request, _context)
        yield  # a generator, like every response stream

    return rebuilt_handler(
        handler, lambda kind, _: refuse if kind.endswith("_unary") else stream_response
    )
