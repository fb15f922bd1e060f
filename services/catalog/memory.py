"""Memory-fit estimates for LLMs (llama.cpp) and image models (diffusers). Pure functions.

The LLM model follows what gguf-parser-go, Ollama and LM Studio compute
(reference/protocols-and-formats.md §3.7); every formula is written out where it is used.
Summary, with L = block_count and k = layers offloaded to the GPU (0..L+1, llama.cpp counts the
output layer as the (L+1)th, and `n_gpu_layers=-1` means all L+1):

- weights: per-layer bytes (`blk.{i}.*`) from the inspector; the input embedding
  (`token_embd`) always stays in host RAM; llama.cpp offloads the LAST k layers; the output head
  moves to the GPU only when k > L. Other tensors (rare: rope tables, ...) stay in RAM.
- KV cache: f16 K+V bytes per token over all layers, scaled by the cache type's bytes per
  element, for the context padded up to 256, times parallel sequences; each layer's share lives
  where the layer lives (llama.cpp `offload_kqv=True`, its default).
- compute buffer: gguf-parser's graph model (inputs, logits, attention scores) plus a fixed
  overhead; on the GPU when any layer is offloaded, else in RAM.
- a CUDA backend context overhead in VRAM on CUDA when anything is offloaded.

Documented simplifications (all err on the side of needing MORE memory, except the last):
- sliding-window attention is not modelled: every layer caches the full context (llama.cpp
  caches only window + ubatch for SWA layers, so gemma2/3-style models need less than we say);
- recurrent architectures (mamba, rwkv) report no KV bytes per token; their fixed per-sequence
  state is not modelled;
- the per-layer KV share is the average (head_count_kv may differ per layer; the inspector
  reports the maximum, which overestimates);
- partial offload puts the whole compute buffer on the GPU; llama.cpp also keeps a smaller host
  compute buffer, not counted in RAM.

Image models (diffusers, §4.5): weights = parameters x the run dtype (fp16 on CUDA/Metal, fp32
on CPU), plus the components a transformer-only file lacks at their usual size, plus
activations: the family's rule-of-thumb peak-minus-weights at its default resolution, scaled
linearly by pixel count and by dtype. A rule of thumb, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from services.catalog.domain import DeviceKind, KvCacheType, MemoryEstimate, ModelMetadata

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
GB = 1_000_000_000  # the §4.5 rules of thumb are in decimal GB

# llama.cpp pads the KV cache size to a multiple of 256 cells (flash-attention friendly).
KV_CONTEXT_PADDING = 256

# Bytes per cached element (ggml block bytes / block size).
KV_BYTES_PER_ELEMENT: dict[KvCacheType, Fraction] = {
    KvCacheType.F32: Fraction(4),
    KvCacheType.F16: Fraction(2),
    KvCacheType.BF16: Fraction(2),
    KvCacheType.Q8_0: Fraction(34, 32),
    KvCacheType.Q4_0: Fraction(18, 32),
    KvCacheType.Q4_1: Fraction(20, 32),
    KvCacheType.Q5_0: Fraction(22, 32),
    KvCacheType.Q5_1: Fraction(24, 32),
    KvCacheType.IQ4_NL: Fraction(18, 32),
}

# Graph metadata, tokenizer tables and small host-side buffers that exist in every context
# (gguf-parser counts ~5 MiB + tokenizer; we round up generously for vocab-heavy models).
COMPUTE_OVERHEAD_BYTES = 64 * MIB
# The CUDA runtime context, cuBLAS workspace and kernels resident on the device: measured
# 250-500 MiB depending on GPU and driver (reference §3.7 says ~300-500 MiB); we take 300 MiB.
CUDA_CONTEXT_OVERHEAD_BYTES = 300 * MIB
DEFAULT_UBATCH = 512


def padded_context(context_length: int) -> int:
    """`context_length` rounded up to llama.cpp's KV padding (256): 8000 -> 8192."""
    if context_length <= 0:
        return 0
    return math.ceil(context_length / KV_CONTEXT_PADDING) * KV_CONTEXT_PADDING


def kv_bytes_per_token_f16(metadata: ModelMetadata) -> int | None:
    """f16 K+V bytes per token over all layers, or None when the header does not say.

    The inspector's `kv_cache_bytes_per_token` wins. Otherwise:
    L x n_head_kv x (head_dim_k + head_dim_v) x 2 bytes, head dims defaulting to n_embd/n_head.
    """
    if metadata.kv_cache_bytes_per_token is not None:
        return metadata.kv_cache_bytes_per_token
    layers, n_head = metadata.block_count, metadata.head_count
    if not layers or not n_head:
        return None
    n_head_kv = metadata.head_count_kv or n_head
    default_dim = metadata.embedding_length // n_head if metadata.embedding_length else None
    key_dim = metadata.key_length or default_dim
    value_dim = metadata.value_length or default_dim
    if key_dim is None or value_dim is None:
        return None
    return layers * n_head_kv * (key_dim + value_dim) * 2


def kv_cache_bytes(
    metadata: ModelMetadata,
    context_length: int,
    kv_cache_type: KvCacheType = KvCacheType.F16,
    n_parallel: int = 1,
) -> int:
    """KV cache bytes for `context_length` tokens (padded to 256) x `n_parallel` sequences.

    bytes = (f16 bytes per token / 2) elements x padded ctx x n_parallel x bytes per element of
    the cache type (f16 2, q8_0 34/32, q4_0 18/32, ...). 0 when the header lacks the shape
    (recurrent models: their state is not modelled). Sliding windows are not modelled.
    """
    per_token_f16 = kv_bytes_per_token_f16(metadata)
    if not per_token_f16:
        return 0
    elements = Fraction(per_token_f16, 2) * padded_context(context_length) * max(n_parallel, 1)
    return math.ceil(elements * KV_BYTES_PER_ELEMENT[kv_cache_type])


def compute_buffer_bytes(
    metadata: ModelMetadata,
    context_length: int,
    n_ubatch: int = DEFAULT_UBATCH,
    flash_attention: bool = False,
) -> int:
    """Scratch memory for one forward pass of `n_ubatch` tokens (gguf-parser's model).

    n_ubatch' = min(n_ubatch, ctx); all f32:
      input embeddings  n_embd  x n_ubatch' x 4
      logits            n_vocab x n_ubatch' x 4
      attention scores  ctx x n_ubatch' x n_head x 4   (only without flash attention; ctx padded)
    plus COMPUTE_OVERHEAD_BYTES. Llama-3-8B at 8192 ctx: ~0.8 GiB without, ~0.3 GiB with flash
    attention, matching llama.cpp's reported CUDA compute buffers (560 / 260 MiB) within margin.
    """
    ctx = padded_context(context_length)
    ubatch = max(min(n_ubatch, ctx), 1)
    n_embd = metadata.embedding_length or 0
    n_vocab = metadata.vocab_size or 0
    n_head = metadata.head_count or 0
    total = n_embd * ubatch * 4 + n_vocab * ubatch * 4
    if not flash_attention:
        total += ctx * ubatch * n_head * 4
    return total + COMPUTE_OVERHEAD_BYTES


@dataclass(frozen=True)
class _WeightSplit:
    input_bytes: int
    output_bytes: int
    other_bytes: int
    layer_bytes: list[int]

    @property
    def total(self) -> int:
        return self.input_bytes + self.output_bytes + self.other_bytes + sum(self.layer_bytes)


def _weight_split(metadata: ModelMetadata) -> _WeightSplit:
    """Per-part weight bytes; without an inspector breakdown, the file size spread over layers."""
    w = metadata.weights
    if w is not None and w.layer_bytes:
        return _WeightSplit(w.input_bytes, w.output_bytes, w.other_bytes, list(w.layer_bytes))
    total = w.total_bytes if w is not None else metadata.size_bytes
    layers = metadata.block_count or 0
    if layers == 0:
        return _WeightSplit(0, 0, total, [])
    # No breakdown: even split (input/output shares unknown, counted as layers).
    share, rest = divmod(total, layers)
    return _WeightSplit(0, 0, 0, [share + (1 if i < rest else 0) for i in range(layers)])


def estimate_llm(
    metadata: ModelMetadata,
    *,
    context_length: int,
    kv_cache_type: KvCacheType = KvCacheType.F16,
    gpu_layers: int = -1,
    device: DeviceKind,
    n_parallel: int = 1,
    n_ubatch: int = DEFAULT_UBATCH,
    flash_attention: bool = False,
) -> MemoryEstimate:
    """RAM vs VRAM needed to load a GGUF LLM with `gpu_layers` offloaded (-1 = all L+1).

    On a CPU device nothing is offloaded. With k = gpu_layers (clamped to 0..L+1):
      VRAM = last min(k, L) blk layers + output head if k > L + their KV share
             + compute buffer (if k > 0) + CUDA context (CUDA, k > 0)
      RAM  = input embedding + other + the remaining layers (+ output if k <= L)
             + their KV share + compute buffer (if k == 0)
    `total_layers` is L + 1, as llama.cpp counts (the output layer is the last one).
    """
    split = _weight_split(metadata)
    n_layers = len(split.layer_bytes)
    total_layers = n_layers + 1
    if device is DeviceKind.CPU:
        k = 0
    elif gpu_layers < 0:
        k = total_layers
    else:
        k = min(gpu_layers, total_layers)
    gpu_blocks = min(k, n_layers)
    output_on_gpu = k > n_layers

    kv_total = kv_cache_bytes(metadata, context_length, kv_cache_type, n_parallel)
    kv_gpu = kv_total * gpu_blocks // n_layers if n_layers else 0
    compute = compute_buffer_bytes(metadata, context_length, n_ubatch, flash_attention)

    # llama.cpp offloads the last layers: blk.{L-k} .. blk.{L-1}.
    gpu_layer_bytes = sum(split.layer_bytes[n_layers - gpu_blocks :])
    cpu_layer_bytes = sum(split.layer_bytes[: n_layers - gpu_blocks])
    vram = gpu_layer_bytes + kv_gpu
    ram = split.input_bytes + split.other_bytes + cpu_layer_bytes + (kv_total - kv_gpu)
    if output_on_gpu:
        vram += split.output_bytes
    else:
        ram += split.output_bytes
    if k > 0:
        vram += compute
        if device is DeviceKind.CUDA:
            vram += CUDA_CONTEXT_OVERHEAD_BYTES
    else:
        ram += compute
    return MemoryEstimate(
        context_length=context_length,
        kv_cache_type=kv_cache_type,
        weights_bytes=split.total,
        kv_cache_bytes=kv_total,
        compute_bytes=compute,
        ram_bytes=ram,
        vram_bytes=vram,
        gpu_layers=k,
        total_layers=total_layers,
    )


def best_offload(
    metadata: ModelMetadata,
    *,
    context_length: int,
    kv_cache_type: KvCacheType = KvCacheType.F16,
    device: DeviceKind,
    free_vram: int,
    margin: float = 0.9,
    n_parallel: int = 1,
    n_ubatch: int = DEFAULT_UBATCH,
    flash_attention: bool = False,
) -> int:
    """The largest k in 0..L+1 whose VRAM need fits in `free_vram` x `margin` (0 on CPU)."""
    if device is DeviceKind.CPU:
        return 0
    budget = free_vram * margin
    total_layers = len(_weight_split(metadata).layer_bytes) + 1
    # VRAM need grows with k, so the first fit from the top is the largest.
    for k in range(total_layers, 0, -1):
        estimate = estimate_llm(
            metadata,
            context_length=context_length,
            kv_cache_type=kv_cache_type,
            gpu_layers=k,
            device=device,
            n_parallel=n_parallel,
            n_ubatch=n_ubatch,
            flash_attention=flash_attention,
        )
        if estimate.vram_bytes <= budget:
            return k
    return 0


@dataclass(frozen=True)
class ImageFamilyProfile:
    """Rules of thumb for one image family (reference §4.5), fp16, one image.

    `pipeline_params`: parameters of the whole pipeline (denoiser + text encoders + VAE);
    `activation_bytes`: peak minus weights at the default resolution.
    """

    default_resolution: int
    pipeline_params: int
    activation_bytes: int


# sd1: UNet 860M + CLIP-L 123M + VAE 84M ~ 2.1 GB fp16, peak 3-4 GB at 512^2.
# sd2: UNet 865M + OpenCLIP-H 354M + VAE 84M ~ 2.6 GB, peak 4-5 GB at 768^2.
# sdxl / playground: UNet 2.57B + CLIP-L + OpenCLIP-bigG 695M + VAE ~ 6.9 GB, peak 8-10 GB.
# sd3 / 3.5: MMDiT 2B / 2.5B / 8.1B + CLIP-L + CLIP-G + T5-XXL 4.76B + VAE (~15 GB with T5 for
# sd3-medium); flux: transformer 11.9B + T5-XXL 4.76B + CLIP-L + VAE ~ 33.7 GB.
# Activations for sd3/flux are not in §4.5: our guess from their 1024^2 latents (2 / 3 GB).
IMAGE_FAMILY_PROFILES: dict[str, ImageFamilyProfile] = {
    "sd1": ImageFamilyProfile(512, 1_067_000_000, 1_500_000_000),
    "sd2": ImageFamilyProfile(768, 1_303_000_000, 1_900_000_000),
    "sdxl": ImageFamilyProfile(1024, 3_470_000_000, 2_100_000_000),
    "sdxl-refiner": ImageFamilyProfile(1024, 3_030_000_000, 2_100_000_000),
    "playground-v2.5": ImageFamilyProfile(1024, 3_470_000_000, 2_100_000_000),
    "sd3": ImageFamilyProfile(1024, 7_660_000_000, 2_000_000_000),
    "sd3.5-medium": ImageFamilyProfile(1024, 8_160_000_000, 2_000_000_000),
    "sd3.5-large": ImageFamilyProfile(1024, 13_760_000_000, 2_500_000_000),
    "flux-dev": ImageFamilyProfile(1024, 16_860_000_000, 3_000_000_000),
    "flux-schnell": ImageFamilyProfile(1024, 16_860_000_000, 3_000_000_000),
}
# Unknown family: SDXL-like numbers.
_DEFAULT_IMAGE_PROFILE = IMAGE_FAMILY_PROFILES["sdxl"]

_FILE_DTYPE_BYTES: dict[str, float] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F4": 0.5,
}


def image_profile(family: str | None) -> ImageFamilyProfile:
    """The rule-of-thumb profile for `family` (SDXL-like when unknown)."""
    return IMAGE_FAMILY_PROFILES.get(family or "", _DEFAULT_IMAGE_PROFILE)


def run_dtype_bytes(device: DeviceKind) -> int:
    """Bytes per parameter the sd worker runs at: fp16 on CUDA/Metal, fp32 on CPU."""
    return 4 if device is DeviceKind.CPU else 2


def _file_bytes_per_param(metadata: ModelMetadata) -> float:
    label = (metadata.quantization or "").upper()
    if label in _FILE_DTYPE_BYTES:
        return _FILE_DTYPE_BYTES[label]
    known = {d.upper(): n for d, n in metadata.dtypes.items() if d.upper() in _FILE_DTYPE_BYTES}
    if known:
        return _FILE_DTYPE_BYTES[max(known, key=lambda d: known[d])]
    return 2.0


def image_parameter_count(metadata: ModelMetadata) -> int:
    """Parameters in the file: the inspector's count, else size / bytes per param of its dtype,
    else the family's whole pipeline."""
    if metadata.parameter_count:
        return metadata.parameter_count
    if metadata.size_bytes:
        return int(metadata.size_bytes / _file_bytes_per_param(metadata))
    return image_profile(metadata.family).pipeline_params


def estimate_image(
    metadata: ModelMetadata,
    *,
    width: int | None = None,
    height: int | None = None,
    dtype_bytes: int | None = None,
    device: DeviceKind,
) -> MemoryEstimate:
    """Memory to generate one image with a diffusers pipeline (rule of thumb, reference §4.5).

    params   = file parameters, + (family pipeline params - file params) when the file lacks
               components (`needs_components`: a Flux/SD3 transformer-only file needs T5/CLIP/VAE)
    weights  = params x dtype_bytes (default: 2 on CUDA/Metal, 4 on CPU)
    compute  = family activations x (width x height / default_resolution^2) x dtype_bytes / 2
    GPU: VRAM = weights + compute (+ CUDA context on CUDA), RAM 0 (weights stream through
    mmap'd safetensors); CPU: RAM = weights + compute.
    """
    profile = image_profile(metadata.family)
    w = width or profile.default_resolution
    h = height or profile.default_resolution
    bytes_per_param = dtype_bytes or run_dtype_bytes(device)
    params = image_parameter_count(metadata)
    if metadata.needs_components:
        params = max(params, profile.pipeline_params)
    weights = params * bytes_per_param
    pixel_ratio = Fraction(w * h, profile.default_resolution**2)
    compute = math.ceil(profile.activation_bytes * pixel_ratio * Fraction(bytes_per_param, 2))
    if device is DeviceKind.CPU:
        ram, vram = weights + compute, 0
    else:
        ram, vram = 0, weights + compute
        if device is DeviceKind.CUDA:
            vram += CUDA_CONTEXT_OVERHEAD_BYTES
    return MemoryEstimate(
        weights_bytes=weights,
        compute_bytes=compute,
        ram_bytes=ram,
        vram_bytes=vram,
    )


def humanize_bytes(n: int | float) -> str:
    """Bytes for people: "1.00 GiB", "512 MiB", "12 KiB", "0 B" (binary units)."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.0f} MiB"
    if n >= KIB:
        return f"{n / KIB:.0f} KiB"
    return f"{int(n)} B"
