"""HuggingFace Hub sources: list a repo, choose its files, plan downloads into the HF cache.

huggingface_hub does what it is good at: the repo listing with commit, sizes, git blob ids
and LFS sha256 (`HfApi.model_info(files_metadata=True)`, `list_repo_tree` as a fallback), the
resolve URLs (`hf_hub_url`) and the cache layout names. The endpoint and token are passed
explicitly (no environment variable is read or set here); without a token we pass
`token=False` so a token stored on this machine by other tools is never sent behind the
operator's back.

Cache layout (reference §1.7), shared with huggingface_hub and diffusers:

    <hf_cache>/models--ORG--NAME/blobs/<etag>                 etag: LFS sha256, else git blob sha1
    <hf_cache>/models--ORG--NAME/snapshots/<commit>/<path>    relative symlink to the blob
    <hf_cache>/models--ORG--NAME/refs/<revision>              the commit, for branches and tags
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from services.catalog.domain import ModelSource, SourceKind
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RbeeError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.provisioner import http
from services.provisioner.domain import (
    AuthScope,
    HfSpec,
    PlannedFile,
    PullOptions,
    RemoteFileInfo,
    Resolution,
)
from services.provisioner.sources.context import SourceContext
from services.provisioner.sources.files import (
    choose_gguf,
    drop_model_suffix,
    format_from_name,
    matches_any,
    model_files_hint,
    model_slug,
    quantization_from_name,
    select_diffusers_files,
    select_transformers_files,
    split_set_for,
)
from services.provisioner.sources.spec import (
    SOURCE_FORMS_HINT,
    validate_repo_file,
    validate_revision,
)

TOKEN_SETTING = "HF_TOKEN"
# Connection-level errors of huggingface_hub's HTTP client (httpx or its fork, by version).
_TRANSPORT_ERROR: type[Exception] = HfHubHTTPError.__mro__[1]  # type: ignore[assignment]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ETAG = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


@dataclass(frozen=True)
class HfRepoFile:
    path: str
    size: int | None
    blob_id: str | None  # git blob sha1
    lfs_sha256: str | None

    @property
    def etag(self) -> str | None:
        """The cache blob name huggingface_hub uses: the LFS sha256, else the git blob sha1."""
        return self.lfs_sha256 or self.blob_id


@dataclass(frozen=True)
class HfRepoListing:
    repo: str
    revision: str
    commit: str
    files: list[HfRepoFile]
    gated: bool = False
    pipeline_tag: str | None = None
    library_name: str | None = None
    tags: list[str] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def by_path(self) -> dict[str, HfRepoFile]:
        return {f.path: f for f in self.files}


def repo_folder(ctx: SourceContext, repo: str) -> Path:
    """`<hf_cache>/models--ORG--NAME` (repo ids are validated: no '--', no '..')."""
    return ctx.hf_cache / ("models--" + repo.replace("/", "--"))


def _token_arg(ctx: SourceContext) -> str | bool:
    token = ctx.credentials.hf_token
    return token.get_secret_value() if token is not None else False


def _api(ctx: SourceContext) -> HfApi:
    return HfApi(endpoint=ctx.hf_endpoint.rstrip("/"), token=_token_arg(ctx))


def map_hub_error(exc: BaseException, *, repo: str, revision: str, has_token: bool) -> RbeeError:
    """Turn a huggingface_hub exception into our error; the message never carries a token."""
    if isinstance(exc, GatedRepoError):
        need = "set HF_TOKEN" if not has_token else "use a token that has been granted access"
        return PermissionDenied(
            f"{repo} is a gated repo: request access on its page on the Hub, then {need}",
            reason="GATED_REPO",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        return NotFound(
            f"{repo}: revision {revision!r} not found",
            resource_type="revision",
            resource_name=f"{repo}@{revision}",
            reason="REVISION_NOT_FOUND",
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return NotFound(
            f"{repo}: file not found at {revision!r}",
            resource_type="remote file",
            resource_name=repo,
            reason="REMOTE_FILE_NOT_FOUND",
        )
    if isinstance(exc, RepositoryNotFoundError):
        if has_token and status == 401:
            return Unauthenticated(
                f"{repo}: the Hub rejected the configured token ({TOKEN_SETTING})",
                reason="TOKEN_INVALID",
            )
        hint = "" if has_token else f" (private repos need {TOKEN_SETTING})"
        return NotFound(
            f"{repo}: repository not found on the Hub{hint}",
            resource_type="repo",
            resource_name=repo,
            reason="REPO_NOT_FOUND",
        )
    if isinstance(exc, HfHubHTTPError) and status is not None:
        if status == 401:
            if has_token:
                return Unauthenticated(
                    f"{repo}: the Hub rejected the configured token ({TOKEN_SETTING})",
                    reason="TOKEN_INVALID",
                )
            return Unauthenticated(
                f"{repo}: the Hub requires a token; set {TOKEN_SETTING}", reason="TOKEN_MISSING"
            )
        if status == 403:
            return PermissionDenied(f"{repo}: access denied by the Hub", reason="ACCESS_DENIED")
        if status == 404:
            return NotFound(
                f"{repo}: not found on the Hub",
                resource_type="repo",
                resource_name=repo,
                reason="REPO_NOT_FOUND",
            )
        if status == 429:
            return ResourceExhausted(f"{repo}: rate-limited by the Hub", reason="RATE_LIMITED")
        if status < 500:
            return InvalidArgument(f"{repo}: the Hub refused the request (HTTP {status})")
        return Unavailable(f"{repo}: the Hub failed (HTTP {status})", reason="UPSTREAM_UNAVAILABLE")
    return Unavailable(
        f"{repo}: cannot reach the Hub ({type(exc).__name__})", reason="UPSTREAM_UNAVAILABLE"
    )


def list_repo(repo: str, revision: str, ctx: SourceContext) -> HfRepoListing:
    """The repo at `revision`: its commit and every file with size, blob id and LFS sha256."""
    api = _api(ctx)
    has_token = ctx.credentials.hf_token is not None
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=ctx.timeout)
        commit = info.sha or ""
        if not _COMMIT.match(commit):
            raise Unavailable(
                f"{repo}: the Hub did not return a commit for {revision!r}",
                reason="UPSTREAM_UNAVAILABLE",
            )
        siblings = list(info.siblings or [])
        files: list[HfRepoFile] = []
        if siblings and all(s.size is not None for s in siblings):
            for s in siblings:
                lfs = s.lfs.sha256.lower() if s.lfs is not None and s.lfs.sha256 else None
                files.append(HfRepoFile(s.rfilename, s.size, s.blob_id, lfs))
        else:
            # Older or partial answers: the tree listing at the commit has everything.
            for entry in api.list_repo_tree(repo, recursive=True, revision=commit):
                if isinstance(entry, RepoFile):
                    lfs_sha = entry.lfs.sha256.lower() if entry.lfs is not None else None
                    files.append(HfRepoFile(entry.path, entry.size, entry.blob_id, lfs_sha))
    except RbeeError:
        raise
    except (HfHubHTTPError, OSError, _TRANSPORT_ERROR) as exc:
        raise map_hub_error(exc, repo=repo, revision=revision, has_token=has_token) from None
    gated = bool(info.gated) if info.gated is not None else False
    return HfRepoListing(
        repo=repo,
        revision=revision,
        commit=commit,
        files=sorted(files, key=lambda f: f.path),
        gated=gated,
        pipeline_tag=info.pipeline_tag,
        library_name=info.library_name,
        tags=list(info.tags or []),
    )


def _not_found(repo: str, what: str, listing: HfRepoListing) -> NotFound:
    return NotFound(
        f"{repo}: no file {what!r} at {listing.commit[:12]}; {model_files_hint(listing.paths())}",
        resource_type="remote file",
        resource_name=f"{repo}:{what}",
        reason="REMOTE_FILE_NOT_FOUND",
    )


@dataclass(frozen=True)
class HfSelection:
    paths: list[str]  # in download order
    kind: str  # "gguf", "diffusers", "transformers", "files"
    chosen_file: str = ""
    choice_reason: str = ""


def _model_index_components(listing: HfRepoListing, ctx: SourceContext) -> list[str] | None:
    """The component folders model_index.json lists (one small GET)."""
    url = hf_hub_url(
        listing.repo, "model_index.json", revision=listing.commit, endpoint=ctx.hf_endpoint
    )
    data: Any = http.get_json(
        url,
        token=ctx.credentials.hf_token,
        timeout=ctx.timeout,
        what=f"{listing.repo}:model_index.json",
        token_setting=TOKEN_SETTING,
        max_bytes=1024 * 1024,
    )
    if not isinstance(data, dict):
        return None
    return [
        key
        for key, value in data.items()
        if not key.startswith("_") and isinstance(value, list) and any(v for v in value)
    ]


def select_files(
    spec: HfSpec, options: PullOptions, listing: HfRepoListing, ctx: SourceContext
) -> HfSelection:
    """Which files of the repo a pull of `spec` fetches, and why."""
    paths = listing.paths()
    present = set(paths)
    requested = ([spec.file] if spec.file else []) + list(options.files)
    if requested:
        selected: list[str] = []
        notes: list[str] = []
        for item in requested:
            if item in present:
                group = split_set_for(item, paths) if item.lower().endswith(".gguf") else [item]
                if len(group) > 1:
                    notes.append(
                        f"{item} is part {group.index(item) + 1} of a split model: "
                        f"all {len(group)} parts pulled"
                    )
                matched = group
            elif any(ch in item for ch in "*?["):
                matched = [p for p in paths if matches_any(p, [item])]
            else:
                # A quantization label (hf:org/repo:Q8_0) or a folder of the repo.
                label = item.upper()
                in_folder = [p for p in paths if p.startswith(item.rstrip("/") + "/")]
                by_label = [
                    p
                    for p in paths
                    if p.lower().endswith(".gguf") and quantization_from_name(p) == label
                ]
                if by_label:
                    choice = choose_gguf(by_label, [label])
                    matched = list(choice.candidate.paths) if choice else []
                    notes.append(f"{label}: named in the source")
                elif in_folder:
                    return _select_in_folder(item.rstrip("/"), in_folder, ctx, listing)
                else:
                    matched = []
            if not matched:
                raise _not_found(listing.repo, item, listing)
            selected.extend(p for p in matched if p not in selected)
        first = selected[0]
        return HfSelection(
            selected,
            "files",
            chosen_file=first if notes else "",
            choice_reason="; ".join(notes),
        )
    return _auto_select(paths, options, ctx, listing)


def _select_in_folder(
    folder: str, in_folder: list[str], ctx: SourceContext, listing: HfRepoListing
) -> HfSelection:
    ggufs = [p for p in in_folder if p.lower().endswith(".gguf")]
    if ggufs:
        try:
            choice = choose_gguf(ggufs, ctx.quantization_preference)
        except LookupError as exc:
            raise _ambiguous(listing, str(exc)) from None
        if choice is not None:
            return HfSelection(
                list(choice.candidate.paths), "gguf", choice.candidate.first, choice.reason
            )
    raise _not_found(listing.repo, folder, listing)


def _ambiguous(listing: HfRepoListing, why: str) -> InvalidArgument:
    return InvalidArgument.for_field(
        "source",
        f"{listing.repo}: {why}; name one: hf:{listing.repo}:FILE "
        f"({model_files_hint(listing.paths())}); {SOURCE_FORMS_HINT}",
        reason="INVALID_SOURCE",
    )


def _auto_select(
    paths: list[str], options: PullOptions, ctx: SourceContext, listing: HfRepoListing
) -> HfSelection:
    if "model_index.json" in paths:
        components = _model_index_components(listing, ctx)
        selected = select_diffusers_files(paths, components)
        return HfSelection(selected, "diffusers")
    preference = tuple(options.quantization_preference) or ctx.quantization_preference
    try:
        choice = choose_gguf(paths, preference)
    except LookupError as exc:
        raise _ambiguous(listing, str(exc)) from None
    if choice is not None:
        return HfSelection(
            list(choice.candidate.paths), "gguf", choice.candidate.first, choice.reason
        )
    if "config.json" in paths:
        return HfSelection(select_transformers_files(paths), "transformers")
    singles = [p for p in paths if p.lower().endswith(".safetensors")]
    if len(singles) == 1:
        return HfSelection(singles, "files", singles[0], "the only safetensors file in the repo")
    if not singles:
        raise _ambiguous(listing, "no GGUF, safetensors, diffusers or transformers model found")
    raise _ambiguous(listing, f"the repo holds {len(singles)} safetensors files")


def write_ref(ctx: SourceContext, repo: str, revision: str, commit: str) -> None:
    """refs/<revision> = commit, atomically (what huggingface_hub writes after a download)."""
    if _COMMIT.match(revision):
        return  # a commit is its own ref
    validate_revision(revision)  # never joined raw: checked again, it is a path below
    ref = repo_folder(ctx, repo) / "refs" / revision
    try:
        if ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ref-", dir=ref.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(commit)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, ref)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise Unavailable(
            f"cannot write the HF cache ref for {repo}: {exc.strerror or exc}",
            reason="UNAVAILABLE",
        ) from None


def _planned(listing: HfRepoListing, paths: Sequence[str], ctx: SourceContext) -> list[PlannedFile]:
    folder = repo_folder(ctx, listing.repo)
    files = listing.by_path()
    planned = []
    for path in paths:
        validate_repo_file(path)  # listing paths come from the network: never trust them raw
        info = files[path]
        etag = (info.etag or "").lower()
        if not _ETAG.match(etag):
            raise Unavailable(
                f"{listing.repo}: the Hub listed {path} without a usable blob id",
                reason="UPSTREAM_UNAVAILABLE",
            )
        dest = folder / "blobs" / etag
        cached = info.size is not None and dest.is_file() and dest.stat().st_size == info.size
        planned.append(
            PlannedFile(
                path=path,
                url=hf_hub_url(
                    listing.repo, path, revision=listing.commit, endpoint=ctx.hf_endpoint
                ),
                dest=dest,
                size=info.size,
                sha256=info.lfs_sha256,
                link=folder / "snapshots" / listing.commit / path,
                auth=AuthScope.HUGGINGFACE,
                cached=cached,
            )
        )
    return planned


def resolve_config_files(
    repo: str, patterns: Sequence[str], ctx: SourceContext, *, revision: str = "main"
) -> list[PlannedFile]:
    """The files of `repo` at `revision` matching `patterns` (fnmatch, as huggingface_hub's
    allow_patterns), planned into the HF cache, with the revision's ref written so that
    huggingface_hub's cache lookups find the snapshot: e.g. the configs and tokenizers a
    single-file checkpoint is loaded with (never weights). NotFound when none matches."""
    listing = list_repo(repo, revision, ctx)
    paths = [p for p in listing.paths() if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    if not paths:
        raise _not_found(repo, f"no file matching {', '.join(patterns)}", listing)
    planned = _planned(listing, paths, ctx)
    write_ref(ctx, repo, revision, listing.commit)
    return planned


def check_access(planned: PlannedFile, ctx: SourceContext, repo: str) -> None:
    """A gated repo lists publicly but serves files only to granted tokens: ask now (one HEAD,
    no redirect followed) so the pull fails at RESOLVING with GATED_REPO, not mid-download."""
    token = ctx.credentials.hf_token
    with http.open_url(
        planned.url, method="HEAD", token=token, timeout=ctx.timeout, follow_redirects=False
    ) as resp:
        if resp.status in http.REDIRECT_STATUSES:
            return
        http.raise_for_status(resp, what=repo, token=token, token_setting=TOKEN_SETTING)


def resolve_hf(
    spec: HfSpec, options: PullOptions, ctx: SourceContext, *, write_refs: bool = True
) -> Resolution:
    """Resolve a Hub source to the files to fetch into the HF cache (nothing is downloaded)."""
    revision = _revision(spec, options)
    listing = list_repo(spec.repo, revision, ctx)
    selection = select_files(spec, options, listing, ctx)
    planned = _planned(listing, selection.paths, ctx)
    if listing.gated and planned:
        check_access(planned[0], ctx, spec.repo)
    selected = set(selection.paths)
    snapshot = repo_folder(ctx, spec.repo) / "snapshots" / listing.commit
    files = [
        RemoteFileInfo(
            path=f.path,
            size=f.size,
            sha256=f.lfs_sha256,
            quantization=quantization_from_name(f.path) if f.path.endswith(".gguf") else None,
            format=format_from_name(f.path),
            selected=f.path in selected,
            present_bytes=_present_bytes(p) if (p := _plan_for(planned, f.path)) else 0,
        )
        for f in listing.files
    ]
    if selection.kind in ("diffusers", "transformers"):
        model_paths = [str(snapshot)]
    else:
        model_paths = [str(snapshot / selection.paths[0])]
    name = spec.repo.split("/", 1)[1]
    label = quantization_from_name(selection.chosen_file) if selection.chosen_file else None
    if selection.kind == "files" and len(selection.paths) >= 1 and not label:
        label = quantization_from_name(selection.paths[0])
    hint = model_slug(drop_model_suffix(name), label)
    if write_refs:
        write_ref(ctx, spec.repo, revision, listing.commit)
    return Resolution(
        source=ModelSource(
            kind=SourceKind.HUGGINGFACE,
            repo=spec.repo,
            revision=revision,
            commit=listing.commit,
            files=list(selection.paths),
        ),
        files=files,
        planned=planned,
        model_paths=model_paths,
        model_id_hint=hint,
        display_name=spec.repo + (f" {label}" if label else ""),
        chosen_file=selection.chosen_file,
        choice_reason=selection.choice_reason,
    )


def _plan_for(planned: Sequence[PlannedFile], path: str) -> PlannedFile | None:
    return next((p for p in planned if p.path == path), None)


def _present_bytes(planned: PlannedFile) -> int:
    for candidate in (planned.dest, planned.partial):
        with contextlib.suppress(OSError):
            return candidate.stat().st_size
    return 0


def _revision(spec: HfSpec, options: PullOptions) -> str:
    if spec.revision and options.revision and spec.revision != options.revision:
        raise InvalidArgument.for_field(
            "options.revision",
            f"the source names revision {spec.revision!r} and the options {options.revision!r}",
        )
    revision = spec.revision or options.revision or "main"
    return validate_revision(revision)
