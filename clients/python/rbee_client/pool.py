"""A typed, synchronous client for rbee.worker.v1.PoolService (the hive's worker supervisor).

    from rbee_client import PoolClient
    from rbee.worker.v1 import pool_pb2, worker_pb2

    with PoolClient("127.0.0.1:50091") as pool:
        request = pool_pb2.SpawnWorkerRequest(model="models/tiny", worker_type="cpu-llm")
        for event in pool.spawn_worker(request, timeout=600):
            if isinstance(event, worker_pb2.Worker):
                print("ready at", event.endpoint)
            else:
                print(pool_pb2.SpawnStage.Name(event.stage), event.message)

Events are the generated protobuf messages. Unary calls carry a deadline (`timeout`, default
30 s); streams have none unless given one. Failures raise the typed exceptions of
rbee_client.errors; only UNAVAILABLE is retried, and a stream never once it has yielded an event.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import duration_pb2

from rbee.common.v1 import device_pb2, progress_pb2
from rbee.worker.v1 import pool_pb2, pool_pb2_grpc, worker_pb2
from rbee_client.calls import DEFAULT_RETRY, DEFAULT_TIMEOUT, RetryPolicy, ServiceClient
from services.common.channels import ChannelSecurity

SpawnEvent = pool_pb2.SpawnProgress | worker_pb2.Worker


def worker_name(name: str) -> str:
    """`workers/ID` from `ID` or `workers/ID`."""
    return name if name.startswith("workers/") else f"workers/{name}"


def device_name(name: str) -> str:
    """`devices/ID` from `ID` or `devices/ID`."""
    return name if name.startswith("devices/") else f"devices/{name}"


def spawn_event_from_pb(msg: pool_pb2.SpawnWorkerResponse) -> SpawnEvent:
    """The event a SpawnWorker response carries."""
    return msg.worker if msg.HasField("worker") else msg.progress


def grace_duration(seconds: float | None) -> duration_pb2.Duration | None:
    """A Duration for a grace period in seconds (None: the pool's default)."""
    if seconds is None:
        return None
    grace = duration_pb2.Duration()
    grace.FromNanoseconds(int(seconds * 1e9))
    return grace


class PoolClient(ServiceClient):
    """Talks to one pool; usable as a context manager (closes the channel it opened)."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(target, security=security, timeout=timeout, channel=channel, retry=retry)
        self._stub = pool_pb2_grpc.PoolServiceStub(self._channel)

    # ---- devices ----------------------------------------------------------------------------

    def list_devices(self, *, filter: str = "") -> list[device_pb2.Device]:
        """Every device of the hive (all pages)."""
        devices: list[device_pb2.Device] = []
        token = ""
        while True:
            response: pool_pb2.ListDevicesResponse = self._unary(
                self._stub.ListDevices, pool_pb2.ListDevicesRequest(filter=filter, page_token=token)
            )
            devices.extend(response.devices)
            token = response.next_page_token
            if not token:
                return devices

    def get_device(self, name: str) -> device_pb2.Device:
        """One device (`devices/ID` or `ID`)."""
        device: device_pb2.Device = self._unary(
            self._stub.GetDevice, pool_pb2.GetDeviceRequest(name=device_name(name))
        )
        return device

    # ---- workers ----------------------------------------------------------------------------

    def spawn_worker(
        self, request: pool_pb2.SpawnWorkerRequest, *, timeout: float | None = None
    ) -> Iterator[SpawnEvent]:
        """Spawn (or reuse) a worker: SpawnProgress events, then the ready Worker."""
        for msg in self._stream(self._stub.SpawnWorker, request, timeout):
            yield spawn_event_from_pb(msg)

    def get_worker(self, name: str) -> worker_pb2.Worker:
        """One worker (`workers/ID` or `ID`)."""
        worker: worker_pb2.Worker = self._unary(
            self._stub.GetWorker, pool_pb2.GetWorkerRequest(name=worker_name(name))
        )
        return worker

    def list_workers(self, *, filter: str = "") -> list[worker_pb2.Worker]:
        """Every worker (all pages)."""
        workers: list[worker_pb2.Worker] = []
        token = ""
        while True:
            response: pool_pb2.ListWorkersResponse = self._unary(
                self._stub.ListWorkers, pool_pb2.ListWorkersRequest(filter=filter, page_token=token)
            )
            workers.extend(response.workers)
            token = response.next_page_token
            if not token:
                return workers

    def stop_worker(
        self,
        name: str,
        *,
        timeout: float | None = None,
        grace: float | None = None,
        force: bool = False,
    ) -> worker_pb2.Worker:
        """Stop a worker (SIGTERM, then SIGKILL after `grace` seconds); returns it stopped.
        `timeout` is this call's deadline (default: the client's)."""
        request = pool_pb2.StopWorkerRequest(
            name=worker_name(name), grace=grace_duration(grace), force=force
        )
        worker: worker_pb2.Worker = self._unary(self._stub.StopWorker, request, timeout)
        return worker

    def delete_worker(self, name: str, *, force: bool = False, allow_missing: bool = False) -> None:
        """Forget a stopped worker (`force`: stop it first)."""
        self._unary(
            self._stub.DeleteWorker,
            pool_pb2.DeleteWorkerRequest(
                name=worker_name(name), force=force, allow_missing=allow_missing
            ),
        )

    def watch_workers(
        self, *, filter: str = "", send_existing: bool = True, timeout: float | None = None
    ) -> Iterator[pool_pb2.WatchWorkersResponse]:
        """Worker changes as they happen (EXISTING first with `send_existing`)."""
        request = pool_pb2.WatchWorkersRequest(filter=filter, send_existing=send_existing)
        yield from self._stream(self._stub.WatchWorkers, request, timeout)

    def worker_log_lines(
        self,
        name: str,
        *,
        follow: bool = False,
        tail: int = 0,
        stream: progress_pb2.LogStream.ValueType = progress_pb2.LOG_STREAM_UNSPECIFIED,
        timeout: float | None = None,
    ) -> Iterator[progress_pb2.LogLine]:
        """A worker's output as LogLine messages (time, stream, text); `tail` = last N lines
        (0: all kept), `follow` keeps the stream open for new lines."""
        request = pool_pb2.GetWorkerLogsRequest(
            name=worker_name(name), follow=follow, tail_lines=tail, stream=stream
        )
        for msg in self._stream(self._stub.GetWorkerLogs, request, timeout):
            yield from msg.lines

    def worker_logs(self, name: str, *, follow: bool = False, tail: int = 0) -> Iterator[str]:
        """A worker's output, one line of text at a time (see worker_log_lines)."""
        for line in self.worker_log_lines(name, follow=follow, tail=tail):
            yield line.text
