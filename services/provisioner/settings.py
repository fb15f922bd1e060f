"""The provisioner's typed settings: RBEE_PROVISIONER_* variables, with the ecosystem's own
variables as fallbacks (HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE, HF_HOME, CIVITAI_API_TOKEN).

Tokens are SecretStr: they render as "**********" in the start-up settings line and reach only
the HTTP seam (services.provisioner.http), which sends them to the first origin of a request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import SHARED_ENV_VARS, ServiceSettings
from services.provisioner.domain import Credentials
from services.provisioner.recipes.pkgbuild import default_recipe_directories
from services.provisioner.sources.context import DEFAULT_QUANTIZATION_PREFERENCE, SourceContext
from services.provisioner.transfer import TransferSettings


def _default_hf_cache() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (as huggingface_hub)."""
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


DEFAULT_PRELOAD_BUDGET = "50%"


def total_ram_bytes() -> int:
    """Physical RAM of this machine (sysconf: Linux and macOS); 0 when unknown."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    return pages * size if pages > 0 and size > 0 else 0


def parse_budget(text: str, *, total_ram: int) -> int:
    """A budget in bytes from `N` (bytes) or `N%` (of `total_ram`); `0` is no budget."""
    text = text.strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return int(total_ram * percent / 100)
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise ValueError(
            f"a preload budget is a number of bytes (e.g. 8589934592) or a percentage of total "
            f"RAM between 0% and 100% (e.g. 50%); got {text!r}"
        ) from None


class ProvisionerSettings(ServiceSettings):
    """Where the provisioner listens, where the catalog is, the upstreams and the transfer."""

    model_config = SettingsConfigDict(env_prefix="RBEE_PROVISIONER_", extra="ignore")

    fallback_env_vars: ClassVar[dict[str, str]] = {
        **SHARED_ENV_VARS,
        "hf_endpoint": "HF_ENDPOINT",
        "hf_token": "HF_TOKEN",
        "hf_cache": "HF_HUB_CACHE",
        "civitai_token": "CIVITAI_API_TOKEN",
    }

    listen: str = "127.0.0.1:50081"
    metrics_listen: str | None = "127.0.0.1:9481"
    catalog_address: str = Field(
        default="127.0.0.1:50061", description="The catalog service this provisioner registers in."
    )

    hf_endpoint: str = Field(
        default="https://huggingface.co", description="The HuggingFace Hub (or a mirror)."
    )
    hf_token: SecretStr | None = Field(
        default=None, description="Hub token for private and gated repos; sent only to the Hub."
    )
    hf_cache: Path = Field(
        default_factory=_default_hf_cache,
        description="The standard HF cache Hub pulls go to (shared with other HF tools).",
    )
    civitai_endpoint: str = Field(default="https://civitai.com", description="CivitAI.")
    civitai_token: SecretStr | None = Field(
        default=None,
        description="CivitAI API token for downloads that need a login; sent only to CivitAI.",
    )
    quantization_preference: tuple[str, ...] = Field(
        default=DEFAULT_QUANTIZATION_PREFERENCE,
        description="GGUF quantizations in order of preference, when a repo has several.",
    )

    max_concurrent_pulls: int = Field(
        default=2, ge=1, le=64, description="Pulls that transfer at once; the others wait QUEUED."
    )
    parallel_files: int = Field(
        default=4,
        ge=1,
        le=16,
        description=(
            "Files of one pull that transfer at once (sharded weights, split GGUF, diffusers "
            "components), each with its own connection and sha256; together they use one "
            "file's buffer memory."
        ),
    )
    resume_on_start: bool = Field(
        default=True,
        description="Restart pulls that a previous run left unfinished (else they stay PAUSED).",
    )
    upstream_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to connect to an upstream and get its answer."
    )
    max_retries: int = Field(
        default=5, ge=0, le=100, description="Retries of a transfer that makes no progress."
    )
    stall_timeout: float = Field(
        default=30.0, gt=0, description="Seconds without a byte before a transfer is retried."
    )
    backoff_initial: float = Field(
        default=0.5, ge=0, description="First wait between retries, seconds (then doubled)."
    )
    backoff_max: float = Field(default=30.0, ge=0, description="Longest wait between retries.")
    bandwidth_limit: int = Field(default=0, ge=0, description="Bytes per second; 0: unlimited.")
    direct_io: bool = Field(
        default=True,
        description=(
            "Write downloads with O_DIRECT where the filesystem allows it: less CPU, no page "
            "cache evicted by a big pull; where refused, writes go through the page cache."
        ),
    )
    preload_budget: str = Field(
        default=DEFAULT_PRELOAD_BUDGET,
        description=(
            "RAM that preloaded models may hold in the page cache: bytes (`8589934592`), or a "
            "percentage of total RAM (`50%`); `0`: no budget. Beyond it the least recently "
            "used preloads are evicted."
        ),
    )

    @field_validator("hf_endpoint", "civitai_endpoint")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"an endpoint must be an http(s) URL, got {value!r}")
        return value

    @field_validator("preload_budget", mode="before")
    @classmethod
    def _check_budget(cls, value: object) -> str:
        text = str(value).strip()
        parse_budget(text, total_ram=1)  # raises ValueError with the accepted forms
        return text

    @field_validator("hf_token", "civitai_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("hf_cache")
    @classmethod
    def _expand_cache(cls, value: Path) -> Path:
        return value.expanduser()

    recipe_dirs: list[Path] = Field(
        default_factory=list,
        description="Where recipes are found; empty: the project's recipes/ and RBEE_HOME/recipes.",
    )
    register_system_installs: bool = Field(
        default=True,
        description="Register this environment's importable backends as 'system' installs.",
    )

    def recipe_directories(self) -> list[Path]:
        return list(self.recipe_dirs) or default_recipe_directories(self.home)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def pulls_dir(self) -> Path:
        return self.home / "provisioner" / "pulls"

    def preload_budget_bytes(self, total_ram: int | None = None) -> int:
        """The preload budget in bytes (a percentage is taken of `total_ram`, default this
        machine's physical RAM); 0: no budget."""
        return parse_budget(self.preload_budget, total_ram=total_ram or total_ram_bytes())

    def credentials(self) -> Credentials:
        return Credentials(hf_token=self.hf_token, civitai_token=self.civitai_token)

    def source_context(self) -> SourceContext:
        return SourceContext(
            hf_endpoint=self.hf_endpoint,
            civitai_endpoint=self.civitai_endpoint,
            hf_cache=self.hf_cache,
            models_dir=self.models_dir,
            credentials=self.credentials(),
            quantization_preference=self.quantization_preference,
            timeout=self.upstream_timeout,
        )

    def transfer_settings(self, bandwidth_limit: int = 0) -> TransferSettings:
        return TransferSettings(
            max_retries=self.max_retries,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            stall_timeout=self.stall_timeout,
            connect_timeout=self.upstream_timeout,
            bandwidth_limit=bandwidth_limit or self.bandwidth_limit,
            direct_io=self.direct_io,
        )
