"""CivitAI sources: `civitai:VERSION_ID[:FILENAME]` through the public API (reference §2).

`GET {endpoint}/api/v1/model-versions/{id}` gives the files (name, approximate size, SHA256,
primary flag), the baseModel (recorded as the family hint) and the model's name and type.
The download URL is `{endpoint}/api/download/models/{id}` (plus the file's query filters for a
non-primary file); the transfer sends the CivitAI token to that origin only and follows the
307 to the storage URL. A version that needs a token surfaces there as TOKEN_MISSING /
TOKEN_INVALID (the transfer maps the 401).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any
from urllib.parse import urlencode, urlsplit

from services.catalog.domain import ModelFormat, ModelSource, SourceKind
from services.common.errors import NotFound, Unavailable
from services.provisioner import http
from services.provisioner.domain import (
    AuthScope,
    CivitaiSpec,
    PlannedFile,
    PullOptions,
    RemoteFileInfo,
    Resolution,
)
from services.provisioner.sources.context import SourceContext
from services.provisioner.sources.files import (
    drop_model_suffix,
    format_from_name,
    model_slug,
    quantization_from_name,
    sanitize_filename,
)

TOKEN_SETTING = "CIVITAI_API_TOKEN"
_FORMATS = {"safetensor": ModelFormat.SAFETENSORS, "gguf": ModelFormat.GGUF}


def fetch_version(version_id: int, ctx: SourceContext) -> dict[str, Any]:
    """The model-version JSON; a missing version is NotFound (REMOTE_FILE_NOT_FOUND)."""
    endpoint = ctx.civitai_endpoint.rstrip("/")
    what = f"civitai:{version_id}"
    try:
        data = http.get_json(
            f"{endpoint}/api/v1/model-versions/{version_id}",
            token=ctx.credentials.civitai_token,
            timeout=ctx.timeout,
            what=what,
            token_setting=TOKEN_SETTING,
        )
    except NotFound:
        raise NotFound(
            f"{what}: no such CivitAI model version (or it is unpublished)",
            resource_type="civitai model version",
            resource_name=str(version_id),
            reason="REMOTE_FILE_NOT_FOUND",
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise Unavailable(
            f"{what}: CivitAI answered without a file list", reason="UPSTREAM_UNAVAILABLE"
        )
    return data


def approximate_size(entry: dict[str, Any]) -> int | None:
    size_kb = entry.get("sizeKB")
    if isinstance(size_kb, int | float) and size_kb >= 0:
        return round(size_kb * 1024)
    return None


def file_sha256(entry: dict[str, Any]) -> str | None:
    hashes = entry.get("hashes")
    if isinstance(hashes, dict):
        value = hashes.get("SHA256")
        if isinstance(value, str) and len(value) == 64:
            with contextlib.suppress(ValueError):
                int(value, 16)
                return value.lower()
    return None


def file_format(entry: dict[str, Any]) -> ModelFormat | None:
    metadata = entry.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("format"), str):
        known = _FORMATS.get(metadata["format"].lower())
        if known is not None:
            return known
    name = entry.get("name")
    return format_from_name(name) if isinstance(name, str) else None


def file_quantization(entry: dict[str, Any]) -> str | None:
    metadata = entry.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("quantType"), str):
        return str(metadata["quantType"]).upper()
    name = entry.get("name")
    return quantization_from_name(name) if isinstance(name, str) else None


def _choose(files: list[dict[str, Any]], spec: CivitaiSpec) -> dict[str, Any]:
    named = [f for f in files if isinstance(f.get("name"), str)]
    if spec.filename is not None:
        exact = [f for f in named if f["name"] == spec.filename]
        folded = [f for f in named if f["name"].lower() == spec.filename.lower()]
        if exact or folded:
            return (exact or folded)[0]
        names = ", ".join(f["name"] for f in named[:8]) or "none"
        raise NotFound(
            f"civitai:{spec.version_id} has no file {spec.filename!r} (files: {names})",
            resource_type="remote file",
            resource_name=f"civitai:{spec.version_id}:{spec.filename}",
            reason="REMOTE_FILE_NOT_FOUND",
        )
    primary = [f for f in named if f.get("primary") is True]
    models = [f for f in named if f.get("type") == "Model"]
    chosen = (primary or models or named)[:1]
    if not chosen:
        raise NotFound(
            f"civitai:{spec.version_id} has no downloadable file (archived or taken down?)",
            resource_type="remote file",
            resource_name=f"civitai:{spec.version_id}",
            reason="REMOTE_FILE_NOT_FOUND",
        )
    return chosen[0]


def download_url(endpoint: str, version_id: int, entry: dict[str, Any]) -> str:
    """`{endpoint}/api/download/models/{id}` (+ the file's filters when it is not primary).

    The query comes from the file's own downloadUrl, re-rooted on our endpoint (the API
    builds it from the request host, which may differ behind proxies or in tests).
    """
    base = f"{endpoint.rstrip('/')}/api/download/models/{version_id}"
    if entry.get("primary") is True:
        return base
    query = ""
    raw = entry.get("downloadUrl")
    if isinstance(raw, str):
        query = urlsplit(raw).query
    if not query:
        filters: dict[str, str] = {}
        if isinstance(entry.get("type"), str):
            filters["type"] = entry["type"]
        metadata = entry.get("metadata")
        if isinstance(metadata, dict):
            for key in ("format", "size", "fp"):
                if isinstance(metadata.get(key), str):
                    filters[key] = metadata[key]
        query = urlencode(filters)
    return f"{base}?{query}" if query else base


def resolve_civitai(spec: CivitaiSpec, options: PullOptions, ctx: SourceContext) -> Resolution:
    """Resolve a CivitAI model version to one planned file under <models_dir>/civitai/<id>/."""
    del options  # nothing in the options applies to a single-file version
    data = fetch_version(spec.version_id, ctx)
    files: list[dict[str, Any]] = [f for f in data["files"] if isinstance(f, dict)]
    chosen = _choose(files, spec)
    name = sanitize_filename(str(chosen["name"]))
    base_model = data.get("baseModel") if isinstance(data.get("baseModel"), str) else None
    raw_model = data.get("model")
    model: dict[str, Any] = raw_model if isinstance(raw_model, dict) else {}
    model_name = model.get("name") if isinstance(model.get("name"), str) else ""
    model_id = data.get("modelId") if isinstance(data.get("modelId"), int) else None
    version_name = data.get("name") if isinstance(data.get("name"), str) else ""
    planned = PlannedFile(
        path=name,
        url=download_url(ctx.civitai_endpoint, spec.version_id, chosen),
        dest=ctx.models_dir / "civitai" / str(spec.version_id) / name,
        size=None,  # sizeKB is approximate: the transfer learns the size from the response
        sha256=file_sha256(chosen),
        auth=AuthScope.CIVITAI,
    )
    if planned.sha256 and planned.dest.is_file():
        planned = dataclasses.replace(planned, cached=True)
    infos = [
        RemoteFileInfo(
            path=str(f["name"]),
            size=approximate_size(f),
            sha256=file_sha256(f),
            quantization=file_quantization(f),
            format=file_format(f),
            selected=f is chosen,
            present_bytes=_present(planned) if f is chosen else 0,
        )
        for f in files
        if isinstance(f.get("name"), str)
    ]
    display = " ".join(p for p in (model_name, version_name) if p) or name
    return Resolution(
        source=ModelSource(
            kind=SourceKind.CIVITAI,
            civitai_model_id=model_id,
            civitai_version_id=spec.version_id,
            base_model=base_model,
            files=[name],
        ),
        files=infos,
        planned=[planned],
        model_paths=[str(planned.dest)],
        model_id_hint=model_slug(
            "civitai", str(spec.version_id), model_name or drop_model_suffix(name)
        ),
        display_name=display,
        family_hint=base_model,
    )


def _present(planned: PlannedFile) -> int:
    for candidate in (planned.dest, planned.partial):
        with contextlib.suppress(OSError):
            return candidate.stat().st_size
    return 0
