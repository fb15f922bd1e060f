"""What resolvers need from the outside world, passed down explicitly (no environment reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.provisioner.domain import Credentials

# The documented GGUF choice when a repo holds several quantizations and no FILE is named:
# the usual quality/size sweet spot first, then larger, then smaller, then unquantized.
DEFAULT_QUANTIZATION_PREFERENCE: tuple[str, ...] = (
    "Q4_K_M",
    "Q5_K_M",
    "Q4_K_S",
    "Q5_K_S",
    "Q6_K",
    "Q8_0",
    "Q4_0",
    "IQ4_XS",
    "Q3_K_M",
    "F16",
    "BF16",
)


@dataclass(frozen=True)
class SourceContext:
    """Endpoints, cache locations, tokens and the GGUF preference for resolving sources."""

    hf_endpoint: str  # e.g. "https://huggingface.co" or a fake's endpoint
    civitai_endpoint: str  # e.g. "https://civitai.com"
    hf_cache: Path  # HF_HUB_CACHE layout root
    models_dir: Path  # RBEE_HOME/models: where non-Hub files land
    credentials: Credentials
    quantization_preference: tuple[str, ...] = DEFAULT_QUANTIZATION_PREFERENCE
    timeout: float = 30.0
