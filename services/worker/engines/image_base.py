"""What an image worker's engine is, without grpc: the domain types of image generation and the
ImageEngine ABC.

Like the LLM engine, an image engine owns one loaded pipeline on one device, its methods BLOCK,
and the worker service calls them from one engine thread at a time. Unlike token generation,
the denoising loop belongs to the library (diffusers calls us back once per step), so
`generate` reports steps through a callback instead of yielding them, and returns the result.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.worker.engines.base import LoadedModel, ProgressCallback

# Bounds the engine enforces (InvalidArgument naming the field outside them).
MIN_SIDE = 64
MAX_SIDE = 2048
SIDE_MULTIPLE = 8
MAX_STEPS = 200
MAX_COUNT = 8
MAX_LORAS = 8  # per request (and per load)
MAX_LORA_SCALE = 4.0  # a LoRA's weight is within +-MAX_LORA_SCALE
DEFAULT_PREVIEW_SIZE = 256


class LoraWeight(BaseModel):
    """A LoRA file on the worker host (an absolute .safetensors path) and its scale (the weight
    its delta is added with: 0 changes nothing, negative values push away from it)."""

    model_config = ConfigDict(frozen=True)

    path: str
    scale: float = 1.0


class ImageLoadOptions(BaseModel):
    """Load-time options (diffusers). None means the engine's documented default."""

    model_config = ConfigDict(frozen=True)

    dtype: str | None = None  # "float16", "bfloat16", "float32"; None: fp16 on GPUs, fp32 on CPU
    scheduler: str | None = None  # the default scheduler by name; None: the pipeline's own
    attention_slicing: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    loras: list[LoraWeight] = Field(default_factory=list)  # fused into the weights at load
    # Single-file checkpoints: the family (sd1, sd2, sdxl, ...; None: from inspection) and a
    # local diffusers folder to take the configs from (None: the family's config repo in the
    # HF cache, SINGLE_FILE_CONFIG_REPOS).
    family: str | None = None
    config: str | None = None
    # Not a wire field: the config folder the catalog records for a model loaded by name
    # (Model.config_folder, set by the provisioner that fetched it), set by the worker service.
    # Tried after `config`, before the HF cache; like the HF cache's family repo, and unlike an
    # explicit `config`, a file's declared prediction type still wins over its scheduler's.
    recorded_config: str | None = None


# The Hub repo whose diffusers configs (model_index.json, component config.json, scheduler,
# tokenizers) a single-file checkpoint of each family is loaded with: diffusers' own defaults
# (`DIFFUSERS_DEFAULT_PIPELINE_PATHS` in diffusers.loaders.single_file_utils), which it would
# download at load time; the worker never downloads, so they must be in the HF cache.
SINGLE_FILE_CONFIG_REPOS: dict[str, str] = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "playground-v2.5": "playgroundai/playground-v2.5-1024px-aesthetic",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}
# The files of a config repo a single file needs (fnmatch patterns, as huggingface_hub's
# allow_patterns): never weights. diffusers fetches "*.json", "*.txt", "*.model" (tokenizers'
# vocab/merges and sentencepiece models).
SINGLE_FILE_CONFIG_PATTERNS: tuple[str, ...] = (
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer*/*.json",
    "tokenizer*/*.txt",
    "tokenizer*/*.model",
)


class ImageParams(BaseModel):
    """Per-request parameters. None means the engine's default (documented in the proto)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the family's default
    guidance_scale: float | None = None  # None: the family's default
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # the first image's seed (image i uses seed + i); None: random
    scheduler: str | None = None  # None: the loaded default
    count: int = 1
    preview_interval: int = 0  # a preview every N steps; 0: none
    preview_size: int = DEFAULT_PREVIEW_SIZE  # the longest edge of previews, pixels
    loras: list[LoraWeight] = Field(default_factory=list)


class ImageProgress(BaseModel):
    """One denoising step done."""

    step: int  # 1-based
    total_steps: int
    image_index: int  # 0-based
    image_count: int
    elapsed_s: float  # since the request's work started
    steps_per_second: float
    preview_png: bytes | None = None  # at `preview_interval` steps only


class GeneratedImage(BaseModel):
    """One finished image, PNG-encoded."""

    png: bytes
    seed: int
    width: int
    height: int
    index: int


class ImageResult(BaseModel):
    """The one final event of an image request."""

    images: list[GeneratedImage]
    scheduler: str
    steps: int
    guidance_scale: float
    total_time_s: float
    steps_per_second: float  # denoising steps per second over the whole request


ImageProgressCallback = Callable[[ImageProgress], None]


class ImageEngine(abc.ABC):
    """An image engine bound to one device. Not thread-safe: one caller at a time."""

    backend: str = ""

    @abc.abstractmethod
    def load(
        self,
        path: Path,
        options: ImageLoadOptions,
        *,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> LoadedModel:
        """Load the pipeline (replacing any loaded one). Raises services.common.errors types:
        InvalidArgument for bad options, FailedPrecondition for a model it cannot run,
        Cancelled when `cancel` is set during the load."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the pipeline's memory; idempotent."""

    @property
    @abc.abstractmethod
    def loaded(self) -> LoadedModel | None:
        """The loaded model, or None."""

    @abc.abstractmethod
    def check_params(self, params: ImageParams) -> None:
        """InvalidArgument (naming the field) for parameters this engine refuses, NotFound
        (FILE_NOT_FOUND) for a LoRA file missing on the host; cheap and safe to call from any
        thread (the worker calls it before queueing the request)."""

    @abc.abstractmethod
    def generate(
        self,
        params: ImageParams,
        *,
        on_progress: ImageProgressCallback,
        cancel: threading.Event,
    ) -> ImageResult:
        """Generate `params.count` images, calling `on_progress` after every step. Raises
        InvalidArgument (naming the field) before any work for bad parameters, NotFound for a
        missing LoRA file, FailedPrecondition (INCOMPATIBLE_MODEL) for a LoRA this pipeline
        cannot use, and Cancelled within one step of `cancel` being set. Leaves no LoRA active
        behind it."""
