"""The six worker types (`worker-types/{id}`): what each worker backend can run, and where.

The seeds had six flat catalog entries (cpu/cuda/metal x llm/sd, reference/rbee-original.md
§2.1). Ours keep that shape but describe the backends we really run:

- `*-llm`: llama-cpp-python (llama.cpp). Runs GGUF only: llama.cpp has no safetensors loader
  (convert with llama.cpp's `convert_hf_to_gguf.py`). Main model type: LLM. GGUF LoRA adapters
  (`general.type = adapter`) and multimodal projectors (mmproj, arch `clip`) are add-ons loaded
  beside a base model (`Llama(lora_path=..., chat_handler=...)`), never alone, so they are
  `addon_model_types`, not `model_types`. Architectures: the installed llama-cpp-python's list
  (see llm_architectures). Quantizations: every llama.cpp file type label; CPU implements all,
  CUDA and Metal run ops they lack on the CPU automatically (slower, not an error).
- `*-sd`: diffusers + torch. Runs single-file safetensors checkpoints (`from_single_file`) and
  diffusers folders (`from_pretrained`). Main model type: IMAGE; image LoRAs are add-ons
  (`pipe.load_lora_weights`).

Image families we offer (`IMAGE_FAMILIES`) are the text-to-image pipelines diffusers runs from
a single file or a folder: sd1, sd2 (StableDiffusionPipeline), sdxl, playground-v2.5
(StableDiffusionXLPipeline; Playground with its EDM scheduler), sd3, sd3.5-medium, sd3.5-large
(StableDiffusion3Pipeline), flux-dev, flux-schnell (FluxPipeline). Not offered, with the reason
the compatibility rules give, in `UNSUPPORTED_IMAGE_FAMILIES` (e.g. the SDXL refiner: an
image-to-image stage, while our worker does text-to-image).

Every worker serves one request at a time (no batching) and streams its output.
"""

from __future__ import annotations

import builtins
import platform as platform_module
import shutil
from pathlib import Path

from services.catalog.domain import Backend, DeviceKind, ModelFormat, ModelType, WorkerType
from services.catalog.llm_architectures import ArchitectureList, resolve_architectures
from services.common.errors import NotFound

LLM_WORKER_TYPE_IDS = ("cpu-llm", "cuda-llm", "metal-llm")
SD_WORKER_TYPE_IDS = ("cpu-sd", "cuda-sd", "metal-sd")

# llama.cpp `llama_ftype_name` short labels (reference §3.3), in ftype order. All load on every
# backend; a GPU backend that lacks an op schedules it on the CPU.
LLAMA_CPP_QUANTIZATIONS: tuple[str, ...] = (
    "F32",
    "F16",
    "Q4_0",
    "Q4_1",
    "Q8_0",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "IQ2_XXS",
    "IQ2_XS",
    "Q2_K_S",
    "IQ3_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ3_M",
    "IQ2_S",
    "IQ2_M",
    "IQ4_XS",
    "IQ1_M",
    "BF16",
    "TQ1_0",
    "TQ2_0",
    "MXFP4_MOE",
    "NVFP4",
    "Q1_0",
    "Q2_0",
)

# Image families the sd workers run, with the diffusers pipeline that runs them.
IMAGE_FAMILIES: dict[str, str] = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "playground-v2.5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd3.5-medium": "StableDiffusion3Pipeline",
    "sd3.5-large": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}

# Families inspection may recognise that we do not offer, and why (shown to the user).
UNSUPPORTED_IMAGE_FAMILIES: dict[str, str] = {
    "sdxl-refiner": (
        "the SDXL refiner is an image-to-image stage run after an SDXL base model; "
        "the sd workers do text-to-image"
    ),
    "flux2": "Flux.2 pipelines are not wired into the sd workers",
    "chroma": "Chroma pipelines are not wired into the sd workers",
    "stable-cascade": "Stable Cascade is a multi-stage pipeline the sd workers do not run",
}

# Variants whose UNet/transformer takes an input image or control image (extra input
# channels): they cannot run text-to-image.
IMAGE_INPUT_VARIANTS: dict[str, str] = {
    "inpaint": "an inpainting model (needs an input image and a mask)",
    "instruct-pix2pix": "an InstructPix2Pix model (needs an input image)",
    "depth": "a depth-conditioned model (needs a depth map)",
    "fill": "a Flux Fill model (needs an input image and a mask)",
    "canny": "a Flux Canny model (needs an edge map)",
}

_PLATFORMS: dict[DeviceKind, list[str]] = {
    DeviceKind.CPU: ["linux", "macos", "windows"],
    DeviceKind.CUDA: ["linux", "windows"],
    DeviceKind.METAL: ["macos"],
}
_CPU_ARCHITECTURES: dict[DeviceKind, list[str]] = {
    DeviceKind.CPU: ["x86_64", "aarch64"],
    DeviceKind.CUDA: ["x86_64", "aarch64"],  # aarch64: Jetson, Grace
    DeviceKind.METAL: ["aarch64"],  # Apple silicon
}
_DEVICE_WORDS: dict[DeviceKind, str] = {
    DeviceKind.CPU: "the CPU",
    DeviceKind.CUDA: "NVIDIA GPUs (CUDA)",
    DeviceKind.METAL: "Apple silicon GPUs (Metal, unified memory)",
}
_DISPLAY_DEVICE: dict[DeviceKind, str] = {
    DeviceKind.CPU: "CPU",
    DeviceKind.CUDA: "CUDA",
    DeviceKind.METAL: "Metal",
}

_SYSTEM_NAMES = {"linux": "linux", "darwin": "macos", "windows": "windows"}
_MACHINE_NAMES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}


def normalize_platform(system: str) -> str:
    """`platform.system()` -> our platform name: Linux -> linux, Darwin -> macos, Windows ->
    windows; anything else lower-cased as is."""
    lowered = system.strip().lower()
    return _SYSTEM_NAMES.get(lowered, lowered)


def normalize_machine(machine: str) -> str:
    """`platform.machine()` -> our CPU architecture: AMD64/x86_64 -> x86_64, arm64/aarch64 ->
    aarch64; anything else lower-cased as is."""
    lowered = machine.strip().lower()
    return _MACHINE_NAMES.get(lowered, lowered)


def host_platform() -> tuple[str, str]:
    """This host's (platform, cpu architecture), normalised (e.g. ("linux", "x86_64"))."""
    return normalize_platform(platform_module.system()), normalize_machine(
        platform_module.machine()
    )


def detect_device_kinds(platform: str, machine: str) -> frozenset[DeviceKind]:
    """The device kinds present on this host, cheaply (no CUDA or torch import).

    CUDA: the NVIDIA kernel driver is loaded (/proc/driver/nvidia/version on Linux) or
    nvidia-smi is on PATH (Windows). Metal: Apple silicon macOS.
    """
    kinds = {DeviceKind.CPU}
    platform, machine = normalize_platform(platform), normalize_machine(machine)
    if Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
        kinds.add(DeviceKind.CUDA)
    if platform == "macos" and machine == "aarch64":
        kinds.add(DeviceKind.METAL)
    return frozenset(kinds)


def host_supports(worker_type: WorkerType, platform: str, machine: str) -> bool:
    """True when `worker_type` can be installed on a host with this platform and CPU arch.

    `platform` / `machine` may be raw `platform.system()` / `platform.machine()` values; they
    are normalised. This says nothing about whether a GPU is present (that is the device's job).
    """
    return (
        normalize_platform(platform) in worker_type.platforms
        and normalize_machine(machine) in worker_type.cpu_architectures
    )


def _llm_worker_type(kind: DeviceKind, architectures: ArchitectureList) -> WorkerType:
    build_note = {
        DeviceKind.CPU: "the default PyPI build",
        DeviceKind.CUDA: 'built with CMAKE_ARGS="-DGGML_CUDA=on" and a CUDA toolkit',
        DeviceKind.METAL: "Metal is on by default when built on Apple silicon",
    }[kind]
    return WorkerType(
        id=f"{kind.value}-llm",
        display_name=f"LLM worker ({_DISPLAY_DEVICE[kind]})",
        description=(
            f"Runs GGUF language models with llama-cpp-python on {_DEVICE_WORDS[kind]} "
            f"({build_note}). Streams tokens; one request at a time per worker (no batching). "
            "GGUF LoRA adapters and multimodal projectors load as add-ons to a base model."
        ),
        backend=Backend.LLAMA_CPP,
        device_kind=kind,
        platforms=list(_PLATFORMS[kind]),
        cpu_architectures=list(_CPU_ARCHITECTURES[kind]),
        formats=[ModelFormat.GGUF],
        model_types=[ModelType.LLM],
        addon_model_types=[ModelType.ADAPTER, ModelType.PROJECTOR],
        llm_architectures=sorted(architectures.names),
        llm_architectures_source=architectures.source,
        quantizations=list(LLAMA_CPP_QUANTIZATIONS),
        max_context_length=None,  # the model's own trained context
        streaming=True,
        batching=False,
    )


def _sd_worker_type(kind: DeviceKind) -> WorkerType:
    dtype_note = "float32" if kind is DeviceKind.CPU else "float16"
    return WorkerType(
        id=f"{kind.value}-sd",
        display_name=f"Image worker ({_DISPLAY_DEVICE[kind]})",
        description=(
            f"Runs Stable Diffusion-family text-to-image models with diffusers and torch on "
            f"{_DEVICE_WORDS[kind]} in {dtype_note}: single-file safetensors checkpoints and "
            "diffusers folders. Streams step progress; one request at a time per worker (no "
            "batching). Image LoRAs load as add-ons to a base model."
        ),
        backend=Backend.DIFFUSERS,
        device_kind=kind,
        platforms=list(_PLATFORMS[kind]),
        cpu_architectures=list(_CPU_ARCHITECTURES[kind]),
        formats=[ModelFormat.SAFETENSORS, ModelFormat.DIFFUSERS],
        model_types=[ModelType.IMAGE],
        addon_model_types=[ModelType.LORA],
        families=list(IMAGE_FAMILIES),
        max_context_length=None,
        streaming=True,
        batching=False,
    )


def build_worker_types(architectures: ArchitectureList | None = None) -> list[WorkerType]:
    """The six worker types, LLM types first. `architectures` defaults to this host's list."""
    archs = architectures if architectures is not None else resolve_architectures()
    kinds = (DeviceKind.CPU, DeviceKind.CUDA, DeviceKind.METAL)
    return [_llm_worker_type(k, archs) for k in kinds] + [_sd_worker_type(k) for k in kinds]


class WorkerTypeRegistry:
    """The worker types this catalog serves, by id. Immutable after construction."""

    def __init__(self, architectures: ArchitectureList | None = None) -> None:
        self._types = {wt.id: wt for wt in build_worker_types(architectures)}

    def list(self) -> builtins.list[WorkerType]:
        """All six worker types, in a stable order (llm cpu/cuda/metal, then sd)."""
        return builtins.list(self._types.values())

    def get(self, worker_type_id: str) -> WorkerType:
        """The worker type `worker_type_id` (e.g. "cuda-llm"); NotFound when there is none."""
        try:
            return self._types[worker_type_id]
        except KeyError:
            raise NotFound(
                f"worker type {worker_type_id!r} does not exist; known: {', '.join(self._types)}",
                resource_type="worker-type",
                resource_name=f"worker-types/{worker_type_id}",
                reason="WORKER_TYPE_NOT_FOUND",
            ) from None

    def host_supports(self, worker_type: WorkerType, platform: str, machine: str) -> bool:
        """True when `worker_type` installs on this platform / CPU arch (see `host_supports`)."""
        return host_supports(worker_type, platform, machine)

    def for_host(self, platform: str, machine: str) -> builtins.list[WorkerType]:
        """The worker types a host with this platform and CPU architecture can install."""
        return [wt for wt in self._types.values() if host_supports(wt, platform, machine)]
