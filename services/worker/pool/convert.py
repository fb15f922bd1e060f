"""The one place that maps rbee.worker.v1 PoolService messages to and from the pool's domain."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from rbee.common.v1 import device_pb2, progress_pb2
from rbee.worker.v1 import pool_pb2 as pb
from rbee.worker.v1 import worker_pb2 as wpb
from services.catalog import convert as catalog_convert
from services.common.errors import InvalidArgument
from services.worker.pool.devices import HostDevice
from services.worker.pool.domain import (
    PoolWorker,
    PoolWorkerState,
    RestartMode,
    RestartPolicy,
    SpawnEvent,
    SpawnStage,
    WorkerEventKind,
)
from services.worker.pool.process import LogLine
from services.worker.pool.service import SpawnRequest
from services.worker.pool.worker_link import serialize_load_options

STATE_TO_PB = {
    PoolWorkerState.STARTING: wpb.WORKER_STATE_STARTING,
    PoolWorkerState.IDLE: wpb.WORKER_STATE_IDLE,
    PoolWorkerState.LOADING: wpb.WORKER_STATE_LOADING,
    PoolWorkerState.READY: wpb.WORKER_STATE_READY,
    PoolWorkerState.BUSY: wpb.WORKER_STATE_BUSY,
    PoolWorkerState.STOPPING: wpb.WORKER_STATE_STOPPING,
    PoolWorkerState.STOPPED: wpb.WORKER_STATE_STOPPED,
    PoolWorkerState.FAILED: wpb.WORKER_STATE_FAILED,
}
STAGE_TO_PB = {
    SpawnStage.VALIDATING: pb.SPAWN_STAGE_VALIDATING,
    SpawnStage.INSTALLING: pb.SPAWN_STAGE_INSTALLING,
    SpawnStage.PRELOADING: pb.SPAWN_STAGE_PRELOADING,
    SpawnStage.STARTING: pb.SPAWN_STAGE_STARTING,
    SpawnStage.LOADING: pb.SPAWN_STAGE_LOADING,
    SpawnStage.READY: pb.SPAWN_STAGE_READY,
}
EVENT_TO_PB = {
    WorkerEventKind.EXISTING: pb.WORKER_EVENT_TYPE_EXISTING,
    WorkerEventKind.CREATED: pb.WORKER_EVENT_TYPE_CREATED,
    WorkerEventKind.UPDATED: pb.WORKER_EVENT_TYPE_UPDATED,
    WorkerEventKind.DELETED: pb.WORKER_EVENT_TYPE_DELETED,
}
LOAD_STAGE_TO_PB = {
    name.removeprefix("LOAD_STAGE_").lower(): v for name, v in wpb.LoadStage.items()
}
LOG_STREAM_TO_PB = {
    "stdout": progress_pb2.LOG_STREAM_STDOUT,
    "stderr": progress_pb2.LOG_STREAM_STDERR,
}
LOG_STREAM_FROM_PB = {v: k for k, v in LOG_STREAM_TO_PB.items()}


def _duration(seconds: float) -> Duration:
    msg = Duration()
    msg.FromTimedelta(timedelta(seconds=seconds))
    return msg


def device_to_pb(
    device: HostDevice,
    *,
    claimed_ram: int = 0,
    claimed_vram: int = 0,
    workers: list[str] | None = None,
) -> device_pb2.Device:
    msg = device_pb2.Device(
        name=device.name,
        kind=catalog_convert.DEVICE_KIND_TO_PB[device.kind],
        index=device.index,
        display_name=device.display_name,
        uuid=device.uuid,
        unified_memory=device.unified_memory,
        compute_capability=device.compute_capability,
        driver_version=device.driver_version,
        cpu_cores=device.cpu_cores,
        cpu_architecture=device.cpu_architecture,
        claimed_ram_bytes=claimed_ram,
        claimed_vram_bytes=claimed_vram,
        workers=workers or [],
    )
    for field in ("total_ram_bytes", "free_ram_bytes", "total_vram_bytes", "free_vram_bytes"):
        value = getattr(device, field)
        if value is not None:
            setattr(msg, field, value)
    return msg


# google.protobuf.Duration's documented range: about +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000


def duration_seconds_from_pb(msg: Duration, field_name: str) -> float:
    """A Duration in seconds; InvalidArgument when it is outside the type's documented range or
    its nanos disagree with its seconds (ToTimedelta raises a bare OverflowError there)."""
    seconds, nanos = msg.seconds, msg.nanos
    if (
        abs(seconds) > MAX_DURATION_SECONDS
        or abs(nanos) > 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument.for_field(
            field_name, f"not a valid duration (at most {MAX_DURATION_SECONDS} seconds)"
        )
    return seconds + nanos / 1e9


def restart_policy_from_pb(msg: wpb.RestartPolicy) -> RestartPolicy:
    mode = RestartMode.ON_FAILURE if msg.mode == wpb.RESTART_MODE_ON_FAILURE else RestartMode.NEVER
    policy = RestartPolicy(mode=mode)
    if msg.max_restarts:
        policy.max_restarts = msg.max_restarts
    if msg.HasField("initial_backoff"):
        policy.initial_backoff = duration_seconds_from_pb(
            msg.initial_backoff, "restart_policy.initial_backoff"
        )
    if msg.HasField("max_backoff"):
        policy.max_backoff = duration_seconds_from_pb(msg.max_backoff, "restart_policy.max_backoff")
    if policy.initial_backoff < 0 or policy.max_backoff < 0:
        raise InvalidArgument.for_field("restart_policy", "backoffs must not be negative")
    return policy


def spawn_request_from_pb(msg: pb.SpawnWorkerRequest) -> SpawnRequest:
    if not msg.model:
        raise InvalidArgument.for_field("model", "the model to serve is required (models/ID)")
    which = msg.WhichOneof("load_options")
    llm = msg.llm if which == "llm" else None
    image = msg.image if which == "image" else None
    context = msg.llm.context_length if which == "llm" else 0
    return SpawnRequest(
        model=msg.model,
        worker_id=msg.worker_id,
        worker_type=msg.worker_type,
        device=msg.device,
        options_kind={"llm": "llm", "image": "image"}.get(which or "", ""),
        load_options=serialize_load_options(llm, image),
        context_length=context,
        force=msg.force,
        restart_policy=restart_policy_from_pb(msg.restart_policy),
        preload=msg.preload,
        validate_only=msg.validate_only,
        reuse=msg.reuse,
        skip_install=msg.skip_install,
        queue_capacity=msg.queue_capacity,
        labels=dict(msg.labels),
    )


def worker_to_pb(record: PoolWorker, device: HostDevice | None = None) -> wpb.Worker:
    msg = wpb.Worker(
        name=record.name,
        endpoint=record.endpoint,
        worker_type=record.worker_type,
        model=record.model,
        state=STATE_TO_PB[record.state],
        state_message=record.state_message,
        pid=record.pid,
        restart_count=record.restart_count,
        queue_capacity=record.queue_capacity,
        install=record.install,
        labels=record.labels,
        create_time=catalog_convert.timestamp_to_pb(record.created_at),
        update_time=catalog_convert.timestamp_to_pb(record.updated_at),
    )
    if device is not None:
        msg.device.CopyFrom(device_to_pb(device))
    else:
        msg.device.CopyFrom(
            device_pb2.Device(
                name=record.device,
                kind=catalog_convert.DEVICE_KIND_TO_PB[record.device_kind],
                index=record.device_index,
            )
        )
    if record.backend is not None:
        msg.backend = catalog_convert.BACKEND_TO_PB[record.backend]
    if record.exit_code is not None:
        msg.exit_code = record.exit_code
    policy = record.restart_policy
    msg.restart_policy.mode = (
        wpb.RESTART_MODE_ON_FAILURE
        if policy.mode is RestartMode.ON_FAILURE
        else wpb.RESTART_MODE_NEVER
    )
    msg.restart_policy.max_restarts = policy.max_restarts
    msg.restart_policy.initial_backoff.CopyFrom(_duration(policy.initial_backoff))
    msg.restart_policy.max_backoff.CopyFrom(_duration(policy.max_backoff))
    msg.memory.claimed_ram_bytes = record.claimed_ram_bytes
    msg.memory.claimed_vram_bytes = record.claimed_vram_bytes
    if record.started_at is not None:
        msg.start_time.CopyFrom(catalog_convert.timestamp_to_pb(record.started_at))
    live = record.live
    if live is not None and record.state.running:
        msg.memory.ram_bytes = live.ram_bytes
        msg.memory.vram_bytes = live.vram_bytes
        msg.queue_depth = live.queue_depth
        msg.counters.requests_succeeded = live.requests_succeeded
        msg.counters.requests_failed = live.requests_failed
        msg.counters.requests_cancelled = live.requests_cancelled
        msg.counters.prompt_tokens = live.prompt_tokens
        msg.counters.completion_tokens = live.completion_tokens
        msg.version = live.version
        msg.backend_version = live.backend_version
    return msg


def spawn_event_to_pb(event: SpawnEvent) -> pb.SpawnWorkerResponse:
    progress = pb.SpawnProgress(
        worker=event.worker,
        stage=STAGE_TO_PB[event.stage],
        message=event.message,
        worker_type=event.worker_type,
        device=event.device,
    )
    if event.compatibility is not None:
        progress.compatibility.CopyFrom(catalog_convert.compat_result_to_pb(event.compatibility))
    if event.stage is SpawnStage.PRELOADING and event.preload_total:
        progress.preload.bytes.completed_bytes = event.preload_done
        progress.preload.bytes.total_bytes = event.preload_total
    if event.load_stage:
        progress.load.stage = LOAD_STAGE_TO_PB.get(event.load_stage, wpb.LOAD_STAGE_UNSPECIFIED)
        progress.load.message = event.message
        if event.load_fraction is not None:
            progress.load.fraction = event.load_fraction
    return pb.SpawnWorkerResponse(progress=progress)


def log_lines_to_pb(lines: list[LogLine]) -> pb.GetWorkerLogsResponse:
    return pb.GetWorkerLogsResponse(
        lines=[
            progress_pb2.LogLine(
                time=catalog_convert.timestamp_to_pb(line.time),
                stream=LOG_STREAM_TO_PB.get(line.stream, progress_pb2.LOG_STREAM_UNSPECIFIED),
                text=line.text,
            )
            for line in lines
        ]
    )
