"""The provisioner's one HTTP seam: blocking requests over http.client, redirects by hand.

Why not a client library: the transfer needs large `readinto` reads straight into its buffers
(about 1 GB/s on loopback), per-chunk cancellation, and exact control over which hop carries the
token. The rules, in one place:

- Redirects (301, 302, 303, 307, 308) are followed up to `max_redirects`; the bearer token is
  sent only to the host (scheme, host, port) of the first URL, never to a redirect target on
  another origin (a CDN or signed storage URL carries its own authorisation).
- Every URL that may appear in a log or an error goes through `redact_url` first: no userinfo,
  no query string (signed URLs and `?token=` forms carry secrets there).
- `raise_for_status` is the one place that turns upstream HTTP statuses into our errors.

Callers run these functions in threads (`asyncio.to_thread`): they block.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from pydantic import SecretStr

from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RbeeError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

USER_AGENT = "rbee-provisioner/0.1 (+https://github.com/rbee; python http.client)"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_TIMEOUT = 30.0


def redact_url(url: str) -> str:
    """The URL without userinfo, query or fragment: safe for logs and error messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


@dataclass
class HttpResponse:
    """An open response: read the body with `readinto`/`read`, then `close()`.

    `url` is the final URL after redirects (secret-bearing: redact before showing it).
    """

    status: int
    headers: Message
    url: str
    _conn: http.client.HTTPConnection
    _resp: http.client.HTTPResponse

    def header(self, name: str, default: str = "") -> str:
        value = self.headers.get(name)
        return default if value is None else str(value)

    def readinto(self, buf: memoryview) -> int:
        return self._resp.readinto(buf)

    def read(self, n: int = -1) -> bytes:
        return self._resp.read(n) if n >= 0 else self._resp.read()

    def close(self) -> None:
        try:
            self._resp.close()
        finally:
            self._conn.close()

    def set_read_timeout(self, seconds: float | None) -> None:
        """Bound every later socket read: a body that stalls this long raises `TimeoutError`.

        `open_url`'s timeout covers the connect and the response headers; a long download sets
        its own stall limit for the body with this.
        """
        sock = self._conn.sock
        if sock is not None:
            sock.settimeout(seconds)

    def shutdown(self) -> None:
        """Abort the transfer from another thread: the blocked read returns or raises at once."""
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HttpResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"unsupported URL scheme {parts.scheme!r} in {redact_url(url)}")
    host = parts.hostname or ""
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    return http.client.HTTPConnection(host, parts.port, timeout=timeout)


def open_url(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    token: SecretStr | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_redirects: int = 10,
    follow_redirects: bool = True,
) -> HttpResponse:
    """Send one request, following redirects; returns the final response whatever its status.

    Connection failures raise `Unavailable` (UPSTREAM_UNAVAILABLE) with the redacted URL.
    """
    first_origin = origin(url)
    current = url
    for _ in range(max_redirects + 1):
        send = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
        if token is not None and origin(current) == first_origin:
            send["Authorization"] = f"Bearer {token.get_secret_value()}"
        parts = urlsplit(current)
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn = _connect(current, timeout)
        try:
            conn.request(method, target, headers=send)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Unavailable(
                f"cannot reach {redact_url(current)}: {_describe(exc)}",
                reason="UPSTREAM_UNAVAILABLE",
            ) from None
        if follow_redirects and resp.status in REDIRECT_STATUSES and resp.getheader("Location"):
            location = resp.getheader("Location") or ""
            resp.read()  # drain the (small) redirect body so the connection closes cleanly
            conn.close()
            current = urljoin(current, location)
            if resp.status == 303:
                method = "GET"
            continue
        return HttpResponse(resp.status, resp.msg, current, conn, resp)
    raise Unavailable(f"too many redirects from {redact_url(url)}", reason="UPSTREAM_UNAVAILABLE")


def get_json(
    url: str,
    *,
    token: SecretStr | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "",
    token_setting: str = "",
    max_bytes: int = 32 * 1024 * 1024,
) -> Any:
    """GET a JSON document; non-2xx statuses raise through `raise_for_status`."""
    with open_url(
        url, headers={"Accept": "application/json", **(headers or {})}, token=token, timeout=timeout
    ) as resp:
        label = what or redact_url(url)
        raise_for_status(resp, what=label, token=token, token_setting=token_setting)
        body = resp.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise Unavailable(
            f"{what or redact_url(url)}: the response is larger than {max_bytes} bytes",
            reason="UPSTREAM_UNAVAILABLE",
        )
    try:
        return json.loads(body)
    except ValueError:
        raise Unavailable(
            f"{what or redact_url(url)}: the upstream answered with invalid JSON",
            reason="UPSTREAM_UNAVAILABLE",
        ) from None


def _error_text(resp: HttpResponse) -> str:
    """A short upstream explanation: X-Error-Message, or the JSON body's error/message."""
    message = resp.header("X-Error-Message")
    if message:
        return message[:300]
    try:
        body = resp.read(64 * 1024)
        data = json.loads(body)
    except (ValueError, OSError, http.client.HTTPException):
        return ""
    if isinstance(data, dict):
        parts = [str(data[k]) for k in ("error", "message") if isinstance(data.get(k), str)]
        return ": ".join(parts)[:300]
    return ""


def raise_for_status(
    resp: HttpResponse,
    *,
    what: str,
    token: SecretStr | None,
    token_setting: str = "",
) -> None:
    """Map a non-2xx upstream status to our error (the message never carries a secret).

    `what` names the thing asked for ("org/repo", "model.gguf", a redacted URL); `token_setting`
    names the setting that holds the token (HF_TOKEN, CIVITAI_API_TOKEN) for the hint.
    """
    status = resp.status
    if 200 <= status < 300:
        return
    detail = _error_text(resp)
    suffix = f" ({detail})" if detail else ""
    code = resp.header("X-Error-Code")
    error: RbeeError
    if code == "GatedRepo":
        error = PermissionDenied(
            f"{what} is a gated repo and this token has not been granted access; request "
            f"access on the repo's page, then set {token_setting or 'the token'}{suffix}",
            reason="GATED_REPO",
        )
    elif code == "RepoNotFound":
        hint = "" if token is not None else f" (private repos need {token_setting or 'a token'})"
        error = NotFound(
            f"{what}: repository not found{hint}{suffix}",
            resource_type="repo",
            resource_name=what,
            reason="REPO_NOT_FOUND",
        )
    elif code == "RevisionNotFound":
        error = NotFound(
            f"{what}: revision not found{suffix}",
            resource_type="revision",
            resource_name=what,
            reason="REVISION_NOT_FOUND",
        )
    elif status == 401:
        if token is None:
            error = Unauthenticated(
                f"{what}: the upstream requires a token and none is configured; set "
                f"{token_setting or 'a token'}{suffix}",
                reason="TOKEN_MISSING",
            )
        else:
            error = Unauthenticated(
                f"{what}: the upstream rejected the configured token "
                f"({token_setting or 'token'}){suffix}",
                reason="TOKEN_INVALID",
            )
    elif status == 403:
        error = PermissionDenied(
            f"{what}: access denied by the upstream{suffix}", reason="ACCESS_DENIED"
        )
    elif status in (404, 410):
        error = NotFound(
            f"{what}: not found upstream (HTTP {status}){suffix}",
            resource_type="remote file",
            resource_name=what,
            reason="REMOTE_FILE_NOT_FOUND",
        )
    elif status == 429:
        retry_after = resp.header("Retry-After")
        error = ResourceExhausted(
            f"{what}: rate-limited by the upstream (HTTP 429)"
            + (f", retry after {retry_after} s" if retry_after.isdigit() else "")
            + suffix,
            reason="RATE_LIMITED",
        )
    elif status >= 500:
        error = Unavailable(
            f"{what}: the upstream failed (HTTP {status}){suffix}", reason="UPSTREAM_UNAVAILABLE"
        )
    else:
        error = InvalidArgument(f"{what}: the upstream refused the request (HTTP {status}){suffix}")
    raise error


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
