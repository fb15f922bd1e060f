"""Which GGUF architectures the LLM workers (llama-cpp-python) can load.

The authoritative answer is the installed llama-cpp-python: its vendored llama.cpp has a fixed
architecture table (`src/llama-arch.cpp`). We do not import `llama_cpp` to ask (importing it
loads the native library, slow and possibly failing on a machine without the right toolkit);
instead we read the installed *distribution version* with `importlib.metadata` and look the
list up in `KNOWN_ARCHITECTURES`, a table keyed by llama-cpp-python version.

- installed and in the table   -> that list, source "llama-cpp-python X (installed)"
- installed, not in the table  -> the newest list for a version <= X (else the oldest), source
                                  "list for V (installed X not in the table)"
- not installed                -> the newest list, source "not installed; list for V"

Some architectures are known to llama.cpp but cannot chat (projectors, encoders, embedding
models, audio decoders, draft heads): `NON_GENERATIVE_ARCHITECTURES` maps each to what it is,
so the compatibility rules can say so instead of offering them as chat models.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass

DISTRIBUTION_NAME = "llama-cpp-python"

# llama-cpp-python 0.3.36 vendors a llama.cpp whose src/llama-arch.cpp names these
# architectures (reference/protocols-and-formats.md §3.5: it says 154 names and lists 153; the
# 154th entry of llama.cpp's table is the "(unknown)" placeholder, not a loadable arch).
_ARCHITECTURES_0_3_36 = frozenset(
    """
    clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert
    modern-bert nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom
    stablelm qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35
    qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm
    minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2 mamba
    mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe
    muse-glimmer openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4
    glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe exaone
    exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid
    graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe bailingmoe2 bailingmoe3
    dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl
    hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada llada-moe seed_oss grovemoe
    apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3
    dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed maincoder kimi-linear kimi-k3
    glm5-next talkie mellum nanbeige qwen3tts pockettts
    """.split()  # noqa: SIM905 - one block, diffable against the reference listing
)

KNOWN_ARCHITECTURES: dict[str, frozenset[str]] = {
    "0.3.36": _ARCHITECTURES_0_3_36,
}

# Known to llama.cpp, but not text generators: loading one in a chat worker either fails or
# produces nothing useful. Value: what the architecture is, for the user-facing reason.
NON_GENERATIVE_ARCHITECTURES: dict[str, str] = {
    "clip": "a multimodal projector (mmproj), loaded beside a vision LLM",
    "t5encoder": "a T5 text encoder (used by image/video pipelines)",
    "wavtokenizer-dec": "an audio codec decoder (WavTokenizer) for text-to-speech",
    "qwen3tts": "a text-to-speech model",
    "pockettts": "a text-to-speech model",
    "eagle3": "a speculative-decoding draft head (EAGLE-3), used with a target model",
    "dflash": "a speculative-decoding draft head, used with a target model",
    "bert": "an embedding model (BERT)",
    "modern-bert": "an embedding model (ModernBERT)",
    "nomic-bert": "an embedding model (nomic-embed)",
    "nomic-bert-moe": "an embedding model (nomic-embed MoE)",
    "neo-bert": "an embedding model (NeoBERT)",
    "jina-bert-v2": "an embedding model (jina-embeddings v2)",
    "jina-bert-v3": "an embedding model (jina-embeddings v3)",
    "eurobert": "an embedding model (EuroBERT)",
    "gemma-embedding": "an embedding model (EmbeddingGemma)",
    "llama-embed": "an embedding model (bidirectional Llama embedder)",
}

_VERSION_PART = re.compile(r"^(\d+)")


@dataclass(frozen=True)
class ArchitectureList:
    """The architectures an LLM worker can load, and where the list came from."""

    names: frozenset[str]
    source: str  # e.g. "llama-cpp-python 0.3.36 (installed)"
    list_version: str  # the KNOWN_ARCHITECTURES key used
    installed_version: str | None  # None when llama-cpp-python is not installed

    def generative(self) -> frozenset[str]:
        """The names that can generate text (the list minus NON_GENERATIVE_ARCHITECTURES)."""
        return self.names - NON_GENERATIVE_ARCHITECTURES.keys()


def version_key(version: str) -> tuple[int, ...]:
    """A sortable key for a release version: leading integers of each dotted part.

    "0.3.36" -> (0, 3, 36); "0.3.40.dev1" -> (0, 3, 40, 0) (a local/dev suffix sorts with its
    release, which is good enough to pick a table entry; no `packaging` dependency needed).
    """
    key: list[int] = []
    for part in version.split("."):
        match = _VERSION_PART.match(part)
        key.append(int(match.group(1)) if match else 0)
    return tuple(key)


def installed_llama_cpp_version() -> str | None:
    """The installed llama-cpp-python distribution version, or None when it is absent.

    Reads package metadata only: `llama_cpp` is NOT imported (that loads the native library).
    """
    try:
        return importlib.metadata.version(DISTRIBUTION_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_architectures(installed_version: str | None = None) -> ArchitectureList:
    """The architecture list for `installed_version` (None: ask the installed distribution).

    Pass a version explicitly to evaluate for another install; leave it None for this host.
    """
    if installed_version is None:
        installed_version = installed_llama_cpp_version()
    by_age = sorted(KNOWN_ARCHITECTURES, key=version_key)
    newest = by_age[-1]
    if installed_version is None:
        return ArchitectureList(
            names=KNOWN_ARCHITECTURES[newest],
            source=f"{DISTRIBUTION_NAME} not installed; list for {newest}",
            list_version=newest,
            installed_version=None,
        )
    if installed_version in KNOWN_ARCHITECTURES:
        return ArchitectureList(
            names=KNOWN_ARCHITECTURES[installed_version],
            source=f"{DISTRIBUTION_NAME} {installed_version} (installed)",
            list_version=installed_version,
            installed_version=installed_version,
        )
    installed_key = version_key(installed_version)
    not_newer = [v for v in by_age if version_key(v) <= installed_key]
    # An install older than every list: the oldest list is the closest we have.
    chosen = not_newer[-1] if not_newer else by_age[0]
    return ArchitectureList(
        names=KNOWN_ARCHITECTURES[chosen],
        source=f"list for {chosen} (installed {installed_version} not in the table)",
        list_version=chosen,
        installed_version=installed_version,
    )


def table_architectures(version: str | None = None) -> ArchitectureList:
    """The table's list for llama-cpp-python `version` (None or "newest": the newest listed),
    whatever is installed here.

    For documents that must not depend on the machine that builds them (docs/COMPATIBILITY.md):
    `resolve_architectures` describes this host's install, this describes the table.
    Raises KeyError for a version the table does not list.
    """
    chosen = max(KNOWN_ARCHITECTURES, key=version_key)
    if version is not None and version != "newest":
        chosen = version
    if chosen not in KNOWN_ARCHITECTURES:
        known = ", ".join(sorted(KNOWN_ARCHITECTURES, key=version_key))
        raise KeyError(f"no architecture list for {DISTRIBUTION_NAME} {chosen} (known: {known})")
    return ArchitectureList(
        names=KNOWN_ARCHITECTURES[chosen],
        source=f"{DISTRIBUTION_NAME} {chosen} (the catalog's architecture table)",
        list_version=chosen,
        installed_version=None,
    )
