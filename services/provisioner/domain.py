"""The provisioner's domain types: plain dataclasses and pydantic models, no grpc, no protobuf.

`convert.py` is the only place that maps these to and from `rbee.provisioner.v1` messages.

The flow of a pull, and the type at each step:

    "hf:org/repo:f.gguf"  -- sources.spec.parse_source -->  SourceSpec (HfSpec | ...)
    SourceSpec            -- sources.<kind>.resolve ---->  Resolution (PlannedFile per file)
    PlannedFile           -- transfer.download_file --->  FileResult (sha256, size), in place
    Resolution            -- catalog UpdateModel ------->  the catalog model, READY
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr

from services.catalog.domain import ModelFormat, ModelSource, SourceKind
from services.catalog.ids import model_id_for_source

# --- source strings, parsed -------------------------------------------------------------------


@dataclass(frozen=True)
class HfSpec:
    """`hf:ORG/REPO[:FILE][@REVISION]` or the bare `ORG/REPO[:FILE]`."""

    repo: str
    file: str | None = None
    revision: str | None = None  # None: "main"


@dataclass(frozen=True)
class CivitaiSpec:
    """`civitai:VERSION_ID[:FILENAME]`."""

    version_id: int
    filename: str | None = None


@dataclass(frozen=True)
class UrlSpec:
    """A plain `http(s)://` file (never with credentials in it: the parser refuses them)."""

    url: str


@dataclass(frozen=True)
class LocalSpec:
    """`file:PATH` or an absolute path, registered in place (or copied when asked)."""

    path: Path


SourceSpec = HfSpec | CivitaiSpec | UrlSpec | LocalSpec


# --- credentials ------------------------------------------------------------------------------


class AuthScope(enum.StrEnum):
    """Which token a request may carry. The transfer adds it only on the first host."""

    NONE = "none"
    HUGGINGFACE = "huggingface"
    CIVITAI = "civitai"


@dataclass(frozen=True)
class Credentials:
    """The upstream tokens, from settings. Never logged, never stored, never in errors."""

    hf_token: SecretStr | None = None
    civitai_token: SecretStr | None = None

    def token_for(self, scope: AuthScope) -> SecretStr | None:
        if scope is AuthScope.HUGGINGFACE:
            return self.hf_token
        if scope is AuthScope.CIVITAI:
            return self.civitai_token
        return None


# --- resolution -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFileInfo:
    """One file of a remote repo or model version, as listings and search show it."""

    path: str  # within the repo, or the file name
    size: int | None = None
    sha256: str | None = None  # lowercase hex, as the source publishes it
    quantization: str | None = None  # read from the name (Q4_K_M, ...)
    format: ModelFormat | None = None  # guessed from the name
    selected: bool = False  # a pull of this source would fetch it
    present_bytes: int = 0  # already on the hive (cache or partial)


@dataclass(frozen=True)
class PlannedFile:
    """One file a pull fetches: where from, what it must be, where it lands."""

    path: str  # within the repo, or the file name (what progress shows)
    url: str  # the first URL to GET; redirects are followed by the transfer
    dest: Path  # final absolute path of the bytes (HF: the cache blob; else under RBEE_HOME)
    size: int | None = None  # expected bytes; None when the source does not say
    sha256: str | None = None  # expected lowercase hex; None when the source publishes none
    link: Path | None = None  # HF: the snapshot path, a relative symlink to `dest`
    auth: AuthScope = AuthScope.NONE
    cached: bool = False  # `dest` is already complete and verified: nothing to transfer

    @property
    def partial(self) -> Path:
        """Where the bytes accumulate until complete and verified (kept for resume)."""
        return self.dest.with_name(self.dest.name + ".partial")

    def partial_bytes(self) -> int:
        """Bytes in the partial file; 0 when there is none."""
        try:
            return self.partial.stat().st_size
        except OSError:
            return 0


@dataclass(frozen=True)
class Resolution:
    """What a source resolves to: the files to fetch and what to register."""

    source: ModelSource  # resolved coordinates (commit, files, civitai ids, url, path)
    files: list[RemoteFileInfo]  # every file of the repo / version, `selected` marked
    planned: list[PlannedFile]  # the selected files, in download order
    model_paths: list[str]  # what the catalog registers (GGUF first shard, folder, file)
    model_id_hint: str  # a readable slug for the catalog id (the catalog keeps it unique)
    display_name: str = ""
    chosen_file: str = ""  # set when a file was chosen automatically
    choice_reason: str = ""
    family_hint: str | None = None  # CivitAI baseModel

    @property
    def total_bytes(self) -> int:
        return sum(p.size or 0 for p in self.planned)

    def model_id(self, requested: str = "") -> str:
        """The catalog id a pull of this resolution creates: `requested` when given, else the
        readable hint made unique by the source's hash (so ResolveSource predicts what
        PullModel creates, and a repo of many files is not named after its first file)."""
        return requested or model_id_for_source(self.source, self.model_id_hint)

    @property
    def kind(self) -> SourceKind:
        return self.source.kind


# --- transfer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileResult:
    """A completed, verified file."""

    path: str
    dest: Path
    size: int
    sha256: str  # lowercase hex, computed while streaming (or over the reused partial)
    transferred: int  # bytes actually fetched over the network in this run (0 when cached)


# --- search -----------------------------------------------------------------------------------


class SearchSort(enum.StrEnum):
    RELEVANCE = "relevance"
    DOWNLOADS = "downloads"
    LIKES = "likes"
    UPDATED = "updated"


@dataclass(frozen=True)
class SearchQuery:
    source: SourceKind  # HUGGINGFACE or CIVITAI
    query: str = ""
    format: ModelFormat | None = None
    task: str = ""  # text-generation, text-to-image
    family: str = ""  # HF: a tag; CivitAI: a baseModel ("SDXL 1.0")
    sort: SearchSort = SearchSort.RELEVANCE
    page_size: int = 20
    page_token: str = ""


@dataclass(frozen=True)
class SearchHit:
    source: str  # a source string that pulls it: "hf:org/repo", "civitai:12345"
    kind: SourceKind
    id: str  # repo id or CivitAI model id
    display_name: str = ""
    author: str = ""
    files: list[RemoteFileInfo] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0
    license: str = ""
    task: str = ""
    base_model: str = ""
    civitai_type: str = ""
    civitai_version_id: int | None = None
    tags: list[str] = field(default_factory=list)
    gated: bool = False
    updated_at: datetime | None = None


@dataclass(frozen=True)
class SearchPage:
    hits: list[SearchHit]
    next_page_token: str = ""


# --- pulls (jobs) -----------------------------------------------------------------------------


class PullState(enum.StrEnum):
    QUEUED = "queued"
    RESOLVING = "resolving"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    REGISTERING = "registering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"

    @property
    def terminal(self) -> bool:
        return self in (PullState.SUCCEEDED, PullState.FAILED, PullState.CANCELLED)

    @property
    def running(self) -> bool:
        return not self.terminal and self is not PullState.PAUSED


class PullFileState(enum.StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    DONE = "done"
    CACHED = "cached"
    FAILED = "failed"


class PullOptions(BaseModel):
    """How a pull runs (every field optional)."""

    revision: str = ""
    files: list[str] = Field(default_factory=list)
    quantization_preference: list[str] = Field(default_factory=list)
    copy_files: bool = False  # local sources: copy into RBEE_HOME instead of in place
    bandwidth_limit: int = 0  # bytes per second, 0 = unlimited
    force: bool = False
    validate_only: bool = False
    model_id: str = ""
    display_name: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class PullFileRecord(BaseModel):
    path: str
    state: PullFileState = PullFileState.PENDING
    done: int = 0
    total: int | None = None
    expected_sha256: str = ""
    sha256: str = ""
    local_path: str = ""
    partial_path: str = ""  # where the bytes accumulate (kept for resume)
    reused: int = 0  # bytes of `done` that were already on disk (resume or cache)


class PullError(BaseModel):
    """Why a pull failed or was cancelled: the status its stream ended with."""

    code: str  # the StatusKind name, e.g. "UNAVAILABLE"
    reason: str
    message: str
    metadata: dict[str, str] = Field(default_factory=dict)


class PullRecord(BaseModel):
    """A pull job (`pulls/{id}`), persisted as JSON under RBEE_HOME so it survives restarts."""

    id: str
    source: str  # the source string as given
    options: PullOptions = Field(default_factory=PullOptions)
    resolved_source: ModelSource | None = None
    state: PullState = PullState.QUEUED
    state_message: str = ""
    files: list[PullFileRecord] = Field(default_factory=list)
    chosen_file: str = ""
    choice_reason: str = ""
    error: PullError | None = None
    model: str = ""  # `models/{id}` in the catalog
    watcher_count: int = 0
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    etag: str = ""

    @property
    def name(self) -> str:
        return f"pulls/{self.id}"

    @property
    def done_bytes(self) -> int:
        return sum(f.done for f in self.files)

    @property
    def total_bytes(self) -> int | None:
        if any(f.total is None for f in self.files):
            return None
        return sum(f.total or 0 for f in self.files)


@dataclass(frozen=True)
class PullEvent:
    """One progress event of a pull (throttled to a few per second)."""

    pull: str  # pulls/{id}
    state: PullState
    file: str = ""
    file_index: int = 0  # 1-based; 0 when not in a file
    file_count: int = 0
    file_done: int = 0
    file_total: int | None = None
    total_done: int = 0
    total_total: int | None = None
    rate: float = 0.0  # bytes per second over the last few seconds
    eta_seconds: float | None = None
    message: str = ""
    reused: int = 0  # bytes already present and not transferred again
