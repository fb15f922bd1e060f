"""The pool's typed settings: RBEE_POOL_* variables."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.catalog.domain import DeviceKind
from services.common.settings import ACCESS_FIELDS, ServiceSettings
from services.worker.pool.service import PoolConfig

# The prefix of the worker's settings (services.worker.settings.WorkerSettings).
WORKER_ENV_PREFIX = "RBEE_WORKER_"


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
    catalog_address: str = Field(
        default="127.0.0.1:50061", description="The catalog spawns are validated against."
    )
    provisioner_address: str = Field(
        default="127.0.0.1:50081",
        description="The provisioner, for preloading before a spawn; empty: none.",
    )
    worker_command: list[str] = Field(
        default_factory=default_worker_command,
        description="How a worker is started (a JSON list): rbee-worker beside the pool's python.",
    )
    stop_grace: float = Field(default=10.0, ge=0, description="StopWorker's default drain.")
    queue_size: int = Field(
        default=8, ge=0, le=10_000, description="Each spawned worker's queue (requests waiting)."
    )
    start_timeout: float = Field(
        default=60.0, gt=0, description="Health deadline for a worker; grows with model size."
    )

    spare_device_kinds: list[DeviceKind] = Field(
        default_factory=lambda: [DeviceKind.CPU],
        description=(
            "Kinds of device whose workers get a warm spare (a JSON list of cpu, cuda, metal; "
            "[] for none): a worker process started ahead, so the next spawn skips its start."
        ),
    )
    spare_limit: int = Field(
        default=2, ge=0, le=64, description="Warm spares kept at most (0: none)."
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
            worker_env=self.worker_access_env(),
            worker_security=self.client_security(),
            spare_device_kinds=frozenset(self.spare_device_kinds),
            spare_limit=self.spare_limit,
        )

    def worker_access_env(self) -> dict[str, str]:
        """RBEE_WORKER_* variables that give every spawned worker the pool's own access
        settings (one token per mesh: the pool calls its workers with the token they check).

        Every access variable is set, empty where the pool has none, so a stray hive-wide
        variable in the pool's environment cannot give a worker a different token. A token
        read from a file is handed on as the file's path, not as its value.
        """
        env: dict[str, str] = {}
        for name in ACCESS_FIELDS:
            value = getattr(self, name)
            if name == "auth_token" and self.auth_token_file is not None:
                value = None  # the worker reads the same file
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = "" if value is None else str(value)
            env[f"{WORKER_ENV_PREFIX}{name.upper()}"] = text
        return env
