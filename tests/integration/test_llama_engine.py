"""LlamaCppEngine on real llama-cpp-python with tiny generated GGUF models (CPU, no sockets)."""

from __future__ import annotations

import ctypes
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import llama_cpp
from llama_cpp import Llama

from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.worker.engines.base import (
    MAX_TOP_LOGPROBS,
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationEvent,
    GenerationResult,
    LlmLoadOptions,
    LogprobOptions,
    SamplingParams,
    StoppingCriteria,
    TokenDelta,
    TokenLogprob,
)
from services.worker.engines.llama_cpp import LlamaCppEngine
from tests.fixtures.gguf_models import write_corrupt_gguf, write_tiny_llama_gguf

pytestmark = [pytest.mark.integration, pytest.mark.llm]

TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
N_CTX = 256  # the fixture's trained context
BYTE_TOKEN_0 = 3  # <0x00> in the fixture's vocabulary (after <unk> <s> </s>)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llm")
    write_tiny_llama_gguf(directory / "chat.gguf", chat_template=TEMPLATE)
    write_tiny_llama_gguf(directory / "plain.gguf", name="plain")
    return directory


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine()
    eng.load(
        model_dir / "chat.gguf",
        LlmLoadOptions(threads=1),
        progress=lambda f, m: None,
        cancel=threading.Event(),
    )
    yield eng
    eng.unload()


def _run(
    engine: LlamaCppEngine,
    prompt: str = "hello world",
    cancel: threading.Event | None = None,
    **kwargs: object,
) -> tuple[list[TokenDelta], GenerationResult]:
    sampling = {k: v for k, v in kwargs.items() if k in SamplingParams.model_fields}
    stopping = {k: v for k, v in kwargs.items() if k in StoppingCriteria.model_fields}
    events = list(
        engine.generate(
            prompt,
            SamplingParams(**sampling),  # type: ignore[arg-type]
            StoppingCriteria(**stopping),  # type: ignore[arg-type]
            cancel=cancel or threading.Event(),
        )
    )
    return _split(events)


def _split(events: list[GenerationEvent]) -> tuple[list[TokenDelta], GenerationResult]:
    *deltas, result = events
    assert all(isinstance(d, TokenDelta) for d in deltas), "deltas, then exactly one result"
    assert isinstance(result, GenerationResult)
    return deltas, result  # type: ignore[return-value]


def _text(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


def _ids(deltas: list[TokenDelta]) -> list[int]:
    return [i for d in deltas for i in d.token_ids]


def _token_of(engine: LlamaCppEngine, text: str) -> int:
    """The id of the word-piece whose text is exactly `text`."""
    matches = [i for i in range(259, 320) if engine.detokenize([i], skip_special=True) == text]
    assert matches, text
    return matches[0]


# --- load -----------------------------------------------------------------------------------


def test_load_reports_progress_and_model_facts(model_dir: Path) -> None:
    engine = LlamaCppEngine()
    seen: list[tuple[float, str]] = []
    info = engine.load(
        model_dir / "chat.gguf",
        LlmLoadOptions(),
        progress=lambda f, m: seen.append((f, m)),
        cancel=threading.Event(),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(seen) > 4  # llama.cpp's own callback reported the weights in between
    assert info.name == "tiny-llama" and info.context_length == N_CTX  # min(256, 4096)
    assert info.has_chat_template and info.memory_bytes > 0 and info.gpu_layers == 0
    assert engine.loaded == info
    smaller = engine.load(
        model_dir / "plain.gguf",
        LlmLoadOptions(context_length=64),
        progress=lambda f, m: None,
        cancel=threading.Event(),
    )
    assert smaller.context_length == 64 and not smaller.has_chat_template
    engine.unload()
    engine.unload()
    assert engine.loaded is None


def test_load_errors(tmp_path: Path, model_dir: Path) -> None:
    engine = LlamaCppEngine()
    with pytest.raises(NotFound) as missing:
        engine.load(
            tmp_path / "nope.gguf",
            LlmLoadOptions(),
            progress=lambda f, m: None,
            cancel=threading.Event(),
        )
    assert missing.value.reason == "FILE_NOT_FOUND"
    bad = write_corrupt_gguf(tmp_path / "bad.gguf", "bad_magic")
    with pytest.raises(FailedPrecondition) as broken:
        engine.load(bad, LlmLoadOptions(), progress=lambda f, m: None, cancel=threading.Event())
    assert broken.value.reason == "INCOMPATIBLE_MODEL"
    assert "magic" in broken.value.message  # llama.cpp's own words
    with pytest.raises(InvalidArgument):
        engine.load(
            model_dir / "chat.gguf",
            LlmLoadOptions(context_length=0),
            progress=lambda f, m: None,
            cancel=threading.Event(),
        )


def test_cancel_during_load_aborts_it(model_dir: Path) -> None:
    engine = LlamaCppEngine()
    cancel = threading.Event()

    def progress(fraction: float, message: str) -> None:
        if 0.1 < fraction < 0.9:  # inside llama.cpp's weight loading
            cancel.set()

    with pytest.raises(Cancelled):
        engine.load(model_dir / "chat.gguf", LlmLoadOptions(), progress=progress, cancel=cancel)
    assert engine.loaded is None


# --- generate -------------------------------------------------------------------------------


def test_stream_equals_whole_detokenization_on_byte_token_output(engine: LlamaCppEngine) -> None:
    # Byte-fallback tokens favoured: most output is raw bytes, multi-byte characters (and
    # invalid sequences) split across tokens. BOS is banned: detokenize() strips a space after it.
    bias = {BYTE_TOKEN_0 + b: 8.0 for b in range(256)} | {1: -100.0}
    deltas, result = _run(
        engine, "hello", seed=11, temperature=1.0, logit_bias=bias, ignore_eos=True
    )
    ids = _ids(deltas)
    assert result.finish_reason == FinishReason.CONTEXT_FULL
    assert len(ids) == result.completion_tokens > 200
    assert sum(BYTE_TOKEN_0 <= i < BYTE_TOKEN_0 + 256 for i in ids) > 0.9 * len(ids)
    expected = engine.detokenize(ids, skip_special=True)
    assert _text(deltas) == expected
    assert any(ord(c) > 0x7F and c != "\ufffd" for c in expected)  # some real characters
    assert all(d.text for d in deltas[:-1])  # no empty deltas except possibly the last


def test_multibyte_characters_arrive_whole_in_one_delta(engine: LlamaCppEngine) -> None:
    # The tiny vocabulary has no CJK or emoji pieces: each character is 3 or 4 byte tokens.
    # (llama.cpp's grammar also admits OVERLONG encodings such as F0 87 8C AB for 猫; those are
    # invalid UTF-8 and come out as U+FFFD, exactly as detokenizing everything at once does.)
    deltas, result = _run(engine, "hello", seed=3, grammar='root ::= ("猫" | "🐈"){16}')
    assert result.finish_reason == FinishReason.END_OF_SEQUENCE
    ids = _ids(deltas)
    assert _text(deltas) == engine.detokenize(ids, skip_special=True)
    whole = [d for d in deltas if d.text in ("猫", "🐈")]
    assert len({d.text for d in whole}) == 2 and len(whole) >= 8
    for delta in whole:  # each character: its own delta, one byte token per byte
        assert delta.token_ids == [BYTE_TOKEN_0 + b for b in delta.text.encode()]
    assert all(set(d.text) <= {"猫", "🐈", "\ufffd"} for d in deltas)


def test_seed_reproduces_and_differs(engine: LlamaCppEngine) -> None:
    first = _run(engine, seed=1234, max_tokens=40)
    _run(engine, "something else", seed=9, max_tokens=5)  # the KV cache holds another prompt
    again = _run(engine, seed=1234, max_tokens=40)
    other = _run(engine, seed=4321, max_tokens=40)
    assert _ids(first[0]) == _ids(again[0])
    assert first[1].seed == 1234
    assert _ids(first[0]) != _ids(other[0])
    random_seed = _run(engine, max_tokens=40)[1].seed
    replay = _run(engine, seed=random_seed, max_tokens=40)
    assert _ids(_run(engine, seed=random_seed, max_tokens=40)[0]) == _ids(replay[0])


def test_greedy_is_argmax(engine: LlamaCppEngine, model_dir: Path) -> None:
    prompt_ids = engine.tokenize("hello world", add_special=True, parse_special=False)
    reference = Llama(str(model_dir / "chat.gguf"), n_ctx=N_CTX, logits_all=True, verbose=False)
    try:
        reference.eval(prompt_ids)
        argmax = int(np.argmax(reference.scores[len(prompt_ids) - 1]))
    finally:
        reference.close()
    greedy = _ids(_run(engine, temperature=0.0, max_tokens=8)[0])
    top1 = _ids(_run(engine, temperature=1.5, top_k=1, seed=1, max_tokens=8)[0])
    top1_other_seed = _ids(_run(engine, temperature=1.5, top_k=1, seed=2, max_tokens=8)[0])
    assert greedy[0] == argmax
    assert greedy == top1 == top1_other_seed


def test_logit_bias_forces_a_token(engine: LlamaCppEngine) -> None:
    forced = _token_of(engine, " world")
    deltas, result = _run(engine, seed=5, logit_bias={forced: 100.0}, max_tokens=10)
    assert _ids(deltas) == [forced] * 10
    assert _text(deltas) == " world" * 10
    assert result.finish_reason == FinishReason.LENGTH


def test_penalties_and_their_window_reach_the_sampler(engine: LlamaCppEngine) -> None:
    # The random model's own logits are tiny (|logit| << 1): the biases decide, greedily.
    a, b, c = (_token_of(engine, x) for x in "abc")
    bias = {a: 30.0, b: 28.5, c: 27.0}

    def text(**kwargs: Any) -> str:
        return _text(_run(engine, temperature=0.0, logit_bias=bias, max_tokens=10, **kwargs)[0])

    assert text() == "a" * 10
    # Presence penalty 2: a (28) loses to b (28.5) while a is inside the window.
    assert text(presence_penalty=2.0, repeat_last_n=1) == "ab" * 5
    assert text(presence_penalty=2.0, repeat_last_n=2) == "abaabaabaa"
    assert text(presence_penalty=2.0, repeat_last_n=64) == "ab" + "a" * 8
    assert text(presence_penalty=2.0, repeat_last_n=0) == "a" * 10  # window 0: off
    # Frequency penalty accumulates: even c (27) gets its turns.
    assert set(text(frequency_penalty=2.0)) == {"a", "b", "c"}
    # Repeat penalty divides a's logit (30 -> 15) once it was seen.
    assert text(repeat_penalty=2.0, repeat_last_n=1) == "ab" * 5


def test_grammar_restricts_the_output(engine: LlamaCppEngine) -> None:
    deltas, result = _run(engine, seed=8, grammar="root ::= [ab]{5,20}", max_tokens=40)
    text = _text(deltas)
    assert 5 <= len(text) <= 20 and set(text) <= {"a", "b"}
    assert result.finish_reason == FinishReason.END_OF_SEQUENCE
    with pytest.raises(InvalidArgument) as bad:
        _run(engine, grammar="root ::= ((")
    assert bad.value.reason == "GRAMMAR_INVALID"


def test_json_schema_yields_valid_json(engine: LlamaCppEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    for seed in (1, 2, 3):
        deltas, result = _run(engine, seed=seed, json_schema=json.dumps(schema), max_tokens=100)
        assert result.finish_reason == FinishReason.END_OF_SEQUENCE
        value = json.loads(_text(deltas))
        assert isinstance(value["ok"], bool) and set(value) == {"ok"}


def test_stop_sequence_split_across_tokens_is_caught(engine: LlamaCppEngine) -> None:
    # Upper-case letters are byte tokens here: "STOP" spans four tokens.
    deltas, result = _run(engine, seed=1, grammar='root ::= "xyzSTOPabc"', stop=["STOP"])
    assert _text(deltas) == "xyz"
    assert not any(c in d.text for d in deltas for c in "STOP")
    assert result.finish_reason == FinishReason.STOP_SEQUENCE
    assert result.stop_sequence == "STOP"
    assert _ids(deltas)[-4:] == [BYTE_TOKEN_0 + ord(c) for c in "STOP"]  # four tokens
    assert result.completion_tokens == len(_ids(deltas))


def test_max_tokens_gives_length(engine: LlamaCppEngine) -> None:
    deltas, result = _run(engine, seed=2, max_tokens=17, ignore_eos=True)
    assert result.finish_reason == FinishReason.LENGTH
    assert result.completion_tokens == 17 == len(_ids(deltas))
    assert result.prompt_tokens == len(
        engine.tokenize("hello world", add_special=True, parse_special=False)
    )
    assert result.time_to_first_token_s > 0 and result.total_time_s >= result.time_to_first_token_s
    assert result.tokens_per_second > 0


def test_cancel_mid_stream_stops_within_one_token(engine: LlamaCppEngine) -> None:
    cancel = threading.Event()
    events = engine.generate(
        "hello",
        SamplingParams(seed=3, logit_bias={1: -100.0}),
        StoppingCriteria(ignore_eos=True),
        cancel=cancel,
    )
    received = 0
    result: GenerationResult | None = None
    for event in events:
        if isinstance(event, TokenDelta):
            received += len(event.token_ids)
            if received >= 5 and not cancel.is_set():
                cancel.set()
                at_cancel = received
        else:
            result = event
    assert result is not None and result.finish_reason == FinishReason.CANCELLED
    assert result.completion_tokens == at_cancel  # not one token sampled after the cancel
    deltas, after = _run(engine, seed=3, max_tokens=6, ignore_eos=True)
    assert after.finish_reason == FinishReason.LENGTH and len(_ids(deltas)) == 6


def test_closing_the_stream_early_leaves_the_engine_usable(engine: LlamaCppEngine) -> None:
    events = engine.generate(
        "hello", SamplingParams(seed=4), StoppingCriteria(ignore_eos=True), cancel=threading.Event()
    )
    next(iter(events))
    events.close()  # type: ignore[attr-defined]
    first = _run(engine, "hello there", seed=4, max_tokens=10)
    second = _run(engine, "hello there", seed=4, max_tokens=10)
    assert _ids(first[0]) == _ids(second[0])
    assert second[1].cached_prompt_tokens > 0  # the prefix was reused from the KV cache


def test_prompt_beyond_the_context(engine: LlamaCppEngine) -> None:
    with pytest.raises(InvalidArgument) as exc:
        engine.generate(
            "hello " * 300, SamplingParams(), StoppingCriteria(), cancel=threading.Event()
        )
    assert exc.value.reason == "CONTEXT_TOO_LONG"
    assert exc.value.metadata["context_length"] == str(N_CTX)
    assert int(exc.value.metadata["prompt_tokens"]) >= N_CTX


# --- log probabilities ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Iterator[Llama]:
    """The same model with logits for every position: the full distributions to check against."""
    llm = Llama(str(model_dir / "chat.gguf"), n_ctx=N_CTX, logits_all=True, verbose=False)
    yield llm
    llm.close()


def _reference_logprobs(reference: Llama, prompt: list[int], generated: list[int]) -> Any:
    """log-softmax over the whole vocabulary, in float64, at the position of each generated
    token (row i: the distribution generated[i] was drawn from)."""
    reference.reset()  # type: ignore[no-untyped-call]
    reference.eval(prompt + generated[:-1])
    logits = np.asarray(
        reference.scores[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dtype=np.float64
    )
    peak = logits.max(axis=1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))


def _logprobs(deltas: list[TokenDelta]) -> list[TokenLogprob]:
    entries = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in entries] == _ids(deltas), "one entry per token id, in order"
    return entries


def _piece(reference: Llama, token_id: int) -> bytes:
    """What a token adds to the output text, from llama.cpp (control tokens: nothing)."""
    buffer = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(reference._model.vocab, token_id, buffer, 64, 0, False)
    return buffer.raw[:n]


PROMPT = "hello world"
TOLERANCE = 1e-4  # float32 logits, evaluated in other batch shapes than the reference's


def test_logprobs_are_the_models_full_distribution(
    engine: LlamaCppEngine, reference: Llama
) -> None:
    deltas, result = _run(
        engine,
        PROMPT,
        seed=21,
        temperature=1.0,
        max_tokens=24,
        logprobs=LogprobOptions(top_logprobs=5),
    )
    entries = _logprobs(deltas)
    assert len(entries) == result.completion_tokens == 24
    prompt = engine.tokenize(PROMPT, add_special=True, parse_special=False)
    expected = _reference_logprobs(reference, prompt, _ids(deltas))
    assert np.exp(expected).sum(axis=1) == pytest.approx(np.ones(len(entries)))
    ranked_in_top = 0
    for row, entry in zip(expected, entries, strict=True):
        assert entry.logprob <= 0 and entry.logprob == pytest.approx(
            row[entry.token_id], abs=TOLERANCE
        )
        top = entry.top_logprobs
        assert len(top) == 5 and len({t.token_id for t in top}) == 5
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        for alternative in top:
            assert alternative.logprob == pytest.approx(row[alternative.token_id], abs=TOLERANCE)
            assert alternative.token == _piece(reference, alternative.token_id)
        # They are THE top five of the whole vocabulary (up to ties within the tolerance).
        assert values[-1] >= np.sort(row)[-5] - TOLERANCE
        # Normalized over the whole vocabulary: the top five alone hold less than all of it.
        assert sum(math.exp(v) for v in values) < 1.0
        matching = [t for t in top if t.token_id == entry.token_id]
        if matching:
            ranked_in_top += 1
            assert matching[0].logprob == entry.logprob
    assert 0 < ranked_in_top < len(entries)  # seed 21 samples inside and outside the top 5
    # The generated tokens' bytes are the output.
    assert b"".join(e.token for e in entries).decode(errors="replace") == _text(deltas)


def test_greedy_samples_the_top_1_and_n_zero_gives_only_the_sampled_token(
    engine: LlamaCppEngine,
) -> None:
    greedy, _ = _run(
        engine, PROMPT, temperature=0.0, max_tokens=8, logprobs=LogprobOptions(top_logprobs=3)
    )
    for entry in _logprobs(greedy):
        assert entry.top_logprobs[0].token_id == entry.token_id
        assert entry.top_logprobs[0].logprob == entry.logprob
    only_sampled, _ = _run(
        engine, PROMPT, temperature=0.0, max_tokens=8, logprobs=LogprobOptions(top_logprobs=0)
    )
    entries = _logprobs(only_sampled)
    assert _ids(only_sampled) == _ids(greedy)
    assert all(e.top_logprobs == [] for e in entries)
    assert [e.logprob for e in entries] == [e.logprob for e in _logprobs(greedy)]
    off, _ = _run(engine, PROMPT, temperature=0.0, max_tokens=8)
    assert _ids(off) == _ids(greedy) and all(d.logprobs == [] for d in off)  # off by default


def test_logprobs_are_taken_before_the_sampler_reshapes_the_distribution(
    engine: LlamaCppEngine, reference: Llama
) -> None:
    # A logit bias of +100 forces " world": the sampler sees probability ~1, the model did not.
    forced = _token_of(engine, " world")
    deltas, _ = _run(
        engine, PROMPT, seed=5, logit_bias={forced: 100.0}, max_tokens=4, logprobs=LogprobOptions()
    )
    assert _ids(deltas) == [forced] * 4
    prompt = engine.tokenize(PROMPT, add_special=True, parse_special=False)
    expected = _reference_logprobs(reference, prompt, _ids(deltas))
    for row, entry in zip(expected, _logprobs(deltas), strict=True):
        assert entry.logprob == pytest.approx(row[forced], abs=TOLERANCE)
        assert entry.logprob < math.log(0.5)  # the random model spreads its mass thinly


def test_a_delta_of_several_byte_tokens_carries_one_logprob_per_token(
    engine: LlamaCppEngine,
) -> None:
    deltas, _ = _run(
        engine, "hello", seed=3, grammar='root ::= "猫"{3}', logprobs=LogprobOptions(top_logprobs=2)
    )
    cats = [d for d in deltas if d.text == "猫"]
    assert len(cats) == 3
    for delta in cats:
        assert len(delta.token_ids) == len(delta.logprobs) == 3
        assert b"".join(lp.token for lp in delta.logprobs) == "猫".encode()
        assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in delta.logprobs)


def test_chat_streams_logprobs_too(engine: LlamaCppEngine) -> None:
    events = engine.chat(
        [ChatMessage(role=ChatRole.USER, content="hi")],
        SamplingParams(seed=2, logprobs=LogprobOptions(top_logprobs=1)),
        StoppingCriteria(max_tokens=6, ignore_eos=True),
        cancel=threading.Event(),
    )
    deltas, _ = _split(list(events))
    entries = _logprobs(deltas)
    assert len(entries) == 6 and all(len(e.top_logprobs) == 1 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob for e in entries)


def test_logprob_options_are_validated_at_the_call(engine: LlamaCppEngine) -> None:
    with pytest.raises(InvalidArgument) as bad:
        _run(engine, logprobs=LogprobOptions(top_logprobs=MAX_TOP_LOGPROBS + 1))
    assert [v.field for v in bad.value.field_violations] == ["logprobs.top_logprobs"]


# --- chat -----------------------------------------------------------------------------------

MESSAGES = [ChatMessage(role=ChatRole.USER, content="hi")]


def test_chat_with_the_models_template(engine: LlamaCppEngine) -> None:
    events = list(
        engine.chat(
            MESSAGES,
            SamplingParams(seed=1),
            StoppingCriteria(max_tokens=5),
            cancel=threading.Event(),
        )
    )
    deltas, result = _split(events)
    expected = engine.tokenize("<s>[user]hi", add_special=False, parse_special=True)
    assert expected[0] == 1 and expected.count(1) == 1  # BOS from the template, not twice
    assert result.prompt_tokens == len(expected)
    assert result.completion_tokens == len(_ids(deltas)) <= 5


def test_chat_with_an_explicit_template_adds_bos_once(engine: LlamaCppEngine) -> None:
    template = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    events = list(
        engine.chat(
            MESSAGES,
            SamplingParams(seed=1),
            StoppingCriteria(max_tokens=3),
            cancel=threading.Event(),
            chat_template=template,
        )
    )
    _, result = _split(events)
    assert result.prompt_tokens == len(
        engine.tokenize("<<hi>>", add_special=True, parse_special=True)
    )
    with pytest.raises(InvalidArgument) as bad:
        engine.chat(
            MESSAGES,
            SamplingParams(),
            StoppingCriteria(),
            cancel=threading.Event(),
            chat_template="{% for %}",
        )
    assert bad.value.reason == "CHAT_TEMPLATE_INVALID"


def test_chat_without_any_template(model_dir: Path) -> None:
    engine = LlamaCppEngine()
    engine.load(
        model_dir / "plain.gguf",
        LlmLoadOptions(),
        progress=lambda f, m: None,
        cancel=threading.Event(),
    )
    try:
        with pytest.raises(FailedPrecondition) as exc:
            engine.chat(MESSAGES, SamplingParams(), StoppingCriteria(), cancel=threading.Event())
        assert exc.value.reason == "NO_CHAT_TEMPLATE"
        assert "chat_template" in exc.value.message
    finally:
        engine.unload()


# --- tokens ---------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(engine: LlamaCppEngine) -> None:
    text = "hello world, 猫 🐈 and the rest"
    ids = engine.tokenize(text, add_special=True, parse_special=False)
    assert ids[0] == 1
    assert engine.detokenize(ids, skip_special=True) == text
    assert engine.tokenize("<s>", add_special=False, parse_special=True) == [1]
    with pytest.raises(InvalidArgument):
        engine.detokenize([100_000], skip_special=True)
