"""The pool's calls to the provisioner: page-cache preloading before a worker starts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rbee.provisioner.v1 import provisioner_pb2 as pb
from rbee.provisioner.v1 import provisioner_pb2_grpc
from rbee_client.errors import error_from_rpc
from services.catalog import convert as catalog_convert
from services.catalog.domain import Install
from services.common.channels import ChannelSecurity, open_aio_channel
from services.common.errors import RbeeError, Unavailable, error_for_status


class ProvisionerLink:
    """One aio channel to the provisioner for the pool's life."""

    def __init__(self, address: str, *, security: ChannelSecurity | None = None) -> None:
        """`security`: the pool's token and TLS (settings.client_security()); None: plaintext."""
        self.address = address
        self._channel = open_aio_channel(address, security)
        self._stub = provisioner_pb2_grpc.ProvisionerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def install(
        self, worker_type: str, *, limit_s: float
    ) -> AsyncIterator[InstallProgressNote | Install]:
        """InstallWorker: notes while the recipe builds, then the registered Install."""
        request = pb.InstallWorkerRequest(worker_type=f"worker-types/{worker_type}")
        try:
            async for msg in self._stub.InstallWorker(request, timeout=limit_s):
                if msg.HasField("install"):
                    yield catalog_convert.install_from_msg(msg.install)
                else:
                    state = pb.InstallJobState.Name(msg.progress.state)
                    note = msg.progress.message
                    if note:
                        yield InstallProgressNote(
                            state.removeprefix("INSTALL_JOB_STATE_").lower(), note
                        )
        except grpc.aio.AioRpcError as exc:
            raise _provisioner_error(exc) from None

    async def preload(self, model: str, *, limit_s: float) -> AsyncIterator[tuple[int, int]]:
        """(bytes warmed, total bytes) while the provisioner reads the model's files into the
        page cache; ends when the model is resident."""
        try:
            async for msg in self._stub.Preload(pb.PreloadRequest(model=model), timeout=limit_s):
                if msg.HasField("progress"):
                    progress = msg.progress.bytes
                    yield progress.completed_bytes, progress.total_bytes
                else:
                    yield msg.preload.resident_bytes, msg.preload.total_bytes
        except grpc.aio.AioRpcError as exc:
            raise _provisioner_error(exc) from None


class InstallProgressNote:
    """A line for the INSTALLING stage."""

    def __init__(self, state: str, message: str) -> None:
        self.state = state
        self.message = message


def _provisioner_error(exc: grpc.aio.AioRpcError) -> RbeeError:
    err = error_from_rpc(exc)
    if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"):
        return Unavailable(
            f"the provisioner cannot preload: {err.message}", reason="DEPENDENCY_UNAVAILABLE"
        )
    return error_for_status(err.code, f"preload: {err.message}", reason=err.reason or None)
