"""What a worker's engine is, without grpc: the domain types of generation and the engine ABC.

An engine owns one loaded model on one device. Its methods are BLOCKING and are called from one
worker thread at a time (the worker service serialises requests); `generate` is a generator
the service drives from that thread, checking nothing itself: the engine checks `cancel` once
per token and finishes with FinishReason.CANCELLED when it is set.
"""

from __future__ import annotations

import abc
import enum
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.catalog.domain import KvCacheType

# progress(fraction 0..1, message)
ProgressCallback = Callable[[float, str], None]


class LlmLoadOptions(BaseModel):
    """Load-time options (llama.cpp). None means the engine's documented default."""

    model_config = ConfigDict(frozen=True)

    context_length: int | None = None  # None: min(model's trained context, 4096)
    gpu_layers: int | None = None  # None/-1: all that the device takes; 0: CPU only
    threads: int | None = None  # None: the cores this process may use
    batch_size: int | None = None
    ubatch_size: int | None = None
    kv_cache_type: KvCacheType = KvCacheType.F16
    flash_attention: bool = False
    use_mmap: bool = True


class SamplingParams(BaseModel):
    """Per-request sampling. None means the engine default (documented in the proto)."""

    model_config = ConfigDict(frozen=True)

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None  # None: random, and reported in the result
    logit_bias: dict[int, float] = Field(default_factory=dict)
    grammar: str | None = None  # GBNF
    json_schema: str | None = None  # a JSON schema (converted to a grammar)


class StoppingCriteria(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_tokens: int | None = None  # None: until the context is full
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False


class ChatRole(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: ChatRole
    content: str


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_tokens reached
    STOP_SEQUENCE = "stop_sequence"
    END_OF_SEQUENCE = "end_of_sequence"  # the model's EOS/EOT token
    CONTEXT_FULL = "context_full"
    CANCELLED = "cancelled"


class TokenDelta(BaseModel):
    """Newly complete text (never a partial UTF-8 character, never part of a stop sequence)
    and the token ids that produced it (a delta may carry several ids, or ids whose text is
    still held back)."""

    text: str
    token_ids: list[int] = Field(default_factory=list)


class GenerationResult(BaseModel):
    """The one final event of a generation."""

    finish_reason: FinishReason
    stop_sequence: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens reused from the KV cache (not evaluated)
    completion_tokens: int = 0
    seed: int = 0
    time_to_first_token_s: float = 0.0
    prompt_time_s: float = 0.0
    total_time_s: float = 0.0
    tokens_per_second: float = 0.0  # completion tokens / generation time after the first


GenerationEvent = TokenDelta | GenerationResult


class LoadedModel(BaseModel):
    """What a load produced."""

    path: str
    name: str = ""  # the model's own name (GGUF general.name) when known
    context_length: int = 0
    gpu_layers: int = 0
    memory_bytes: int = 0  # resident bytes attributable to the model (best effort)
    has_chat_template: bool = False
    load_seconds: float = 0.0


class LlmEngine(abc.ABC):
    """A language-model engine bound to one device. Not thread-safe: one caller at a time."""

    backend: str = ""

    @abc.abstractmethod
    def load(
        self,
        path: Path,
        options: LlmLoadOptions,
        *,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> LoadedModel:
        """Load the model (replacing any loaded one). Raises services.common.errors types:
        InvalidArgument for bad options, FailedPrecondition for a model it cannot run,
        Cancelled when `cancel` is set during the load."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the model's memory; idempotent."""

    @property
    @abc.abstractmethod
    def loaded(self) -> LoadedModel | None:
        """The loaded model, or None."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    @abc.abstractmethod
    def detokenize(self, token_ids: Sequence[int], *, skip_special: bool) -> str: ...

    @abc.abstractmethod
    def generate(
        self,
        prompt: str,
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        add_special: bool = True,
        parse_special: bool = False,
    ) -> Iterator[GenerationEvent]:
        """Stream TokenDeltas, then exactly one GenerationResult. Raises before the first
        event for bad input (InvalidArgument; for a prompt beyond the context with reason
        CONTEXT_TOO_LONG, as rbee.common.v1.ErrorReason documents)."""

    @abc.abstractmethod
    def chat(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        chat_template: str | None = None,
    ) -> Iterator[GenerationEvent]:
        """Format `messages` with `chat_template` or the model's own template (GGUF
        tokenizer.chat_template), then generate. FailedPrecondition (NO_CHAT_TEMPLATE) when
        neither exists."""
