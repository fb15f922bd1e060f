"""What Ollama and LM Studio support, for the side-by-side of `rbee compat --chart`.

Static data, paraphrased from the project's research notes, never from memory:
- ../shared/reference/protocols-and-formats.md section 5.1 (Ollama, source and docs at
  ollama/ollama@fb307609) and 5.2 (LM Studio, lmstudio.ai docs; "3rd" = third-party sources);
- ../shared/reference/peers.md sections 1a/1b and 2.6 (Ollama placement, queueing, residency).
A cell says "not covered by our sources" where those notes say nothing; update it from a new
snapshot of the notes, not from guesses. rbee's own column is never written here: the chart
derives it from the worker-type registry (rbee_client.cli.chart).
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_COVERED = "not covered by our sources"


@dataclass(frozen=True)
class PeerSupport:
    """One row of the side-by-side: a topic and what each peer does about it."""

    topic: str  # also the key of the chart's rbee-column builder
    ollama: str
    lm_studio: str


PEER_SUPPORT: tuple[PeerSupport, ...] = (
    PeerSupport(
        topic="Model formats (run time)",
        ollama="GGUF only at run time",  # §5.1
        lm_studio="GGUF (bundled llama.cpp runtimes); MLX on Apple silicon",  # §5.2
    ),
    PeerSupport(
        topic="Importing other formats",
        # §5.1, docs/import.mdx
        ollama=(
            "`ollama create` imports GGUF files and adapters, and converts safetensors for "
            "Llama 2/3/3.1/3.2, Mistral 1/2, Mixtral, Gemma 1/2 and Phi3"
        ),
        lm_studio=NOT_COVERED,
    ),
    PeerSupport(
        topic="Model types",
        # §5.1 capabilities; peers.md 1a manifest layer media types
        ollama=(
            "capabilities completion, tools, insert, vision, embedding, thinking, image, audio; "
            "manifest layers model, projector, adapter"
        ),
        lm_studio="llm, vlm, embeddings",  # §5.2 `type` of GET /api/v0/models
    ),
    PeerSupport(
        topic="LLM architectures",
        ollama="reports `family` / `families` per model; no list in our sources",  # §5.1
        lm_studio="reports `arch` per model; no list in our sources",  # §5.2
    ),
    PeerSupport(
        topic="Quantizations",
        # §5.1: quantization_level is the llama.cpp ftype label; create --quantize
        ollama=(
            "reports `quantization_level` (the llama.cpp file type label, e.g. Q4_K_M); "
            "`ollama create --quantize` makes q8_0, q4_K_S, q4_K_M from F16/F32"
        ),
        lm_studio="reports `quantization` per model (GGUF and MLX)",  # §5.2
    ),
    PeerSupport(
        topic="KV cache types",
        ollama="f16 (default), q8_0, q4_0 (`OLLAMA_KV_CACHE_TYPE`, needs flash attention)",
        lm_studio="KV cache quantization is a load option",  # §5.2 load config knobs
    ),
    PeerSupport(
        topic="Image generation",
        ollama="an `image` capability exists; models run as GGUF only",  # §5.1
        lm_studio="not offered (model types llm, vlm, embeddings)",  # §5.2
    ),
    PeerSupport(
        topic="Devices and platforms",
        # peers.md 1a "Per-device placement" (OLL:server/sched.go)
        ollama=(
            "GPUs through its llama.cpp runner: the best single GPU that fits, else the GPU "
            "group with the most free memory; CPU for the rest"
        ),
        lm_studio=(
            "llama.cpp runtimes CPU, CUDA 12, Vulkan, ROCm on all OSes; MLX on Apple silicon"
        ),  # §5.2
    ),
    PeerSupport(
        topic="Memory-fit check",
        # §5.1 (cmd/cmd.go L1142-1150) and §5.2 (3rd-party, thresholds unpublished)
        ollama=(
            "no badge before loading; after loading `ollama ps` shows 100% GPU, 100% CPU or "
            "a CPU/GPU split"
        ),
        lm_studio=(
            "Full GPU Offload Possible / Partial GPU Offload Possible / Likely too large, per "
            "quantization, from total (not free) VRAM; `lms load --estimate-only`"
        ),
    ),
    PeerSupport(
        topic="Concurrency",
        # peers.md 1b "Request queueing" and 2.6 residency limits
        ollama="`OLLAMA_NUM_PARALLEL` requests per model; up to `OLLAMA_MAX_QUEUE` (512) queued",
        lm_studio=NOT_COVERED,
    ),
)
