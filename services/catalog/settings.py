"""The catalog's typed settings: environment variables with the RBEE_CATALOG_ prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CatalogSettings(ServiceSettings):
    """Where the catalog listens and keeps its database."""

    model_config = SettingsConfigDict(env_prefix="RBEE_CATALOG_", extra="ignore")

    listen: str = "127.0.0.1:50061"
    metrics_listen: str | None = "127.0.0.1:9461"

    @property
    def database_path(self) -> Path:
        return self.home / "catalog" / "catalog.db"
