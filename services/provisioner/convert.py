"""The one place that maps rbee.provisioner.v1 messages to and from the provisioner's domain."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2

from rbee.catalog.v1 import catalog_pb2
from rbee.common.v1 import errors_pb2, progress_pb2
from rbee.provisioner.v1 import provisioner_pb2 as pb
from services.catalog import convert as catalog_convert
from services.catalog.domain import Install, Model, ModelFormat, SourceKind
from services.common.enum_mapping import enum_from_pb, inverse
from services.common.errors import InvalidArgument
from services.provisioner.domain import (
    PullEvent,
    PullFileState,
    PullOptions,
    PullRecord,
    PullState,
    RemoteFileInfo,
    Resolution,
    SearchHit,
    SearchPage,
    SearchQuery,
    SearchSort,
)
from services.provisioner.preload import PreloadEvent, PreloadPage, PreloadRecord
from services.provisioner.pulls import display_source
from services.provisioner.recipes.build import LogLine, LogStream
from services.provisioner.recipes.installs import (
    InstallEvent,
    InstallJobRecord,
    InstallJobState,
    InstallOptions,
)
from services.provisioner.recipes.pkgbuild import Recipe

PULL_STATE_TO_PB = {
    PullState.QUEUED: pb.PULL_STATE_QUEUED,
    PullState.RESOLVING: pb.PULL_STATE_RESOLVING,
    PullState.DOWNLOADING: pb.PULL_STATE_DOWNLOADING,
    PullState.VERIFYING: pb.PULL_STATE_VERIFYING,
    PullState.REGISTERING: pb.PULL_STATE_REGISTERING,
    PullState.SUCCEEDED: pb.PULL_STATE_SUCCEEDED,
    PullState.FAILED: pb.PULL_STATE_FAILED,
    PullState.CANCELLED: pb.PULL_STATE_CANCELLED,
    PullState.PAUSED: pb.PULL_STATE_PAUSED,
}
PULL_FILE_STATE_TO_PB = {
    PullFileState.PENDING: pb.PULL_FILE_STATE_PENDING,
    PullFileState.DOWNLOADING: pb.PULL_FILE_STATE_DOWNLOADING,
    PullFileState.DONE: pb.PULL_FILE_STATE_DONE,
    PullFileState.CACHED: pb.PULL_FILE_STATE_CACHED,
    PullFileState.FAILED: pb.PULL_FILE_STATE_FAILED,
}
SEARCH_SORT_TO_PB = {
    SearchSort.RELEVANCE: pb.SEARCH_SORT_UNSPECIFIED,
    SearchSort.DOWNLOADS: pb.SEARCH_SORT_DOWNLOADS,
    SearchSort.LIKES: pb.SEARCH_SORT_LIKES,
    SearchSort.UPDATED: pb.SEARCH_SORT_UPDATED,
}
SEARCH_SORT_FROM_PB = inverse(SEARCH_SORT_TO_PB)
FORMAT_TO_PB = catalog_convert.FORMAT_TO_PB
FORMAT_FROM_PB = catalog_convert.FORMAT_FROM_PB


def _rpc_code(name: str) -> int:
    """The google.rpc.Code number of a status name ("UNAVAILABLE" -> 14); INTERNAL if unknown."""
    try:
        return int(code_pb2.Code.Value(name))
    except ValueError:
        return int(code_pb2.INTERNAL)


def pull_options_from_pb(msg: pb.PullOptions) -> PullOptions:
    return PullOptions(
        revision=msg.revision,
        files=list(msg.files),
        quantization_preference=list(msg.quantization_preference),
        copy_files=msg.copy,
        bandwidth_limit=msg.bandwidth_limit_bytes_per_second,
        force=msg.force,
        validate_only=msg.validate_only,
        model_id=msg.model_id,
        display_name=msg.display_name,
        labels=dict(msg.labels),
    )


def pull_options_to_pb(options: PullOptions) -> pb.PullOptions:
    return pb.PullOptions(
        revision=options.revision,
        files=options.files,
        quantization_preference=options.quantization_preference,
        copy=options.copy_files,
        bandwidth_limit_bytes_per_second=options.bandwidth_limit,
        force=options.force,
        validate_only=options.validate_only,
        model_id=options.model_id,
        display_name=options.display_name,
        labels=options.labels,
    )


def _bytes(
    done: int, total: int | None, *, rate: float = 0.0, eta: float | None = None, reused: int = 0
) -> progress_pb2.ByteProgress:
    msg = progress_pb2.ByteProgress(
        completed_bytes=done, total_bytes=total or 0, bytes_per_second=rate, reused_bytes=reused
    )
    if eta is not None:
        duration = Duration()
        duration.FromTimedelta(timedelta(seconds=round(eta, 3)))
        msg.eta.CopyFrom(duration)
    return msg


def pull_event_to_pb(event: PullEvent) -> pb.PullModelResponse:
    progress = pb.PullProgress(
        pull=event.pull,
        state=PULL_STATE_TO_PB[event.state],
        file=event.file,
        file_index=event.file_index,
        file_count=event.file_count,
        file_bytes=_bytes(event.file_done, event.file_total),
        total_bytes=_bytes(
            event.total_done,
            event.total_total,
            rate=event.rate,
            eta=event.eta_seconds,
            reused=event.reused,
        ),
        message=event.message,
    )
    return pb.PullModelResponse(progress=progress)


def pull_model_to_pb(model: Model) -> pb.PullModelResponse:
    return pb.PullModelResponse(model=catalog_convert.model_to_pb(model))


def pull_to_pb(record: PullRecord) -> pb.Pull:
    msg = pb.Pull(
        name=record.name,
        source=display_source(record.source),
        options=pull_options_to_pb(record.options),
        state=PULL_STATE_TO_PB[record.state],
        state_message=record.state_message,
        total_bytes=_bytes(
            record.done_bytes,
            record.total_bytes,
            reused=sum(f.reused for f in record.files),
        ),
        chosen_file=record.chosen_file,
        choice_reason=record.choice_reason,
        model=record.model,
        watcher_count=record.watcher_count,
        create_time=catalog_convert.timestamp_to_pb(record.created_at),
        update_time=catalog_convert.timestamp_to_pb(record.updated_at),
        etag=record.etag,
    )
    if record.resolved_source is not None:
        msg.resolved_source.CopyFrom(catalog_convert.source_to_pb(record.resolved_source))
    for entry in record.files:
        msg.files.append(
            pb.PullFile(
                path=entry.path,
                state=PULL_FILE_STATE_TO_PB[entry.state],
                bytes=_bytes(entry.done, entry.total, reused=entry.reused),
                expected_sha256=entry.expected_sha256,
                sha256=entry.sha256,
                local_path=entry.local_path,
            )
        )
    if record.error is not None:
        msg.error.CopyFrom(
            errors_pb2.ErrorStatus(
                code=_rpc_code(record.error.code),
                reason=record.error.reason,
                message=record.error.message,
                metadata=record.error.metadata,
            )
        )
    if record.ended_at is not None:
        msg.end_time.CopyFrom(catalog_convert.timestamp_to_pb(record.ended_at))
    return msg


def remote_file_to_pb(info: RemoteFileInfo) -> pb.RemoteFile:
    return pb.RemoteFile(
        path=info.path,
        size_bytes=info.size or 0,
        sha256=info.sha256 or "",
        quantization=info.quantization or "",
        format=FORMAT_TO_PB[info.format] if info.format else catalog_pb2.MODEL_FORMAT_UNSPECIFIED,
        selected=info.selected,
        present_bytes=info.present_bytes,
    )


def resolution_to_pb(
    resolution: Resolution, *, model_id: str = "", existing_model: str = ""
) -> pb.ResolveSourceResponse:
    present = sum(f.present_bytes for f in resolution.files if f.selected)
    return pb.ResolveSourceResponse(
        source=catalog_convert.source_to_pb(resolution.source),
        files=[remote_file_to_pb(f) for f in resolution.files],
        chosen_file=resolution.chosen_file,
        choice_reason=resolution.choice_reason,
        total_bytes=resolution.total_bytes,
        present_bytes=present,
        model_id=model_id,
        existing_model=existing_model,
    )


def search_query_from_pb(msg: pb.SearchModelsRequest) -> SearchQuery:
    kind = enum_from_pb(catalog_convert.SOURCE_KIND_FROM_PB, msg.source, "source")
    if kind not in (SourceKind.HUGGINGFACE, SourceKind.CIVITAI):
        raise InvalidArgument.for_field(
            "source", "search covers the HuggingFace Hub and CivitAI (HUGGINGFACE or CIVITAI)"
        )
    if msg.page_size < 0:
        raise InvalidArgument.for_field("page_size", f"must not be negative, got {msg.page_size}")
    fmt: ModelFormat | None = None
    if msg.format:
        fmt = enum_from_pb(FORMAT_FROM_PB, msg.format, "format")
    return SearchQuery(
        source=kind,
        query=msg.query,
        format=fmt,
        task=msg.task,
        family=msg.family,
        sort=enum_from_pb(SEARCH_SORT_FROM_PB, msg.sort, "sort", default=SearchSort.RELEVANCE),
        page_size=min(msg.page_size or 20, 100),
        page_token=msg.page_token,
    )


def search_hit_to_pb(hit: SearchHit) -> pb.SearchResult:
    msg = pb.SearchResult(
        source=hit.source,
        kind=catalog_convert.SOURCE_KIND_TO_PB[hit.kind],
        id=hit.id,
        display_name=hit.display_name,
        author=hit.author,
        files=[remote_file_to_pb(f) for f in hit.files],
        downloads=hit.downloads,
        likes=hit.likes,
        license=hit.license,
        task=hit.task,
        base_model=hit.base_model,
        civitai_type=hit.civitai_type,
        tags=hit.tags,
        gated=hit.gated,
    )
    if hit.civitai_version_id is not None:
        msg.civitai_version_id = hit.civitai_version_id
    if hit.updated_at is not None:
        msg.update_time.CopyFrom(catalog_convert.timestamp_to_pb(hit.updated_at))
    return msg


def search_page_to_pb(page: SearchPage) -> pb.SearchModelsResponse:
    return pb.SearchModelsResponse(
        results=[search_hit_to_pb(h) for h in page.hits], next_page_token=page.next_page_token
    )


# --- preloads ----------------------------------------------------------------------------------


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=round(seconds, 6)))
    return duration


def preload_event_to_pb(event: PreloadEvent) -> pb.PreloadResponse:
    """A preload progress event; bytes already resident at the start are `reused_bytes`."""
    progress = pb.PreloadProgress(
        model=event.model,
        file=event.file,
        file_index=event.file_index,
        file_count=event.file_count,
        bytes=_bytes(
            event.done_bytes,
            event.total_bytes,
            rate=event.bytes_per_second,
            eta=event.eta_seconds,
            reused=event.resident_before_bytes,
        ),
    )
    return pb.PreloadResponse(progress=progress)


def preload_to_pb(record: PreloadRecord) -> pb.Preload:
    return pb.Preload(
        name=record.name,
        model=record.model,
        total_bytes=record.total_bytes,
        resident_bytes=record.resident_bytes,
        pinned=record.pinned,
        duration=_duration(record.duration_seconds),
        evicted_models=record.evicted_models,
        last_used_time=catalog_convert.timestamp_to_pb(record.last_used_at),
        measure_time=catalog_convert.timestamp_to_pb(record.measured_at),
    )


def preload_result_to_pb(record: PreloadRecord) -> pb.PreloadResponse:
    """The terminal message of a Preload stream."""
    return pb.PreloadResponse(preload=preload_to_pb(record))


def preload_page_to_pb(page: PreloadPage) -> pb.ListPreloadsResponse:
    return pb.ListPreloadsResponse(
        preloads=[preload_to_pb(r) for r in page.preloads],
        next_page_token=page.next_page_token,
        total_size=page.total_size,
        budget_bytes=page.budget_bytes,
        resident_bytes=page.resident_bytes,
        evictions=page.evictions,
    )


# --- installs ---------------------------------------------------------------------------------

INSTALL_STATE_TO_PB = {
    InstallJobState.QUEUED: pb.INSTALL_JOB_STATE_QUEUED,
    InstallJobState.FETCHING: pb.INSTALL_JOB_STATE_FETCHING,
    InstallJobState.PREPARING: pb.INSTALL_JOB_STATE_PREPARING,
    InstallJobState.BUILDING: pb.INSTALL_JOB_STATE_BUILDING,
    InstallJobState.CHECKING: pb.INSTALL_JOB_STATE_CHECKING,
    InstallJobState.PACKAGING: pb.INSTALL_JOB_STATE_PACKAGING,
    InstallJobState.REGISTERING: pb.INSTALL_JOB_STATE_REGISTERING,
    InstallJobState.SUCCEEDED: pb.INSTALL_JOB_STATE_SUCCEEDED,
    InstallJobState.FAILED: pb.INSTALL_JOB_STATE_FAILED,
    InstallJobState.CANCELLED: pb.INSTALL_JOB_STATE_CANCELLED,
}
LOG_STREAM_TO_PB = {
    LogStream.STDOUT: progress_pb2.LOG_STREAM_STDOUT,
    LogStream.STDERR: progress_pb2.LOG_STREAM_STDERR,
}


def install_options_from_pb(msg: pb.InstallOptions) -> InstallOptions:
    return InstallOptions(
        force=msg.force,
        validate_only=msg.validate_only,
        recipe=msg.recipe,
        install_id=msg.install_id,
        skip_check=msg.skip_check,
        build_env=dict(msg.build_env),
    )


def install_options_to_pb(options: InstallOptions) -> pb.InstallOptions:
    return pb.InstallOptions(
        force=options.force,
        validate_only=options.validate_only,
        recipe=options.recipe,
        install_id=options.install_id,
        skip_check=options.skip_check,
        build_env=options.build_env,
    )


def log_line_to_pb(line: LogLine) -> progress_pb2.LogLine:
    return progress_pb2.LogLine(
        time=catalog_convert.timestamp_to_pb(line.time),
        stream=LOG_STREAM_TO_PB[line.stream],
        text=line.text,
    )


def install_event_to_pb(event: InstallEvent) -> pb.InstallWorkerResponse:
    progress = pb.InstallProgress(
        install_job=event.install_job,
        state=INSTALL_STATE_TO_PB[event.state],
        log_lines=[log_line_to_pb(line) for line in event.log_lines],
        message=event.message,
    )
    if event.fetch_done or event.fetch_total:
        progress.fetch_bytes.CopyFrom(_bytes(event.fetch_done, event.fetch_total))
    return pb.InstallWorkerResponse(progress=progress)


def install_result_to_pb(install: Install) -> pb.InstallWorkerResponse:
    return pb.InstallWorkerResponse(install=catalog_convert.install_to_pb(install))


def install_job_to_pb(record: InstallJobRecord) -> pb.InstallJob:
    msg = pb.InstallJob(
        name=record.name,
        worker_type=f"worker-types/{record.worker_type}",
        recipe=record.recipe,
        options=install_options_to_pb(record.options),
        state=INSTALL_STATE_TO_PB[record.state],
        state_message=record.state_message,
        log_tail=[log_line_to_pb(line) for line in record.log_tail],
        install=record.install,
        watcher_count=record.watcher_count,
        create_time=catalog_convert.timestamp_to_pb(record.created_at),
        update_time=catalog_convert.timestamp_to_pb(record.updated_at),
    )
    if record.error is not None:
        msg.error.CopyFrom(
            errors_pb2.ErrorStatus(
                code=_rpc_code(record.error.code),
                reason=record.error.reason,
                message=record.error.message,
                metadata=record.error.metadata,
            )
        )
    if record.ended_at is not None:
        msg.end_time.CopyFrom(catalog_convert.timestamp_to_pb(record.ended_at))
    return msg


def recipe_to_pb(recipe: Recipe) -> pb.Recipe:
    pkg = recipe.pkgbuild
    return pb.Recipe(
        name=recipe.name,
        worker_type=f"worker-types/{recipe.worker_type}",
        pkgname=pkg.pkgname,
        pkgver=pkg.pkgver,
        pkgrel=pkg.pkgrel,
        arch=pkg.arch,
        depends=pkg.depends,
        makedepends=pkg.makedepends,
        sources=[pb.RecipeSource(url=s.url, sha256=s.sha256) for s in recipe.sources],
        path=recipe.path,
        supported_on_host=recipe.supported_on_host,
    )
