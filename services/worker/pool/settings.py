"""The pool's typed settings: RBEE_POOL_* variables."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.worker.pool.service import PoolConfig


def default_worker_command() -> list[str]:
    """`rbee-worker` beside this interpreter (the same environment), else `python -m`."""
    beside = Path(sys.executable).parent / "rbee-worker"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("rbee-worker")
    return [found] if found else [sys.executable, "-m", "services.worker"]


class PoolSettings(ServiceSettings):
    """Where the pool listens, the catalog it asks, and how it runs workers."""

    model_config = SettingsConfigDict(env_prefix="RBEE_POOL_", extra="ignore")

    listen: str = "127.0.0.1:50091"
    metrics_listen: str | None = "127.0.0.1:9491"
    catalog_address: str = "127.0.0.1:50061"
    provisioner_address: str = Field(
        default="127.0.0.1:50081",
        description="The provisioner, for preloading before a spawn; empty: none.",
    )
    worker_command: list[str] = Field(default_factory=default_worker_command)
    stop_grace: float = Field(default=10.0, ge=0, description="StopWorker's default drain.")
    queue_size: int = Field(default=8, ge=0, le=10_000)
    start_timeout: float = Field(
        default=60.0, gt=0, description="Health deadline for a worker; grows with model size."
    )

    def pool_config(self) -> PoolConfig:
        return PoolConfig(
            worker_command=list(self.worker_command),
            catalog_address=self.catalog_address,
            provisioner_address=self.provisioner_address,
            home=self.home,
            logs_dir=self.home / "pool" / "logs",
            default_grace=self.stop_grace,
            default_queue=self.queue_size,
            start_timeout_base=self.start_timeout,
        )
