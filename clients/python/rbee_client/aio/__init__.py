"""Asyncio clients (grpc.aio): the same methods as the sync clients of rbee_client, awaited, with
streams as async iterators, and `async with` closing the channel.

    from rbee_client.aio import CatalogClient

    async with CatalogClient("127.0.0.1:50061") as catalog:
        models, total = await catalog.list_models(all_pages=True)
"""

from rbee_client.aio.catalog import CatalogClient
from rbee_client.aio.pool import PoolClient
from rbee_client.aio.provisioner import ProvisionerClient
from rbee_client.aio.worker import WorkerClient

__all__ = ["CatalogClient", "PoolClient", "ProvisionerClient", "WorkerClient"]
