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
        ge=0,
        le=1024,
        description="Threads that serve calls (a threaded server: the quickest answers at a few "
        "calls in flight). GetModel, ListModels and cached compatibility answers take one for "
        "about a millisecond; other calls hold one while they run (an inspection, a write), so "
        "this many slow calls at once make reads wait. 0: serve on the event loop (grpc.aio) "
        "instead, which spends less CPU per call with dozens of calls in flight.",
    )

    @property
    def database_path(self) -> Path:
        return self.home / "catalog" / "catalog.db"
