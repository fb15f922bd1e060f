"""The image engine on diffusers + torch: loads a diffusers pipeline folder and generates images.

- Loading is offline: `from_pretrained(folder, local_files_only=True)`, so a missing file is an
  error, never a Hub fetch; the safety checker is never loaded.
- Single-file checkpoints (one .safetensors in the original "ldm" layout, as CivitAI serves
  them) load with the pipeline class's `from_single_file(file, config=FOLDER,
  local_files_only=True)`: diffusers converts the weights using the component configs and the
  tokenizers in FOLDER, a local diffusers folder: `image.config` when given, else the folder
  the catalog records for the model (`recorded_config`: Model.config_folder, the family repo's
  snapshot the provisioner fetched into ITS HF cache, which may not be this worker's) when it is
  complete, else the family's config repo (SINGLE_FILE_CONFIG_REPOS: diffusers' own defaults)
  in this worker's HF cache, of which only the small files are needed. FOLDER is always a local
  path: given a repo id, diffusers would download the configs when they are not cached, even
  with `local_files_only=True`. The family is `image.family`, else inspection's; the pipeline
  class is the folder's model_index.json `_class_name`. No folder: FAILED_PRECONDITION naming
  the folders looked in, which repo's files are missing and how to fetch them. The scheduler
  (and so the prediction type) is the config folder's, with one exception: a family repo serves
  one prediction type for the whole family (SD2's is
  stabilityai/stable-diffusion-2-1, v-prediction), so when the configs come from it and the
  file's own SAI ModelSpec header declares another (`modelspec.prediction_type` "epsilon"/"v",
  or the architecture `stable-diffusion-v2-512` / `...-768-v`), the file's wins: an SD2
  512-px base checkpoint is epsilon, and v-prediction would turn its images to noise. An
  explicit `image.config` is taken as is.
- Schedulers by name (SCHEDULERS) are built from the loaded scheduler's config, so the model's
  own beta schedule and prediction type are kept.
- One pipeline call per image: image i uses seed + i on its own CPU torch.Generator (so a seed
  gives the same initial noise on every device), and progress is reported per image.
- Steps are reported from `callback_on_step_end`, which also checks the cancel event: it sets
  `pipe._interrupt`, and diffusers skips the remaining steps. The pipeline returns latents
  (`output_type="latent"`) and the VAE decode is ours, so a cancelled image is never decoded.
- Previews use the latent-to-RGB linear approximation (a 4x3 matrix, the factors ComfyUI and
  A1111 use for SD1.x latents) instead of a VAE decode: one small matrix product instead of a
  full decoder pass, at the price of a blurry, slightly off-colour picture at latent
  resolution, scaled up to `preview_size`. Latents without 4 channels get no preview.
- LoRAs per request (`params.loras`): safetensors files on the worker host, loaded with
  `pipeline.load_lora_weights` (peft) under an adapter name derived from a hash of the file's
  resolved path, size and mtime, so a LoRA reused across requests is read once (a rewritten file
  gets a fresh adapter). At most `max_cached_loras` adapters stay loaded; the least recently
  used one not in the current request is deleted first. A request activates exactly its
  adapters with their weights (`set_adapters` + `enable_lora`) and ends, however it ends, with
  `disable_lora`, so a request without LoRAs runs the base weights (bit for bit). A file that
  is not a LoRA for this pipeline is FAILED_PRECONDITION (INCOMPATIBLE_MODEL) with diffusers'
  reason; diffusers removes the half-loaded adapter, and we make sure of it.
- LoRAs at load (`image.loras`) are fused into the pipeline's weights with their weights
  (`fuse_lora`), then peft's layers are dropped (`unload_lora_weights`): they cost nothing per
  step, cannot be turned off but by loading again, and requests' LoRAs apply on top.
- Pickled LoRAs (.bin, .pt, .ckpt) are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
)
from services.worker.engines.base import LoadedModel, ProgressCallback
from services.worker.engines.image_base import (
    MAX_COUNT,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    SINGLE_FILE_CONFIG_PATTERNS,
    SINGLE_FILE_CONFIG_REPOS,
    GeneratedImage,
    ImageEngine,
    ImageLoadOptions,
    ImageParams,
    ImageProgress,
    ImageProgressCallback,
    ImageResult,
    LoraWeight,
)

logger = logging.getLogger(__name__)

# name -> (diffusers scheduler class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as SD ships it
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
DEFAULT_GUIDANCE_XL = 5.0
SEED_MODULUS = 2**64
# LoRA adapters kept loaded between requests (each holds its weights in device memory: an SDXL
# LoRA is tens to hundreds of MB).
DEFAULT_MAX_CACHED_LORAS = 4
LORA_SUFFIX = ".safetensors"
# diffusers' load errors can list every mismatched tensor; the client gets the start.
MAX_REASON_CHARS = 400
# Rows: the 4 latent channels; columns: R, G, B (SD1.x VAE; close enough for SD2/SDXL previews).
LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def scheduler_names() -> str:
    """The accepted scheduler names, for messages."""
    return ", ".join(SCHEDULERS)


def _check_scheduler(name: str, field: str) -> None:
    if name not in SCHEDULERS:
        raise InvalidArgument.for_field(
            field, f"unknown scheduler {name!r}; use one of: {scheduler_names()}"
        )


def check_image_params(params: ImageParams) -> None:
    """InvalidArgument naming the first bad field; the checks that need no pipeline."""
    if not params.prompt:
        raise InvalidArgument.for_field("params.prompt", "must not be empty")
    for field, value in (("params.width", params.width), ("params.height", params.height)):
        if value is not None and (value % SIDE_MULTIPLE or not MIN_SIDE <= value <= MAX_SIDE):
            raise InvalidArgument.for_field(
                field,
                f"must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, got {value}",
            )
    if params.steps is not None and not 1 <= params.steps <= MAX_STEPS:
        raise InvalidArgument.for_field("params.steps", f"must be 1 to {MAX_STEPS}")
    if not 1 <= params.count <= MAX_COUNT:
        raise InvalidArgument.for_field("params.count", f"must be 1 to {MAX_COUNT}")
    if params.guidance_scale is not None and not 0.0 <= params.guidance_scale <= 50.0:
        raise InvalidArgument.for_field("params.guidance_scale", "must be 0 to 50")
    if params.preview_interval < 0:
        raise InvalidArgument.for_field("params.preview_interval", "must be 0 or more")
    if not 8 <= params.preview_size <= MAX_SIDE:
        raise InvalidArgument.for_field("params.preview_size", f"must be 8 to {MAX_SIDE}")
    if params.seed is not None and not 0 <= params.seed < SEED_MODULUS:
        raise InvalidArgument.for_field("params.seed", "must be 0 to 2^64-1")
    if params.scheduler is not None:
        _check_scheduler(params.scheduler, "params.scheduler")
    check_loras(params.loras, "params.loras")


def check_loras(loras: Sequence[LoraWeight], field: str) -> None:
    """InvalidArgument naming the first bad LoRA field (`{field}[i].path` or `.weight`): at most
    MAX_LORAS, absolute .safetensors paths, finite weights within +-MAX_LORA_SCALE. Touches no
    file (see check_lora_files)."""
    if len(loras) > MAX_LORAS:
        raise InvalidArgument.for_field(field, f"at most {MAX_LORAS} LoRAs, got {len(loras)}")
    for index, lora in enumerate(loras):
        path = Path(lora.path)
        if not lora.path or not path.is_absolute():
            raise InvalidArgument.for_field(
                f"{field}[{index}].path",
                f"must be an absolute path on the worker host, got {lora.path!r}",
            )
        if path.suffix.lower() != LORA_SUFFIX:
            raise InvalidArgument.for_field(
                f"{field}[{index}].path",
                f"must be a {LORA_SUFFIX} file (pickled .bin/.pt/.ckpt LoRAs are refused: "
                f"loading them runs code), got {path.name!r}",
            )
        if not math.isfinite(lora.scale) or abs(lora.scale) > MAX_LORA_SCALE:
            raise InvalidArgument.for_field(
                f"{field}[{index}].weight",
                f"must be from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, got {lora.scale}",
            )


def check_lora_files(loras: Sequence[LoraWeight], field: str) -> None:
    """NotFound (FILE_NOT_FOUND) for the first LoRA whose file is not on the worker host."""
    for lora in loras:
        if not Path(lora.path).is_file():
            raise NotFound(
                f"{field}: no such LoRA file on the worker host: {lora.path}",
                resource_type="file",
                resource_name=lora.path,
                reason="FILE_NOT_FOUND",
            )


def lora_adapter_name(path: Path) -> str:
    """The adapter name of the LoRA file at `path`: a hash of its resolved path, size and mtime,
    so the same file maps to the same cached adapter and a rewritten one to a new adapter."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return "lora_" + hashlib.sha256(key).hexdigest()[:16]


# SAI ModelSpec `modelspec.prediction_type` values -> diffusers' scheduler prediction_type.
MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}
# SAI ModelSpec architectures that say the prediction type (SD2 comes in both).
MODELSPEC_ARCHITECTURE_PREDICTION_TYPES = {
    "stable-diffusion-v2-512": "epsilon",
    "stable-diffusion-v2-768-v": "v_prediction",
}


def declared_prediction_type(path: Path) -> str | None:
    """The scheduler prediction type ("epsilon", "v_prediction") the single-file checkpoint at
    `path` declares in its safetensors header (SAI ModelSpec), or None: no header metadata, no
    such key, or an unknown value. Reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:  # type: ignore[no-untyped-call]
            metadata = checkpoint.metadata() or {}
    except Exception:  # not safetensors, unreadable: nothing declared
        return None
    declared = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if declared in MODELSPEC_PREDICTION_TYPES:
        return MODELSPEC_PREDICTION_TYPES[declared]
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    return MODELSPEC_ARCHITECTURE_PREDICTION_TYPES.get(architecture)


# model_index.json components a single file never needs configs for (we never load them).
SINGLE_FILE_SKIPPED_COMPONENTS = frozenset({"safety_checker", "feature_extractor", "image_encoder"})


def single_file_config_command(repo: str, hf_cache: Path) -> str:
    """The command that puts `repo`'s config files (no weights) into the HF cache `hf_cache`."""
    patterns = " ".join(f"'{pattern}'" for pattern in SINGLE_FILE_CONFIG_PATTERNS)
    return f"HF_HUB_CACHE={hf_cache} hf download {repo} --include {patterns}"


def missing_config_files(folder: Path) -> list[str]:
    """What `folder` lacks as the config of a single-file checkpoint: "model_index.json", or
    the component folders ("text_encoder/", ...) its model_index.json names with no .json file
    in them. Empty: usable."""
    index = folder / "model_index.json"
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError):
        return ["model_index.json"]
    if not isinstance(components, dict):
        return ["model_index.json"]
    missing = []
    for name, value in sorted(components.items()):
        if name.startswith("_") or name in SINGLE_FILE_SKIPPED_COMPONENTS:
            continue
        if not isinstance(value, list) or not value or value[0] is None:
            continue  # a null component, or a plain setting (requires_safety_checker)
        if not any((folder / name).glob("*.json")):
            missing.append(f"{name}/")
    return missing


def find_single_file_config(
    path: Path,
    family: str | None,
    *,
    config: str | None,
    hf_cache: Path,
    recorded: str | None = None,
) -> Path:
    """The local diffusers folder whose configs the single-file checkpoint `path` loads with.

    In this order: `config` (image.config) wins: an absolute folder with model_index.json and
    its components' configs, else InvalidArgument / FailedPrecondition. Then `recorded` (the
    config folder the catalog records for the model, which the provisioner fetched into its own
    HF cache) when it is a complete config folder. Then the family's config repo
    (SINGLE_FILE_CONFIG_REPOS) at its `main` snapshot in the HF cache `hf_cache`. Raises
    FailedPrecondition: INCOMPATIBLE_MODEL when no family is known or the family has no config
    repo (and no usable recorded folder); FAILED_PRECONDITION (with a violation naming
    `hf:REPO`) when neither the recorded folder nor the cache has the repo's files, naming every
    folder it looked in and saying how to fetch them.
    """
    if config is not None:
        folder = Path(config)
        if not folder.is_absolute():
            raise InvalidArgument.for_field(
                "image.config", f"must be an absolute folder on the worker host, got {config!r}"
            )
        if not folder.is_dir():
            raise NotFound(
                f"image.config: no such folder on the worker host: {config}",
                resource_type="file",
                resource_name=config,
                reason="FILE_NOT_FOUND",
            )
        missing = missing_config_files(folder)
        if missing:
            raise FailedPrecondition(
                f"image.config {folder} is not a diffusers config folder for {path.name}: it "
                f"lacks {', '.join(missing)}",
                violations=[
                    PreconditionViolation("CONFIG_INCOMPLETE", str(folder), ", ".join(missing))
                ],
            )
        return folder
    # What was wrong with the recorded folder, for the message when the cache lacks them too.
    recorded_problem = ""
    if recorded:
        recorded_folder = Path(recorded)
        if not recorded_folder.is_absolute():
            recorded_problem = "is not an absolute path"
        elif not recorded_folder.is_dir():
            recorded_problem = "does not exist on this host"
        elif lacking := missing_config_files(recorded_folder):
            recorded_problem = f"lacks {', '.join(lacking)}"
        else:
            return recorded_folder
        logger.warning(
            "%s: the catalog's config folder %s %s; trying the HF cache",
            path.name,
            recorded,
            recorded_problem,
        )
    # Said in every refusal below, so the message names each folder looked in.
    recorded_note = (
        f" (the config folder the catalog records for this model, {recorded}, {recorded_problem})"
        if recorded
        else ""
    )
    if family is None:
        raise FailedPrecondition(
            f"{path.name}: cannot tell the model family of this single file (inspection names "
            f"none), so its configs are unknown{recorded_note}: set image.family (one of "
            f"{', '.join(SINGLE_FILE_CONFIG_REPOS)}) or image.config (a local diffusers folder "
            "of the same model)",
            reason="INCOMPATIBLE_MODEL",
        )
    repo = SINGLE_FILE_CONFIG_REPOS.get(family)
    if repo is None:
        raise FailedPrecondition(
            f"{path.name} is a single-file {family} checkpoint; this worker knows no config "
            f"repo for {family} (it knows {', '.join(SINGLE_FILE_CONFIG_REPOS)}){recorded_note}: "
            "set image.config to a local diffusers folder of the same model",
            reason="INCOMPATIBLE_MODEL",
        )
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "model_index.json", cache_dir=hf_cache)
    missing = ["model_index.json"]
    if isinstance(found, str):
        folder = Path(found).parent
        missing = missing_config_files(folder)
        if not missing:
            return folder
    command = single_file_config_command(repo, hf_cache)
    metadata = {"family": family, "config_repo": repo}
    if recorded:
        metadata["recorded_config"] = recorded
    raise FailedPrecondition(
        f"{path.name} is a single-file {family} checkpoint: loading it needs the diffusers "
        f"configs and tokenizers of {repo} (model_index.json, the components' config.json, "
        f"scheduler/, tokenizer/; no weights), and this worker's HF cache {hf_cache} lacks "
        f"{', '.join(missing)} of them{recorded_note}. Fetch them with `{command}` "
        "(pulling a single-file checkpoint with `rbee pull` fetches them too), or set "
        "image.config to a local diffusers folder of the same family",
        violations=[
            PreconditionViolation(
                "SINGLE_FILE_CONFIG_MISSING",
                f"hf:{repo}",
                (f"{recorded}: {recorded_problem}; " if recorded else "")
                + f"not in {hf_cache}: "
                + ", ".join(missing),
            )
        ],
        metadata=metadata,
    )


@contextlib.contextmanager
def _peft_notes_silenced() -> Iterator[None]:
    """peft warns about what a cache of adapters does on purpose (several adapters in a model,
    the others' keys "missing" from each file, deleting one that was active): log noise here."""
    with warnings.catch_warnings():
        for message in ("missing keys", "multiple adapters", "is now deleted"):
            warnings.filterwarnings("ignore", message=f".*{message}.*", category=UserWarning)
        yield


def _short_reason(exc: BaseException) -> str:
    """The start of `exc`'s message on one line (torch lists one line per mismatched tensor)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def _encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def latents_preview_png(latents: Any, size: int) -> bytes | None:
    """A PNG of the first latent through the linear latent-to-RGB approximation, its longest
    edge scaled to `size`; None for latents that are not 4-channel."""
    import torch
    from PIL import Image

    if latents.ndim != 4 or latents.shape[1] != len(LATENT_RGB_FACTORS):
        return None
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].detach().float().cpu(), factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, mode="RGB")
    scale = size / max(image.size)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return _encode_png(image.resize(target, Image.Resampling.BILINEAR))


class _StepReporter:
    """diffusers' `callback_on_step_end` for one request: reports each step (with a preview at
    the interval) and interrupts the pipeline once `cancel` is set."""

    def __init__(
        self,
        params: ImageParams,
        on_progress: ImageProgressCallback,
        cancel: threading.Event,
        *,
        default_total: int,
    ) -> None:
        self._params = params
        self._on_progress = on_progress
        self._cancel = cancel
        self._default_total = default_total
        self.started = time.perf_counter()
        self._index = 0
        self._image_started = self.started
        self._denoise_before = 0.0  # denoising seconds of the images already done
        self._steps_done = 0

    def start_image(self, index: int) -> None:
        self._index = index
        self._image_started = time.perf_counter()

    def end_image(self) -> None:
        self._denoise_before += time.perf_counter() - self._image_started

    def steps_per_second(self) -> float:
        """Denoising steps per second over the images done (VAE decode and encode excluded)."""
        seconds = self._denoise_before
        return self._steps_done / seconds if seconds > 0 else 0.0

    def on_step_end(
        self, pipeline: Any, step_index: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        """Called by diffusers after every step; must return the tensors it was given."""
        self._steps_done += 1
        step = step_index + 1
        now = time.perf_counter()
        params = self._params
        preview = None
        interval = params.preview_interval
        if interval and step % interval == 0 and "latents" in tensors:
            preview = latents_preview_png(tensors["latents"], params.preview_size)
        denoising = self._denoise_before + (now - self._image_started)
        self._on_progress(
            ImageProgress(
                step=step,
                # The loop's own length: multistep schedulers may differ from the request.
                total_steps=int(getattr(pipeline, "num_timesteps", self._default_total)),
                image_index=self._index,
                image_count=params.count,
                elapsed_s=now - self.started,
                steps_per_second=self._steps_done / denoising if denoising > 0 else 0.0,
                preview_png=preview,
            )
        )
        if self._cancel.is_set():
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return tensors


def _model_index(folder: Path) -> dict[str, Any]:
    """A pipeline folder's model_index.json ({} when it cannot be read: the load then says why)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


class DiffusersEngine(ImageEngine):
    """diffusers text-to-image pipelines on one torch device ("cpu", "cuda", "mps").

    `max_cached_loras` bounds the per-request LoRA adapters kept loaded between requests.
    `hf_cache` is the HF cache single-file checkpoints find their family's configs in; None:
    huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
    `threads` sets torch's intra-op threads (process-wide) when a model loads; None leaves
    torch's default (all cores). On a busy or small CPU fewer threads can be much faster:
    torch's OpenMP workers spin while they wait for cores (measured here on 2 shared cores with
    a tiny UNet: 1 thread ran 30x faster than 2).
    """

    backend = "diffusers"

    def __init__(
        self,
        device: str = "cpu",
        *,
        threads: int | None = None,
        max_cached_loras: int = DEFAULT_MAX_CACHED_LORAS,
        hf_cache: Path | None = None,
    ) -> None:
        self._device = device
        self._hf_cache = hf_cache
        self._threads = threads
        self._max_cached_loras = max(1, max_cached_loras)
        # adapter name -> LoRA path, least recently used first (see the module docstring).
        self._adapters: OrderedDict[str, str] = OrderedDict()
        self._pipe: Any = None
        self._loaded: LoadedModel | None = None
        self._base_scheduler_config: Any = None
        self._own_scheduler: Any = None  # the pipeline's, for requests that name none
        self._default_scheduler: str = ""

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    @property
    def cached_loras(self) -> list[str]:
        """The paths of the LoRAs loaded as adapters, least recently used first."""
        return list(self._adapters.values())

    # ---- load ----------------------------------------------------------------------------------

    def _dtype(self, name: str | None) -> Any:
        import torch

        if name is None:
            name = "float32" if self._device == "cpu" else "float16"
        if name not in DTYPES:
            raise InvalidArgument.for_field(
                "image.dtype", f"unknown dtype {name!r}; use one of: {', '.join(DTYPES)}"
            )
        return getattr(torch, name)

    def load(
        self,
        path: Path,
        options: ImageLoadOptions,
        *,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> LoadedModel:
        """Load a diffusers folder or a single-file checkpoint offline (see the module
        docstring)."""
        dtype = self._dtype(options.dtype)
        if options.scheduler is not None:
            _check_scheduler(options.scheduler, "image.scheduler")
        check_loras(options.loras, "image.loras")
        check_lora_files(options.loras, "image.loras")
        config: Path | None = None
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise FailedPrecondition(
                    f"{path} is not a diffusers pipeline folder (no model_index.json)",
                    reason="INCOMPATIBLE_MODEL",
                )
        else:
            config = find_single_file_config(
                path,
                self._single_file_family(path, options),
                config=options.config,
                hf_cache=self._hf_cache_folder(),
                recorded=options.recorded_config,
            )
        self.unload()
        started = time.perf_counter()
        progress(0.0, f"reading {path.name}")
        import diffusers
        import torch

        if self._threads is not None:
            torch.set_num_threads(self._threads)
        # Our progress goes through `progress`; tqdm bars on stderr would only clutter the log.
        diffusers.utils.logging.disable_progress_bar()

        if config is None:
            pipe = self._from_pretrained(path, dtype)
        else:
            pipe = self._from_single_file(path, config, dtype)
            if options.config is None:  # the family repo's configs (module docstring)
                self._apply_declared_prediction_type(pipe, path)
        if cancel.is_set():
            raise Cancelled("the load was cancelled")
        pipe = pipe.to(self._device)
        pipe.set_progress_bar_config(disable=True)
        if options.attention_slicing:
            pipe.enable_attention_slicing()
        if options.vae_tiling:
            pipe.vae.enable_tiling()
        if options.vae_slicing:
            pipe.vae.enable_slicing()
        if options.loras:
            progress(0.8, f"fusing {len(options.loras)} LoRA(s)")
            self._fuse_loras(pipe, options.loras, cancel)
        self._base_scheduler_config = pipe.scheduler.config
        self._own_scheduler = pipe.scheduler
        if options.scheduler is not None:
            self._default_scheduler = options.scheduler
        else:
            # Named after the pipeline's own class when we have a name for it (the first match:
            # its config, e.g. karras sigmas, carries over anyway).
            own_class = type(pipe.scheduler).__name__
            names = [name for name, (cls, _) in SCHEDULERS.items() if cls == own_class]
            self._default_scheduler = names[0] if names else own_class
        memory = 0
        for component in pipe.components.values():
            parameters = getattr(component, "parameters", None)
            if callable(parameters):
                memory += sum(p.numel() * p.element_size() for p in parameters())
        self._pipe = pipe
        self._loaded = LoadedModel(
            path=str(path),
            name=type(pipe).__name__,
            memory_bytes=memory,
            load_seconds=time.perf_counter() - started,
        )
        progress(1.0, "loaded")
        return self._loaded

    @staticmethod
    def _from_pretrained(path: Path, dtype: Any) -> Any:
        import diffusers

        try:
            with warnings.catch_warnings():
                # `torch_dtype` is what every supported diffusers takes; newer ones also take
                # `dtype` and warn about the old name.
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                # The safety checker is never loaded; say so only to pipelines that have one
                # (SDXL's warns about an unexpected keyword).
                extra: dict[str, Any] = {}
                if "safety_checker" in _model_index(path):
                    extra["safety_checker"] = None
                return diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                    path, local_files_only=True, torch_dtype=dtype, **extra
                )
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"cannot load the pipeline in {path.name}: {exc}", reason="MODEL_FILE_INVALID"
            ) from exc

    def _hf_cache_folder(self) -> Path:
        if self._hf_cache is not None:
            return self._hf_cache
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    @staticmethod
    def _single_file_family(path: Path, options: ImageLoadOptions) -> str | None:
        """image.family, else the family inspection reads from the file's header."""
        if options.family is not None:
            return options.family
        from services.catalog.inspect import inspect_path

        try:
            return inspect_path(path).family
        except Exception:  # unreadable header: from_single_file reports it better
            logger.warning("cannot inspect %s for its family", path, exc_info=True)
            return None

    @staticmethod
    def _from_single_file(path: Path, config: Path, dtype: Any) -> Any:
        """The pipeline class named by `config`'s model_index.json, from the checkpoint at
        `path` with `config` as its configs; never the safety checker, never a download."""
        import diffusers
        import torch

        class_name = json.loads((config / "model_index.json").read_text()).get("_class_name")
        pipeline_class = getattr(diffusers, str(class_name), None)
        if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
            raise FailedPrecondition(
                f"{path.name}: the config folder {config} names the pipeline {class_name!r}, "
                "which diffusers cannot load from a single file",
                reason="INCOMPATIBLE_MODEL",
            )
        expected, optional = pipeline_class._get_signature_keys(pipeline_class)
        extra: dict[str, Any] = {
            name: None for name in SINGLE_FILE_SKIPPED_COMPONENTS if name in expected
        }
        if "requires_safety_checker" in optional:
            extra["requires_safety_checker"] = False
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                return pipeline_class.from_single_file(
                    str(path),
                    config=str(config),  # a local folder: never a Hub fetch (module docstring)
                    local_files_only=True,
                    torch_dtype=dtype,
                    **extra,
                )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # diffusers' conversion raises KeyError, ValueError, its own
            raise FailedPrecondition(
                f"cannot load {path.name} as a single-file {pipeline_class.__name__} with the "
                f"configs in {config}: {_short_reason(exc)}",
                reason="MODEL_FILE_INVALID",
            ) from exc

    @staticmethod
    def _apply_declared_prediction_type(pipe: Any, path: Path) -> None:
        """Rebuild `pipe`'s scheduler with the prediction type `path` declares when it differs
        from the family config's (see the module docstring)."""
        declared = declared_prediction_type(path)
        current = pipe.scheduler.config.get("prediction_type")
        if declared is None or current is None or declared == current:
            return
        logger.info(
            "%s declares prediction_type %s; its family's config says %s: using %s",
            path.name,
            declared,
            current,
            declared,
        )
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=declared
        )

    def unload(self) -> None:
        """Drop the pipeline (and the CUDA cache when on a GPU); idempotent."""
        if self._pipe is None:
            return
        self._pipe = None
        self._loaded = None
        self._own_scheduler = None
        self._adapters.clear()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # ---- generate ------------------------------------------------------------------------------

    def _scheduler(self, name: str) -> Any:
        import diffusers

        class_name, extra = SCHEDULERS[name]
        cls = getattr(diffusers, class_name)
        return cls.from_config(self._base_scheduler_config, **extra)

    def check_params(self, params: ImageParams) -> None:
        """check_image_params, then the LoRA files' presence (NotFound)."""
        check_image_params(params)
        check_lora_files(params.loras, "params.loras")

    # ---- LoRAs ---------------------------------------------------------------------------------

    def _fuse_loras(self, pipe: Any, loras: Sequence[LoraWeight], cancel: threading.Event) -> None:
        """Fuse `loras` with their weights into the pipeline's own weights (`image.loras` at
        load): no per-step cost, and requests' LoRAs still apply on top."""
        names = []
        for index, lora in enumerate(loras):
            if cancel.is_set():
                raise Cancelled("the load was cancelled")
            name = f"fused_{index}"
            self._load_lora(pipe, Path(lora.path), name, f"image.loras[{index}]")
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        # The deltas are in the base weights now: drop peft's layers (and their memory).
        pipe.unload_lora_weights()

    def _load_lora(self, pipe: Any, path: Path, name: str, field: str) -> None:
        """Load the LoRA at `path` as adapter `name`; FailedPrecondition (INCOMPATIBLE_MODEL)
        with diffusers' reason when it is not a LoRA for this pipeline, the pipeline unchanged."""
        import torch
        from diffusers.utils.constants import USE_PEFT_BACKEND

        if not USE_PEFT_BACKEND:  # else diffusers' ValueError would read as a bad LoRA file
            raise FailedPrecondition(
                f"{field}: LoRAs need peft, which this worker's environment lacks (install "
                "the `sd` extra)"
            )
        try:
            with _peft_notes_silenced():
                pipe.load_lora_weights(
                    str(path.parent),
                    weight_name=path.name,
                    adapter_name=name,
                    local_files_only=True,
                    use_safetensors=True,  # never the pickle fallback
                )
        except torch.OutOfMemoryError:
            self._delete_adapter(pipe, name)
            raise
        except Exception as exc:  # whatever the file holds, it is not a LoRA we can use
            self._delete_adapter(pipe, name)
            raise FailedPrecondition(
                f"{field}: {path.name} is not a LoRA this {type(pipe).__name__} can use: "
                f"{_short_reason(exc)}",
                reason="INCOMPATIBLE_MODEL",
            ) from exc
        if not self._has_adapter(pipe, name):
            # diffusers only warns when no key matches a layer of the pipeline.
            raise FailedPrecondition(
                f"{field}: {path.name} is not a LoRA this {type(pipe).__name__} can use: none "
                "of its tensors matches a layer of the pipeline (a LoRA for another model "
                "family?)",
                reason="INCOMPATIBLE_MODEL",
            )

    @staticmethod
    def _has_adapter(pipe: Any, name: str) -> bool:
        return any(name in names for names in pipe.get_list_adapters().values())

    @classmethod
    def _delete_adapter(cls, pipe: Any, name: str) -> None:
        """Remove adapter `name` wherever a failed or evicted load left it."""
        if cls._has_adapter(pipe, name):
            with _peft_notes_silenced():
                pipe.delete_adapters([name])

    def _prepare_loras(
        self, pipe: Any, loras: Sequence[LoraWeight], cancel: threading.Event
    ) -> dict[str, float]:
        """The request's adapters (adapter name -> summed weight), loading the ones not cached
        and evicting the least recently used others beyond `max_cached_loras`. Activates
        nothing."""
        names: list[str] = []
        weights: dict[str, float] = {}
        for index, lora in enumerate(loras):
            try:
                name = lora_adapter_name(Path(lora.path))
            except OSError as exc:  # gone since check_params
                raise NotFound(
                    f"params.loras[{index}]: no such LoRA file on the worker host: {lora.path}",
                    resource_type="file",
                    resource_name=lora.path,
                    reason="FILE_NOT_FOUND",
                ) from exc
            names.append(name)
            # The same file twice: one adapter, the weights add up (a LoRA's delta is linear).
            weights[name] = weights.get(name, 0.0) + lora.scale
        for index, (lora, name) in enumerate(zip(loras, names, strict=True)):
            if name in self._adapters:
                self._adapters.move_to_end(name)
                continue
            if cancel.is_set():
                raise Cancelled("the generation was cancelled")
            self._evict_adapters(pipe, keep=weights.keys(), room=1)  # before: less peak memory
            self._load_lora(pipe, Path(lora.path), name, f"params.loras[{index}]")
            self._adapters[name] = lora.path
            logger.info("loaded LoRA %s as adapter %s", lora.path, name)
        self._evict_adapters(pipe, keep=weights.keys(), room=0)
        return weights

    def _evict_adapters(self, pipe: Any, *, keep: Collection[str], room: int) -> None:
        """Delete the least recently used adapters not in `keep` until `room` more fit in
        `max_cached_loras` (or only kept ones are left: a request may need more)."""
        for name in [n for n in self._adapters if n not in keep]:
            if len(self._adapters) + room <= self._max_cached_loras:
                break
            self._delete_adapter(pipe, name)
            del self._adapters[name]

    def generate(
        self,
        params: ImageParams,
        *,
        on_progress: ImageProgressCallback,
        cancel: threading.Event,
    ) -> ImageResult:
        """Generate the images one pipeline call each (see the module docstring)."""
        import torch

        self.check_params(params)
        pipe = self._pipe
        if pipe is None:
            raise FailedPrecondition("no model is loaded", reason="MODEL_NOT_LOADED")
        native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        width = params.width or native
        height = params.height or native
        steps = params.steps or DEFAULT_STEPS
        is_xl = "XL" in type(pipe).__name__
        guidance = params.guidance_scale
        if guidance is None:
            guidance = DEFAULT_GUIDANCE_XL if is_xl else DEFAULT_GUIDANCE
        scheduler_name = params.scheduler or self._default_scheduler
        # A fresh scheduler per request: schedulers keep per-run state (step index, sigmas).
        if scheduler_name in SCHEDULERS:
            pipe.scheduler = self._scheduler(scheduler_name)
        else:  # the pipeline's own class, which has no name here
            pipe.scheduler = self._own_scheduler
        first_seed = params.seed if params.seed is not None else secrets.randbits(32)
        reporter = _StepReporter(params, on_progress, cancel, default_total=steps)
        adapters = self._prepare_loras(pipe, params.loras, cancel)
        images: list[GeneratedImage] = []
        try:
            if adapters:
                pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
                pipe.enable_lora()  # set_adapters does not undo the last request's disable_lora
            for index in range(params.count):
                if cancel.is_set():
                    raise Cancelled("the generation was cancelled")
                seed = (first_seed + index) % SEED_MODULUS
                generator = torch.Generator("cpu").manual_seed(seed)
                reporter.start_image(index)
                with torch.inference_mode():
                    latents = pipe(
                        prompt=params.prompt,
                        negative_prompt=params.negative_prompt or None,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        width=width,
                        height=height,
                        generator=generator,
                        output_type="latent",
                        callback_on_step_end=reporter.on_step_end,
                        callback_on_step_end_tensor_inputs=["latents"],
                    ).images
                    reporter.end_image()
                    if cancel.is_set():
                        raise Cancelled("the generation was cancelled")
                    images.append(self._decode(pipe, latents, seed=seed, index=index))
        finally:
            if adapters:
                # The next request runs the base weights unless it activates its own LoRAs.
                pipe.disable_lora()
        return ImageResult(
            images=images,
            scheduler=scheduler_name,
            steps=steps,
            guidance_scale=guidance,
            total_time_s=time.perf_counter() - reporter.started,
            steps_per_second=reporter.steps_per_second(),
        )

    @staticmethod
    def _decode(pipe: Any, latents: Any, *, seed: int, index: int) -> GeneratedImage:
        vae = pipe.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        decoded = vae.decode(scaled, return_dict=False)[0]
        image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        return GeneratedImage(
            png=_encode_png(image), seed=seed, width=image.width, height=image.height, index=index
        )
