"""The pool's calls to its worker processes over gRPC: health, LoadModel, GetWorker.

The one place in the pool that speaks to a worker; the pool service sees domain values only.
Worker errors come back as our own errors with the worker's status and reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.worker.v1 import load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from rbee_client.errors import error_from_rpc
from services.common.channels import ChannelSecurity, open_aio_channel
from services.common.errors import RbeeError, Unavailable, error_for_status
from services.common.settings import FAST_RECONNECT_OPTIONS
from services.worker.pool.domain import LiveStatus, PoolWorkerState

_STATE_FROM_PB = {
    pb.WORKER_STATE_STARTING: PoolWorkerState.STARTING,
    pb.WORKER_STATE_IDLE: PoolWorkerState.IDLE,
    pb.WORKER_STATE_LOADING: PoolWorkerState.LOADING,
    pb.WORKER_STATE_READY: PoolWorkerState.READY,
    pb.WORKER_STATE_BUSY: PoolWorkerState.BUSY,
    pb.WORKER_STATE_STOPPING: PoolWorkerState.STOPPING,
    pb.WORKER_STATE_STOPPED: PoolWorkerState.STOPPED,
    pb.WORKER_STATE_FAILED: PoolWorkerState.FAILED,
}
_LOAD_STAGE_NAMES = {
    value: name.removeprefix("LOAD_STAGE_").lower() for name, value in pb.LoadStage.items()
}


def _worker_error(exc: grpc.aio.AioRpcError, endpoint: str) -> RbeeError:
    err = error_from_rpc(exc)
    if err.code in ("UNAVAILABLE", "UNKNOWN", "INTERNAL"):
        return Unavailable(
            f"the worker at {endpoint} failed: {err.message}", reason="WORKER_UNAVAILABLE"
        )
    return error_for_status(
        err.code,
        err.message,
        reason=err.reason or None,
        resource_type=err.resource_type or "model",
        resource_name=err.resource_name,
    )


def live_from_pb(msg: pb.Worker) -> LiveStatus:
    return LiveStatus(
        state=_STATE_FROM_PB.get(msg.state, PoolWorkerState.IDLE),
        model=msg.model,
        ram_bytes=msg.memory.ram_bytes,
        vram_bytes=msg.memory.vram_bytes,
        queue_depth=msg.queue_depth,
        queue_capacity=msg.queue_capacity,
        requests_succeeded=msg.counters.requests_succeeded,
        requests_failed=msg.counters.requests_failed,
        requests_cancelled=msg.counters.requests_cancelled,
        prompt_tokens=msg.counters.prompt_tokens,
        completion_tokens=msg.counters.completion_tokens,
        version=msg.version,
        backend_version=msg.backend_version,
    )


class WorkerLink:
    """One channel to one worker process."""

    def __init__(
        self, endpoint: str, *, deadline: float = 10.0, security: ChannelSecurity | None = None
    ) -> None:
        """`security`: the pool's token and TLS (settings.client_security()), which the pool
        also hands to the workers it spawns; None: plaintext, no token."""
        self.endpoint = endpoint
        self._channel = open_aio_channel(endpoint, security, options=FAST_RECONNECT_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._deadline = deadline

    async def close(self) -> None:
        await self._channel.close()

    async def wait_serving(self, limit_s: float, *, exited: asyncio.Event) -> None:
        """Until grpc.health.v1 says SERVING; Unavailable (WORKER_START_TIMEOUT) after
        `limit_s`, or as soon as `exited` is set (the process is gone)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if exited.is_set():
                raise Unavailable(
                    f"the worker exited before it became healthy ({self.endpoint})",
                    reason="WORKER_CRASHED",
                )
            try:
                response = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise Unavailable(
            f"the worker at {self.endpoint} was not healthy within {limit_s:.0f} s",
            reason="WORKER_START_TIMEOUT",
        )

    async def load(
        self, request: pb.LoadModelRequest, *, limit_s: float
    ) -> AsyncIterator[tuple[str, float | None, str] | LiveStatus]:
        """LoadModel: (stage, fraction, message) per progress event, then the LiveStatus."""
        try:
            async for msg in self._stub.LoadModel(request, timeout=limit_s):
                if msg.HasField("worker"):
                    yield live_from_pb(msg.worker)
                else:
                    p = msg.progress
                    fraction = p.fraction if p.HasField("fraction") else None
                    yield _LOAD_STAGE_NAMES.get(p.stage, "loading"), fraction, p.message
        except grpc.aio.AioRpcError as exc:
            raise _worker_error(exc, self.endpoint) from None

    async def status(self) -> LiveStatus:
        try:
            msg = await self._stub.GetWorker(
                pb.WorkerServiceGetWorkerRequest(), timeout=self._deadline
            )
        except grpc.aio.AioRpcError as exc:
            raise _worker_error(exc, self.endpoint) from None
        return live_from_pb(msg)


def load_request(model: str, paths: list[str], options: bytes) -> pb.LoadModelRequest:
    """The LoadModel request for `model` with the spawn's serialised options (see
    `serialize_load_options`)."""
    request = pb.LoadModelRequest(model=model, paths=paths)
    if options:
        holder = pb.LoadModelRequest.FromString(options)
        which = holder.WhichOneof("options")
        if which == "llm":
            request.llm.CopyFrom(holder.llm)
        elif which == "image":
            request.image.CopyFrom(holder.image)
    return request


def serialize_load_options(
    llm: load_pb2.LlmLoadOptions | None, image: load_pb2.ImageLoadOptions | None
) -> bytes:
    """The spawn's load options, kept with the worker record to replay on a restart."""
    holder = pb.LoadModelRequest()
    if llm is not None:
        holder.llm.CopyFrom(llm)
    elif image is not None:
        holder.image.CopyFrom(image)
    else:
        return b""
    return holder.SerializeToString()
