"""An asyncio client for rbee.worker.v1.PoolService: the methods of rbee_client.PoolClient,
awaited, with streams as async iterators.

    from rbee_client.aio import PoolClient

    async with PoolClient("127.0.0.1:50091") as pool:
        for worker in await pool.list_workers():
            print(worker.name, worker.endpoint)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rbee.common.v1 import device_pb2, progress_pb2
from rbee.worker.v1 import pool_pb2, pool_pb2_grpc, worker_pb2
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, AsyncServiceClient, RetryPolicy
from rbee_client.pool import (
    SpawnEvent,
    device_name,
    grace_duration,
    spawn_event_from_pb,
    worker_name,
)
from services.common.channels import ChannelSecurity


class PoolClient(AsyncServiceClient):
    """Talks to one pool over a grpc.aio channel; `async with` closes the channel it opened."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(target, security=security, timeout=timeout, channel=channel, retry=retry)
        self._stub = pool_pb2_grpc.PoolServiceStub(self._channel)

    # ---- devices ----------------------------------------------------------------------------

    async def list_devices(self, *, filter: str = "") -> list[device_pb2.Device]:
        """Every device of the hive (all pages)."""
        devices: list[device_pb2.Device] = []
        token = ""
        while True:
            response: pool_pb2.ListDevicesResponse = await self._unary(
                self._stub.ListDevices, pool_pb2.ListDevicesRequest(filter=filter, page_token=token)
            )
            devices.extend(response.devices)
            token = response.next_page_token
            if not token:
                return devices

    async def get_device(self, name: str) -> device_pb2.Device:
        """One device (`devices/ID` or `ID`)."""
        device: device_pb2.Device = await self._unary(
            self._stub.GetDevice, pool_pb2.GetDeviceRequest(name=device_name(name))
        )
        return device

    # ---- workers ----------------------------------------------------------------------------

    async def spawn_worker(
        self,
        request: pool_pb2.SpawnWorkerRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[SpawnEvent]:
        """Spawn (or reuse) a worker: SpawnProgress events, then the ready Worker."""
        async for msg in self._stream(self._stub.SpawnWorker, request, timeout):
            yield spawn_event_from_pb(msg)

    async def get_worker(self, name: str) -> worker_pb2.Worker:
        """One worker (`workers/ID` or `ID`)."""
        worker: worker_pb2.Worker = await self._unary(
            self._stub.GetWorker, pool_pb2.GetWorkerRequest(name=worker_name(name))
        )
        return worker

    async def list_workers(self, *, filter: str = "") -> list[worker_pb2.Worker]:
        """Every worker (all pages)."""
        workers: list[worker_pb2.Worker] = []
        token = ""
        while True:
            response: pool_pb2.ListWorkersResponse = await self._unary(
                self._stub.ListWorkers, pool_pb2.ListWorkersRequest(filter=filter, page_token=token)
            )
            workers.extend(response.workers)
            token = response.next_page_token
            if not token:
                return workers

    async def stop_worker(
        self,
        name: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
        grace: float | None = None,
        force: bool = False,
    ) -> worker_pb2.Worker:
        """Stop a worker (SIGTERM, then SIGKILL after `grace` seconds); returns it stopped.
        `timeout` is this call's deadline (default: the client's)."""
        request = pool_pb2.StopWorkerRequest(
            name=worker_name(name), grace=grace_duration(grace), force=force
        )
        worker: worker_pb2.Worker = await self._unary(self._stub.StopWorker, request, timeout)
        return worker

    async def delete_worker(
        self, name: str, *, force: bool = False, allow_missing: bool = False
    ) -> None:
        """Forget a stopped worker (`force`: stop it first)."""
        await self._unary(
            self._stub.DeleteWorker,
            pool_pb2.DeleteWorkerRequest(
                name=worker_name(name), force=force, allow_missing=allow_missing
            ),
        )

    async def watch_workers(
        self,
        *,
        filter: str = "",
        send_existing: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[pool_pb2.WatchWorkersResponse]:
        """Worker changes as they happen (EXISTING first with `send_existing`)."""
        request = pool_pb2.WatchWorkersRequest(filter=filter, send_existing=send_existing)
        async for msg in self._stream(self._stub.WatchWorkers, request, timeout):
            yield msg

    async def worker_log_lines(
        self,
        name: str,
        *,
        follow: bool = False,
        tail: int = 0,
        stream: progress_pb2.LogStream.ValueType = progress_pb2.LOG_STREAM_UNSPECIFIED,
        timeout: float | None = None,  # noqa: ASYNC109 (the gRPC deadline, not a wait)
    ) -> AsyncIterator[progress_pb2.LogLine]:
        """A worker's output as LogLine messages (time, stream, text); `tail` = last N lines
        (0: all kept), `follow` keeps the stream open for new lines."""
        request = pool_pb2.GetWorkerLogsRequest(
            name=worker_name(name), follow=follow, tail_lines=tail, stream=stream
        )
        async for msg in self._stream(self._stub.GetWorkerLogs, request, timeout):
            for line in msg.lines:
                yield line

    async def worker_logs(
        self, name: str, *, follow: bool = False, tail: int = 0
    ) -> AsyncIterator[str]:
        """A worker's output, one line of text at a time (see worker_log_lines)."""
        async for line in self.worker_log_lines(name, follow=follow, tail=tail):
            yield line.text
