"""Compatibility verdicts for realistic models on the six worker types and real-sized devices."""

from __future__ import annotations

import re

import pytest

from services.catalog.compat import evaluate, evaluate_all
from services.catalog.domain import (
    Device,
    DeviceKind,
    KvCacheType,
    ModelFormat,
    ModelMetadata,
    ModelType,
    Verdict,
    WeightsBreakdown,
    WorkerType,
)
from services.catalog.llm_architectures import resolve_architectures
from services.catalog.worker_types import WorkerTypeRegistry
from services.common.errors import InvalidArgument

pytestmark = pytest.mark.unit

MIB, GIB = 1024**2, 1024**3

REGISTRY = WorkerTypeRegistry(resolve_architectures("0.3.36"))
WORKER_TYPES = REGISTRY.list()


def wt(worker_type_id: str) -> WorkerType:
    return REGISTRY.get(worker_type_id)


def _q4_k(n: int) -> int:
    return n * 144 // 256


def _q6_k(n: int) -> int:
    return n * 210 // 256


def llama3_q4_k_m(
    *, n_layer: int, n_embd: int, n_head: int, n_ff: int, context_length: int = 8192
) -> ModelMetadata:
    """A Llama-3 GGUF quantized Q4_K_M the way llama.cpp does it (Q6_K on attn_v/ffn_down of
    the "use_more_bits" layers and on the output head); 8 KV heads of 128 dims."""
    n_kv_dim = 8 * 128

    def more_bits(i: int) -> bool:
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2

    layers = []
    for i in range(n_layer):
        big = _q6_k if more_bits(i) else _q4_k
        layers.append(
            2 * n_embd * 4
            + 2 * _q4_k(n_embd * n_embd)
            + _q4_k(n_embd * n_kv_dim)
            + big(n_embd * n_kv_dim)
            + 2 * _q4_k(n_embd * n_ff)
            + big(n_ff * n_embd)
        )
    input_bytes = _q4_k(128256 * n_embd)
    output_bytes = _q6_k(128256 * n_embd) + n_embd * 4
    total = sum(layers) + input_bytes + output_bytes
    return ModelMetadata(
        format=ModelFormat.GGUF,
        model_type=ModelType.LLM,
        architecture="llama",
        quantization="Q4_K_M",
        file_type=15,
        context_length=context_length,
        block_count=n_layer,
        embedding_length=n_embd,
        feed_forward_length=n_ff,
        head_count=n_head,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        vocab_size=128256,
        kv_cache_bytes_per_token=n_layer * 8 * 256 * 2,
        weights=WeightsBreakdown(
            total_bytes=total,
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            layer_bytes=layers,
        ),
        size_bytes=total + 8 * MIB,
    )


LLAMA_8B = llama3_q4_k_m(n_layer=32, n_embd=4096, n_head=32, n_ff=14336)
LLAMA_70B = llama3_q4_k_m(n_layer=80, n_embd=8192, n_head=64, n_ff=28672)

SDXL = ModelMetadata(
    format=ModelFormat.SAFETENSORS,
    model_type=ModelType.IMAGE,
    name="sd_xl_base_1.0",
    family="sdxl",
    quantization="F16",
    parameter_count=3_470_000_000,
    size_bytes=6_938_040_682,
)
FLUX_TRANSFORMER = ModelMetadata(
    format=ModelFormat.SAFETENSORS,
    model_type=ModelType.IMAGE,
    name="flux1-dev",
    family="flux-dev",
    quantization="BF16",
    parameter_count=11_901_408_320,
    size_bytes=23_802_932_552,
    needs_components=["text_encoder", "text_encoder_2", "vae"],
)
SDXL_LORA = ModelMetadata(
    format=ModelFormat.SAFETENSORS,
    model_type=ModelType.LORA,
    family="sdxl",
    size_bytes=228_458_000,
)
SAFETENSORS_LLM = ModelMetadata(
    format=ModelFormat.SAFETENSORS,
    model_type=ModelType.LLM,
    architecture="llama",
    parameter_count=8_030_261_248,
    size_bytes=16_060_522_496,
)
GGUF_ADAPTER = ModelMetadata(
    format=ModelFormat.GGUF,
    model_type=ModelType.ADAPTER,
    architecture="llama",
    size_bytes=168 * MIB,
)
MMPROJ = ModelMetadata(
    format=ModelFormat.GGUF,
    model_type=ModelType.PROJECTOR,
    architecture="clip",
    size_bytes=600 * MIB,
)
BERT_EMBEDDER = LLAMA_8B.model_copy(update={"architecture": "nomic-bert", "name": "nomic-embed"})
MYSTERY_ARCH = LLAMA_8B.model_copy(update={"architecture": "fancyformer9"})
FLUX_GGUF = ModelMetadata(
    format=ModelFormat.GGUF, model_type=ModelType.IMAGE, family="flux-dev", size_bytes=6_800_000_000
)
SDXL_INPAINT = SDXL.model_copy(update={"variant": "inpaint"})
SDXL_REFINER = SDXL.model_copy(update={"family": "sdxl-refiner"})
SD15_FOLDER = ModelMetadata(
    format=ModelFormat.DIFFUSERS,
    model_type=ModelType.IMAGE,
    family="sd1",
    parameter_count=1_066_000_000,
    size_bytes=2_132_000_000,
)
UNKNOWN_FAMILY = SDXL.model_copy(update={"family": None})

C, UMT, UF, UA, NC = (
    Verdict.COMPATIBLE,
    Verdict.UNSUPPORTED_MODEL_TYPE,
    Verdict.UNSUPPORTED_FORMAT,
    Verdict.UNSUPPORTED_ARCH,
    Verdict.NEEDS_COMPONENTS,
)

# Rows: model; columns: cpu-llm, cuda-llm, metal-llm, cpu-sd, cuda-sd, metal-sd (no device).
MATRIX = [
    ("llama-3-8b gguf", LLAMA_8B, [C, C, C, UMT, UMT, UMT]),
    ("llama-3-70b gguf", LLAMA_70B, [C, C, C, UMT, UMT, UMT]),
    ("safetensors llm", SAFETENSORS_LLM, [UF, UF, UF, UMT, UMT, UMT]),
    ("sdxl checkpoint", SDXL, [UMT, UMT, UMT, C, C, C]),
    ("sd1.5 diffusers folder", SD15_FOLDER, [UMT, UMT, UMT, C, C, C]),
    ("flux transformer only", FLUX_TRANSFORMER, [UMT, UMT, UMT, NC, NC, NC]),
    ("sdxl lora", SDXL_LORA, [UMT] * 6),
    ("gguf lora adapter", GGUF_ADAPTER, [UMT] * 6),
    ("mmproj", MMPROJ, [UMT] * 6),
    ("embedding gguf", BERT_EMBEDDER, [UMT, UMT, UMT, UMT, UMT, UMT]),
    ("unknown arch gguf", MYSTERY_ARCH, [UA, UA, UA, UMT, UMT, UMT]),
    ("flux gguf", FLUX_GGUF, [UMT, UMT, UMT, UF, UF, UF]),
    ("sdxl inpaint", SDXL_INPAINT, [UMT, UMT, UMT, UA, UA, UA]),
    ("sdxl refiner", SDXL_REFINER, [UMT, UMT, UMT, UA, UA, UA]),
    ("unknown family", UNKNOWN_FAMILY, [UMT, UMT, UMT, UA, UA, UA]),
]


@pytest.mark.parametrize(("label", "metadata", "expected"), MATRIX, ids=[m[0] for m in MATRIX])
def test_matrix_without_device(
    label: str, metadata: ModelMetadata, expected: list[Verdict]
) -> None:
    results = evaluate_all(metadata, WORKER_TYPES)
    assert [r.worker_type for r in results] == [w.id for w in WORKER_TYPES]
    assert [r.verdict for r in results] == expected, label
    for result in results:
        assert result.reasons, f"{label} on {result.worker_type}: no reason"
        assert (result.memory is not None) == (result.verdict is Verdict.COMPATIBLE)


def test_reasons_name_the_thing() -> None:
    lora = evaluate(SDXL_LORA, wt("cuda-llm"))
    assert "LoRA adapters are applied on top of a base model, not run alone" in lora.reasons[0]
    lora_sd = evaluate(SDXL_LORA, wt("cuda-sd"))
    assert "not run alone" in lora_sd.reasons[0] and "sdxl" in lora_sd.reasons[0]
    st = evaluate(SAFETENSORS_LLM, wt("cpu-llm"))
    assert "convert_hf_to_gguf.py" in st.reasons[0]
    gguf_sd = evaluate(FLUX_GGUF, wt("cuda-sd"))
    assert "GGUF" in gguf_sd.reasons[0]
    mystery = evaluate(MYSTERY_ARCH, wt("cuda-llm"))
    assert "'fancyformer9'" in mystery.reasons[0]
    assert "llama-cpp-python 0.3.36 (installed)" in mystery.reasons[0]
    bert = evaluate(BERT_EMBEDDER, wt("cpu-llm"))
    assert "nomic-bert" in bert.reasons[0] and "embedding model" in bert.reasons[0]
    flux = evaluate(FLUX_TRANSFORMER, wt("cuda-sd"))
    assert "text_encoder, text_encoder_2, vae" in flux.reasons[0]
    inpaint = evaluate(SDXL_INPAINT, wt("cuda-sd"))
    assert "inpainting" in inpaint.reasons[0] and "text-to-image" in inpaint.reasons[0]
    refiner = evaluate(SDXL_REFINER, wt("cuda-sd"))
    assert "sdxl-refiner" in refiner.reasons[0]


def test_missing_architecture_is_unsupported_arch() -> None:
    nameless = LLAMA_8B.model_copy(update={"architecture": None})
    result = evaluate(nameless, wt("cpu-llm"))
    assert result.verdict is Verdict.UNSUPPORTED_ARCH
    assert "general.architecture" in result.reasons[0]


def cuda(vram_gib: float, ram_gib: float = 64) -> Device:
    return Device(
        kind=DeviceKind.CUDA,
        name="cuda:0",
        total_vram_bytes=int(vram_gib * GIB),
        free_vram_bytes=int(vram_gib * GIB),
        total_ram_bytes=int(ram_gib * GIB),
        free_ram_bytes=int(ram_gib * GIB),
    )


def cpu(ram_gib: float) -> Device:
    return Device(
        kind=DeviceKind.CPU,
        name="cpu",
        total_ram_bytes=int(ram_gib * GIB),
        free_ram_bytes=int(ram_gib * GIB),
    )


def mac(ram_gib: float, free_gib: float | None = None) -> Device:
    free = ram_gib if free_gib is None else free_gib
    return Device(
        kind=DeviceKind.METAL,
        name="Apple M3",
        total_ram_bytes=int(ram_gib * GIB),
        free_ram_bytes=int(free * GIB),
        unified_memory=True,
    )


def test_fixtures_have_realistic_sizes() -> None:
    assert LLAMA_8B.weights is not None and LLAMA_70B.weights is not None
    assert 4.85e9 < LLAMA_8B.weights.total_bytes < 4.95e9  # real file: 4.92 GB
    assert 41e9 < LLAMA_70B.weights.total_bytes < 43.5e9  # real file: 42.5 GB


def test_8b_fits_a_24_gib_gpu() -> None:
    result = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(24))
    assert result.verdict is Verdict.FITS_GPU
    assert result.memory is not None
    # Hand sum: 4.58 GiB weights - 0.28 GiB input + 1 GiB KV + ~0.8 GiB compute + 0.3 GiB CUDA.
    assert 6 * GIB < result.memory.vram_bytes < 8 * GIB
    assert result.memory.gpu_layers == result.memory.total_layers == 33
    assert result.memory.context_length == 8192
    assert result.memory.available_vram_bytes == 24 * GIB
    assert "33/33 layers" in result.reasons[0]
    assert "21.60 GiB usable" in result.reasons[0]  # 24 GiB x 0.9
    assert any("KV cache 1.00 GiB" in r for r in result.reasons)
    assert any("Context 8192 tokens" in r for r in result.reasons)


def test_8b_on_a_6_gib_gpu_is_a_partial_offload() -> None:
    result = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(6, ram_gib=32))
    assert result.verdict is Verdict.PARTIAL_OFFLOAD
    assert result.memory is not None
    k = result.memory.gpu_layers
    # Per offloaded layer ~0.13 GB weights + 32 MiB KV; fixed GPU cost ~1.1 GiB (compute buffer
    # + CUDA context): (5.4 - 1.1) GiB / ~0.16 GiB -> high 20s.
    assert 24 <= k <= 30
    assert result.memory.total_layers == 33
    assert f"{k}/33 layers on GPU" in result.reasons[0]
    assert result.memory.vram_bytes <= 6 * GIB * 0.9
    assert result.memory.ram_bytes > 0


def test_8b_with_flash_attention_and_q8_cache_offloads_more() -> None:
    plain = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(6, ram_gib=32))
    small = evaluate(
        LLAMA_8B, wt("cuda-llm"), device=cuda(6, ram_gib=32), kv_cache_type=KvCacheType.Q8_0
    )
    assert plain.memory is not None and small.memory is not None
    assert small.memory.kv_cache_bytes == GIB * 34 // 64
    assert small.memory.gpu_layers > plain.memory.gpu_layers
    assert any("flash attention" in r for r in small.reasons)


def test_70b_on_24_gib_gpu_and_64_gib_ram_is_partial() -> None:
    result = evaluate(LLAMA_70B, wt("cuda-llm"), device=cuda(24, ram_gib=64))
    assert result.verdict is Verdict.PARTIAL_OFFLOAD
    assert result.memory is not None
    k = result.memory.gpu_layers
    # ~0.53 GB/layer (+32 MiB KV) into ~20 GiB left after compute and CUDA context.
    assert 30 <= k <= 45
    assert f"{k}/81 layers on GPU" in result.reasons[0]
    # 80 layers x 8 KV heads x 256 dims x 2 bytes x 8192 tokens = 2.5 GiB.
    assert result.memory.kv_cache_bytes == 80 * 8 * 256 * 2 * 8192 == int(2.5 * GIB)


def test_70b_on_16_gib_ram_without_gpu_is_too_large() -> None:
    result = evaluate(LLAMA_70B, wt("cpu-llm"), device=cpu(16))
    assert result.verdict is Verdict.TOO_LARGE
    assert "16.00 GiB" in result.reasons[0]
    assert not result.runnable


def test_8b_on_cpu_with_enough_ram_is_cpu_only() -> None:
    result = evaluate(LLAMA_8B, wt("cpu-llm"), device=cpu(16))
    assert result.verdict is Verdict.CPU_ONLY
    assert result.memory is not None and result.memory.vram_bytes == 0
    assert result.runnable


def test_tiny_gpu_means_cpu_only() -> None:
    result = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(1, ram_gib=32))
    assert result.verdict is Verdict.CPU_ONLY
    assert result.memory is not None and result.memory.gpu_layers == 0
    assert "No layer fits" in result.reasons[0]


def test_70b_on_a_gpu_box_with_little_ram_is_too_large() -> None:
    result = evaluate(LLAMA_70B, wt("cuda-llm"), device=cuda(24, ram_gib=8))
    assert result.verdict is Verdict.TOO_LARGE


def test_metal_uses_unified_memory() -> None:
    # 16 GiB Mac: working set 12 GiB, x 0.9 = 10.8 GiB usable; the 8B needs ~6.5 GiB.
    small = evaluate(LLAMA_8B, wt("metal-llm"), device=mac(16))
    assert small.verdict is Verdict.FITS_GPU
    assert small.memory is not None and small.memory.available_vram_bytes == 12 * GIB
    assert "unified-memory GPU working set" in small.reasons[0]
    # 32 GiB Mac with 28 GiB free: the 70B's ~42 GB cannot fit the one pool.
    big = evaluate(LLAMA_70B, wt("metal-llm"), device=mac(32, free_gib=28))
    assert big.verdict is Verdict.TOO_LARGE
    # 128 GiB Mac: working set 96 GiB fits all 81 layers.
    studio = evaluate(LLAMA_70B, wt("metal-llm"), device=mac(128))
    assert studio.verdict is Verdict.FITS_GPU


def test_wrong_device_kind_is_unsupported_device() -> None:
    result = evaluate(LLAMA_8B, wt("metal-llm"), device=cuda(24))
    assert result.verdict is Verdict.UNSUPPORTED_DEVICE
    assert "cuda:0" in result.reasons[0] and "metal" in result.reasons[0]
    row = evaluate_all(LLAMA_8B, WORKER_TYPES, device=cuda(24))
    assert [r.verdict for r in row] == [
        Verdict.UNSUPPORTED_DEVICE,
        Verdict.FITS_GPU,
        Verdict.UNSUPPORTED_DEVICE,
        Verdict.UNSUPPORTED_MODEL_TYPE,
        Verdict.UNSUPPORTED_MODEL_TYPE,
        Verdict.UNSUPPORTED_MODEL_TYPE,
    ]


def test_default_context_is_capped_at_8192() -> None:
    llama31 = LLAMA_8B.model_copy(update={"context_length": 131072})
    result = evaluate(llama31, wt("cuda-llm"), device=cuda(24))
    assert result.memory is not None and result.memory.context_length == 8192
    assert result.memory.kv_cache_bytes == GIB
    assert any("8192" in r and "131072" in r for r in result.reasons)


def test_context_above_trained_is_warned_but_evaluated() -> None:
    result = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(24), context_length=16384)
    assert result.verdict is Verdict.FITS_GPU
    assert result.memory is not None and result.memory.kv_cache_bytes == 2 * GIB
    assert any(r.startswith("Warning") and "16384" in r and "8192" in r for r in result.reasons)


def test_explicit_gpu_layers() -> None:
    ten = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(24), gpu_layers=10)
    assert ten.verdict is Verdict.PARTIAL_OFFLOAD
    assert "10/33 layers" in ten.reasons[0]
    none = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(24), gpu_layers=0)
    assert none.verdict is Verdict.CPU_ONLY
    too_many = evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(6, ram_gib=32), gpu_layers=-1)
    assert too_many.verdict is Verdict.PARTIAL_OFFLOAD
    assert any("requested 33 GPU layers" in r for r in too_many.reasons)


def test_no_device_reports_the_numbers() -> None:
    result = evaluate(LLAMA_8B, wt("cuda-llm"))
    assert result.verdict is Verdict.COMPATIBLE
    assert result.memory is not None
    assert result.memory.gpu_layers == 33
    assert result.memory.kv_cache_bytes == GIB
    assert "not checked" in result.reasons[0]


def test_unknown_free_memory_is_compatible_not_guessed() -> None:
    blind = Device(kind=DeviceKind.CUDA, name="cuda:0")
    assert evaluate(LLAMA_8B, wt("cuda-llm"), device=blind).verdict is Verdict.COMPATIBLE
    assert evaluate(SDXL, wt("cuda-sd"), device=blind).verdict is Verdict.COMPATIBLE


def test_sd_on_devices() -> None:
    # SDXL: 6.94 GB fp16 weights + 2.1 GB activations + 0.3 GiB CUDA ~ 9.4 GB.
    big = evaluate(SDXL, wt("cuda-sd"), device=cuda(24))
    assert big.verdict is Verdict.FITS_GPU
    assert big.memory is not None and big.memory.weights_bytes == 6_940_000_000
    assert any("1024x1024" in r for r in big.reasons)
    # 8 GiB card: 7.2 GiB usable < ~8.7 GiB; fp32 on CPU needs ~16.8 GiB of 32.
    small = evaluate(SDXL, wt("cuda-sd"), device=cuda(8, ram_gib=32))
    assert small.verdict is Verdict.CPU_ONLY
    assert small.memory is not None and small.memory.weights_bytes == 13_880_000_000
    assert evaluate(SDXL, wt("cuda-sd"), device=cuda(8, ram_gib=12)).verdict is Verdict.TOO_LARGE
    assert evaluate(SD15_FOLDER, wt("cpu-sd"), device=cpu(16)).verdict is Verdict.CPU_ONLY
    assert evaluate(SDXL, wt("cpu-sd"), device=cpu(8)).verdict is Verdict.TOO_LARGE
    assert evaluate(SDXL, wt("metal-sd"), device=mac(32)).verdict is Verdict.FITS_GPU
    # A smaller image needs fewer activations.
    half = evaluate(SDXL, wt("cuda-sd"), device=cuda(24), width=512, height=512)
    assert half.memory is not None and half.memory.compute_bytes == 2_100_000_000 // 4


def test_every_verdict_is_reachable() -> None:
    seen = {
        evaluate(LLAMA_8B, wt("cuda-llm")).verdict,
        evaluate(SAFETENSORS_LLM, wt("cuda-llm")).verdict,
        evaluate(MYSTERY_ARCH, wt("cuda-llm")).verdict,
        evaluate(SDXL_LORA, wt("cuda-sd")).verdict,
        evaluate(LLAMA_8B, wt("metal-llm"), device=cuda(24)).verdict,
        evaluate(FLUX_TRANSFORMER, wt("cuda-sd")).verdict,
        evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(24)).verdict,
        evaluate(LLAMA_8B, wt("cuda-llm"), device=cuda(6, ram_gib=32)).verdict,
        evaluate(LLAMA_8B, wt("cpu-llm"), device=cpu(16)).verdict,
        evaluate(LLAMA_70B, wt("cpu-llm"), device=cpu(16)).verdict,
    }
    assert seen == set(Verdict)


def test_reasons_humanise_sizes() -> None:
    result = evaluate(LLAMA_70B, wt("cuda-llm"), device=cuda(24, ram_gib=64))
    text = " ".join(result.reasons)
    assert re.search(r"\d+\.\d{2} GiB", text)
    assert not re.search(r"\d{7,}", text)  # no raw byte counts


def test_quantization_unknown_to_llama_cpp_is_noted() -> None:
    odd = LLAMA_8B.model_copy(update={"quantization": "Q4_X_SPECIAL"})
    result = evaluate(odd, wt("cpu-llm"))
    assert result.verdict is Verdict.COMPATIBLE
    assert any("Q4_X_SPECIAL" in r for r in result.reasons)
    guessed = LLAMA_8B.model_copy(update={"quantization": "(guessed) Q4_K_M"})
    assert not any("may not load" in r for r in evaluate(guessed, wt("cpu-llm")).reasons)


@pytest.mark.parametrize(
    "kwargs",
    [{"context_length": 0}, {"gpu_layers": -2}, {"width": 0}, {"margin": 1.5}],
)
def test_impossible_options_are_invalid_arguments(kwargs: dict[str, int | float]) -> None:
    with pytest.raises(InvalidArgument):
        evaluate(LLAMA_8B, wt("cuda-llm"), **kwargs)  # type: ignore[arg-type]
