"""The worker's typed settings: environment variables with the RBEE_WORKER_ prefix.

`rbee-worker` flags override them (see services.worker.__main__). Defaults: the gRPC service on
127.0.0.1:50071, /metrics on 127.0.0.1:9471 and the catalog at 127.0.0.1:50061; the pool gives
every worker it spawns its own ports (usually port 0 is not useful there, since the pool must
know the address).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.catalog.domain import KvCacheType
from services.common.settings import ServiceSettings
from services.worker.devices import DeviceSpec, parse_device
from services.worker.engines.base import LlmLoadOptions
from services.worker.engines.image_base import ImageLoadOptions

EngineName = Literal["llama_cpp", "diffusers", "fake"]


class WorkerSettings(ServiceSettings):
    """One worker process: its engine, device, addresses, queue and optional start-up model."""

    model_config = SettingsConfigDict(env_prefix="RBEE_WORKER_", extra="ignore")

    listen: str = "127.0.0.1:50071"
    metrics_listen: str | None = "127.0.0.1:9471"
    # Short: a SIGTERM cancels the running generation at once (within a token), so in-flight
    # RPCs end quickly; the grace only covers writing their last messages.
    grace_seconds: float = Field(default=5.0, ge=0)

    engine: EngineName = Field(
        default="llama_cpp", description="llama_cpp (GGUF LLMs), diffusers (images) or fake."
    )
    device: str = Field(default="cpu", description="cpu, cuda:N or mps.")
    queue_size: int = Field(
        default=8, ge=0, le=10_000, description="Requests that may wait behind the running one."
    )
    name: str = Field(default="", description="`workers/{worker}` when the pool named it.")
    catalog_address: str = Field(
        default="127.0.0.1:50061",
        description=(
            "The catalog service that LoadModel by model name (no paths) looks models up in; "
            "empty: no catalog (LoadModel then needs paths)."
        ),
    )

    # A model to load before SERVING (optional); `model_name` is its catalog name, reported by
    # GetWorker and checked against requests that name a model.
    model_path: Path | None = Field(default=None, description="A model to load at start-up.")
    model_name: str = Field(
        default="", description="The start-up model's catalog name (`models/ID`)."
    )

    # Load options for the start-up model (LoadModel requests carry their own).
    context_length: int | None = Field(
        default=None, ge=1, description="Context length (default: the model's, capped)."
    )
    gpu_layers: int | None = Field(
        default=None, ge=-1, description="Layers offloaded to the GPU; -1: all."
    )
    threads: int | None = Field(default=None, ge=1, description="CPU threads (default: cores).")
    batch_size: int | None = Field(default=None, ge=1, description="llama.cpp n_batch.")
    ubatch_size: int | None = Field(default=None, ge=1, description="llama.cpp n_ubatch.")
    kv_cache_type: KvCacheType = Field(
        default=KvCacheType.F16, description="KV cache type: f16, q8_0, q4_0, ..."
    )
    flash_attention: bool = Field(default=False, description="llama.cpp flash attention.")
    use_mmap: bool = Field(default=True, description="Map the model file instead of reading it.")
    # Image (diffusers) load options for the start-up model.
    dtype: str | None = Field(default=None, description="float16, bfloat16 or float32.")
    scheduler: str | None = Field(
        default=None, description="The image scheduler at load (default: the model's)."
    )
    attention_slicing: bool = Field(
        default=False, description="Slice attention to save memory (slower)."
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        parse_device(value)  # DeviceSpecError is a ValueError: pydantic reports it
        return value

    @property
    def device_spec(self) -> DeviceSpec:
        """The parsed `device`."""
        return parse_device(self.device)

    def image_load_options(self) -> ImageLoadOptions:
        """The start-up model's load options on a diffusers worker."""
        return ImageLoadOptions(
            dtype=self.dtype, scheduler=self.scheduler, attention_slicing=self.attention_slicing
        )

    def load_options(self) -> LlmLoadOptions:
        """The start-up model's load options."""
        return LlmLoadOptions(
            context_length=self.context_length,
            gpu_layers=self.gpu_layers,
            threads=self.threads,
            batch_size=self.batch_size,
            ubatch_size=self.ubatch_size,
            kv_cache_type=self.kv_cache_type,
            flash_attention=self.flash_attention,
            use_mmap=self.use_mmap,
        )
