"""The image engine on diffusers + torch: loads a diffusers pipeline folder and generates images.

- Loading is offline: `from_pretrained(folder, local_files_only=True)`, so a missing file is an
  error, never a Hub fetch. Single-file checkpoints are refused for now (FAILED_PRECONDITION,
  convert to a diffusers folder); the safety checker is never loaded.
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
- LoRAs are refused (INVALID_ARGUMENT): diffusers needs `peft` for them, not installed here.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from services.worker.engines.base import LoadedModel, ProgressCallback
from services.worker.engines.image_base import (
    MAX_COUNT,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GeneratedImage,
    ImageEngine,
    ImageLoadOptions,
    ImageParams,
    ImageProgress,
    ImageProgressCallback,
    ImageResult,
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
    if params.loras:
        raise InvalidArgument.for_field(
            "params.loras", "LoRAs are not supported by this worker yet (diffusers needs peft)"
        )


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


class DiffusersEngine(ImageEngine):
    """diffusers text-to-image pipelines on one torch device ("cpu", "cuda", "mps").

    `threads` sets torch's intra-op threads (process-wide) when a model loads; None leaves
    torch's default (all cores). On a busy or small CPU fewer threads can be much faster:
    torch's OpenMP workers spin while they wait for cores (measured here on 2 shared cores with
    a tiny UNet: 1 thread ran 30x faster than 2).
    """

    backend = "diffusers"

    def __init__(self, device: str = "cpu", *, threads: int | None = None) -> None:
        self._device = device
        self._threads = threads
        self._pipe: Any = None
        self._loaded: LoadedModel | None = None
        self._base_scheduler_config: Any = None
        self._own_scheduler: Any = None  # the pipeline's, for requests that name none
        self._default_scheduler: str = ""

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

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
        """Load a diffusers folder offline (see the module docstring)."""
        dtype = self._dtype(options.dtype)
        if options.scheduler is not None:
            _check_scheduler(options.scheduler, "image.scheduler")
        if not path.is_dir():
            raise FailedPrecondition(
                f"{path.name} is a single file; this worker loads diffusers folders only for "
                "now (convert the checkpoint to a diffusers folder)",
                reason="INCOMPATIBLE_MODEL",
            )
        if not (path / "model_index.json").is_file():
            raise FailedPrecondition(
                f"{path} is not a diffusers pipeline folder (no model_index.json)",
                reason="INCOMPATIBLE_MODEL",
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

        try:
            with warnings.catch_warnings():
                # `torch_dtype` is what every supported diffusers takes; newer ones also take
                # `dtype` and warn about the old name.
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                    path, local_files_only=True, torch_dtype=dtype, safety_checker=None
                )
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"cannot load the pipeline in {path.name}: {exc}", reason="MODEL_FILE_INVALID"
            ) from exc
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

    def unload(self) -> None:
        """Drop the pipeline (and the CUDA cache when on a GPU); idempotent."""
        if self._pipe is None:
            return
        self._pipe = None
        self._loaded = None
        self._own_scheduler = None
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
        """See check_image_params."""
        check_image_params(params)

    def generate(
        self,
        params: ImageParams,
        *,
        on_progress: ImageProgressCallback,
        cancel: threading.Event,
    ) -> ImageResult:
        """Generate the images one pipeline call each (see the module docstring)."""
        import torch

        check_image_params(params)
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
        images: list[GeneratedImage] = []
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
