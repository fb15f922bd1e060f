"""The LLM engine on llama-cpp-python (0.3.x): GGUF models, a token loop we drive ourselves.

Why our own loop: `create_completion(stream=True)` re-detokenizes the whole completion at every
token (quadratic on byte-token output, issue 4). Here each token costs one sample, one decode
and O(len(piece)) of text work (services.worker.engines.text_stream).

Why our own sampler chain (llama.cpp's native samplers through `_internals.LlamaSampler`)
rather than `Llama.generate(...)`: generate() takes logit bias only as a Python logits
processor (a callback over the whole vocabulary per token), reads the repeat-penalty window
from the constructor (`last_n_tokens_size`) and the seed from `Llama._seed`. Building the chain
per request gives native logit bias, a per-request window (`repeat_last_n`), a per-request seed
in the `dist` sampler, and lets the prompt's tail seed the penalty window as llama.cpp's
server does. The KV-cache prefix reuse of generate() is kept (same rule, see `_prepare_kv`).

Chain order (llama.cpp's common sampler order): logit_bias, penalties, grammar, then greedy
(temperature 0) or top_k, typical_p, top_p, min_p, temperature, dist(seed).

Log probabilities, when a request asks for them: the log-softmax (numpy) of the raw logits
llama.cpp holds for the position just sampled (`llama_get_logits_ith`, before the next
decode), i.e. the model's distribution before the chain above reshapes it. When they are off
the loop computes nothing: one `is None` test per token.

Process-wide effects, acceptable because one worker process hosts one engine: llama.cpp's log
goes to the Python logger "llama_cpp.native" (its errors also feed load error messages), and a
load temporarily wraps `llama_model_default_params` to install llama.cpp's progress callback,
which llama-cpp-python does not expose (a lock serialises loads).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import _internals as llama_internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from services.catalog.domain import KvCacheType
from services.catalog.inspect import InspectError
from services.catalog.inspect.gguf import read_gguf_header
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

_LOG = logging.getLogger(__name__)
_NATIVE_LOG = logging.getLogger("llama_cpp.native")

DEFAULT_CONTEXT_CAP = 4096

# Sampling defaults (documented in protos/rbee/worker/v1/generation.proto).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_TYPICAL_P = 1.0
DEFAULT_REPEAT_PENALTY = 1.0
DEFAULT_REPEAT_LAST_N = 64
# llama.cpp reads seed 0xFFFFFFFF as "pick one at random", which could not be reported.
MAX_SEED = llama_cpp.LLAMA_DEFAULT_SEED - 1

_KV_TYPES: dict[KvCacheType, tuple[int, float]] = {
    # ggml type, bytes per element (block size / block bytes for the quantized ones)
    KvCacheType.F32: (llama_cpp.GGML_TYPE_F32, 4.0),
    KvCacheType.F16: (llama_cpp.GGML_TYPE_F16, 2.0),
    KvCacheType.BF16: (getattr(llama_cpp, "GGML_TYPE_BF16", 30), 2.0),
    KvCacheType.Q8_0: (llama_cpp.GGML_TYPE_Q8_0, 34 / 32),
    KvCacheType.Q4_0: (llama_cpp.GGML_TYPE_Q4_0, 18 / 32),
    KvCacheType.Q4_1: (llama_cpp.GGML_TYPE_Q4_1, 20 / 32),
    KvCacheType.Q5_0: (llama_cpp.GGML_TYPE_Q5_0, 22 / 32),
    KvCacheType.Q5_1: (llama_cpp.GGML_TYPE_Q5_1, 24 / 32),
    KvCacheType.IQ4_NL: (llama_cpp.GGML_TYPE_IQ4_NL, 18 / 32),
}
_UNQUANTIZED_KV = frozenset({KvCacheType.F32, KvCacheType.F16, KvCacheType.BF16})


# --- llama.cpp's log ------------------------------------------------------------------------

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
_GGML_TO_LOGGING = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.DEBUG,  # llama.cpp's INFO is a per-tensor dump: debug for us
    3: logging.WARNING,
    4: logging.ERROR,
}


class _NativeLog:
    """llama.cpp's log -> Python logging; recent error lines kept for error messages."""

    def __init__(self) -> None:
        # (sequence number, line) of recent errors; `logged` counts every error line so far.
        self._errors: collections.deque[tuple[int, str]] = collections.deque(maxlen=16)
        self.logged = 0
        self._last_level = logging.DEBUG
        self._installed = False
        self._lock = threading.Lock()
        # Kept referenced for the life of the process: llama.cpp holds the raw pointer.
        self._callback = llama_cpp.llama_log_callback(self._on_log)

    def install(self) -> None:
        with self._lock:
            if not self._installed:
                llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
                self._installed = True

    def _on_log(self, level: int, text: bytes, _user_data: Any) -> None:
        try:
            log_level = _GGML_TO_LOGGING.get(level, self._last_level)
            self._last_level = log_level
            message = text.decode("utf-8", errors="replace").strip()
            if not message:
                return
            if log_level >= logging.ERROR:
                self._errors.append((self.logged, message))
                self.logged += 1
            if _NATIVE_LOG.isEnabledFor(log_level):
                _NATIVE_LOG.log(log_level, "%s", message)
        except Exception:  # never let an exception cross into C
            pass

    def errors_since(self, mark: int) -> str:
        """The (recent) error lines logged since `mark` (an earlier `logged`), joined."""
        return "; ".join(line for number, line in list(self._errors) if number >= mark)


_native_log = _NativeLog()
_load_lock = threading.Lock()


@contextlib.contextmanager
def _progress_hook(on_progress: Callable[[float], bool]) -> Iterator[None]:
    """Install llama.cpp's model-load progress callback for the Llama() created inside.

    llama-cpp-python builds its llama_model_params from `llama_model_default_params()` and
    offers no argument for the callback, so the function is wrapped for the duration of one
    load (under `_load_lock`). Returning False from the callback aborts the load.
    """
    module = llama_cpp.llama_cpp
    original = getattr(module, "llama_model_default_params", None)
    if original is None or not hasattr(llama_cpp, "llama_progress_callback"):
        yield  # another version: no progress in the middle, still correct
        return

    def callback(fraction: float, _user_data: Any) -> bool:
        try:
            return on_progress(float(fraction))
        except Exception:  # an exception must not cross into C
            _LOG.exception("load progress callback failed")
            return True

    c_callback = llama_cpp.llama_progress_callback(callback)

    def params_with_progress() -> Any:
        params = original()
        params.progress_callback = c_callback
        return params

    module.llama_model_default_params = params_with_progress
    try:
        yield
    finally:
        module.llama_model_default_params = original


# --- the engine -----------------------------------------------------------------------------


class _Loaded:
    """The state of one loaded model."""

    def __init__(self, llm: Llama, info: LoadedModel, chat_template: str | None) -> None:
        self.llm = llm
        self.info = info
        self.chat_template = chat_template
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        # llama.cpp may round its context up (to 256), but Llama sized its token buffer
        # (input_ids) by the n_ctx we asked for: the smaller is the real limit.
        self.n_ctx = min(llm.n_ctx(), len(llm.input_ids))
        self.bos = llm.token_bos()
        self.eos = llm.token_eos()
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_text = self._token_text(self.bos)
        self.eos_text = self._token_text(self.eos)
        # Pieces are looked up once per token id: the token loop pays a list index.
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._buffer = ctypes.create_string_buffer(64)
        self.model_formatter: Jinja2ChatFormatter | None = None

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw: bytes = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes of one token as generated text (control tokens render as nothing)."""
        cached = self._pieces[token]
        if cached is not None:
            return cached
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._buffer, 64, 0, False)
        if n < 0:  # the piece is longer than the buffer: -n is its length
            self._buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._buffer, -n, 0, False)
        data = self._buffer.raw[:n]
        self._pieces[token] = data
        return data

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


class LlamaCppEngine(LlmEngine):
    """GGUF models on llama-cpp-python. Not thread-safe: one caller at a time (see base)."""

    backend = "llama_cpp"

    def __init__(self) -> None:
        self._state: _Loaded | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel | None:
        """The loaded model, or None."""
        return self._state.info if self._state is not None else None

    def load(
        self,
        path: Path,
        options: LlmLoadOptions,
        *,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> LoadedModel:
        """Load a GGUF model (replacing any loaded one); progress 0..1 from llama.cpp.

        Defaults: context = min(the model's trained context, 4096); gpu_layers None = all on
        a GPU build (0 on a CPU build); threads None = the cores this process may use.
        """
        _validate_load_options(options)
        if not path.is_file():
            raise NotFound(
                f"model file not found: {path}",
                resource_type="file",
                resource_name=str(path),
                reason="FILE_NOT_FOUND",
            )
        started = time.perf_counter()
        self.unload()
        _native_log.install()
        progress(0.0, "reading header")
        _check_cancel(cancel)
        trained_ctx, arch_kv = _trained_context(path)
        n_ctx = options.context_length or min(
            trained_ctx or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP
        )
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        gpu_layers = options.gpu_layers
        if gpu_layers is None:
            gpu_layers = -1 if gpu_offload else 0
        threads = options.threads or _usable_cores()
        kv_type, _ = _KV_TYPES[options.kv_cache_type]
        kwargs: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_gpu_layers": gpu_layers,
            "n_threads": threads,
            "n_threads_batch": threads,
            "type_k": kv_type,
            "type_v": kv_type,
            "flash_attn": options.flash_attention,
            "use_mmap": options.use_mmap,
            "verbose": False,
            "logits_all": False,
        }
        if options.batch_size is not None:
            kwargs["n_batch"] = options.batch_size
        if options.ubatch_size is not None:
            kwargs["n_ubatch"] = options.ubatch_size

        def on_progress(fraction: float) -> bool:
            progress(0.05 + 0.85 * fraction, "loading weights")
            return not cancel.is_set()

        progress(0.05, "loading weights")
        mark = _native_log.logged
        with _load_lock, _progress_hook(on_progress):
            try:
                llm = Llama(str(path), **kwargs)
            except ValueError as exc:
                _check_cancel(cancel)  # an aborted load also ends in ValueError
                detail = _native_log.errors_since(mark) or str(exc)
                raise FailedPrecondition(
                    f"llama.cpp cannot load {path.name}: {detail}", reason="INCOMPATIBLE_MODEL"
                ) from exc
        try:
            _check_cancel(cancel)
            progress(0.95, "context created")
            template = llm.metadata.get("tokenizer.chat_template") or None
            n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
            effective_layers = 0
            if gpu_offload:
                effective_layers = n_layer + 1 if gpu_layers < 0 else min(gpu_layers, n_layer + 1)
            context_length = min(llm.n_ctx(), len(llm.input_ids))
            info = LoadedModel(
                path=str(path),
                name=llm.metadata.get("general.name", "") or path.stem,
                context_length=context_length,
                gpu_layers=effective_layers,
                memory_bytes=int(llama_cpp.llama_model_size(llm.model))
                + _kv_cache_bytes(arch_kv, llm.n_ctx(), options.kv_cache_type),
                has_chat_template=template is not None,
                load_seconds=time.perf_counter() - started,
            )
            state = _Loaded(llm, info, template)
            if template is not None:
                state.model_formatter = _formatter(template, state)
        except BaseException:
            llm.close()
            raise
        self._state = state
        progress(1.0, "loaded")
        _LOG.info(
            "loaded %s: n_ctx=%d gpu_layers=%d threads=%d in %.2fs",
            path.name,
            info.context_length,
            info.gpu_layers,
            threads,
            info.load_seconds,
        )
        return info

    def unload(self) -> None:
        """Free the model and its context; idempotent."""
        state, self._state = self._state, None
        if state is not None:
            state.llm.close()

    # --- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of `text` (BOS first when add_special and the model asks for it)."""
        state = self._require_loaded()
        return list(
            state.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
        )

    def detokenize(self, token_ids: Sequence[int], *, skip_special: bool) -> str:
        """Text of `token_ids` (invalid UTF-8 becomes U+FFFD)."""
        state = self._require_loaded()
        ids = list(token_ids)
        _check_token_ids(ids, state.n_vocab, "token_ids")
        data: bytes = state.llm.detokenize(ids, special=not skip_special)
        return data.decode("utf-8", errors="replace")

    # --- generation -----------------------------------------------------------------------

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
        """Stream TokenDeltas then one GenerationResult. Validation errors raise HERE (at the
        call), before any event; the returned iterator runs the token loop."""
        started = time.perf_counter()
        state = self._require_loaded()
        tokens = state.llm.tokenize(
            prompt.encode("utf-8"), add_bos=add_special, special=parse_special
        )
        return self._start(
            state, tokens, sampling, stopping, extra_stops=(), cancel=cancel, started=started
        )

    def chat(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        cancel: threading.Event,
        chat_template: str | None = None,
    ) -> Iterator[GenerationEvent]:
        """Format with `chat_template` or the model's template (Jinja2ChatFormatter), then
        generate; the formatter's stop strings join the request's."""
        started = time.perf_counter()
        state = self._require_loaded()
        if chat_template:
            formatter = _formatter(chat_template, state)
        elif state.model_formatter is not None:
            formatter = state.model_formatter
        else:
            raise FailedPrecondition(
                f"the model {state.info.name!r} has no chat template (GGUF "
                "tokenizer.chat_template); pass chat_template, or use Generate with a "
                "formatted prompt",
                reason="NO_CHAT_TEMPLATE",
            )
        try:
            # llama-cpp-python types messages as OpenAI TypedDicts; plain dicts are what it reads.
            chat_messages: list[Any] = [
                {"role": m.role.value, "content": m.content} for m in messages
            ]
            formatted = formatter(messages=chat_messages)
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            raise InvalidArgument(
                f"chat template does not render: {exc}", reason="CHAT_TEMPLATE_INVALID"
            ) from exc
        # Templates usually write the BOS text themselves: parse it as the special token and
        # add BOS only when the model wants one and the template did not put it there.
        tokens = state.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        if state.add_bos and state.bos >= 0 and tokens[:1] != [state.bos]:
            tokens.insert(0, state.bos)
        extra = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
        return self._start(
            state, tokens, sampling, stopping, extra_stops=extra, cancel=cancel, started=started
        )

    def _start(
        self,
        state: _Loaded,
        tokens: list[int],
        sampling: SamplingParams,
        stopping: StoppingCriteria,
        *,
        extra_stops: Sequence[str],
        cancel: threading.Event,
        started: float,
    ) -> Iterator[GenerationEvent]:
        """Validate and build everything, then hand back the (lazy) token loop."""
        if not tokens:
            raise InvalidArgument.for_field("prompt", "is empty (no tokens to start from)")
        if len(tokens) >= state.n_ctx:
            message = (
                f"the prompt is {len(tokens)} tokens; the context holds {state.n_ctx} "
                "(the prompt must leave room for at least one generated token)"
            )
            raise InvalidArgument(
                message,
                reason="CONTEXT_TOO_LONG",
                field_violations=[FieldViolation("prompt", message)],
                metadata={"prompt_tokens": str(len(tokens)), "context_length": str(state.n_ctx)},
            )
        if stopping.max_tokens is not None and stopping.max_tokens < 0:
            raise InvalidArgument.for_field("stopping.max_tokens", "must be >= 0")
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(MAX_SEED + 1)
        sampler = _build_sampler(state, sampling, seed, tokens)
        top_logprobs = sampling.logprobs.top_logprobs if sampling.logprobs is not None else None
        stops = [*stopping.stop, *(s for s in extra_stops if s)]
        # SPM drops the space of the first piece of a sequence: only when the completion IS
        # the start of the text (the prompt was BOS alone), as detokenizing it all would.
        strip = tokens[0] == state.bos and not any(state.piece(t) for t in tokens)
        stream = TextStream(state.piece, stops, strip_leading_space=strip)
        return self._loop(
            state,
            tokens,
            sampler,
            stream,
            stopping=stopping,
            seed=seed,
            cancel=cancel,
            started=started,
            top_logprobs=top_logprobs,
        )

    def _loop(
        self,
        state: _Loaded,
        tokens: list[int],
        sampler: llama_internals.LlamaSampler,
        stream: TextStream,
        *,
        stopping: StoppingCriteria,
        seed: int,
        cancel: threading.Event,
        started: float,
        top_logprobs: int | None,
    ) -> Iterator[GenerationEvent]:
        """The token loop. `top_logprobs`: None = no log probabilities (the loop then pays one
        `is None` test per token), else the alternatives to report per position."""
        llm = state.llm
        n_ctx = state.n_ctx
        max_tokens = stopping.max_tokens or None  # 0 = no limit (as in the proto)
        stop_on_eog = not stopping.ignore_eos
        piece_ids: list[int] = []  # ids whose text is still held back
        piece_logprobs: list[TokenLogprob] = []  # theirs, when asked for
        completion = 0
        cached_prompt = 0
        first_token_at = 0.0
        last_token_at = 0.0
        prompt_time = 0.0
        finish: FinishReason
        matched: str | None = None
        try:
            if cancel.is_set():
                finish = FinishReason.CANCELLED
            else:
                eval_started = time.perf_counter()
                cached_prompt = _prepare_kv(llm, tokens)
                prompt_time = time.perf_counter() - eval_started
                while True:
                    token = sampler.sample(llm._ctx, -1)
                    now = time.perf_counter()
                    if not first_token_at:
                        first_token_at = now
                    if stop_on_eog and state.is_eog(token):
                        finish = FinishReason.END_OF_SEQUENCE
                        break
                    last_token_at = now
                    completion += 1
                    piece_ids.append(token)
                    if top_logprobs is not None:
                        # The logits of this position are valid until the next decode.
                        piece_logprobs.append(_token_logprob(state, token, top_logprobs))
                    text, matched = stream.feed(token)
                    if text:
                        # model_construct: the fields are built here with the right types;
                        # validation per token would be pure overhead in the hot loop.
                        if top_logprobs is None:
                            yield TokenDelta.model_construct(text=text, token_ids=piece_ids)
                        else:
                            yield TokenDelta.model_construct(
                                text=text, token_ids=piece_ids, logprobs=piece_logprobs
                            )
                            piece_logprobs = []
                        piece_ids = []
                    if matched is not None:
                        finish = FinishReason.STOP_SEQUENCE
                        break
                    if max_tokens is not None and completion >= max_tokens:
                        finish = FinishReason.LENGTH
                        break
                    if llm.n_tokens >= n_ctx:  # no room to evaluate this token
                        finish = FinishReason.CONTEXT_FULL
                        break
                    if cancel.is_set():
                        finish = FinishReason.CANCELLED
                        break
                    llm.eval([token])
        except GeneratorExit:
            raise  # closed at a yield: the cache bookkeeping is consistent, keep it
        except BaseException:
            # A failed decode leaves llama's bookkeeping uncertain: start the next request
            # from a clean cache.
            llm.reset()  # type: ignore[no-untyped-call]
            raise
        finally:
            sampler.close()  # type: ignore[no-untyped-call]
        if matched is None:
            text, matched = stream.flush()
            if matched is not None:
                finish = FinishReason.STOP_SEQUENCE
        else:
            text = ""
        if text or piece_ids:
            yield TokenDelta(text=text, token_ids=piece_ids, logprobs=piece_logprobs)
        ended = time.perf_counter()
        decode_span = last_token_at - first_token_at
        yield GenerationResult(
            finish_reason=finish,
            stop_sequence=matched or "",
            prompt_tokens=len(tokens),
            cached_prompt_tokens=cached_prompt,
            completion_tokens=completion,
            seed=seed,
            time_to_first_token_s=(first_token_at - started) if first_token_at else 0.0,
            prompt_time_s=prompt_time,
            total_time_s=ended - started,
            tokens_per_second=(completion - 1) / decode_span if decode_span > 0 else 0.0,
        )

    def _require_loaded(self) -> _Loaded:
        if self._state is None:
            raise FailedPrecondition("no model is loaded", reason="MODEL_NOT_LOADED")
        return self._state


# --- helpers of the engine (module-private) -------------------------------------------------


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("model load cancelled")


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _validate_load_options(options: LlmLoadOptions) -> None:
    checks = [
        ("context_length", options.context_length, 1),
        ("gpu_layers", options.gpu_layers, -1),
        ("threads", options.threads, 1),
        ("batch_size", options.batch_size, 1),
        ("ubatch_size", options.ubatch_size, 1),
    ]
    for name, value, minimum in checks:
        if value is not None and value < minimum:
            raise InvalidArgument.for_field(name, f"must be >= {minimum}, got {value}")
    if options.kv_cache_type not in _UNQUANTIZED_KV and not options.flash_attention:
        raise InvalidArgument.for_field(
            "kv_cache_type",
            f"{options.kv_cache_type.value} (a quantized KV cache) needs flash_attention",
        )


def _trained_context(path: Path) -> tuple[int | None, dict[str, int]]:
    """The trained context and the attention shape from the GGUF header (None/{} if unread:
    llama.cpp then reports what is wrong with the file)."""
    try:
        kv = read_gguf_header(path).kv
    except InspectError:
        return None, {}
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        return None, {}
    shape: dict[str, int] = {}
    for key in ("context_length", "block_count", "embedding_length"):
        value = kv.get(f"{arch}.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            shape[key] = value
    for key in ("head_count", "head_count_kv"):
        value = kv.get(f"{arch}.attention.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            shape[key] = value
    return shape.get("context_length"), shape


def _kv_cache_bytes(shape: dict[str, int], n_ctx: int, kv_type: KvCacheType) -> int:
    """K and V for every layer and position (best effort from the header; 0 if unknown)."""
    try:
        n_embd_kv = (
            shape["embedding_length"]
            * shape.get("head_count_kv", shape["head_count"])
            // shape["head_count"]
        )
        per_element = _KV_TYPES[kv_type][1]
        return int(2 * n_ctx * shape["block_count"] * n_embd_kv * per_element)
    except (KeyError, ZeroDivisionError):
        return 0


def _formatter(template: str, state: _Loaded) -> Jinja2ChatFormatter:
    try:
        return Jinja2ChatFormatter(
            template=template,
            eos_token=state.eos_text,
            bos_token=state.bos_text,
            add_generation_prompt=True,
        )
    except Exception as exc:  # jinja2.TemplateSyntaxError and friends
        raise InvalidArgument(
            f"chat template does not compile: {exc}", reason="CHAT_TEMPLATE_INVALID"
        ) from exc


def _check_token_ids(ids: Sequence[int], n_vocab: int, field: str) -> None:
    for token in ids:
        if not 0 <= token < n_vocab:
            # llama.cpp would read out of bounds (or abort): never pass it an unknown id.
            raise InvalidArgument.for_field(field, f"token id {token} is not in 0..{n_vocab - 1}")


def _validate_sampling(sampling: SamplingParams, state: _Loaded) -> None:
    ranges: list[tuple[str, float | None, float, float]] = [
        ("temperature", sampling.temperature, 0.0, float("inf")),
        ("top_p", sampling.top_p, 0.0, 1.0),
        ("min_p", sampling.min_p, 0.0, 1.0),
        ("typical_p", sampling.typical_p, 0.0, 1.0),
        ("presence_penalty", sampling.presence_penalty, -2.0, 2.0),
        ("frequency_penalty", sampling.frequency_penalty, -2.0, 2.0),
    ]
    for name, value, low, high in ranges:
        if value is not None and not low <= value <= high:
            raise InvalidArgument.for_field(f"sampling.{name}", f"must be in [{low}, {high}]")
    if sampling.top_k is not None and sampling.top_k < 0:
        raise InvalidArgument.for_field("sampling.top_k", "must be >= 0 (0 disables it)")
    if sampling.repeat_penalty is not None and not sampling.repeat_penalty > 0:
        raise InvalidArgument.for_field("sampling.repeat_penalty", "must be > 0 (1 disables it)")
    if sampling.repeat_last_n is not None and sampling.repeat_last_n < -1:
        raise InvalidArgument.for_field(
            "sampling.repeat_last_n", "must be >= -1 (-1 = the whole context)"
        )
    if sampling.seed is not None and not 0 <= sampling.seed <= MAX_SEED:
        raise InvalidArgument.for_field("sampling.seed", f"must be in [0, {MAX_SEED}]")
    if sampling.grammar and sampling.json_schema:
        raise InvalidArgument.for_field("sampling", "set grammar or json_schema, not both")
    check_logprob_options(sampling.logprobs)
    _check_token_ids(list(sampling.logit_bias), state.n_vocab, "sampling.logit_bias")
    for token, bias in sampling.logit_bias.items():
        if math.isnan(bias):
            raise InvalidArgument.for_field("sampling.logit_bias", f"bias of {token} is NaN")


def _build_sampler(
    state: _Loaded, sampling: SamplingParams, seed: int, prompt: Sequence[int]
) -> llama_internals.LlamaSampler:
    """The request's llama.cpp sampler chain (order in the module docstring)."""
    _validate_sampling(sampling, state)
    grammar_text: str | None = None
    if sampling.json_schema:
        try:
            grammar_text = LlamaGrammar.from_json_schema(
                sampling.json_schema, verbose=False
            )._grammar
        except Exception as exc:  # invalid JSON, unsupported schema constructs
            raise InvalidArgument(
                f"sampling.json_schema: cannot convert to a grammar: {exc}",
                reason="GRAMMAR_INVALID",
            ) from exc
    elif sampling.grammar:
        grammar_text = sampling.grammar

    chain = llama_internals.LlamaSampler()  # type: ignore[no-untyped-call]
    try:
        if sampling.logit_bias:
            chain.add_logit_bias(state.n_vocab, dict(sampling.logit_bias))
        _add_penalties(chain, state, sampling, prompt)
        if grammar_text is not None:
            mark = _native_log.logged
            grammar = llama_cpp.llama_sampler_init_grammar(
                state.vocab, grammar_text.encode("utf-8"), b"root"
            )
            if not grammar:
                detail = _native_log.errors_since(mark) or "not valid GBNF"
                raise InvalidArgument(
                    f"sampling: the grammar does not parse ({detail})",
                    reason="GRAMMAR_INVALID",
                )
            llama_cpp.llama_sampler_chain_add(chain.sampler, grammar)
        temperature = DEFAULT_TEMPERATURE if sampling.temperature is None else sampling.temperature
        if temperature == 0.0:
            chain.add_greedy()  # type: ignore[no-untyped-call]
        else:
            top_k = DEFAULT_TOP_K if sampling.top_k is None else sampling.top_k
            typical_p = DEFAULT_TYPICAL_P if sampling.typical_p is None else sampling.typical_p
            top_p = DEFAULT_TOP_P if sampling.top_p is None else sampling.top_p
            min_p = DEFAULT_MIN_P if sampling.min_p is None else sampling.min_p
            if top_k > 0:
                chain.add_top_k(top_k)
            if typical_p < 1.0:
                chain.add_typical(typical_p, 1)
            if top_p < 1.0:
                chain.add_top_p(top_p, 1)
            if min_p > 0.0:
                chain.add_min_p(min_p, 1)
            chain.add_temp(temperature)
            chain.add_dist(seed)
    except BaseException:
        chain.close()  # type: ignore[no-untyped-call]
        raise
    return chain


def _add_penalties(
    chain: llama_internals.LlamaSampler,
    state: _Loaded,
    sampling: SamplingParams,
    prompt: Sequence[int],
) -> None:
    """Repeat/frequency/presence penalties over the last `repeat_last_n` tokens, the prompt's
    tail included (as llama.cpp's server does); left out entirely when they are all off."""
    repeat = DEFAULT_REPEAT_PENALTY if sampling.repeat_penalty is None else sampling.repeat_penalty
    frequency = sampling.frequency_penalty or 0.0
    presence = sampling.presence_penalty or 0.0
    window = DEFAULT_REPEAT_LAST_N if sampling.repeat_last_n is None else sampling.repeat_last_n
    if window == -1:
        window = state.n_ctx
    if window == 0 or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return
    penalties = llama_cpp.llama_sampler_init_penalties(
        state.n_vocab, window, repeat, frequency, presence
    )
    for token in prompt[-window:]:
        llama_cpp.llama_sampler_accept(penalties, token)
    llama_cpp.llama_sampler_chain_add(chain.sampler, penalties)  # the chain owns it now


def _token_logprob(state: _Loaded, token: int, top_n: int) -> TokenLogprob:
    """The log probability of `token` and the `top_n` most likely tokens at the position
    whose logits llama.cpp holds now (the last one evaluated).

    log-softmax over the whole vocabulary of the model's raw logits, before any sampler
    (base.LogprobOptions says why). Only the normalizer needs the whole vocabulary: one exp
    and one sum over it, summed in float64 (large vocabularies); the top N come from a
    partial sort.
    """
    pointer = llama_cpp.llama_get_logits_ith(state.llm._ctx.ctx, -1)
    logits = np.ctypeslib.as_array(pointer, shape=(state.n_vocab,))
    peak = float(logits.max())
    log_normalizer = peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
    alternatives: list[TopLogprob] = []
    if top_n > 0:
        if top_n < state.n_vocab:
            best = np.argpartition(logits, -top_n)[-top_n:]
        else:
            best = np.arange(state.n_vocab)
        # Best first; equal logits in id order.
        ordered = best[np.lexsort((best, -logits[best]))]
        alternatives = [
            TopLogprob.model_construct(
                token_id=t, token=state.piece(t), logprob=logit - log_normalizer
            )
            for t, logit in zip(ordered.tolist(), logits[ordered].tolist(), strict=True)
        ]
    return TokenLogprob.model_construct(
        token_id=token,
        token=state.piece(token),
        logprob=float(logits[token]) - log_normalizer,
        top_logprobs=alternatives,
    )


def _prepare_kv(llm: Llama, tokens: Sequence[int]) -> int:
    """Evaluate the prompt, reusing the longest prefix already in the KV cache; returns the
    number of prompt tokens reused.

    The same rule as Llama.generate(): at least one token is evaluated again so the logits
    are those of the prompt's last position.
    """
    cached = llm.input_ids[: llm.n_tokens]
    reuse = 0
    limit = min(len(cached), len(tokens))
    while reuse < limit and cached[reuse] == tokens[reuse]:
        reuse += 1
    if reuse == len(tokens):
        reuse -= 1
    if reuse > 0 and llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
        llm.n_tokens = reuse
    else:
        llm.reset()  # type: ignore[no-untyped-call]
        reuse = 0
    llm.eval(tokens[reuse:])
    return reuse
