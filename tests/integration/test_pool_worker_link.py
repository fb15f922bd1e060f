"""The pool's link to a worker when the worker goes away in the middle of a call."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rbee.worker.v1 import worker_pb2 as pb
from services.common.errors import Unavailable
from services.worker.pool.worker_link import WorkerLink

pytestmark = pytest.mark.integration

GET_WORKER = "GetWorker"
SERVICE = pb.DESCRIPTOR.services_by_name["WorkerService"].full_name


async def slow_worker() -> tuple[grpc.aio.Server, int, asyncio.Event]:
    """A worker whose GetWorker answers only after a long while."""
    called = asyncio.Event()

    async def get_worker(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        called.set()
        await asyncio.sleep(30)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {GET_WORKER: grpc.unary_unary_rpc_method_handler(get_worker)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, called


async def test_a_link_closed_during_a_call_is_unavailable_not_a_cancellation() -> None:
    server, port, called = await slow_worker()
    link = WorkerLink(f"127.0.0.1:{port}")
    try:
        status = asyncio.ensure_future(link.status())
        await asyncio.wait_for(called.wait(), 10)
        await link.close()  # what the pool does when the worker process exits
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(status, 10)
        assert caught.value.reason == "WORKER_UNAVAILABLE"
    finally:
        await server.stop(0)


async def test_cancelling_the_caller_still_cancels() -> None:
    server, port, called = await slow_worker()
    link = WorkerLink(f"127.0.0.1:{port}")
    try:
        status = asyncio.ensure_future(link.status())
        await asyncio.wait_for(called.wait(), 10)
        status.cancel()
        with pytest.raises(asyncio.CancelledError):
            await status
    finally:
        await link.close()
        await server.stop(0)
