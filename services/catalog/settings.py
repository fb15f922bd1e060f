"""The catalog's typed settings: environment variables with the RBEE_CATALOG_ prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

# Threads of the catalog's server (see `CatalogSettings.handler_threads`).
DEFAULT_HANDLER_THREADS = 32


class CatalogSettings(ServiceSettings):
    """Where the catalog listens and keeps its database."""

    model_config = SettingsConfigDict(env_prefix="RBEE_CATALOG_", extra="ignore")

    listen: str = "127.0.0.1:50061"
    metrics_listen: str | None = "127.0.0.1:9461"
    handler_threads: int = Field(
        default=DEFAULT_HANDLER_THREADS,
        ge=1,
        le=1024,
        description="Threads that serve calls. GetModel and ListModels take one for well "
        "under a millisecond; every other call holds one while it runs (an inspection of a "
        "cold file, a write), so this many slow calls at once make reads wait.",
    )

    @property
    def database_path(self) -> Path:
        return self.home / "catalog" / "catalog.db"
