"""Plain `http(s)://` sources: one file, its size and name from a HEAD (or a 1-byte GET).

No expected sha256 (the transfer records the one it computes). The file lands in
`<models_dir>/url/<16 hex of sha256(url)>/<name>`: the URL (with its query) picks the folder,
so two URLs never share a destination, and the name stays readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from email.message import Message
from urllib.parse import unquote, urlsplit

from services.catalog.domain import ModelSource, SourceKind
from services.provisioner import http
from services.provisioner.domain import (
    AuthScope,
    PlannedFile,
    PullOptions,
    RemoteFileInfo,
    Resolution,
    UrlSpec,
)
from services.provisioner.sources.context import SourceContext
from services.provisioner.sources.files import (
    drop_model_suffix,
    format_from_name,
    model_slug,
    quantization_from_name,
    sanitize_filename,
)

_CONTENT_RANGE_TOTAL = re.compile(r"^bytes\s+(?:\d+-\d+|\*)/(\d+)$")


def filename_from_disposition(value: str) -> str | None:
    """The file name of a Content-Disposition header (RFC 6266 `filename*` first)."""
    if not value:
        return None
    message = Message()
    message["content-disposition"] = value
    name = message.get_filename()
    return str(name) if name else None


def total_from_content_range(value: str) -> int | None:
    match = _CONTENT_RANGE_TOTAL.match(value.strip())
    return int(match.group(1)) if match else None


def auth_scope_for(url: str, ctx: SourceContext) -> AuthScope:
    """A URL on the configured Hub or CivitAI origin may carry that service's token."""
    target = http.origin(url)
    if target == http.origin(ctx.hf_endpoint):
        return AuthScope.HUGGINGFACE
    if target == http.origin(ctx.civitai_endpoint):
        return AuthScope.CIVITAI
    return AuthScope.NONE


def probe(url: str, ctx: SourceContext, auth: AuthScope) -> tuple[int | None, str | None]:
    """(size, file name from Content-Disposition) from a HEAD, else a `Range: bytes=0-0` GET."""
    token = ctx.credentials.token_for(auth)
    what = http.redact_url(url)
    with http.open_url(url, method="HEAD", token=token, timeout=ctx.timeout) as resp:
        if resp.status not in (405, 501, 403):
            http.raise_for_status(resp, what=what, token=token)
            size_text = resp.header("Content-Length")
            name = filename_from_disposition(resp.header("Content-Disposition"))
            if size_text.isdigit():
                return int(size_text), name
    headers = {"Range": "bytes=0-0"}
    with http.open_url(url, headers=headers, token=token, timeout=ctx.timeout) as resp:
        http.raise_for_status(resp, what=what, token=token)
        name = filename_from_disposition(resp.header("Content-Disposition"))
        if resp.status == 206:
            return total_from_content_range(resp.header("Content-Range")), name
        size_text = resp.header("Content-Length")
        return (int(size_text) if size_text.isdigit() else None), name


def resolve_url(spec: UrlSpec, options: PullOptions, ctx: SourceContext) -> Resolution:
    """Resolve a plain URL to one planned file (a HEAD request, nothing downloaded)."""
    del options
    auth = auth_scope_for(spec.url, ctx)
    size, disposition_name = probe(spec.url, ctx, auth)
    path_name = unquote(urlsplit(spec.url).path.rsplit("/", 1)[-1])
    name = sanitize_filename(disposition_name or path_name)
    folder = hashlib.sha256(spec.url.encode("utf-8")).hexdigest()[:16]
    dest = ctx.models_dir / "url" / folder / name
    cached = size is not None and dest.is_file() and dest.stat().st_size == size
    planned = PlannedFile(path=name, url=spec.url, dest=dest, size=size, auth=auth, cached=cached)
    present = 0
    for candidate in (dest, planned.partial):
        with contextlib.suppress(OSError):
            present = candidate.stat().st_size
            break
    return Resolution(
        # The catalog keeps the URL without its query: signed URLs carry credentials there.
        source=ModelSource(kind=SourceKind.URL, url=http.redact_url(spec.url), files=[name]),
        files=[
            RemoteFileInfo(
                path=name,
                size=size,
                quantization=quantization_from_name(name),
                format=format_from_name(name),
                selected=True,
                present_bytes=present,
            )
        ],
        planned=[planned],
        model_paths=[str(dest)],
        model_id_hint=model_slug(drop_model_suffix(name), quantization_from_name(name)),
        display_name=name,
    )
