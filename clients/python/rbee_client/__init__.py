"""The rbee Python SDK: typed clients for every rbee service.

    from rbee_client import CatalogClient, ChannelSecurity

    with CatalogClient("127.0.0.1:50061", security=ChannelSecurity.from_env()) as catalog:
        models, total = catalog.list_models(all_pages=True)

Sync clients live here; rbee_client.aio has the asyncio ones with the same methods. Every call
has a deadline, failures raise the typed exceptions below (built from the server's ErrorInfo),
and only UNAVAILABLE is retried (rbee_client.calls). See clients/python/README.md.

The names are imported on first use, so `rbee --help` (rbee_client.cli) does not pay for
loading every client and its protobuf modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rbee_client.calls import DEFAULT_RETRY, NO_RETRY, RetryPolicy
    from rbee_client.catalog import CatalogClient
    from rbee_client.errors import (
        AbortedError,
        AlreadyExistsError,
        CancelledError,
        DeadlineExceededError,
        FailedPreconditionError,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        RbeeClientError,
        ResourceExhaustedError,
        ServiceUnavailableError,
        UnauthenticatedError,
        UnimplementedError,
    )
    from rbee_client.pool import PoolClient
    from rbee_client.provisioner import PreloadUpdate, ProvisionerClient, PullUpdate
    from rbee_client.worker import WorkerClient
    from services.common.channels import ChannelSecurity

_EXPORTS: dict[str, str] = {
    "DEFAULT_RETRY": "rbee_client.calls",
    "NO_RETRY": "rbee_client.calls",
    "RetryPolicy": "rbee_client.calls",
    "CatalogClient": "rbee_client.catalog",
    "PoolClient": "rbee_client.pool",
    "PreloadUpdate": "rbee_client.provisioner",
    "ProvisionerClient": "rbee_client.provisioner",
    "PullUpdate": "rbee_client.provisioner",
    "WorkerClient": "rbee_client.worker",
    "ChannelSecurity": "services.common.channels",
    **{
        name: "rbee_client.errors"
        for name in (
            "AbortedError",
            "AlreadyExistsError",
            "CancelledError",
            "DeadlineExceededError",
            "FailedPreconditionError",
            "InternalError",
            "InvalidArgumentError",
            "NotFoundError",
            "PermissionDeniedError",
            "RbeeClientError",
            "ResourceExhaustedError",
            "ServiceUnavailableError",
            "UnauthenticatedError",
            "UnimplementedError",
        )
    },
}

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "CatalogClient",
    "ChannelSecurity",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PoolClient",
    "PreloadUpdate",
    "ProvisionerClient",
    "PullUpdate",
    "RbeeClientError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "UnauthenticatedError",
    "UnimplementedError",
    "WorkerClient",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rbee_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
