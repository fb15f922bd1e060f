"""FakeEngine: a deterministic, instant LLM engine for protocol tests (no model file needed).

Its vocabulary is bytes: ids 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), then 3 + b for byte b, so a
multi-byte character always spans several tokens and the UTF-8 hold-back of the real engine is
exercised here too: both engines turn tokens into text through the same TextStream.

Output: the scripted `reply` when one is given, else an echo of the prompt (Generate) or of
the last message (Chat); then EOS. With `ignore_eos` the reply repeats until max_tokens or the
context is full. `token_delay_s` waits between tokens (on the cancel event, so a cancel is seen
at once) so that tests can cancel mid-stream.

Log probabilities (when asked for) come from a fixed distribution, so protocol tests can check
them exactly: at every position the logit of token t is -((t - g) mod N_VOCAB) for the generated
token g. So g is the most likely token, with log probability -LOG_NORMALIZER, and the k-th
alternative (k = 0, 1, ...) is (g + k) mod N_VOCAB with log probability -k - LOG_NORMALIZER; see
`fake_token_logprob`.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from services.worker.engines.base import (
    ChatMessage,
    FinishReason,
    GenerationEvent,
    GenerationResult,
    LlmEngine,
    LlmLoadOptions,
    LoadedModel,
    ProgressCallback,
    SamplingParams,
    StoppingCriteria,
    TokenDelta,
    TokenLogprob,
    TopLogprob,
    check_logprob_options,
)
from services.worker.engines.text_stream import TextStream

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
N_VOCAB = BYTE_OFFSET + 256
DEFAULT_CONTEXT_LENGTH = 2048
MAX_SEED = 0xFFFFFFFE
# log(sum over the vocabulary of exp(-k)), k = 0 .. N_VOCAB-1: the fake distribution's normalizer.
LOG_NORMALIZER = math.log(sum(math.exp(-k) for k in range(N_VOCAB)))


def _piece(token_id: int) -> bytes:
    """The bytes of one fake token (special tokens render as nothing)."""
    return bytes((token_id - BYTE_OFFSET,)) if token_id >= BYTE_OFFSET else b""


def fake_token_logprob(token_id: int, top_n: int) -> TokenLogprob:
    """The fake's log probabilities at a position that generated `token_id` (module docstring):
    the token itself is the most likely, then the ids after it, wrapping around."""
    alternatives = [
        TopLogprob(
            token_id=(token_id + k) % N_VOCAB,
            token=_piece((token_id + k) % N_VOCAB),
            logprob=-k - LOG_NORMALIZER,
        )
        for k in range(top_n)
    ]
    return TokenLogprob(
        token_id=token_id,
        token=_piece(token_id),
        logprob=-LOG_NORMALIZER,
        top_logprobs=alternatives,
    )


def format_chat(messages: Sequence[ChatMessage]) -> str:
    """The fake's built-in chat format: `<|role|>content` lines, then `<|assistant|>`."""
    lines = [f"<|{m.role.value}|>{m.content}\n" for m in messages]
    return "".join(lines) + "<|assistant|>"


class FakeEngine(LlmEngine):
    """Deterministic stand-in for LlamaCppEngine. Not thread-safe (one caller at a time).

    `reply`: the text every request generates (None: echo). `has_chat_template`: False makes
    Chat fail with NO_CHAT_TEMPLATE unless the request passes one. The last formatted chat
    prompt and template are kept in `last_prompt` / `last_chat_template` for assertions.
    """

    backend = "fake"

    def __init__(
        self,
        *,
        reply: str | None = None,
        token_delay_s: float = 0.0,
        has_chat_template: bool = True,
        name: str = "fake",
    ) -> None:
        self.reply = reply
        self.token_delay_s = token_delay_s
        self.has_chat_template = has_chat_template
        self.name = name
        self.last_prompt: str | None = None
        self.last_chat_template: str | None = None
        self._loaded: LoadedModel | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        """The loaded model, or None."""
        return self._loaded

    def load(
        self,
        path: Path,
        options: LlmLoadOptions,
        *,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> LoadedModel:
        """Pretend to load any existing file or folder: progress 0, 0.5, 1, cancel checked."""
        if not path.exists():
            raise NotFound(
                f"model file not found: {path}",
                resource_type="file",
                resource_name=str(path),
                reason="FILE_NOT_FOUND",
            )
        if options.context_length is not None and options.context_length < 2:
            raise InvalidArgument.for_field("context_length", "must be >= 2")
        started = time.perf_counter()
        self.unload()
        for fraction, message in ((0.0, "reading header"), (0.5, "loading weights")):
            progress(fraction, message)
            if cancel.is_set():
                raise Cancelled("model load cancelled")
        self._loaded = LoadedModel(
            path=str(path),
            name=self.name,
            context_length=options.context_length or DEFAULT_CONTEXT_LENGTH,
            gpu_layers=0,
            memory_bytes=path.stat().st_size if path.is_file() else 0,
            has_chat_template=self.has_chat_template,
            load_seconds=time.perf_counter() - started,
        )
        progress(1.0, "loaded")
        return self._loaded

    def unload(self) -> None:
        """Forget the model; idempotent."""
        self._loaded = None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """BOS (when add_special) then one token per UTF-8 byte; parse_special recognises
        the literal texts "<s>" and "</s>"."""
        self._require_loaded()
        ids = [BOS_ID] if add_special else []
        if parse_special:
            for i, part in enumerate(text.split("<s>")):
                if i:
                    ids.append(BOS_ID)
                for j, chunk in enumerate(part.split("</s>")):
                    if j:
                        ids.append(EOS_ID)
                    ids.extend(BYTE_OFFSET + b for b in chunk.encode("utf-8"))
            return ids
        return ids + [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def detokenize(self, token_ids: Sequence[int], *, skip_special: bool) -> str:
        """Bytes back to text (U+FFFD for invalid UTF-8); specials as "<s>" / "</s>" unless
        skipped."""
        self._require_loaded()
        out = bytearray()
        for token in token_ids:
            if not 0 <= token < N_VOCAB:
                raise InvalidArgument.for_field("token_ids", f"token id {token} is unknown")
            if token >= BYTE_OFFSET:
                out += _piece(token)
            elif not skip_special:
                out += {UNK_ID: b"<unk>", BOS_ID: b"<s>", EOS_ID: b"</s>"}[token]
        return out.decode("utf-8", errors="replace")

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
        """Stream the reply (or the prompt's echo) token by token, then one result; input
        errors raise at the call."""
        started = time.perf_counter()
        tokens = self.tokenize(prompt, add_special=add_special, parse_special=parse_special)
        reply = prompt if self.reply is None else self.reply
        return self._start(tokens, reply, sampling, stopping, cancel=cancel, started=started)

    def chat(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        chat_template: str | None = None,
    ) -> Iterator[GenerationEvent]:
        """Format with the built-in format (a given `chat_template` is recorded, not
        rendered) and stream the reply (or the last message's echo)."""
        started = time.perf_counter()
        self._require_loaded()
        if not chat_template and not self.has_chat_template:
            raise FailedPrecondition(
                f"the model {self.name!r} has no chat template; pass chat_template",
                reason="NO_CHAT_TEMPLATE",
            )
        prompt = format_chat(messages)
        self.last_prompt = prompt
        self.last_chat_template = chat_template
        tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        echo = messages[-1].content if messages else ""
        reply = self.reply if self.reply is not None else echo
        return self._start(tokens, reply, sampling, stopping, cancel=cancel, started=started)

    def _start(
        self,
        tokens: list[int],
        reply: str,
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        started: float,
    ) -> Iterator[GenerationEvent]:
        loaded = self._require_loaded()
        if len(tokens) >= loaded.context_length:
            message = (
                f"the prompt is {len(tokens)} tokens; the context holds {loaded.context_length}"
            )
            raise InvalidArgument(
                message,
                reason="CONTEXT_TOO_LONG",
                field_violations=[FieldViolation("prompt", message)],
                metadata={
                    "prompt_tokens": str(len(tokens)),
                    "context_length": str(loaded.context_length),
                },
            )
        if stopping.max_tokens is not None and stopping.max_tokens < 0:
            raise InvalidArgument.for_field("stopping.max_tokens", "must be >= 0")
        if sampling.seed is not None and not 0 <= sampling.seed <= MAX_SEED:
            raise InvalidArgument.for_field("sampling.seed", f"must be in [0, {MAX_SEED}]")
        check_logprob_options(sampling.logprobs)
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(MAX_SEED + 1)
        script = [BYTE_OFFSET + b for b in reply.encode("utf-8")]
        return self._loop(
            tokens,
            script,
            stopping,
            seed=seed,
            cancel=cancel,
            started=started,
            n_ctx=loaded.context_length,
            top_logprobs=sampling.logprobs.top_logprobs if sampling.logprobs else None,
        )

    def _loop(
        self,
        tokens: list[int],
        script: list[int],
        stopping: StoppingCriteria,
        *,
        seed: int,
        cancel: threading.Event,
        started: float,
        n_ctx: int,
        top_logprobs: int | None,
    ) -> Iterator[GenerationEvent]:
        stream = TextStream(_piece, stopping.stop)
        max_tokens = stopping.max_tokens or None  # 0 = no limit (as in the proto)
        pending_ids: list[int] = []
        pending_logprobs: list[TokenLogprob] = []
        completion = 0
        first_at = last_at = 0.0
        matched: str | None = None
        position = 0
        finish: FinishReason
        while True:
            if cancel.is_set():
                finish = FinishReason.CANCELLED
                break
            if position >= len(script):
                if not stopping.ignore_eos or not script:
                    finish = FinishReason.END_OF_SEQUENCE
                    break
                position = 0
            if self.token_delay_s > 0 and cancel.wait(self.token_delay_s):
                finish = FinishReason.CANCELLED
                break
            token = script[position]
            position += 1
            last_at = time.perf_counter()
            first_at = first_at or last_at
            completion += 1
            pending_ids.append(token)
            if top_logprobs is not None:
                pending_logprobs.append(fake_token_logprob(token, top_logprobs))
            text, matched = stream.feed(token)
            if text:
                yield TokenDelta(text=text, token_ids=pending_ids, logprobs=pending_logprobs)
                pending_ids = []
                pending_logprobs = []
            if matched is not None:
                finish = FinishReason.STOP_SEQUENCE
                break
            if max_tokens is not None and completion >= max_tokens:
                finish = FinishReason.LENGTH
                break
            if len(tokens) + completion >= n_ctx:
                finish = FinishReason.CONTEXT_FULL
                break
        text = ""
        if matched is None:
            text, matched = stream.flush()
            if matched is not None:
                finish = FinishReason.STOP_SEQUENCE
        if text or pending_ids:
            yield TokenDelta(text=text, token_ids=pending_ids, logprobs=pending_logprobs)
        span = last_at - first_at
        yield GenerationResult(
            finish_reason=finish,
            stop_sequence=matched or "",
            prompt_tokens=len(tokens),
            completion_tokens=completion,
            seed=seed,
            time_to_first_token_s=(first_at - started) if first_at else 0.0,
            prompt_time_s=0.0,
            total_time_s=time.perf_counter() - started,
            tokens_per_second=(completion - 1) / span if span > 0 else 0.0,
        )

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise FailedPrecondition("no model is loaded", reason="MODEL_NOT_LOADED")
        return self._loaded
