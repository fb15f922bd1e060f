"""Memory estimates against numbers worked out by hand for real models (Llama-3-8B Q4_K_M)."""

from __future__ import annotations

import pytest

from services.catalog.domain import (
    DeviceKind,
    KvCacheType,
    ModelFormat,
    ModelMetadata,
    ModelType,
    WeightsBreakdown,
)
from services.catalog.memory import (
    CUDA_CONTEXT_OVERHEAD_BYTES,
    best_offload,
    compute_buffer_bytes,
    estimate_image,
    estimate_llm,
    humanize_bytes,
    kv_cache_bytes,
    padded_context,
)

pytestmark = pytest.mark.unit

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def _q4_k(n: int) -> int:
    return n * 144 // 256  # Q4_K: 256 weights in 144 bytes


def _q6_k(n: int) -> int:
    return n * 210 // 256  # Q6_K: 256 weights in 210 bytes


def llama3_8b_q4_k_m() -> ModelMetadata:
    """Llama-3-8B Q4_K_M as llama.cpp quantizes it: attn_v/ffn_down in Q6_K on the
    "use_more_bits" layers, output Q6_K, token_embd Q4_K (4.91 GB, like the real 4.92 GB file)."""
    n = 32

    def more_bits(i: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    layers = []
    for i in range(n):
        big = _q6_k if more_bits(i) else _q4_k
        layers.append(
            2 * 4096 * 4  # attn_norm, ffn_norm (f32)
            + 2 * _q4_k(4096 * 4096)  # attn_q, attn_output
            + _q4_k(4096 * 1024)  # attn_k
            + big(4096 * 1024)  # attn_v
            + 2 * _q4_k(4096 * 14336)  # ffn_gate, ffn_up
            + big(14336 * 4096)  # ffn_down
        )
    input_bytes = _q4_k(128256 * 4096)
    output_bytes = _q6_k(128256 * 4096) + 4096 * 4
    total = sum(layers) + input_bytes + output_bytes
    return ModelMetadata(
        format=ModelFormat.GGUF,
        model_type=ModelType.LLM,
        architecture="llama",
        quantization="Q4_K_M",
        parameter_count=8_030_261_248,
        context_length=8192,
        block_count=32,
        embedding_length=4096,
        feed_forward_length=14336,
        head_count=32,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        vocab_size=128256,
        kv_cache_bytes_per_token=32 * 8 * (128 + 128) * 2,
        weights=WeightsBreakdown(
            total_bytes=total,
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            layer_bytes=layers,
        ),
        size_bytes=total + 8 * MIB,
    )


LLAMA = llama3_8b_q4_k_m()


def test_fixture_is_realistic() -> None:
    assert LLAMA.weights is not None
    assert 4.85e9 < LLAMA.weights.total_bytes < 4.95e9


def test_kv_cache_llama3_8b_f16_at_8192_is_exactly_one_gib() -> None:
    # 32 layers x 8 KV heads x (128 + 128) dims x 2 bytes = 128 KiB per token; x 8192 = 1 GiB.
    assert kv_cache_bytes(LLAMA, 8192, KvCacheType.F16) == GIB


def test_kv_cache_quantized_types_scale_by_block_bytes() -> None:
    # 8192 is already a multiple of 256, so no padding: elements = 1 GiB / 2 bytes = 2**29.
    elements = 2**29
    assert kv_cache_bytes(LLAMA, 8192, KvCacheType.Q8_0) == elements * 34 // 32 == GIB * 34 // 64
    assert kv_cache_bytes(LLAMA, 8192, KvCacheType.Q4_0) == GIB * 18 // 64
    assert kv_cache_bytes(LLAMA, 8192, KvCacheType.F32) == 2 * GIB
    assert kv_cache_bytes(LLAMA, 8192, KvCacheType.BF16) == GIB


def test_kv_cache_context_is_padded_to_256() -> None:
    assert padded_context(8000) == 8192
    assert padded_context(8193) == 8448
    assert kv_cache_bytes(LLAMA, 8000, KvCacheType.F16) == GIB
    # 8193 tokens -> 33 blocks of 256 = 8448 cells x 128 KiB.
    assert kv_cache_bytes(LLAMA, 8193, KvCacheType.F16) == 8448 * 128 * KIB
    # q8_0 with padding: 8448 cells x 65536 elements x 34/32 bytes.
    assert kv_cache_bytes(LLAMA, 8193, KvCacheType.Q8_0) == 8448 * 65536 * 34 // 32


def test_kv_cache_scales_with_parallel_sequences() -> None:
    assert kv_cache_bytes(LLAMA, 4096, KvCacheType.F16, n_parallel=4) == 2 * GIB


def test_kv_cache_from_head_shapes_when_per_token_bytes_absent() -> None:
    bare = LLAMA.model_copy(update={"kv_cache_bytes_per_token": None, "key_length": None})
    # head dim defaults to n_embd / n_head = 128; same 1 GiB.
    assert kv_cache_bytes(bare, 8192) == GIB
    shapeless = bare.model_copy(update={"head_count": None})
    assert kv_cache_bytes(shapeless, 8192) == 0


def test_compute_buffer_follows_gguf_parser_model() -> None:
    inputs = 4096 * 512 * 4  # 8 MiB
    logits = 128256 * 512 * 4  # ~250.5 MiB
    scores = 8192 * 512 * 32 * 4  # 512 MiB
    overhead = 64 * MIB
    assert compute_buffer_bytes(LLAMA, 8192) == inputs + logits + scores + overhead
    assert compute_buffer_bytes(LLAMA, 8192, flash_attention=True) == inputs + logits + overhead
    # A context shorter than the ubatch shrinks the ubatch too.
    small = 256 * 4096 * 4 + 256 * 128256 * 4 + 256 * 256 * 32 * 4 + overhead
    assert compute_buffer_bytes(LLAMA, 256) == small


def test_estimate_llm_cpu_puts_everything_in_ram() -> None:
    assert LLAMA.weights is not None
    est = estimate_llm(LLAMA, context_length=8192, gpu_layers=-1, device=DeviceKind.CPU)
    compute = compute_buffer_bytes(LLAMA, 8192)
    assert est.gpu_layers == 0
    assert est.total_layers == 33
    assert est.vram_bytes == 0
    assert est.ram_bytes == LLAMA.weights.total_bytes + GIB + compute
    assert est.weights_bytes == LLAMA.weights.total_bytes
    assert est.kv_cache_bytes == GIB


def test_estimate_llm_full_cuda_offload_keeps_only_input_embedding_in_ram() -> None:
    w = LLAMA.weights
    assert w is not None
    est = estimate_llm(LLAMA, context_length=8192, gpu_layers=-1, device=DeviceKind.CUDA)
    compute = compute_buffer_bytes(LLAMA, 8192)
    assert est.gpu_layers == 33
    assert est.ram_bytes == w.input_bytes
    expected_vram = sum(w.layer_bytes) + w.output_bytes + GIB + compute
    assert est.vram_bytes == expected_vram + CUDA_CONTEXT_OVERHEAD_BYTES
    # Metal: the same split, no CUDA context.
    metal = estimate_llm(LLAMA, context_length=8192, gpu_layers=-1, device=DeviceKind.METAL)
    assert metal.vram_bytes == expected_vram


def test_estimate_llm_partial_offload_moves_the_last_layers() -> None:
    w = LLAMA.weights
    assert w is not None
    compute = compute_buffer_bytes(LLAMA, 8192)
    est = estimate_llm(LLAMA, context_length=8192, gpu_layers=10, device=DeviceKind.CUDA)
    # llama.cpp offloads blk.22..blk.31; each layer carries 1/32 of the KV cache (32 MiB).
    assert est.vram_bytes == (
        sum(w.layer_bytes[22:]) + 10 * 32 * MIB + compute + CUDA_CONTEXT_OVERHEAD_BYTES
    )
    assert est.ram_bytes == w.input_bytes + w.output_bytes + sum(w.layer_bytes[:22]) + 22 * 32 * MIB
    # 32 blocks vs 33 layers: the 33rd is the output head.
    all_blocks = estimate_llm(LLAMA, context_length=8192, gpu_layers=32, device=DeviceKind.CUDA)
    all_layers = estimate_llm(LLAMA, context_length=8192, gpu_layers=33, device=DeviceKind.CUDA)
    assert all_layers.vram_bytes - all_blocks.vram_bytes == w.output_bytes
    assert all_blocks.ram_bytes - all_layers.ram_bytes == w.output_bytes


def test_estimate_llm_without_breakdown_spreads_file_size_over_layers() -> None:
    plain = LLAMA.model_copy(update={"weights": None, "size_bytes": 3200})
    est = estimate_llm(plain, context_length=256, gpu_layers=16, device=DeviceKind.METAL)
    assert est.weights_bytes == 3200
    # 3200 bytes over 32 layers = 100 each; the last 16 layers hold half of the 32 MiB KV cache.
    kv_share = 256 * 128 * KIB // 2
    assert est.vram_bytes == 16 * 100 + kv_share + est.compute_bytes
    assert est.ram_bytes == 16 * 100 + kv_share


def test_best_offload_is_the_largest_fitting_layer_count() -> None:
    def vram(k: int) -> int:
        return estimate_llm(
            LLAMA, context_length=8192, gpu_layers=k, device=DeviceKind.CUDA
        ).vram_bytes

    assert (
        best_offload(LLAMA, context_length=8192, device=DeviceKind.CUDA, free_vram=24 * GIB) == 33
    )
    assert best_offload(LLAMA, context_length=8192, device=DeviceKind.CUDA, free_vram=GIB) == 0
    k = best_offload(LLAMA, context_length=8192, device=DeviceKind.CUDA, free_vram=6 * GIB)
    assert 0 < k < 33
    assert vram(k) <= 6 * GIB * 0.9 < vram(k + 1)
    assert best_offload(LLAMA, context_length=8192, device=DeviceKind.CPU, free_vram=80 * GIB) == 0


SDXL = ModelMetadata(
    format=ModelFormat.SAFETENSORS,
    model_type=ModelType.IMAGE,
    family="sdxl",
    quantization="F16",
    parameter_count=3_470_000_000,
    size_bytes=6_940_000_000,
)


def test_estimate_image_sdxl_fp16_on_cuda_and_fp32_on_cpu() -> None:
    cuda = estimate_image(SDXL, device=DeviceKind.CUDA)
    assert cuda.weights_bytes == 6_940_000_000
    assert cuda.compute_bytes == 2_100_000_000  # §4.5: 8-10 GB peak at 1024^2
    assert cuda.vram_bytes == 6_940_000_000 + 2_100_000_000 + CUDA_CONTEXT_OVERHEAD_BYTES
    assert cuda.ram_bytes == 0
    cpu = estimate_image(SDXL, device=DeviceKind.CPU)
    assert cpu.weights_bytes == 13_880_000_000
    assert cpu.ram_bytes == 13_880_000_000 + 4_200_000_000
    assert cpu.vram_bytes == 0


def test_estimate_image_activations_scale_with_pixels() -> None:
    half = estimate_image(SDXL, width=512, height=512, device=DeviceKind.METAL)
    assert half.compute_bytes == 2_100_000_000 // 4
    assert half.vram_bytes == 6_940_000_000 + 525_000_000


def test_estimate_image_counts_missing_components_and_size_only_files() -> None:
    flux = ModelMetadata(
        format=ModelFormat.SAFETENSORS,
        model_type=ModelType.IMAGE,
        family="flux-dev",
        parameter_count=11_900_000_000,
        needs_components=["text_encoder", "text_encoder_2", "vae"],
    )
    # transformer 11.9B + T5-XXL 4.76B + CLIP-L + VAE ~ 16.86B params at bf16/fp16.
    assert estimate_image(flux, device=DeviceKind.METAL).weights_bytes == 16_860_000_000 * 2
    fp8 = SDXL.model_copy(update={"parameter_count": None, "quantization": "F8_E4M3"})
    # 6.94 GB of fp8 = 6.94e9 params, upcast to fp16 for the run.
    assert estimate_image(fp8, device=DeviceKind.CUDA).weights_bytes == 13_880_000_000


def test_humanize_bytes() -> None:
    assert humanize_bytes(GIB) == "1.00 GiB"
    assert humanize_bytes(int(4.5 * GIB)) == "4.50 GiB"
    assert humanize_bytes(300 * MIB) == "300 MiB"
    assert humanize_bytes(12 * KIB) == "12 KiB"
    assert humanize_bytes(0) == "0 B"
