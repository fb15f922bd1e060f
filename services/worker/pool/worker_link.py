"""The pool's calls to its worker processes over gRPC: health, LoadModel, GetWorker.

The one place in the pool that speaks to a worker; the pool service sees domain values only.
Worker errors come back as our own errors with the worker's status and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.worker.v1 import load_pb2, worker_pb2_grpc
from rbee.worker.v1 import worker_pb2 as pb
from rbee_client.errors import error_from_rpc
from services.common.channels import ChannelSecurity, open_aio_channel
from services.common.errors import RbeeError, Unavailable, error_for_status
from services.common.settings import FAST_RECONNECT_OPTIONS
from services.worker.pool.domain import LiveStatus, PoolWorkerState

# Between health checks while a worker starts (see WorkerLink.wait_serving).
POLL_INTERVAL_S = 0.1

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


@contextlib.contextmanager
def worker_errors(endpoint: str) -> Iterator[None]:
    """Around a call on a link: the worker's status as our error, and the call's own
    cancellation (the link closed under it: the pool closes a worker's link when the process
    exits) as Unavailable. A cancellation of the task awaiting the call passes through.

    Why the second: grpc.aio cancels a closing channel's calls, and awaiting a cancelled call
    raises CancelledError in the caller. Left alone it would end a pool RPC (GetWorker asking a
    worker that just died) as if that RPC had been cancelled: grpc then sends no status, and
    the client waits out its whole deadline.
    """
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise _worker_error(exc, endpoint) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise Unavailable(
            f"the link to the worker at {endpoint} closed during the call (the worker exited)",
            reason="WORKER_UNAVAILABLE",
        ) from None


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
        self._deadline = deadline
        self._security = security

    async def close(self) -> None:
        await self._channel.close()

    async def wait_serving(
        self, limit_s: float, *, exited: asyncio.Event, serving: asyncio.Event | None = None
    ) -> None:
        """Until grpc.health.v1 says SERVING; Unavailable (WORKER_START_TIMEOUT) after
        `limit_s`, or as soon as `exited` is set (the process is gone).

        Polls every POLL_INTERVAL_S, or at once when `serving` is set (the worker printed that
        it serves: services.worker.stdout_lines). Each poll uses a channel of its own, so the
        refused connections of a worker still starting never put this link's channel into
        reconnect backoff: the check after `serving` connects at once.
        """
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if exited.is_set():
                raise Unavailable(
                    f"the worker exited before it became healthy ({self.endpoint})",
                    reason="WORKER_CRASHED",
                )
            if await self._serving_now():
                return
            if serving is None:
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(serving.wait(), POLL_INTERVAL_S)
        raise Unavailable(
            f"the worker at {self.endpoint} was not healthy within {limit_s:.0f} s",
            reason="WORKER_START_TIMEOUT",
        )

    async def _serving_now(self) -> bool:
        async with open_aio_channel(self.endpoint, self._security) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def load(
        self, request: pb.LoadModelRequest, *, limit_s: float
    ) -> AsyncIterator[tuple[str, float | None, str] | LiveStatus]:
        """LoadModel: (stage, fraction, message) per progress event, then the LiveStatus."""
        with worker_errors(self.endpoint):
            async for msg in self._stub.LoadModel(request, timeout=limit_s):
                if msg.HasField("worker"):
                    yield live_from_pb(msg.worker)
                else:
                    p = msg.progress
                    fraction = p.fraction if p.HasField("fraction") else None
                    yield _LOAD_STAGE_NAMES.get(p.stage, "loading"), fraction, p.message

    async def status(self) -> LiveStatus:
        with worker_errors(self.endpoint):
            msg = await self._stub.GetWorker(
                pb.WorkerServiceGetWorkerRequest(), timeout=self._deadline
            )
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
