"""FakeEngine: the protocol-test stand-in behaves like the real engine's contract."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

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
)
from services.worker.engines.fake import (
    BYTE_OFFSET,
    LOG_NORMALIZER,
    N_VOCAB,
    FakeEngine,
    fake_token_logprob,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"anything")
    return path


def _loaded(model_file: Path, **kwargs: object) -> FakeEngine:
    engine = FakeEngine(**kwargs)  # type: ignore[arg-type]
    engine.load(model_file, LlmLoadOptions(), progress=lambda f, m: None, cancel=threading.Event())
    return engine


def _split(events: list[GenerationEvent]) -> tuple[list[TokenDelta], GenerationResult]:
    *deltas, result = events
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert isinstance(result, GenerationResult)
    return deltas, result  # type: ignore[return-value]


def _run(engine: FakeEngine, prompt: str, **stopping: object) -> list[GenerationEvent]:
    return list(
        engine.generate(
            prompt,
            SamplingParams(seed=7),
            StoppingCriteria(**stopping),  # type: ignore[arg-type]
            cancel=threading.Event(),
        )
    )


def test_load_reports_progress_and_the_loaded_model(model_file: Path) -> None:
    engine = FakeEngine()
    seen: list[tuple[float, str]] = []
    info = engine.load(
        model_file,
        LlmLoadOptions(context_length=64),
        progress=lambda f, m: seen.append((f, m)),
        cancel=threading.Event(),
    )
    assert [f for f, _ in seen] == [0.0, 0.5, 1.0]
    assert info.context_length == 64 and info.path == str(model_file)
    assert engine.loaded == info
    engine.unload()
    engine.unload()
    assert engine.loaded is None


def test_load_errors_missing_file_and_cancel(tmp_path: Path, model_file: Path) -> None:
    engine = FakeEngine()
    with pytest.raises(NotFound) as missing:
        engine.load(
            tmp_path / "nope.gguf",
            LlmLoadOptions(),
            progress=lambda f, m: None,
            cancel=threading.Event(),
        )
    assert missing.value.reason == "FILE_NOT_FOUND"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        engine.load(model_file, LlmLoadOptions(), progress=lambda f, m: None, cancel=cancel)
    assert engine.loaded is None


def test_generate_echoes_the_prompt_then_one_result(model_file: Path) -> None:
    engine = _loaded(model_file)
    deltas, result = _split(_run(engine, "héllo 🐈"))
    assert "".join(d.text for d in deltas) == "héllo 🐈"
    # Multi-byte characters arrive whole: é is 2 tokens, the cat 4, each in one delta.
    assert [d.text for d in deltas] == list("héllo 🐈")
    assert [len(d.token_ids) for d in deltas] == [1, 2, 1, 1, 1, 1, 4]
    assert result.finish_reason == FinishReason.END_OF_SEQUENCE
    assert result.completion_tokens == len("héllo 🐈".encode())
    assert result.prompt_tokens == 1 + len("héllo 🐈".encode())  # BOS + bytes
    assert result.seed == 7


def test_max_tokens_gives_length(model_file: Path) -> None:
    engine = _loaded(model_file, reply="abcdef")
    deltas, result = _split(_run(engine, "x", max_tokens=4))
    assert "".join(d.text for d in deltas) == "abcd"
    assert result.finish_reason == FinishReason.LENGTH and result.completion_tokens == 4


def test_stop_sequence_is_cut_and_reported(model_file: Path) -> None:
    engine = _loaded(model_file, reply="one two STOP three")
    deltas, result = _split(_run(engine, "x", stop=["STOP", "zzz"]))
    assert "".join(d.text for d in deltas) == "one two "
    assert all("S" not in d.text for d in deltas)
    assert result.finish_reason == FinishReason.STOP_SEQUENCE
    assert result.stop_sequence == "STOP"
    # Every generated id is in exactly one delta, even those whose text was dropped.
    assert sum(len(d.token_ids) for d in deltas) == result.completion_tokens == len("one two STOP")


def test_ignore_eos_repeats_until_the_context_is_full(model_file: Path) -> None:
    engine = FakeEngine(reply="ab")
    engine.load(
        model_file,
        LlmLoadOptions(context_length=10),
        progress=lambda f, m: None,
        cancel=threading.Event(),
    )
    deltas, result = _split(_run(engine, "x", ignore_eos=True))
    assert result.finish_reason == FinishReason.CONTEXT_FULL
    assert result.prompt_tokens + result.completion_tokens == 10
    assert "".join(d.text for d in deltas) == "abababab"


def test_prompt_beyond_the_context_is_context_too_long(model_file: Path) -> None:
    engine = FakeEngine()
    engine.load(
        model_file,
        LlmLoadOptions(context_length=8),
        progress=lambda f, m: None,
        cancel=threading.Event(),
    )
    with pytest.raises(InvalidArgument) as exc:
        engine.generate(
            "a long prompt", SamplingParams(), StoppingCriteria(), cancel=threading.Event()
        )
    assert exc.value.reason == "CONTEXT_TOO_LONG"
    assert exc.value.metadata == {"prompt_tokens": "14", "context_length": "8"}


def test_random_seed_is_reported_and_bad_seed_rejected(model_file: Path) -> None:
    engine = _loaded(model_file)
    seeds = set()
    for _ in range(3):
        *_, result = engine.generate(
            "x", SamplingParams(), StoppingCriteria(), cancel=threading.Event()
        )
        assert isinstance(result, GenerationResult)
        seeds.add(result.seed)
    assert len(seeds) > 1  # three draws from 2^32 values
    with pytest.raises(InvalidArgument):
        engine.generate(
            "x", SamplingParams(seed=2**40), StoppingCriteria(), cancel=threading.Event()
        )


def test_cancel_mid_stream_stops_within_one_token_and_next_request_works(
    model_file: Path,
) -> None:
    engine = _loaded(model_file, reply="x" * 1000, token_delay_s=0.002)
    cancel = threading.Event()
    events = engine.generate("p", SamplingParams(), StoppingCriteria(), cancel=cancel)
    received = 0
    result: GenerationResult | None = None
    for event in events:
        if isinstance(event, TokenDelta):
            received += len(event.token_ids)
            if received == 5:
                cancel.set()
        else:
            result = event
    assert result is not None
    assert result.finish_reason == FinishReason.CANCELLED
    assert result.completion_tokens == 5  # not one token more after the cancel
    started = time.perf_counter()
    _, again = _split(_run(engine, "p", max_tokens=3))
    assert again.finish_reason == FinishReason.LENGTH
    assert time.perf_counter() - started < 5


def test_cancel_wakes_a_waiting_token_delay(model_file: Path) -> None:
    engine = _loaded(model_file, reply="abc", token_delay_s=30.0)
    cancel = threading.Event()
    threading.Timer(0.05, cancel.set).start()
    started = time.perf_counter()
    events = list(engine.generate("p", SamplingParams(), StoppingCriteria(), cancel=cancel))
    assert time.perf_counter() - started < 5
    assert isinstance(events[-1], GenerationResult)
    assert events[-1].finish_reason == FinishReason.CANCELLED


def test_chat_uses_the_builtin_format_and_template_errors(model_file: Path) -> None:
    engine = _loaded(model_file)
    messages = [
        ChatMessage(role=ChatRole.SYSTEM, content="be brief"),
        ChatMessage(role=ChatRole.USER, content="hi there"),
    ]
    deltas, result = _split(
        list(engine.chat(messages, SamplingParams(), StoppingCriteria(), cancel=threading.Event()))
    )
    assert "".join(d.text for d in deltas) == "hi there"
    assert engine.last_prompt == "<|system|>be brief\n<|user|>hi there\n<|assistant|>"
    assert result.prompt_tokens == 1 + len(engine.last_prompt.encode())

    bare = _loaded(model_file, has_chat_template=False)
    with pytest.raises(FailedPrecondition) as exc:
        bare.chat(messages, SamplingParams(), StoppingCriteria(), cancel=threading.Event())
    assert exc.value.reason == "NO_CHAT_TEMPLATE"
    assert "chat_template" in exc.value.message
    list(
        bare.chat(
            messages,
            SamplingParams(),
            StoppingCriteria(),
            cancel=threading.Event(),
            chat_template="{{ messages }}",
        )
    )
    assert bare.last_chat_template == "{{ messages }}"


def test_tokenize_detokenize_round_trip_and_requires_a_model(model_file: Path) -> None:
    engine = FakeEngine()
    with pytest.raises(FailedPrecondition) as exc:
        engine.tokenize("x", add_special=True, parse_special=False)
    assert exc.value.reason == "MODEL_NOT_LOADED"
    engine = _loaded(model_file)
    ids = engine.tokenize("ab 猫", add_special=True, parse_special=False)
    assert ids[0] == 1 and len(ids) == 1 + len("ab 猫".encode())
    assert engine.detokenize(ids, skip_special=True) == "ab 猫"
    assert engine.detokenize(ids, skip_special=False) == "<s>ab 猫"
    assert engine.tokenize("<s>x", add_special=False, parse_special=True)[0] == 1
    with pytest.raises(InvalidArgument):
        engine.detokenize([10_000], skip_special=True)


def _run_logprobs(
    engine: FakeEngine, prompt: str, logprobs: LogprobOptions | None, **stopping: object
) -> tuple[list[TokenDelta], GenerationResult]:
    return _split(
        list(
            engine.generate(
                prompt,
                SamplingParams(seed=7, logprobs=logprobs),
                StoppingCriteria(**stopping),  # type: ignore[arg-type]
                cancel=threading.Event(),
            )
        )
    )


def test_logprobs_are_the_documented_fixed_distribution(model_file: Path) -> None:
    engine = _loaded(model_file, reply="aé")
    deltas, _ = _run_logprobs(engine, "x", LogprobOptions(top_logprobs=3))
    # "é" is two byte tokens in one delta: one entry per token id, in order.
    assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas] == [1, 2]
    entries = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in entries] == [i for d in deltas for i in d.token_ids]
    assert b"".join(lp.token for lp in entries) == "aé".encode()
    a = BYTE_OFFSET + ord("a")
    first = entries[0]
    assert [t.token_id for t in first.top_logprobs] == [a, a + 1, a + 2]
    assert [t.token for t in first.top_logprobs] == [b"a", b"b", b"c"]
    expected = [-LOG_NORMALIZER, -1 - LOG_NORMALIZER, -2 - LOG_NORMALIZER]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(expected)
    assert first.logprob == first.top_logprobs[0].logprob
    # A distribution: the whole vocabulary's probabilities sum to 1.
    everything = fake_token_logprob(a, N_VOCAB)
    assert sum(math.exp(t.logprob) for t in everything.top_logprobs) == pytest.approx(1.0)
    assert len({t.token_id for t in everything.top_logprobs}) == N_VOCAB  # ids wrap around


def test_logprobs_off_by_default_and_n_zero_and_bounds(model_file: Path) -> None:
    engine = _loaded(model_file, reply="abc")
    off, _ = _run_logprobs(engine, "x", None)
    assert off and all(d.logprobs == [] for d in off)
    sampled_only, _ = _run_logprobs(engine, "x", LogprobOptions(top_logprobs=0))
    entries = [lp for d in sampled_only for lp in d.logprobs]
    assert len(entries) == 3 and all(lp.top_logprobs == [] for lp in entries)
    assert all(lp.logprob == pytest.approx(-LOG_NORMALIZER) for lp in entries)
    with pytest.raises(InvalidArgument) as bad:
        _run_logprobs(engine, "x", LogprobOptions(top_logprobs=MAX_TOP_LOGPROBS + 1))
    assert [v.field for v in bad.value.field_violations] == ["logprobs.top_logprobs"]


def test_logprobs_of_held_back_tokens_come_with_their_ids(model_file: Path) -> None:
    # The stop sequence's tokens are held back, then dropped from the text: their ids (and
    # log probabilities) still arrive, once.
    engine = _loaded(model_file, reply="ab STOP cd")
    deltas, result = _run_logprobs(engine, "x", LogprobOptions(), stop=["STOP"])
    ids = [i for d in deltas for i in d.token_ids]
    assert [lp.token_id for d in deltas for lp in d.logprobs] == ids
    assert len(ids) == result.completion_tokens == len("ab STOP")
