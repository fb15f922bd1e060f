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
from services.common.errors import InvalidArgument

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


# The most alternatives a request may ask for per position (the proto documents 0 to 20).
MAX_TOP_LOGPROBS = 20


class LogprobOptions(BaseModel):
    """Ask for log probabilities in the token deltas (rbee.worker.v1.LogprobOptions).

    Each generated token gets the log probability of the sampled token and, with
    `top_logprobs` N > 0, the N most likely tokens at that position. The distribution is the
    model's own: log-softmax of the raw logits over the whole vocabulary, BEFORE the sampler
    chain (logit bias, penalties, grammar, temperature, top-k/p...) reshapes it, so the numbers
    say what the model thinks, whatever the sampling settings.
    """

    model_config = ConfigDict(frozen=True)

    top_logprobs: int = 0  # 0..MAX_TOP_LOGPROBS alternatives per position


def check_logprob_options(options: LogprobOptions | None) -> None:
    """InvalidArgument unless `options` is None (off) or asks for 0..MAX_TOP_LOGPROBS."""
    if options is not None and not 0 <= options.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument.for_field(
            "logprobs.top_logprobs",
            f"must be in [0, {MAX_TOP_LOGPROBS}], got {options.top_logprobs}",
        )


class SamplingParams(BaseModel):
    """Per-request sampling. None means the engine default (documented in the proto).

    `logprobs` rides here (it is a per-request option of the token loop, like the sampler's)
    so that every caller that passes the sampling on passes it too; None = off.
    """

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
    logprobs: LogprobOptions | None = None  # None: no log probabilities in the deltas


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


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token_id: int
    token: bytes  # the token's piece (may be part of a multi-byte character; b"" for control)
    logprob: float


class TokenLogprob(BaseModel):
    """The log probability of one generated token, and the best alternatives at its position
    (best first; the generated token is among them when it ranks in the top N)."""

    token_id: int
    token: bytes  # the bytes it added to the output (b"" for a control token)
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class TokenDelta(BaseModel):
    """Newly complete text (never a partial UTF-8 character, never part of a stop sequence)
    and the token ids that produced it (a delta may carry several ids, or ids whose text is
    still held back). `logprobs`: when asked for, one entry per id of `token_ids`, in order;
    empty otherwise."""

    text: str
    token_ids: list[int] = Field(default_factory=list)
    # A plain default, not default_factory: pydantic (2.14) inspects a factory's signature on
    # every model_construct (hundreds of microseconds, measured), and deltas are
    # model_construct-ed per message without this field. Pydantic copies the default.
    logprobs: list[TokenLogprob] = []

    @classmethod
    def joined(cls, deltas: Sequence[TokenDelta]) -> TokenDelta:
        """One delta carrying `deltas` in order (text, ids and log probabilities)."""
        # model_construct: the parts are valid already, and this runs per message.
        return cls.model_construct(
            text="".join(d.text for d in deltas),
            token_ids=[i for d in deltas for i in d.token_ids],
            logprobs=[lp for d in deltas for lp in d.logprobs],
        )


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
