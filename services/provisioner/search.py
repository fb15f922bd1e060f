"""Search the HuggingFace Hub and CivitAI before pulling (the seeds' marketplace).

HF: `GET {hf}/api/models?search=&filter=&pipeline_tag=&sort=&direction=-1&limit=&full=true`,
paginated by the `Link: <...cursor=...>; rel="next"` header. CivitAI:
`GET {civitai}/api/v1/models?query=&types=&baseModels=&sort=&limit=&cursor=`, paginated by
`metadata.nextCursor`. Our page token wraps the upstream cursor together with a fingerprint
of the query, so a token is only accepted for the query that produced it; anything else is
InvalidArgument (INVALID_PAGE_TOKEN).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from services.catalog.domain import SourceKind
from services.common.errors import InvalidArgument, Unavailable
from services.provisioner import http
from services.provisioner.domain import (
    RemoteFileInfo,
    SearchHit,
    SearchPage,
    SearchQuery,
    SearchSort,
)
from services.provisioner.sources.civitai import (
    approximate_size,
    file_format,
    file_quantization,
    file_sha256,
)
from services.provisioner.sources.context import SourceContext
from services.provisioner.sources.files import format_from_name, quantization_from_name

MAX_PAGE_SIZE = 100
MAX_FILES_PER_HIT = 50
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_HF_SORT = {
    SearchSort.DOWNLOADS: "downloads",
    SearchSort.LIKES: "likes",
    SearchSort.UPDATED: "lastModified",
}
_CIVITAI_SORT = {
    SearchSort.DOWNLOADS: "Most Downloaded",
    SearchSort.LIKES: "Highest Rated",
    SearchSort.UPDATED: "Newest",
}
_CIVITAI_IMAGE_TYPES = ("Checkpoint",)


def _fingerprint(query: SearchQuery) -> str:
    key = json.dumps(
        [query.source.value, query.query, query.format, query.task, query.family, query.sort],
        default=str,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_page_token(query: SearchQuery, cursor: str) -> str:
    """An opaque token: the upstream cursor plus the query's fingerprint."""
    raw = json.dumps({"v": 1, "q": _fingerprint(query), "c": cursor}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(query: SearchQuery) -> str | None:
    """The upstream cursor in `query.page_token` (None for the first page)."""
    token = query.page_token
    if not token:
        return None
    invalid = InvalidArgument.for_field(
        "page_token",
        "not a page token from a previous search with the same query",
        reason="INVALID_PAGE_TOKEN",
    )
    if len(token) > 4096:
        raise invalid
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid from None
    if (
        not isinstance(data, dict)
        or data.get("v") != 1
        or data.get("q") != _fingerprint(query)
        or not isinstance(data.get("c"), str)
        or not data["c"]
    ):
        raise invalid
    return str(data["c"])


def search(query: SearchQuery, ctx: SourceContext) -> SearchPage:
    """One page of search results from the Hub or CivitAI (blocking)."""
    if not 0 <= query.page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument.for_field("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    if query.source is SourceKind.HUGGINGFACE:
        return _search_hf(query, ctx)
    if query.source is SourceKind.CIVITAI:
        return _search_civitai(query, ctx)
    raise InvalidArgument.for_field("source", "search covers the HuggingFace Hub and CivitAI")


def _get_json_with_headers(
    url: str, ctx: SourceContext, token: Any, what: str, token_setting: str
) -> tuple[Any, str]:
    with http.open_url(
        url, headers={"Accept": "application/json"}, token=token, timeout=ctx.timeout
    ) as resp:
        http.raise_for_status(resp, what=what, token=token, token_setting=token_setting)
        body = resp.read(32 * 1024 * 1024)
        link = resp.header("Link")
    try:
        return json.loads(body), link
    except ValueError:
        raise Unavailable(
            f"{what}: invalid JSON from the upstream", reason="UPSTREAM_UNAVAILABLE"
        ) from None


def _search_hf(query: SearchQuery, ctx: SourceContext) -> SearchPage:
    cursor = decode_page_token(query)
    params: list[tuple[str, str]] = [("full", "true"), ("cardData", "true")]
    if query.query:
        params.append(("search", query.query))
    if query.format is not None:
        params.append(("filter", query.format.value))
    if query.family:
        params.append(("filter", query.family))
    if query.task:
        params.append(("pipeline_tag", query.task))
    if query.sort in _HF_SORT:
        params += [("sort", _HF_SORT[query.sort]), ("direction", "-1")]
    params.append(("limit", str(query.page_size or 20)))
    if cursor is not None:
        params.append(("cursor", cursor))
    url = f"{ctx.hf_endpoint.rstrip('/')}/api/models?{urlencode(params)}"
    data, link = _get_json_with_headers(
        url, ctx, ctx.credentials.hf_token, "HuggingFace search", "HF_TOKEN"
    )
    if not isinstance(data, list):
        raise Unavailable("HuggingFace search: unexpected answer", reason="UPSTREAM_UNAVAILABLE")
    hits = [
        _hf_hit(item) for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]
    next_token = ""
    match = _LINK_NEXT.search(link or "")
    if match:
        next_cursor = parse_qs(urlsplit(match.group(1)).query).get("cursor", [""])[0]
        if next_cursor:
            next_token = encode_page_token(query, next_cursor)
    return SearchPage(hits=hits, next_page_token=next_token)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _date(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _hf_hit(item: dict[str, Any]) -> SearchHit:
    repo = str(item["id"])
    files = []
    for sibling in item.get("siblings") or []:
        name = sibling.get("rfilename") if isinstance(sibling, dict) else None
        if isinstance(name, str) and name.lower().endswith((".gguf", ".safetensors")):
            files.append(
                RemoteFileInfo(
                    path=name,
                    size=sibling.get("size") if isinstance(sibling.get("size"), int) else None,
                    quantization=quantization_from_name(name) if name.endswith(".gguf") else None,
                    format=format_from_name(name),
                )
            )
    card = _obj(item.get("cardData"))
    tags = [t for t in item.get("tags") or [] if isinstance(t, str)]
    license_ = card.get("license") if isinstance(card.get("license"), str) else ""
    if not license_:
        license_ = next((t.split(":", 1)[1] for t in tags if t.startswith("license:")), "")
    return SearchHit(
        source=f"hf:{repo}",
        kind=SourceKind.HUGGINGFACE,
        id=repo,
        display_name=repo.split("/", 1)[-1],
        author=repo.split("/", 1)[0] if "/" in repo else "",
        files=files[:MAX_FILES_PER_HIT],
        downloads=int(item.get("downloads") or 0),
        likes=int(item.get("likes") or 0),
        license=license_,
        task=str(item.get("pipeline_tag") or ""),
        tags=tags,
        gated=bool(item.get("gated")),
        updated_at=_date(item.get("lastModified")),
    )


def _search_civitai(query: SearchQuery, ctx: SourceContext) -> SearchPage:
    cursor = decode_page_token(query)
    params: list[tuple[str, str]] = [("limit", str(query.page_size or 20))]
    if query.query:
        params.append(("query", query.query))
    if query.task == "text-to-image":
        params += [("types", t) for t in _CIVITAI_IMAGE_TYPES]
    if query.family:
        params.append(("baseModels", query.family))
    if query.sort in _CIVITAI_SORT:
        params.append(("sort", _CIVITAI_SORT[query.sort]))
    if cursor is not None:
        params.append(("cursor", cursor))
    url = f"{ctx.civitai_endpoint.rstrip('/')}/api/v1/models?{urlencode(params)}"
    data, _ = _get_json_with_headers(
        url, ctx, ctx.credentials.civitai_token, "CivitAI search", "CIVITAI_API_TOKEN"
    )
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise Unavailable("CivitAI search: unexpected answer", reason="UPSTREAM_UNAVAILABLE")
    hits = [h for item in items if isinstance(item, dict) and (h := _civitai_hit(item, query))]
    metadata = _obj(data.get("metadata"))
    next_cursor = metadata.get("nextCursor")
    next_token = ""
    if isinstance(next_cursor, str | int) and str(next_cursor):
        next_token = encode_page_token(query, str(next_cursor))
    return SearchPage(hits=hits, next_page_token=next_token)


def _civitai_hit(item: dict[str, Any], query: SearchQuery) -> SearchHit | None:
    model_id = item.get("id")
    versions = [v for v in item.get("modelVersions") or [] if isinstance(v, dict)]
    if not isinstance(model_id, int) or not versions:
        return None
    version = versions[0]  # the newest
    version_id = version.get("id")
    if not isinstance(version_id, int):
        return None
    files = [
        RemoteFileInfo(
            path=str(f["name"]),
            size=approximate_size(f),
            sha256=file_sha256(f),
            quantization=file_quantization(f),
            format=file_format(f),
            selected=f.get("primary") is True,
        )
        for f in version.get("files") or []
        if isinstance(f, dict) and isinstance(f.get("name"), str)
    ]
    if query.format is not None and not any(f.format == query.format for f in files):
        return None
    stats = _obj(item.get("stats"))
    creator = _obj(item.get("creator"))
    model_type = str(item.get("type") or "")
    return SearchHit(
        source=f"civitai:{version_id}",
        kind=SourceKind.CIVITAI,
        id=str(model_id),
        display_name=str(item.get("name") or ""),
        author=str(creator.get("username") or ""),
        files=files[:MAX_FILES_PER_HIT],
        downloads=int(stats.get("downloadCount") or 0),
        likes=int(stats.get("thumbsUpCount") or 0),
        license=_civitai_license(item),
        task="text-to-image" if model_type == "Checkpoint" else "",
        base_model=str(version.get("baseModel") or ""),
        civitai_type=model_type,
        civitai_version_id=version_id,
        tags=[t for t in item.get("tags") or [] if isinstance(t, str)],
    )


def _civitai_license(item: dict[str, Any]) -> str:
    """CivitAI has no SPDX license: summarise its permission flags."""
    commercial = item.get("allowCommercialUse")
    if isinstance(commercial, list):
        return "commercial use: " + (", ".join(str(c) for c in commercial) or "none")
    if isinstance(commercial, str):
        return f"commercial use: {commercial}"
    return ""
