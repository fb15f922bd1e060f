"""Which worker type can run which model on which device: the compatibility rules.

`evaluate` answers for one (model, worker type[, device]); checks run in this order and the
first that fails decides the verdict (reference/protocols-and-formats.md §5.3):

1. model type   -> unsupported_model_type (a LoRA, a projector, a VAE, ... or the wrong kind)
2. format       -> unsupported_format (safetensors LLM on llama.cpp, GGUF on diffusers)
3. architecture -> unsupported_arch (llm: not in llama.cpp's list; image: family/variant not
                   run by our pipelines); an arch llama.cpp knows but that cannot generate text
                   (embedding model, projector, TTS, draft head) -> unsupported_model_type
4. components   -> needs_components (a Flux/SD3 transformer-only file)
5. device kind  -> unsupported_device (a CUDA device for a metal worker)
6. memory       -> no device: compatible, with the estimate for the worker's own device kind;
                   with a device: fits_gpu / partial_offload / cpu_only / too_large.

Memory rules (numbers from services.catalog.memory, always for the context actually loaded):
- LLM context: the requested one, else min(model's trained context, 8192). A request above the
  trained context is evaluated but warned about.
- LLM on a GPU: k = the most layers (of L+1, llama.cpp counts the output layer) whose VRAM need
  fits in free VRAM x 0.9. k = L+1: fits_gpu; 0 < k <= L with the rest in free RAM:
  partial_offload; k = 0 and everything in RAM: cpu_only; otherwise too_large.
- LLM on a CPU device: cpu_only when it fits free RAM (we say cpu_only rather than compatible
  so the verdict always says where it runs), else too_large.
- Metal: unified memory. The GPU may use its recommended working set (the device's reported
  VRAM, else 75% of RAM), and GPU + CPU parts together must fit free RAM.
- Image: fits_gpu when the fp16 estimate fits VRAM x 0.9; else cpu_only when the fp32 CPU
  estimate fits free RAM (runs on a cpu-sd worker, slowly); else too_large.
Free memory unknown on the device -> compatible, with a reason saying the fit was not checked.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.catalog.domain import (
    CompatibilityResult,
    Device,
    DeviceKind,
    KvCacheType,
    MemoryEstimate,
    ModelFormat,
    ModelMetadata,
    ModelType,
    Verdict,
    WorkerType,
)
from services.catalog.llm_architectures import NON_GENERATIVE_ARCHITECTURES
from services.catalog.memory import (
    best_offload,
    estimate_image,
    estimate_llm,
    humanize_bytes,
    image_profile,
    kv_bytes_per_token_f16,
)
from services.catalog.worker_types import (
    IMAGE_INPUT_VARIANTS,
    LLM_WORKER_TYPE_IDS,
    SD_WORKER_TYPE_IDS,
    UNSUPPORTED_IMAGE_FAMILIES,
)
from services.common.errors import InvalidArgument

DEFAULT_CONTEXT_CAP = 8192
VRAM_MARGIN = 0.9
# Apple's recommendedMaxWorkingSetSize is about 65-75% of RAM; used when the device does not
# report it.
METAL_WORKING_SET_FRACTION = 0.75

_LLM_WORKERS = ", ".join(LLM_WORKER_TYPE_IDS)
_SD_WORKERS = ", ".join(SD_WORKER_TYPE_IDS)

_Rejection = tuple[Verdict, str]


def default_context_length(metadata: ModelMetadata) -> int:
    """The context we load by default: the model's trained context, capped at 8192."""
    return min(metadata.context_length or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)


def _is_llm_worker(worker_type: WorkerType) -> bool:
    return ModelType.LLM in worker_type.model_types


def _model_type_rejection(metadata: ModelMetadata, worker_type: WorkerType) -> _Rejection | None:
    mtype = metadata.model_type
    if mtype in worker_type.model_types:
        return None
    llm_worker = _is_llm_worker(worker_type)
    family = f" ({metadata.family})" if metadata.family else ""
    reasons: dict[ModelType, str] = {
        ModelType.LORA: (
            "LoRA adapters are applied on top of a base model, not run alone"
            + (
                f"; this is an image LoRA{family}, for a base model on an sd worker "
                f"({_SD_WORKERS})."
                if llm_worker
                else f": load it with a compatible{family} base model on this worker."
            )
        ),
        ModelType.ADAPTER: (
            "This is a GGUF LoRA adapter: it is applied on top of a base LLM (lora_path), "
            "not run alone" + ("." if llm_worker else f", on an llm worker ({_LLM_WORKERS}).")
        ),
        ModelType.PROJECTOR: (
            "This is a multimodal projector (mmproj): it is loaded beside a vision LLM, "
            "not run alone" + ("." if llm_worker else f", on an llm worker ({_LLM_WORKERS}).")
        ),
        ModelType.VAE: "This is a VAE, one component of an image pipeline; it does not run alone.",
        ModelType.CONTROLNET: (
            "This is a ControlNet: it guides a base image model with a control image; "
            "it does not run alone."
        ),
        ModelType.TEXT_ENCODER: (
            "This is a text encoder, one component of an image pipeline; it does not run alone."
        ),
        ModelType.EMBEDDING: (
            "This is a textual-inversion embedding: it extends a base model's prompt "
            "vocabulary; it does not run alone."
        ),
        ModelType.UNKNOWN: (
            "Inspection could not tell what this file is, so no worker can run it; "
            "check that it is a complete model file."
        ),
        ModelType.LLM: (
            f"This is a language model; it runs on an llm worker ({_LLM_WORKERS}), "
            "not an image worker."
        ),
        ModelType.IMAGE: (
            f"This is an image model; it runs on an sd worker ({_SD_WORKERS}), not an LLM worker."
        ),
    }
    return Verdict.UNSUPPORTED_MODEL_TYPE, reasons[mtype]


def _format_rejection(metadata: ModelMetadata, worker_type: WorkerType) -> _Rejection | None:
    fmt = metadata.format
    if fmt in worker_type.formats:
        return None
    if _is_llm_worker(worker_type) and fmt is ModelFormat.SAFETENSORS:
        reason = (
            "llama.cpp runs GGUF files only and this model is safetensors: convert it with "
            "llama.cpp's convert_hf_to_gguf.py (then quantize with llama-quantize), or pull a "
            "GGUF build of it."
        )
    elif not _is_llm_worker(worker_type) and fmt is ModelFormat.GGUF:
        reason = (
            "The sd workers load safetensors checkpoints and diffusers folders, and this is a "
            "GGUF file (a quantized transformer that diffusers' GGUF loader is not set up for "
            "here): use a safetensors checkpoint of the model."
        )
    else:
        accepted = ", ".join(f.value for f in worker_type.formats)
        reason = f"{worker_type.id} loads {accepted} models; this model is {fmt.value}."
    return Verdict.UNSUPPORTED_FORMAT, reason


def _llm_arch_rejection(metadata: ModelMetadata, worker_type: WorkerType) -> _Rejection | None:
    arch = metadata.architecture
    source = worker_type.llm_architectures_source or "llama.cpp"
    if not arch:
        return (
            Verdict.UNSUPPORTED_ARCH,
            "The GGUF header names no architecture (general.architecture), so llama.cpp "
            "cannot load it.",
        )
    if arch in NON_GENERATIVE_ARCHITECTURES:
        return (
            Verdict.UNSUPPORTED_MODEL_TYPE,
            f"Architecture '{arch}' is {NON_GENERATIVE_ARCHITECTURES[arch]}; llama.cpp knows "
            "it, but it does not generate text, so the llm workers do not serve it.",
        )
    if arch not in worker_type.llm_architectures:
        return (
            Verdict.UNSUPPORTED_ARCH,
            f"Architecture '{arch}' is not in llama.cpp's architecture list ({source}); "
            "a newer llama-cpp-python may support it.",
        )
    return None


def _image_family_rejection(metadata: ModelMetadata, worker_type: WorkerType) -> _Rejection | None:
    variant, family = metadata.variant, metadata.family
    if variant in IMAGE_INPUT_VARIANTS:
        return (
            Verdict.UNSUPPORTED_ARCH,
            f"This is {IMAGE_INPUT_VARIANTS[variant]}; the sd workers do text-to-image only.",
        )
    if not family:
        return (
            Verdict.UNSUPPORTED_ARCH,
            "The image family could not be identified from the file, so the sd workers "
            "cannot choose a pipeline for it.",
        )
    if family in UNSUPPORTED_IMAGE_FAMILIES:
        return (
            Verdict.UNSUPPORTED_ARCH,
            f"Image family '{family}' is not supported: {UNSUPPORTED_IMAGE_FAMILIES[family]}.",
        )
    if family not in worker_type.families:
        return (
            Verdict.UNSUPPORTED_ARCH,
            f"Image family '{family}' is not one the sd workers run "
            f"({', '.join(worker_type.families)}).",
        )
    return None


def _quantization_note(metadata: ModelMetadata, worker_type: WorkerType) -> str | None:
    label = (metadata.quantization or "").removeprefix("(guessed)").strip()
    if not label or label.upper() in worker_type.quantizations:
        return None
    return f"Quantization '{label}' is not a llama.cpp file type we know; it may not load."


def _with_available(estimate: MemoryEstimate, ram: int | None, vram: int | None) -> MemoryEstimate:
    return estimate.model_copy(update={"available_ram_bytes": ram, "available_vram_bytes": vram})


def _free_ram(device: Device) -> int | None:
    if device.free_ram_bytes is not None:
        return device.free_ram_bytes
    return device.total_ram_bytes


def _gpu_memory(device: Device) -> tuple[int | None, int | None, bool]:
    """(free VRAM the GPU may use, free RAM for the CPU part, unified) for a GPU device.

    Unified memory (Metal): the GPU may use its working set (reported VRAM, else 75% of total
    RAM) but never more than free RAM; both parts come out of the same free RAM.
    """
    ram = _free_ram(device)
    unified = device.unified_memory or device.kind is DeviceKind.METAL
    if not unified:
        vram = (
            device.free_vram_bytes
            if device.free_vram_bytes is not None
            else device.total_vram_bytes
        )
        return vram, ram, False
    working_set: int | None
    if device.free_vram_bytes is not None:
        working_set = device.free_vram_bytes
    elif device.total_vram_bytes is not None:
        working_set = device.total_vram_bytes
    elif device.total_ram_bytes is not None:
        working_set = int(device.total_ram_bytes * METAL_WORKING_SET_FRACTION)
    else:
        working_set = None
    if working_set is not None and ram is not None:
        working_set = min(working_set, ram)
    return working_set, ram, True


def _llm_context(
    metadata: ModelMetadata, worker_type: WorkerType, requested: int | None
) -> tuple[int, list[str]]:
    trained = metadata.context_length
    notes: list[str] = []
    if requested is None:
        ctx = default_context_length(metadata)
        if trained is None:
            notes.append(
                f"The model does not state its trained context; estimated at {ctx} tokens."
            )
        elif trained > ctx:
            notes.append(
                f"Context {ctx} tokens (the default; the model was trained for {trained})."
            )
        else:
            notes.append(f"Context {ctx} tokens (the model's trained context).")
        return ctx, notes
    ctx = requested
    notes.append(f"Context {ctx} tokens (requested).")
    if trained is not None and ctx > trained:
        notes.append(
            f"Warning: the requested context {ctx} exceeds the model's trained context "
            f"{trained}; output degrades beyond it unless RoPE scaling is configured."
        )
    if worker_type.max_context_length is not None and ctx > worker_type.max_context_length:
        notes.append(
            f"Warning: {worker_type.id} allows at most {worker_type.max_context_length} tokens."
        )
    return ctx, notes


def _llm_breakdown(estimate: MemoryEstimate) -> str:
    return (
        f"Weights {humanize_bytes(estimate.weights_bytes)}, KV cache "
        f"{humanize_bytes(estimate.kv_cache_bytes)} ({estimate.kv_cache_type.value} at "
        f"{estimate.context_length} tokens), compute buffer "
        f"{humanize_bytes(estimate.compute_bytes)}."
    )


def _evaluate_llm_memory(
    metadata: ModelMetadata,
    worker_type: WorkerType,
    device: Device | None,
    *,
    context_length: int | None,
    kv_cache_type: KvCacheType,
    gpu_layers: int | None,
    flash_attention: bool,
    margin: float,
) -> CompatibilityResult:
    ctx, reasons = _llm_context(metadata, worker_type, context_length)
    if kv_cache_type not in (KvCacheType.F16, KvCacheType.F32, KvCacheType.BF16):
        # llama.cpp refuses a quantized V cache without flash attention.
        flash_attention = True
        reasons.append(
            f"A {kv_cache_type.value} KV cache needs flash attention; estimated with it on."
        )
    if kv_bytes_per_token_f16(metadata) is None:
        reasons.append("The header lacks attention shapes; the KV cache is not estimated.")
    note = _quantization_note(metadata, worker_type)
    if note:
        reasons.append(note)

    kind = device.kind if device is not None else worker_type.device_kind

    def estimate(k: int) -> MemoryEstimate:
        return estimate_llm(
            metadata,
            context_length=ctx,
            kv_cache_type=kv_cache_type,
            gpu_layers=k,
            device=kind,
            flash_attention=flash_attention,
        )

    def result(verdict: Verdict, first: str, est: MemoryEstimate) -> CompatibilityResult:
        return CompatibilityResult(
            worker_type=worker_type.id,
            verdict=verdict,
            reasons=[first, _llm_breakdown(est), *reasons],
            memory=est,
        )

    if device is None:
        est = estimate(-1 if gpu_layers is None else gpu_layers)
        where = (
            f"{humanize_bytes(est.ram_bytes)} RAM"
            if kind is DeviceKind.CPU
            else f"{humanize_bytes(est.vram_bytes)} GPU memory + "
            f"{humanize_bytes(est.ram_bytes)} RAM"
        )
        return result(
            Verdict.COMPATIBLE,
            f"Runs on {worker_type.id}; needs about {where}. No device given, so the fit "
            "was not checked.",
            est,
        )

    if kind is DeviceKind.CPU:
        ram = _free_ram(device)
        est = _with_available(estimate(0), ram, None)
        if ram is None:
            return result(
                Verdict.COMPATIBLE,
                f"Needs {humanize_bytes(est.ram_bytes)} of RAM; free RAM is unknown, so the "
                "fit was not checked.",
                est,
            )
        if est.ram_bytes <= ram:
            return result(
                Verdict.CPU_ONLY,
                f"Runs on the CPU from RAM: needs {humanize_bytes(est.ram_bytes)} of "
                f"{humanize_bytes(ram)} free.",
                est,
            )
        return result(
            Verdict.TOO_LARGE,
            f"Needs {humanize_bytes(est.ram_bytes)} of RAM but only {humanize_bytes(ram)} is "
            "free: try a smaller quantization or a shorter context.",
            est,
        )

    vram, ram, unified = _gpu_memory(device)
    gpu_words = "unified-memory GPU working set" if unified else "VRAM"
    if vram is None:
        est = _with_available(estimate(-1 if gpu_layers is None else gpu_layers), ram, None)
        return result(
            Verdict.COMPATIBLE,
            f"Needs {humanize_bytes(est.vram_bytes)} of GPU memory; free {gpu_words} is "
            "unknown, so the fit was not checked.",
            est,
        )
    usable = int(vram * margin)
    best = best_offload(
        metadata,
        context_length=ctx,
        kv_cache_type=kv_cache_type,
        device=kind,
        free_vram=vram,
        margin=margin,
        flash_attention=flash_attention,
    )
    k = best
    if gpu_layers is not None:
        wanted = estimate(gpu_layers)
        if wanted.vram_bytes <= usable:
            k = wanted.gpu_layers
        else:
            reasons.append(
                f"The requested {wanted.gpu_layers} GPU layers need "
                f"{humanize_bytes(wanted.vram_bytes)}, more than {humanize_bytes(usable)} "
                f"usable; evaluated with {best} instead."
            )
    est = _with_available(estimate(k), ram, vram)
    total = est.total_layers
    # Unified memory: the GPU part comes out of the same free RAM.
    ram_left = None if ram is None else (ram - est.vram_bytes if unified else ram)
    ram_words = "unknown free RAM" if ram_left is None else f"{humanize_bytes(ram_left)} free"
    fits_ram = ram_left is None or est.ram_bytes <= ram_left
    if ram is None:
        reasons.append("Free RAM is unknown; assumed enough for the CPU part.")
    usable_words = f"{humanize_bytes(usable)} usable {gpu_words}"
    share_words = f"{margin:.0%} of {humanize_bytes(vram)} free"
    if fits_ram and k == total:
        return result(
            Verdict.FITS_GPU,
            f"All {total}/{total} layers fit on the GPU: needs "
            f"{humanize_bytes(est.vram_bytes)} of {usable_words} ({share_words}).",
            est,
        )
    if fits_ram and k > 0:
        return result(
            Verdict.PARTIAL_OFFLOAD,
            f"{k}/{total} layers on GPU: {humanize_bytes(est.vram_bytes)} of {usable_words} "
            f"({share_words}); the other {total - k} run on the CPU from RAM "
            f"({humanize_bytes(est.ram_bytes)} of {ram_words}). Slower than a full offload.",
            est,
        )
    if fits_ram:
        one_layer = estimate(1).vram_bytes
        return result(
            Verdict.CPU_ONLY,
            f"No layer fits in {usable_words} ({share_words}; offloading one layer needs "
            f"{humanize_bytes(one_layer)}): runs on the CPU from RAM "
            f"({humanize_bytes(est.ram_bytes)} of {ram_words}).",
            est,
        )
    need = est.weights_bytes + est.kv_cache_bytes
    if unified:
        room = f"only {humanize_bytes(ram or 0)} of unified memory is free"
    else:
        room = f"only {usable_words} and {ram_words} RAM remain"
    return result(
        Verdict.TOO_LARGE,
        f"Needs {humanize_bytes(need)} for weights and KV cache but {room}: try a smaller "
        "quantization or a shorter context.",
        est,
    )


def _evaluate_image_memory(
    metadata: ModelMetadata,
    worker_type: WorkerType,
    device: Device | None,
    *,
    width: int | None,
    height: int | None,
    margin: float,
) -> CompatibilityResult:
    profile = image_profile(metadata.family)
    w = width or profile.default_resolution
    h = height or profile.default_resolution
    kind = device.kind if device is not None else worker_type.device_kind
    size_words = f"{w}x{h}" + (" (the family default)" if width is None and height is None else "")

    def breakdown(est: MemoryEstimate, dtype: str) -> str:
        return (
            f"At {size_words}: weights {humanize_bytes(est.weights_bytes)} ({dtype}), "
            f"activations {humanize_bytes(est.compute_bytes)}; a rule of thumb."
        )

    def result(
        verdict: Verdict, first: str, est: MemoryEstimate, dtype: str
    ) -> CompatibilityResult:
        return CompatibilityResult(
            worker_type=worker_type.id,
            verdict=verdict,
            reasons=[first, breakdown(est, dtype)],
            memory=est,
        )

    cpu_est = estimate_image(metadata, width=w, height=h, device=DeviceKind.CPU)
    if device is None:
        est = (
            cpu_est
            if kind is DeviceKind.CPU
            else estimate_image(metadata, width=w, height=h, device=kind)
        )
        need = est.ram_bytes + est.vram_bytes
        dtype = "float32" if kind is DeviceKind.CPU else "float16"
        return result(
            Verdict.COMPATIBLE,
            f"Runs on {worker_type.id}; needs about {humanize_bytes(need)}. No device given, "
            "so the fit was not checked.",
            est,
            dtype,
        )

    ram = _free_ram(device)

    def cpu_fallback(first: str, vram: int | None) -> CompatibilityResult:
        est = _with_available(cpu_est, ram, vram)
        if ram is None:
            return result(
                Verdict.COMPATIBLE,
                f"{first}Needs {humanize_bytes(est.ram_bytes)} of RAM on the CPU; free RAM "
                "is unknown, so the fit was not checked.",
                est,
                "float32",
            )
        if est.ram_bytes <= ram:
            return result(
                Verdict.CPU_ONLY,
                f"{first}Runs on the CPU in float32 (slow): needs "
                f"{humanize_bytes(est.ram_bytes)} of {humanize_bytes(ram)} free RAM.",
                est,
                "float32",
            )
        return result(
            Verdict.TOO_LARGE,
            f"{first}Needs {humanize_bytes(est.ram_bytes)} of RAM in float32 but only "
            f"{humanize_bytes(ram)} is free.",
            est,
            "float32",
        )

    if kind is DeviceKind.CPU:
        return cpu_fallback("", None)
    vram, _, unified = _gpu_memory(device)
    gpu_est = estimate_image(metadata, width=w, height=h, device=kind)
    gpu_words = "unified-memory GPU working set" if unified else "VRAM"
    if vram is None:
        return result(
            Verdict.COMPATIBLE,
            f"Needs {humanize_bytes(gpu_est.vram_bytes)} of GPU memory; free {gpu_words} is "
            "unknown, so the fit was not checked.",
            _with_available(gpu_est, ram, None),
            "float16",
        )
    usable = int(vram * margin)
    if gpu_est.vram_bytes <= usable:
        return result(
            Verdict.FITS_GPU,
            f"Fits on the GPU: needs {humanize_bytes(gpu_est.vram_bytes)} of "
            f"{humanize_bytes(usable)} usable {gpu_words} ({margin:.0%} of "
            f"{humanize_bytes(vram)} free).",
            _with_available(gpu_est, ram, vram),
            "float16",
        )
    return cpu_fallback(
        f"Does not fit on the GPU (needs {humanize_bytes(gpu_est.vram_bytes)} in float16, "
        f"{humanize_bytes(usable)} usable {gpu_words}). ",
        vram,
    )


def evaluate(
    metadata: ModelMetadata,
    worker_type: WorkerType,
    *,
    device: Device | None = None,
    context_length: int | None = None,
    kv_cache_type: KvCacheType = KvCacheType.F16,
    gpu_layers: int | None = None,
    flash_attention: bool = False,
    width: int | None = None,
    height: int | None = None,
    margin: float = VRAM_MARGIN,
) -> CompatibilityResult:
    """Can `worker_type` run this model (on `device`)? The verdict, reasons and numbers.

    `context_length` / `kv_cache_type` / `gpu_layers` / `flash_attention` are the LLM load
    options (None: default context min(trained, 8192); auto offload); `width` / `height` the
    image size (None: the family default). Raises InvalidArgument for impossible options.
    """
    if context_length is not None and context_length <= 0:
        raise InvalidArgument.for_field("context_length", "must be a positive number of tokens")
    if gpu_layers is not None and gpu_layers < -1:
        raise InvalidArgument.for_field("gpu_layers", "must be -1 (all), 0 or a layer count")
    for field_name, value in (("width", width), ("height", height)):
        if value is not None and value <= 0:
            raise InvalidArgument.for_field(field_name, "must be a positive number of pixels")
    if not 0 < margin <= 1:
        raise InvalidArgument.for_field("margin", "must be in (0, 1]")

    llm_worker = _is_llm_worker(worker_type)
    checks = (
        _model_type_rejection(metadata, worker_type),
        _format_rejection(metadata, worker_type),
        _llm_arch_rejection(metadata, worker_type)
        if llm_worker
        else _image_family_rejection(metadata, worker_type),
    )
    for rejection in checks:
        if rejection is not None:
            verdict, reason = rejection
            return CompatibilityResult(
                worker_type=worker_type.id, verdict=verdict, reasons=[reason]
            )
    if metadata.needs_components:
        missing = ", ".join(metadata.needs_components)
        return CompatibilityResult(
            worker_type=worker_type.id,
            verdict=Verdict.NEEDS_COMPONENTS,
            reasons=[
                f"This file holds only part of the pipeline; it also needs: {missing}. "
                "Provide them (for example the base model's diffusers folder) to run it."
            ],
        )
    if device is not None and device.kind is not worker_type.device_kind:
        label = device.name or device.kind.value
        return CompatibilityResult(
            worker_type=worker_type.id,
            verdict=Verdict.UNSUPPORTED_DEVICE,
            reasons=[
                f"Device {label} is a {device.kind.value} device; {worker_type.id} runs on "
                f"{worker_type.device_kind.value} devices."
            ],
        )
    if llm_worker:
        return _evaluate_llm_memory(
            metadata,
            worker_type,
            device,
            context_length=context_length,
            kv_cache_type=kv_cache_type,
            gpu_layers=gpu_layers,
            flash_attention=flash_attention,
            margin=margin,
        )
    return _evaluate_image_memory(
        metadata, worker_type, device, width=width, height=height, margin=margin
    )


def evaluate_all(
    metadata: ModelMetadata,
    worker_types: Sequence[WorkerType],
    *,
    device: Device | None = None,
    context_length: int | None = None,
    kv_cache_type: KvCacheType = KvCacheType.F16,
    gpu_layers: int | None = None,
    flash_attention: bool = False,
    width: int | None = None,
    height: int | None = None,
    margin: float = VRAM_MARGIN,
) -> list[CompatibilityResult]:
    """`evaluate` for each worker type, in the given order (the compatibility matrix row)."""
    return [
        evaluate(
            metadata,
            worker_type,
            device=device,
            context_length=context_length,
            kv_cache_type=kv_cache_type,
            gpu_layers=gpu_layers,
            flash_attention=flash_attention,
            width=width,
            height=height,
            margin=margin,
        )
        for worker_type in worker_types
    ]
